"""The artifact contracts between the stages: each format's reader and writer side by side.

Torch-free on purpose (docs/architecture.md, "Packages and what each may
import"): the stages that write an artifact and the service and search that
read it agree on one module per format, and a serving image without PyTorch
can still open every artifact it needs.
"""
