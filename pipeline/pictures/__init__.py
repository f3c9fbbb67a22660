"""Pictures of the pipeline's results: search result grids, training curves, embedding maps (matplotlib)."""
