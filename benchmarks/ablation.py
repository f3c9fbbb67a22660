"""Ablation at equal wall-clock: MoCo v2 vs + dual view vs + each hard-negative mode vs both, on Fashion-MNIST.

Each variant trains the `fashion-mnist-cpu` preset (as shipped, or with
``--set`` overrides) from the same initialisation on the same shards for the
same wall-clock budget (``--minutes``, the trainer's ``train.time_budget``: its
cosine schedule is re-planned from the measured pace to end at the budget), so a
variant that costs more per step — the symmetric loss encodes four views a step,
selection costs a top-k — pays for it in steps, as it would for a user. The
hard-negative warm-up is counted in steps (``--warmup-steps``), since short
budgets may not reach a whole epoch. Each run is scored with `mocoplus evaluate`'s
retrieval suite (weighted kNN-200, 1/5/20-NN, precision@10; 60k training images
as memory, 10k test queries) and linear probe, key encoder. Prints JSON with every
run and mean ± std per variant over the seeds, and a Markdown table for docs/results.md.
Run it on a quiet machine: the budget is wall-clock.

    mocoplus ingest fashion-mnist:train --out shards/fmnist-train
    mocoplus ingest fashion-mnist:test --out shards/fmnist-test
    python benchmarks/ablation.py --train shards/fmnist-train --test shards/fmnist-test --minutes 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from pipeline.evaluate.evaluate import evaluate
from pipeline.train.run_config import load_config, with_data
from pipeline.train.trainer import train

VARIANTS = {
    "MoCo v2": ["model.dual_view=none", "model.negatives=all"],
    "+ dual view (symmetric)": ["model.dual_view=symmetric", "model.negatives=all"],
    "+ band": ["model.dual_view=none", "model.negatives=band"],
    "+ debiased": ["model.dual_view=none", "model.negatives=debiased"],
    "+ hard-weighted": ["model.dual_view=none", "model.negatives=hard-weighted"],
    "both (symmetric + band)": ["model.dual_view=symmetric", "model.negatives=band"],
}
COLUMNS = ("weighted_knn200", "nn1", "nn5", "nn20", "precision_at_10", "linear_top1")
HEADINGS = ("kNN-200", "1-NN", "5-NN", "20-NN", "P@10", "linear")


def run_variant(name: str, seed: int, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    overrides = [
        *VARIANTS[name],
        f"model.warmup_steps={args.warmup_steps}",
        "model.warmup_epochs=0",
        *args.overrides,
        f"train.seed={seed}",
        f"train.time_budget={args.minutes * 60}",
        "train.epochs=1000",  # the budget ends the run
        "train.checkpoint_every=0",
    ]
    config = with_data(load_config("fashion-mnist-cpu", overrides), train=args.train)
    run_dir = folder / f"{name.split(' (')[0].replace(' ', '_').replace('+', 'plus')}-{seed}"
    result = train(config, run_dir, progress=args.progress)
    scores = evaluate(run_dir, args.train, args.test, checkpoint="last", workers=args.workers, progress=False)
    key = scores.encoders["key"]
    return {
        "variant": name,
        "seed": seed,
        "steps": result.steps,
        "images_per_s": result.images_per_s,
        "final_loss": result.final_loss,
        **key.retrieval.as_dict(),
        "linear_top1": key.linear_top1,
    }


def summarise(runs: list[dict[str, object]]) -> dict[str, dict[str, str]]:
    """Mean ± sample std (in %) per variant and column, and the mean steps each variant reached."""
    table: dict[str, dict[str, str]] = {}
    for name in VARIANTS:
        mine = [run for run in runs if run["variant"] == name]
        if not mine:
            continue
        table[name] = {"steps": f"{statistics.mean(int(run['steps']) for run in mine):,.0f}"}  # type: ignore[arg-type]
        for column in COLUMNS:
            values = [100 * float(run[column]) for run in mine]  # type: ignore[arg-type]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            table[name][column] = f"{statistics.mean(values):.2f}{spread}"
    return table


def markdown(table: dict[str, dict[str, str]], seeds: int, minutes: float) -> str:
    unit = f"{seeds} seed{'s' if seeds > 1 else ''}, {minutes:g} min each"
    lines = [f"| variant ({unit}) | steps | " + " | ".join(HEADINGS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['steps']} | " + " | ".join(row[column] for column in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="labelled training shards (memory and probe data)")
    parser.add_argument("--test", required=True, help="labelled held-out shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget of every run")
    parser.add_argument("--warmup-steps", type=int, default=300, help="steps of all negatives before selection")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra config override for every variant, e.g. augment.small_crops=2",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ablation-") as temp:
        folder = args.out or Path(temp)
        runs = []
        for seed in args.seeds:  # seed-major: an interrupted run still has whole seeds of every variant
            for name in args.variants:
                runs.append(run_variant(name, seed, args, folder))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    table = summarise(runs)
    report = {
        "benchmark": "ablation",
        "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "minutes_per_run": args.minutes,
        "warmup_steps": args.warmup_steps,
        "overrides": args.overrides,
        "runs": runs,
        "mean_std_percent": table,
        "markdown": markdown(table, len(args.seeds), args.minutes),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
