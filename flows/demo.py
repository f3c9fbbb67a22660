"""`mocoplus demo`: the ``end-to-end`` flow on Fashion-MNIST on the CPU, within a time budget.

Ingest (60,000 training and 10,000 test images into shards) → pretrain with
the ``fashion-mnist-cpu`` preset → evaluate → export → embed the training set
→ index → search one test image. The training length is planned, not guessed:
after ingest, a short calibration run measures this machine's training speed,
and ``train.max_steps`` is set so that training ends ``RESERVE_SECONDS``
before the budget (what the stages after it took on 2 cores, with margin).
The cosine schedule is planned over those steps, so a short run still ends
with a decayed learning rate.
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

# after the planned steps, measured on 2 cores (quiet): torchrun start-up and the final kNN ≈ 35 s; evaluate
# (key encoder, 4×4 grid whitened, pixel and HOG baselines as they are and whitened, no linear probe) 176 s;
# export with the whitening fitted on 60k images 68 s; embed 60k 44 s; a 2,048-d HNSW index and its tuning
# ≈ 40 s; search and Prefect ≈ 5 s — 368 s, plus margin
RESERVE_SECONDS = 400
BASELINES = ("pixels", "hog")
CALIBRATION_STEPS = 20
SOURCES = ("fashion-mnist:train", "fashion-mnist:test")


@dataclass(frozen=True)
class DemoConfig:
    minutes: float = 10.0
    config: str = "fashion-mnist-cpu"
    overrides: list[str] = field(default_factory=list)  # training overrides (tests shrink the network)
    shares: int = 2


def plan_steps(shards: Path, config: DemoConfig, seconds: float) -> tuple[int, float]:
    """Training steps that fit ``seconds`` on this machine (≥ 1), and the measured images/s."""
    from pipeline.train.run_config import load_config, with_data
    from pipeline.train.trainer import train

    run_config = with_data(load_config(config.config, [*config.overrides, f"train.max_steps={CALIBRATION_STEPS}"]),
                           train=str(shards), eval_queries="")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mocoplus-calibration-") as scratch:
        result = train(run_config, Path(scratch) / "run", progress=False)
    steps = math.floor(result.images_per_s * max(seconds, 0) / run_config.train.global_batch)
    return max(1, steps), result.images_per_s


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
    training_seconds = config.minutes * 60 - clock.elapsed - RESERVE_SECONDS
    steps, calibration_rate = plan_steps(train_shards, config, training_seconds)
    overrides = [*config.overrides, f"train.max_steps={steps}", "eval.every_epochs=1000"]  # one kNN, at the end
    clock.stage(
        f"3/3 the end-to-end flow: pretrain {steps:,} steps (≈ {_clock(max(training_seconds, 0))} at "
        f"{calibration_rate:,.0f} images/s) → evaluate → export → embed → index → search"
    )
    result = end_to_end(
        str(root),
        config=config.config,
        overrides=overrides,
        shares=config.shares,
        baselines=list(BASELINES),
        linear_probe=False,
    )
    clock.stage("done")
    report = {
        "minutes_budget": config.minutes,
        "seconds": round(clock.elapsed, 1),
        "ingest_seconds": round(ingested, 1),
        "calibration_images_per_s": round(calibration_rate, 1),
        "planned_steps": steps,
        "knn_top1": result["pretrain"].get("knn_top1"),
        "linear_top1": result["pretrain"].get("linear_top1"),
        "retrieval": result["pretrain"].get("retrieval", {}),
        "whitening": result["pretrain"].get("whitening", "none"),
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
