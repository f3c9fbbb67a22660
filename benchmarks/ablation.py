"""Ablation: MoCo v2 vs + dual-view vs + hard negatives vs both, on Fashion-MNIST at equal compute.

Each variant trains the `fashion-mnist-cpu` preset's network from the same
initialisation on the same shards for the same number of query-encoder views
(``--views``): the symmetric loss encodes two views a step, so one-sided
variants get twice the steps. Each run is then scored by `mocoplus evaluate`'s
protocols (weighted kNN k=200 τ=0.1 with the training shards as memory, and a
linear probe) for the key and the query encoder. Prints JSON with every run
and the mean ± std per variant, and a Markdown table for the README.

    mocoplus ingest fashion-mnist:train --out shards/fmnist-train
    mocoplus ingest fashion-mnist:test --out shards/fmnist-test
    python benchmarks/ablation.py --train shards/fmnist-train --test shards/fmnist-test --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline.evaluate import evaluate
from pipeline.run_config import load_config, with_data
from pipeline.train import train

VARIANTS = {
    "MoCo v2": ["model.dual_view=none", "model.negatives=all"],
    "+ dual-view": ["model.dual_view=symmetric", "model.negatives=all"],
    "+ hard negatives": ["model.dual_view=none", "model.negatives=band"],
    "both (preset)": ["model.dual_view=symmetric", "model.negatives=band"],
}


def run_variant(name: str, seed: int, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    overrides = [
        *VARIANTS[name],
        *args.overrides,
        f"train.seed={seed}",
        f"train.global_batch={args.batch}",
        "train.checkpoint_every=0",
    ]
    config = load_config("fashion-mnist-cpu", overrides)
    views_per_step = 2 if config.model.dual_view == "symmetric" else 1
    steps = args.views // (args.batch * views_per_step)
    config = load_config("fashion-mnist-cpu", [*overrides, f"train.max_steps={steps}", "train.epochs=1000"])
    config = with_data(config, train=args.train)
    run_dir = folder / f"{name.replace(' ', '_').replace('+', 'plus')}-{seed}"
    started = time.perf_counter()
    result = train(config, run_dir, progress=args.progress)
    seconds = time.perf_counter() - started
    scores = evaluate(run_dir, args.train, args.test, checkpoint="last", workers=args.workers)
    return {
        "variant": name,
        "seed": seed,
        "steps": result.steps,
        "query_views": result.steps * args.batch * views_per_step,
        "train_seconds": seconds,
        "final_loss": result.final_loss,
        **{f"{encoder}_{metric}": value for encoder, s in scores.encoders.items() for metric, value in vars(s).items()},
    }


def summarise(runs: list[dict[str, object]]) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for name in VARIANTS:
        mine = [run for run in runs if run["variant"] == name]
        table[name] = {}
        for column in ("key_knn_top1", "query_knn_top1", "key_linear_top1", "query_linear_top1"):
            values = [100 * float(run[column]) for run in mine]  # type: ignore[arg-type]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            table[name][column] = f"{statistics.mean(values):.2f}{spread}"
    return table


def markdown(table: dict[str, dict[str, str]], seeds: int) -> str:
    header = f"| variant ({seeds} seed{'s' if seeds > 1 else ''}) | kNN key | kNN query | linear key | linear query |"
    lines = [header, "|---|---|---|---|---|"]
    for name, row in table.items():
        cells = " | ".join(row[c] for c in ("key_knn_top1", "query_knn_top1", "key_linear_top1", "query_linear_top1"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="labelled training shards (memory and probe data)")
    parser.add_argument("--test", required=True, help="labelled held-out shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--views", type=int, default=120_000, help="query-encoder views per run (equal compute)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra config override for every variant, e.g. model.warmup_epochs=0 (the preset's one-epoch "
        "hard-negative warm-up would cover a whole symmetric run at the default budget)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ablation-") as temp:
        folder = args.out or Path(temp)
        runs = [run_variant(name, seed, args, folder) for seed in args.seeds for name in VARIANTS]
    table = summarise(runs)
    report = {
        "benchmark": "ablation",
        "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "views_per_run": args.views,
        "overrides": args.overrides,
        "batch": args.batch,
        "runs": runs,
        "mean_std_percent": table,
        "markdown": markdown(table, len(args.seeds)),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
