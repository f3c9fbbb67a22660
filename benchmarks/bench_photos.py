"""Colour photos on a CPU: ``photos-cpu`` against ``cifar-resnet18`` at the same wall-clock, and raw pixels.

Why: a user with a folder of colour photos and no GPU needs a preset that
learns in the 15 minutes the gray one does. This builds the sample-photo
corpus (`mocoplus sample-photos`: 19 photographs, 100 crops each for training,
20 other crops each as held-out queries), ingests it as a user would, trains
each preset for ``--minutes`` of wall-clock (``train.time_budget``), and scores
every run two ways on the same data:

- labelled: the retrieval suite (held-out crops as queries, the training crops
  as memory, a crop's class is its photograph) beside pixels and HOG;
- label-free: recall@1/@10 of altered views of 500 training crops among all
  1,900 (`mocoplus evaluate --unlabelled`), beside pixels.

A one-step run of ``photos-cpu`` is scored too: what the network gives before it
learns anything (a random convolutional network is a baseline of its own).
Everything runs through the ``mocoplus`` command line, one process at a time;
prints one JSON report (docs/own-images.md, "What to expect on 2 cores"). An
AVX-512 machine can stand in for an AVX2 one by limiting the kernels (and
training in fp32, as ``auto`` does where bf16 is not native):

    python benchmarks/bench_photos.py --minutes 15 --out /tmp/bench-photos
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
      python benchmarks/bench_photos.py --presets photos-cpu --set train.precision=fp32 --out /tmp/bench-avx2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import emit, log, report

PRESETS = ("photos-cpu", "cifar-resnet18")
# what limits the kernels to an older instruction set (oneDNN, ATen's vector code, MKL), reported with the results
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def mocoplus(*arguments: str) -> str:
    done = subprocess.run([sys.executable, "-m", "flows.cli", *arguments], check=True, capture_output=True, text=True)
    return done.stdout


def prepare(out: Path) -> tuple[Path, Path]:
    """The training and held-out shard sets of the sample-photo corpus (made once per ``out``)."""
    shards = {}
    for split, per_photo, seed in (("train", 100, 0), ("test", 20, 1)):
        photos, shards[split] = out / f"photos-{split}", out / f"shards-{split}"
        if not photos.exists():
            mocoplus("sample-photos", "--out", str(photos), "--per-photo", str(per_photo), "--seed", str(seed))
        if not (shards[split] / "manifest.json").exists():
            mocoplus("ingest", str(photos), "--out", str(shards[split]), "--format", "jpg", "--max-side", "256",
                     "--no-progress")  # fmt: skip
    return shards["train"], shards["test"]


def score(run: Path, train: Path, test: Path) -> dict[str, object]:
    suite = json.loads(mocoplus("evaluate", str(run), "--data", str(train), "--eval", str(test), "--baselines",
                                "pixels,hog", "--no-linear", "--json", "--no-progress"))  # fmt: skip
    views = json.loads(mocoplus("evaluate", str(run), "--data", str(train), "--unlabelled", "--json", "--no-progress"))
    trained = json.loads((run / "train.json").read_text())
    return {
        "steps": trained.get("steps"),
        "images_per_s": trained.get("images_per_s"),
        "key_encoder": suite["encoders"]["key"]["retrieval"],
        "baselines": suite["baselines"],
        "label_free": {"model": views["model"]["recall"], "pixels": views["pixels"]["recall"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-photos"))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="for every run, e.g. "
                        "train.precision=fp32 (with ONEDNN_MAX_CPU_ISA=AVX2: an AVX2 machine's kernels)")  # fmt: skip
    args = parser.parse_args()
    started = time.time()
    train, test = prepare(args.out)
    results = {}
    runs = [(name, name, [f"train.time_budget={args.minutes * 60:g}", *args.overrides]) for name in args.presets]
    runs.append(("photos-cpu, 1 step", "photos-cpu", ["train.max_steps=1", "train.time_budget=0", *args.overrides]))
    for label, preset, overrides in runs:
        run = args.out / "runs" / label.replace(", ", "-").replace(" ", "-")
        if not (run / "train.json").exists():
            log("bench_photos", f"training {label} ({' '.join(overrides)})")
            settings = [argument for override in overrides for argument in ("--set", override)]
            mocoplus("train", "--data", str(train), "--eval", str(test), "--out", str(run), "--config", preset,
                     *settings, "--no-progress")  # fmt: skip
        results[label] = score(run, train, test)
    isa = {name: os.environ[name] for name in ISA_LIMITS if name in os.environ}
    emit(report("bench_photos", {"minutes": args.minutes, "overrides": args.overrides, "isa_limits": isa,
                                 "runs": results}, started=started))  # fmt: skip


if __name__ == "__main__":
    main()
