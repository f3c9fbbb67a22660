"""The data stage: image sources → shard sets (ingest, verify) → training and evaluation streams."""
