"""The evaluation stage: kNN, the retrieval suite, label-free baselines and the linear probe of a run."""
