"""The embed stage: a shard set through a model bundle (ONNX Runtime) into an embedding set."""
