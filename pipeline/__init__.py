"""The stages of the embedding pipeline, each an artifact in and an artifact out.

One package per stage (data, train, evaluate, export, index) and the
single-module stages (embed, search); docs/architecture.md, "How data flows
through a run", shows how they chain.
"""
