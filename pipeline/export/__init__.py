"""The export stage: a run's encoder → a model bundle (TorchScript, ONNX, optional int8)."""
