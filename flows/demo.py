"""`mocoplus demo`: the ``end-to-end`` flow on Fashion-MNIST on the CPU, within a time budget.

Ingest (60,000 training and 10,000 test images into shards) → pretrain with
the ``fashion-mnist-cpu`` preset → export (the whitening fitted in its one
pass) → embed the training and test sets → evaluate those served vectors
beside pixels and HOG → the quality gate → index → search one test image.
The training length is planned, not guessed: after ingest, a short
calibration run measures this machine's training speed, and
``train.max_steps`` is set so that training ends ``RESERVE_SECONDS`` before
the budget (what the stages after it took on 2 cores, with margin). The
cosine schedule is planned over those steps, so a short run still ends with a
decayed learning rate. The reserve was measured on a machine that calibrates
at `REFERENCE_IMAGES_PER_S`; on a slower one it grows in proportion (the
later stages are model passes too). When what is left to train is below
`USEFUL_TRAINING_SECONDS`, the demo stops before training and says which
``--minutes`` this machine needs: it never presents a model that had no time
to learn. ``steps`` (``--steps``) trains exactly that many steps instead, a
look at the chain's mechanics that says so.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from artifacts.atomic import prepare_out_dir, write_json_atomic

# after the planned steps, measured on 2 cores with AVX-512 (quiet; docs/results.md, demo): torchrun start-up ≈ 7 s;
# export with the whitening fitted on 60k images 53 s; embedding the 60k training and 10k test images 33 s;
# the suite of the served vectors with pixels and HOG (their features computed the first time) 60 s; a 1,024-d
# HNSW index and its tuning 13 s (16 s with efConstruction 80, the next run); the map of 3,000 embeddings 17 s;
# search, grid and Prefect 11 s — 194 s (the next run, with this reserve: 186 s), plus margin
RESERVE_SECONDS = 200
REFERENCE_IMAGES_PER_S = 415.0  # what the calibration measured on that machine
USEFUL_TRAINING_SECONDS = 120  # below this the model learns little: the demo says so
MAP_SAMPLE = 3000
BASELINES = ("pixels", "hog")
CALIBRATION_STEPS = 20
SOURCES = ("fashion-mnist:train", "fashion-mnist:test")


@dataclass(frozen=True)
class DemoConfig:
    minutes: float = 10.0
    config: str = "fashion-mnist-cpu"
    overrides: list[str] = field(default_factory=list)  # training overrides (tests shrink the network)
    shares: int = 2
    steps: int | None = None  # train exactly this many steps, unplanned (a look at the mechanics)
    gate: bool = True  # False: publish the model even if the quality gate refuses it (with --steps)


class DemoTooSlowError(ValueError):
    """This machine cannot train meaningfully within the budget: the demo stops before training."""


def calibrate(shards: Path, config: DemoConfig) -> float:
    """This machine's training speed, images/s: `CALIBRATION_STEPS` steps of the demo's own config."""
    from pipeline.train.run_config import load_config, with_data
    from pipeline.train.trainer import train

    run_config = with_data(load_config(config.config, [*config.overrides, f"train.max_steps={CALIBRATION_STEPS}"]),
                           train=str(shards), eval_queries="")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mocoplus-calibration-") as scratch:
        return train(run_config, Path(scratch) / "run", progress=False).images_per_s


def reserve_seconds(images_per_s: float) -> float:
    """What the stages after training take here: `RESERVE_SECONDS`, longer in proportion on a slower machine."""
    return RESERVE_SECONDS * max(1.0, REFERENCE_IMAGES_PER_S / max(images_per_s, 1e-9))


def planned_steps(images_per_s: float, seconds: float, config: DemoConfig) -> int:
    """Training steps that fit ``seconds`` at ``images_per_s`` (≥ 1)."""
    from pipeline.train.run_config import load_config

    batch = load_config(config.config, config.overrides).train.global_batch
    return max(1, math.floor(images_per_s * max(seconds, 0) / batch))


class _Budget:
    """The demo's clock: which stage it is in and how much of the budget is left, on stderr."""

    def __init__(self, minutes: float) -> None:
        self.seconds, self.started = minutes * 60, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stage(self, name: str) -> None:
        left = self.seconds - self.elapsed
        print(
            f"demo: {name} · {_clock(self.elapsed)} elapsed, {_clock(max(left, 0))} of {_clock(self.seconds)} left",
            file=sys.stderr,
            flush=True,
        )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def run_demo(out: Path, config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run the whole chain under ``out`` and return (and write to ``out/demo.json``) what it measured."""
    from flows.end_to_end import end_to_end
    from flows.pretrain import ensure_shards

    clock = _Budget(config.minutes)
    root = prepare_out_dir(Path(out))
    train_shards, test_shards = root / "shards" / "train", root / "shards" / "test"
    clock.stage("1/3 ingest Fashion-MNIST (60,000 training and 10,000 test images)")
    for source, shards in zip(SOURCES, (train_shards, test_shards), strict=True):
        ensure_shards(source, str(shards))  # done before the flow (which then skips it) to time the rest
    ingested = clock.elapsed
    clock.stage(f"2/3 calibration: {CALIBRATION_STEPS} training steps measure this machine's speed")
    calibration_rate = calibrate(train_shards, config)
    calibrated = clock.elapsed
    reserve = reserve_seconds(calibration_rate)
    training_seconds = config.minutes * 60 - clock.elapsed - reserve
    if config.steps is not None:
        steps, plan = config.steps, f"{config.steps:,} step{'s' if config.steps != 1 else ''} as asked (--steps)"
        print(f"demo: --steps {steps}: a look at the chain, not a trained model", file=sys.stderr, flush=True)
    elif training_seconds < USEFUL_TRAINING_SECONDS:
        needed = math.ceil((clock.elapsed + reserve + USEFUL_TRAINING_SECONDS) / 60)
        raise DemoTooSlowError(
            f"this machine trains at {calibration_rate:,.0f} images/s (the 10-minute plan assumes "
            f"≈ {REFERENCE_IMAGES_PER_S:,.0f}): the stages after training need ≈ {_clock(reserve)}, leaving "
            f"{_clock(max(training_seconds, 0))} of {config.minutes:g} minutes to train, less than the "
            f"{_clock(USEFUL_TRAINING_SECONDS)} a model needs to learn: run mocoplus demo --minutes {needed}"
        )
    else:
        steps = planned_steps(calibration_rate, training_seconds, config)
        plan = f"{steps:,} steps (≈ {_clock(training_seconds)} at {calibration_rate:,.0f} images/s)"
    overrides = [*config.overrides, f"train.max_steps={steps}"]
    clock.stage(f"3/3 the end-to-end flow: pretrain {plan} → export → embed → evaluate, gate → index → search")
    result = end_to_end(
        str(root),
        config=config.config,
        overrides=overrides,
        shares=config.shares,
        baselines=list(BASELINES),
        linear_probe=False,
        monitor=False,
        map_sample=MAP_SAMPLE,
        gate=config.gate,
    )
    clock.stage("done")
    evaluation = result["pretrain"]["evaluation"]

    def stage_seconds() -> dict[str, float]:
        """The budget's split: ingest and calibration here, each flow stage as the flows timed it."""
        flow_stages = {**result["pretrain"]["seconds"], **{f"corpus {name}": value
                       for name, value in result["index"]["seconds"].items()}}  # fmt: skip
        flow_stages.pop("ingest", None)  # done before the flow: skipped there
        split = {"ingest": round(ingested, 1), "calibration": round(calibrated - ingested, 1), **flow_stages}
        split["search"] = result["search"]["seconds"]
        split["other (Prefect, start-up)"] = round(clock.elapsed - sum(split.values()), 1)
        return split

    report = {
        "minutes_budget": config.minutes,
        "seconds": round(clock.elapsed, 1),
        "ingest_seconds": round(ingested, 1),
        "calibration_images_per_s": round(calibration_rate, 1),
        "reserve_seconds": round(reserve, 1),
        "planned_steps": steps,
        "dim": evaluation["model"]["dim"],
        "knn_top1": evaluation["model"]["scores"]["weighted_knn200"],
        "retrieval": {"model": evaluation["model"]["scores"], **evaluation["baselines"]},
        "gate": result["pretrain"]["gate"],
        "stage_seconds": stage_seconds(),
        "recall_at_10": result["index"]["recall"],
        "index": result["index"]["factory"],
        "search": result["search"],
        "paths": {
            "model": result["pretrain"]["model"],
            "index": result["index"]["index"],
            "run": result["pretrain"]["run"],
        },
        "pictures": {
            name: path
            for name, path in (
                ("search grid", result["search"].get("grid")),
                ("training curves", result["pretrain"].get("curves")),
                ("embedding map", result["index"].get("map")),
            )
            if path
        },
        "config": asdict(config),
    }
    write_json_atomic(root / "demo.json", json.loads(json.dumps(report)))
    return report
