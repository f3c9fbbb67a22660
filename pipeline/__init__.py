"""The stages of the embedding pipeline, each an artifact in and an artifact out (DESIGN §2–3)."""
