"""Ablation at equal wall-clock on Fashion-MNIST, scored on the served embedding, accumulated across sessions.

Every variant trains the `fashion-mnist-cpu` preset (with the variant's
overrides) from the same initialisation per seed for the same *wall-clock
budget* (``--minutes``), then `mocoplus evaluate` scores its **served
embedding** — key encoder, the run's grid, whitening and kept dimensions, as
`mocoplus export` ships it — with the retrieval suite (weighted kNN-200,
1/5/20-NN, precision@10; 60,000 training images as memory, 10,000 test
queries) and the linear probe.

Equal wall-clock without a quiet machine: each variant's pace (images/s of the
real training loop, data loading included) is measured once, quietly, in a
short calibration run (``--calibrate-steps``), and the budget becomes a fixed
step count, ``minutes × pace``. A variant that costs more per step (the
symmetric loss encodes four views, multi-crop adds small ones) gets fewer steps,
as it would for a user with that budget, and a run slowed by other work on the
machine still trains exactly as far. The paces are kept in the results file
with the machine that measured them, and reused, so runs from later sessions
(on other machines) join the same table.

Runs accumulate in ``--results`` (JSON lines, one per finished run; a run
already there for the same variant, seed, budget and ``--set`` overrides is
skipped, and one stopped early is not written), so the 3 seeds
× 7 variants × 15 minutes (over 5 hours of 2 cores) can be spread over
sessions. Prints JSON with every run and mean ± sample std per variant, the
Markdown table of docs/results.md, and each variant against the preset: the
difference of means per score and whether it is beyond the seeds' spread (at
least two seeds a side, larger than either side's range), the rule by which
the preset moves (`winners`).

    mocoplus ingest fashion-mnist:train --out shards/fmnist-train
    mocoplus ingest fashion-mnist:test --out shards/fmnist-test
    python benchmarks/ablation.py --train shards/fmnist-train --test shards/fmnist-test \\
        --minutes 15 --seeds 0 1 2 --results benchmarks/results/ablation-15min.jsonl
    python benchmarks/ablation.py --results benchmarks/results/ablation-15min.jsonl --report   # the table only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cpu_model_name, environment, load_average, log  # benchmarks/ is the script's folder

from pipeline.evaluate.evaluate import evaluate
from pipeline.train.run_config import RunConfig, load_config, with_data
from pipeline.train.trainer import train

PRESET = "fashion-mnist-cpu"
# The preset is the seed paper's hard negatives alone (band, one-sided loss); the rest change one thing each.
VARIANTS: dict[str, list[str]] = {
    "preset (band negatives)": [],
    "MoCo v2 (no enhancement)": ["model.negatives=all"],
    "dual view alone": ["model.dual_view=symmetric", "model.negatives=all"],
    "both enhancements": ["model.dual_view=symmetric"],
    "+ multi-crop (2 × 16 px)": ["augment.small_crops=2"],
    "+ mild gray augmentation": ["augment.scale=[0.8, 1.0]", "augment.flip_p=0", "augment.rotation=10"],
    "+ plain key BN": ["model.key_bn=plain"],
}
COLUMNS = ("weighted_knn200", "nn1", "nn5", "nn20", "precision_at_10", "linear_top1")
HEADINGS = ("kNN-200", "1-NN", "5-NN", "20-NN", "P@10", "linear")
SEEDS_TO_MOVE = 3  # seeds a side before a variant may take the preset's place


def variant_config(name: str, seed: int, extra: list[str], train_shards: str, **train_settings: Any) -> RunConfig:
    """The preset with the variant's overrides, the common ones and ``train_settings`` (``train.<key>=<value>``)."""
    settings = [f"train.{key}={value}" for key, value in train_settings.items()]
    overrides = [*VARIANTS[name], *extra, f"train.seed={seed}", "train.time_budget=0", *settings]
    return with_data(load_config(PRESET, overrides), train=train_shards)


def measure_pace(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Images/s of the variant's real training loop over ``--calibrate-steps`` steps (data loading included)."""
    config = variant_config(name, 0, args.overrides, args.train, max_steps=args.calibrate_steps, checkpoint_every=0)
    log("ablation", f"calibrating {name!r}: {args.calibrate_steps} steps (keep the machine quiet)")
    result = train(config, folder / f"pace-{slug(name)}", progress=False)
    return {
        "kind": "pace",
        "variant": name,
        "overrides": args.overrides,
        "images_per_s": result.images_per_s,
        "batch": config.train.global_batch,
        "calibrate_steps": args.calibrate_steps,
        "cpu": cpu_model_name(),
        "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run_variant(name: str, seed: int, steps: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Train ``steps`` steps, then score the served embedding (key encoder, as exported)."""
    config = variant_config(
        name, seed, args.overrides, args.train, max_steps=steps, epochs=10_000, checkpoint_every=0, keep_last=1
    )
    run_dir = folder / f"{slug(name)}-{seed}"
    started = time.perf_counter()
    result = train(config, run_dir, progress=args.progress)
    trained_s = time.perf_counter() - started
    if result.steps < steps:  # stopped (Ctrl-C, SIGTERM): a short run is not this budget's result
        raise SystemExit(
            f"{name!r} seed {seed} stopped at step {result.steps:,} of {steps:,} ({result.stopped_by}): not recorded"
        )
    scores = evaluate(run_dir, args.train, args.test, checkpoint="last", workers=args.workers, encoders=("key",))
    key = scores.encoders["key"]
    return {
        "kind": "run",
        "variant": name,
        "seed": seed,
        "minutes": args.minutes,
        "overrides": args.overrides,
        "steps": result.steps,
        "train_s": round(trained_s, 1),
        "images_per_s": result.images_per_s,
        "final_loss": result.final_loss,
        "embedding": f"grid {config.model.embedding_grid}, {config.model.embedding_whitening} "
        f"whitening, {config.model.embedding_dims or 'all'} dims",
        **key.retrieval.as_dict(),
        "linear_top1": key.linear_top1,
        "cpu": cpu_model_name(),
        "load_average": load_average(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def git_commit() -> str | None:
    try:
        command = ["git", "rev-parse", "--short", "HEAD"]
        here = Path(__file__).parent
        return subprocess.run(command, capture_output=True, text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def read_results(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr, flush=True)


def percentages(runs: list[dict[str, Any]], name: str, column: str) -> list[float]:
    return [100 * float(run[column]) for run in runs if run["variant"] == name and run.get(column) is not None]


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Mean ± sample std (in %) per variant and column, the seeds counted and the mean steps reached."""
    table: dict[str, dict[str, str]] = {}
    for name in VARIANTS:
        mine = [run for run in runs if run["variant"] == name]
        if not mine:
            continue
        table[name] = {"seeds": str(len(mine)), "steps": f"{statistics.mean(int(run['steps']) for run in mine):,.0f}"}
        for column in COLUMNS:
            values = percentages(runs, name, column)
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            table[name][column] = f"{statistics.mean(values):.2f}{spread}" if values else "—"
    return table


def by_seed(runs: list[dict[str, Any]], name: str) -> dict[int, dict[str, Any]]:
    """The variant's runs by seed, in seed order (a later run of a seed, from a merged file, replaces one before)."""
    return dict(sorted({run["seed"]: run for run in runs if run["variant"] == name}.items()))


def against_preset(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each variant's mean minus the preset's over the seeds both have, per column, and whether that difference
    is beyond the seeds' spread: at least two seeds and larger than either side's range (max − min), so the worst
    seed of the better one is still about level with the best of the other. What `winners` moves the preset by.

    Over the same seeds: a seed fixes every variant's initial weights, and one that is poor for all would
    otherwise favour the variants that have not run it yet."""
    preset = next(iter(VARIANTS))
    preset_runs = by_seed(runs, preset)
    verdicts: dict[str, dict[str, dict[str, Any]]] = {}
    for name in VARIANTS:
        mine_runs = by_seed(runs, name)
        common = [seed for seed in mine_runs if seed in preset_runs]
        if name == preset or not common:
            continue
        verdicts[name] = {}
        for column in COLUMNS:
            mine = percentages([mine_runs[seed] for seed in common], name, column)
            theirs = percentages([preset_runs[seed] for seed in common], preset, column)
            if len(mine) != len(common) or len(theirs) != len(common):
                continue
            difference = statistics.mean(mine) - statistics.mean(theirs)
            spread = max(max(mine) - min(mine), max(theirs) - min(theirs))
            beyond = len(common) >= 2 and abs(difference) > spread
            verdicts[name][column] = {
                "difference": round(difference, 2),
                "spread": round(spread, 2),
                "beyond": beyond,
                "better": beyond and difference > 0,
                "seeds": len(common),
            }
    return verdicts


def paired_against_preset(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Each variant's score minus the preset's of the same seed, per column, in seed order (seeds both have).

    A seed fixes the initial weights for every variant, so a seed that is poor for one tends to be poor for
    all; pairing runs by seed takes that shared part out, which the ranges of `against_preset` keep in. Shown
    beside the rule (``seeds above``), not part of it: the rule was set before these were read.
    """
    preset = next(iter(VARIANTS))
    preset_runs = by_seed(runs, preset)
    paired: dict[str, dict[str, list[float]]] = {}
    for name in VARIANTS:
        mine = [(seed, run) for seed, run in by_seed(runs, name).items() if seed in preset_runs]
        if name == preset or not mine:
            continue
        paired[name] = {
            column: [round(100 * (float(run[column]) - float(preset_runs[seed][column])), 2) for seed, run in mine]
            for column in COLUMNS
            if all(run.get(column) is not None and preset_runs[seed].get(column) is not None for seed, run in mine)
        }
    return paired


def markdown_paired(paired: dict[str, dict[str, list[float]]]) -> str:
    """Per variant and score: on how many seeds the variant is above the preset's run of the same seed."""
    lines = ["| seeds above the preset's | " + " | ".join(HEADINGS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, columns in paired.items():
        cells = [f"{sum(d > 0 for d in columns[c])} of {len(columns[c])}" if c in columns else "—" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners(verdicts: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The variants the preset moves to, best first: with `SEEDS_TO_MOVE` seeds on each side, above the preset
    beyond the seeds' spread on most retrieval scores and below it beyond the spread on none of the six (the
    linear probe included), so a variant that trades one score for another does not move it.

    Ranked by the number of retrieval scores above beyond the spread, then by the sum of their differences.
    """
    retrieval = [column for column in COLUMNS if column != "linear_top1"]
    ranked = []
    for name, columns in verdicts.items():
        if len(columns) < len(COLUMNS) or any(verdict["seeds"] < SEEDS_TO_MOVE for verdict in columns.values()):
            continue
        if any(verdict["beyond"] and not verdict["better"] for verdict in columns.values()):
            continue
        better = [columns[column]["difference"] for column in retrieval if columns[column]["better"]]
        if 2 * len(better) > len(retrieval):
            ranked.append((len(better), sum(better), name))
    return [name for *_, name in sorted(ranked, reverse=True)]


def markdown_against_preset(verdicts: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Points above (+) or below (−) the preset; ``*`` where the difference is beyond the seeds' spread."""
    lines = ["| against the preset | " + " | ".join(HEADINGS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, columns in verdicts.items():
        cells = [
            f"{columns[c]['difference']:+.2f}{' *' if columns[c]['beyond'] else ''}" if c in columns else "—"
            for c in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells).replace("-", "−") + " |")
    return "\n".join(lines)


def markdown(table: dict[str, dict[str, str]], minutes: float) -> str:
    lines = [
        f"| variant ({minutes:g} min each) | seeds | steps | " + " | ".join(HEADINGS) + " |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for name, row in table.items():
        cells = " | ".join(row[column] for column in COLUMNS)
        lines.append(f"| {name} | {row['seeds']} | {row['steps']} | {cells} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", help="labelled training shards (memory and probe data)")
    parser.add_argument("--test", help="labelled held-out shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget of every run")
    parser.add_argument("--calibrate-steps", type=int, default=150, help="steps of each variant's pace measurement")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file the runs accumulate in")
    parser.add_argument("--report", action="store_true", help="only summarise --results; train nothing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra config override for every variant"
    )
    args = parser.parse_args(argv)
    if not args.report and not (args.train and args.test):
        parser.error("--train and --test are needed to train (or give --report with --results)")
    if args.report and args.results is None:
        parser.error("--report reads --results")
    return args


def is_done(records: list[dict[str, Any]], name: str, seed: int, args: argparse.Namespace) -> bool:
    wanted = ("run", name, seed, args.minutes, args.overrides)
    return any(
        (r["kind"], r.get("variant"), r.get("seed"), r.get("minutes"), r["overrides"]) == wanted for r in records
    )


def known_pace(records: list[dict[str, Any]], name: str, overrides: list[str]) -> dict[str, Any] | None:
    wanted = ("pace", name, overrides)
    return next((r for r in records if (r["kind"], r["variant"], r["overrides"]) == wanted), None)


def budget_steps(pace: dict[str, Any], minutes: float) -> int:
    """The steps ``minutes`` of training buy at the calibrated pace."""
    return max(1, round(minutes * 60 * pace["images_per_s"] / pace["batch"]))


def run_ablation(records: list[dict[str, Any]], args: argparse.Namespace, folder: Path) -> None:
    """Calibrate every variant still to run (all first, so one quiet stretch covers them), then train and score."""
    todo = [(seed, name) for seed in args.seeds for name in args.variants if not is_done(records, name, seed, args)]
    paces = {}
    for name in dict.fromkeys(name for _, name in todo):
        pace = known_pace(records, name, args.overrides)
        if pace is None:
            pace = measure_pace(name, args, folder)
            append_result(args.results, pace)
            records.append(pace)
        paces[name] = pace
    for seed, name in todo:  # seed-major: an interrupted ablation still has whole seeds of every variant
        pace = paces[name]
        steps = budget_steps(pace, args.minutes)
        log(
            "ablation",
            f"{name!r} seed {seed}: {steps:,} steps, {args.minutes:g} min at {pace['images_per_s']:.0f} img/s",
        )
        record = run_variant(name, seed, steps, args, folder)
        append_result(args.results, record)
        records.append(record)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    records = read_results(args.results)
    if not args.report:
        with tempfile.TemporaryDirectory(prefix="ablation-") as temp:
            run_ablation(records, args, args.out or Path(temp))
    runs = [
        r for r in records if r["kind"] == "run" and r["minutes"] == args.minutes and r["overrides"] == args.overrides
    ]
    table = summarise(runs)
    verdicts, paired = against_preset(runs), paired_against_preset(runs)
    report = {
        "benchmark": "ablation",
        "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "minutes_per_run": args.minutes,
        "overrides": args.overrides,
        "paces": [r for r in records if r["kind"] == "pace"],
        "runs": runs,
        "mean_std_percent": table,
        "markdown": markdown(table, args.minutes),
        "against_preset": verdicts,
        "markdown_against_preset": markdown_against_preset(verdicts),
        "moves_the_preset_to": winners(verdicts),
        "paired_against_preset": paired,
        "markdown_paired": markdown_paired(paired),
        "environment": environment(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
