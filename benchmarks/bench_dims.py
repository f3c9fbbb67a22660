"""How many whitened dimensions does retrieval need? The suite at D = 2,048 … 128, per trained run (seed).

For each run: the key encoder's 4×4-grid features of the training set (memory)
and the held-out set (queries) in one pass, then for every D the PCA whitening
fitted on the memory set keeping the leading D directions (`mocoplus.whitening`,
what `mocoplus export --dims D` folds into the graph), scored by the retrieval
suite (same metric, k and split at every D); and the auto-planned FAISS index
of the memory set at that D (`pipeline.index.build`): its bytes, queries/s and
recall@10. The summary gives each D's mean over the runs and its largest
shortfall from the full whitening on any score.

    python benchmarks/bench_dims.py --runs demo-out/run runs/seed1 runs/seed2 \\
        --train demo-out/shards/train --test demo-out/shards/test > dims.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import emit, log, report
from torch.nn import functional as F

from pipeline.evaluate.evaluate import run_features, whitened
from pipeline.evaluate.retrieval import retrieval_scores


def index_numbers(vectors: np.ndarray, scratch: Path) -> dict[str, float]:
    """The auto-planned index of ``vectors``: its file size, tuned queries/s and recall@10."""
    from artifacts.embedding_set import write_embedding_set
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig

    embeddings = write_embedding_set(scratch / "embeddings", vectors, bundle_hash="bench-dims")
    info = build_index(embeddings, scratch / "index", IndexConfig(), progress=False).info
    recall = info["recall_at_k"]
    return {"factory": info["factory"], "bytes": info["bytes"], "qps": recall.get("qps"), "recall": recall["recall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="trained run folders (one per seed)")
    parser.add_argument("--train", required=True, help="training shards: the memory set and the whitening's data")
    parser.add_argument("--test", required=True, help="held-out shards: the queries")
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 1024, 512, 256, 128])
    parser.add_argument("--no-index", action="store_true", help="score only, build no index")
    args = parser.parse_args()
    started, runs = time.perf_counter(), {}
    for run in args.runs:
        log("dims", f"{run}: features")
        bank, bank_labels = run_features(Path(run), args.train, progress=False)
        queries, query_labels = run_features(Path(run), args.test, progress=False)
        per_dim = {}
        for dims in args.dims:
            white_bank, white_queries = whitened(bank, queries, dims)
            scores = retrieval_scores(white_bank, bank_labels, white_queries, query_labels).as_dict()
            entry = {"dim": int(white_bank.shape[1]), **scores}
            if not args.no_index and run == args.runs[0]:
                with tempfile.TemporaryDirectory(prefix="bench-dims-") as scratch:
                    entry["index"] = index_numbers(F.normalize(white_bank, dim=1).numpy(), Path(scratch))
            per_dim[str(dims)] = entry
            log("dims", f"{run} D={dims}: {scores}")
        runs[run] = per_dim
    full = str(max(args.dims))
    summary = {}
    for dims in map(str, args.dims):
        names = [name for name in runs[args.runs[0]][dims] if name not in ("dim", "index")]
        mean = {name: float(np.mean([runs[run][dims][name] for run in runs])) for name in names}
        shortfall = max(
            float(np.mean([runs[run][full][name] - runs[run][dims][name] for run in runs])) for name in names
        )
        summary[dims] = {"mean": mean, "largest_mean_shortfall_points": round(100 * shortfall, 2)}
    results = {"runs": runs, "summary": summary, "train": args.train, "test": args.test}
    emit(report("whitening_dims", results, started=started))


if __name__ == "__main__":
    main()
