"""The online side: model-bundle loading, embedding and search; never imports torch (DESIGN §2)."""
