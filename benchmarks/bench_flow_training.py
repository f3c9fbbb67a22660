"""Training inside the ``pretrain`` flow against ``mocoplus train`` alone: the same settings, images/s each.

Why: the demo trains inside the flow (a ``torchrun`` subprocess whose log
lines the flow relays into Prefect), and a third of its training speed was
once lost there. ``--mode flow`` runs the flow's own training task
(`flows.pretrain.train_run`) inside a Prefect flow on the ephemeral API;
``--mode alone`` runs ``mocoplus train`` as a user would. Each run trains
``--steps`` steps of the ``fashion-mnist-cpu`` preset into a fresh folder and
prints the trainer's measured images/s (``train.json``) as JSON; time the two
side by side with ``farm-bench`` (docs/results.md, "The demo"):

    farm-bench -n 3 --warmup 0 --timeout 1500 \\
      --vs "sh -c 'exec .venv/bin/python benchmarks/bench_flow_training.py --mode alone >>/tmp/alone.jsonl'" \\
      -- sh -c 'exec .venv/bin/python benchmarks/bench_flow_training.py --mode flow >>/tmp/flow.jsonl'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_alone(data: str, run_dir: Path, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "flows.cli", "train", "--data", data, "--out", str(run_dir)]
    command += ["--config", "fashion-mnist-cpu", "--no-progress"]
    command += [argument for override in overrides for argument in ("--set", override)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


# the flow's own training task inside a flow, run as a program (benchmarks never import the drivers in
# flows/: docs/architecture.md, "Packages and what each may import"), as `train_alone` runs `mocoplus train`
FLOW_TRAINING = """
import sys
from prefect import flow
from flows.pretrain import train_run

data, run_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
flow(name="bench-flow-training")(lambda: train_run(data, None, run_dir, "fashion-mnist-cpu", overrides, 1))()
"""


def train_in_flow(data: str, run_dir: Path, overrides: list[str]) -> None:
    command = [sys.executable, "-c", FLOW_TRAINING, data, str(run_dir), *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("flow", "alone"), required=True)
    parser.add_argument("--data", default="demo-out/shards/train")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    scratch = Path(tempfile.mkdtemp(prefix="bench-flow-training-"))
    os.environ.setdefault("PREFECT_HOME", str(scratch / "prefect"))
    started = time.perf_counter()
    try:
        run_dir = scratch / "run"
        (train_in_flow if args.mode == "flow" else train_alone)(args.data, run_dir, [f"train.max_steps={args.steps}"])
        summary = json.loads((run_dir / "train.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - started
    print(json.dumps({"mode": args.mode, "steps": summary["steps"], "images_per_s": summary["images_per_s"],
                      "wall_s": round(wall, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
