"""The HTTP service alone: the FastAPI app, its micro-batcher, request payloads, guards and metrics.

It reads the model and index bundles through `artifacts` and never imports
torch (docs/architecture.md, "Packages and what each may import").
"""
