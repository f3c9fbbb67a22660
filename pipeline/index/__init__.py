"""The index stage: an embedding set → a planned, tuned (and optionally sharded) FAISS index bundle."""
