"""The training stage: run config and presets, the shared training step, the trainer and its checkpoints."""
