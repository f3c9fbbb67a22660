"""Benchmark: what split-BN (multi-GPU BN emulated on one device) costs in a MoCoPlus training step.

Times one ResNet-18 (CIFAR stem, 32 px) MoCoPlus step with ``key_bn="split"``
and with ``key_bn="plain"`` round-robin in one process, with the precision
the trainer would pick (bf16 + channels_last where native), and prints JSON
with the medians and their ratio.

    python benchmarks/bench_split_bn.py --batch 64 --threads 1 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from harness import emit, report, time_interleaved  # benchmarks/ is the script's folder, first on sys.path

from mocoplus import MoCoConfig, MoCoPlus
from pipeline.precision import resolve_precision
from pipeline.train.step import TrainingStep


def make_step(key_bn: str, batch: int, precision_name: str):
    """A closure running one forward/backward/SGD step of a fresh model with the given key BN."""
    precision = resolve_precision(precision_name)
    model = MoCoPlus(MoCoConfig(arch="resnet18", cifar_stem=True, queue_size=4096, key_bn=key_bn))
    model.to(memory_format=precision.memory_format()).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, 32, 32, generator=generator).contiguous(memory_format=precision.memory_format())]
    views.append(views[0].flip(-1).contiguous(memory_format=precision.memory_format()))

    step = TrainingStep(model, optimizer, precision)
    return (lambda: step(*views)), precision.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="1 gives steadier numbers on a shared 2-core CPU")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    steps = {}
    for key_bn in ("split", "plain"):
        steps[key_bn], precision = make_step(key_bn, args.batch, args.precision)
    # one warm-up call each (oneDNN picks its kernels on the first), then round-robin: load hits both alike
    samples = time_interleaved(steps, warmup=1, repeats=args.repeats)
    medians = {name: statistics.median(values) / 1e3 for name, values in samples.items()}
    results = {
        "command": "python benchmarks/bench_split_bn.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "batch": args.batch,
        "threads": args.threads,
        "precision": precision,
        "median_s": {name: round(value, 3) for name, value in medians.items()},
        "split_over_plain": round(medians["split"] / medians["plain"], 3),
    }
    emit(report("split-BN vs plain BN, ResNet-18 MoCoPlus training step", results, started=started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
