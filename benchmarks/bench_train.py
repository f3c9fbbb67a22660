"""Benchmark: CPU training throughput of a preset (default `fashion-mnist-cpu`), side by side with its baselines.

Times one training step (forward, backward, SGD update, key-encoder EMA, queue
update) on fixed, ready-made views of the preset's batch, round-robin over
three variants in one process, so machine load hits all alike:

- ``enhanced``: the full enhanced objective on the preset's network
  (symmetric dual-view loss, band hard negatives, bf16 autocast +
  channels_last where the CPU has native bf16);
- ``moco_v2``: the same backbone, batch and views with MoCo v2's objective
  (``dual_view=none``, ``negatives=all``);
- ``enhanced_fp32``: the preset in fp32, contiguous layout;
- ``preset_plain_bn``: the preset with plain batch norm in the key encoder
  (``model.key_bn = "plain"``, as lightly's peer on one device) instead of split-BN;
- ``lightly_moco``: lightly's MoCo v2 blocks on the same network (``pip install lightly``).

Beside the ratios it profiles lightly's step (``torch.profiler``) for the share
of its time spent in the network's own layers — convolutions, batch norm and
ReLU, forward and backward (oneDNN and ATen kernels). Both steps run those very
layers on the same tensors, so ``1 / share`` is the most any step of this
network, batch and precision could gain over lightly's on this CPU, with all
the rest (loss, queue, EMA, shuffle, optimizer, Python) free. The profiler's
own cost per op inflates the small ops, so that ceiling is if anything too high.

The symmetric loss encodes both views with the query encoder (two
forward/backward passes a step) where MoCo v2 encodes one, so the fair unit
is a *view*: images/s counts each image once per query-encoded view. Targets:
enhanced costs at most 10 % more per view than MoCo v2, and bf16 +
channels_last is at least 2.5× faster than fp32.

    python benchmarks/bench_train.py               # about a minute on 2 cores
    python benchmarks/bench_train.py --repeats 3 --batch 128
    python benchmarks/bench_train.py --config cifar-resnet18 --batch 64   # a full-width ResNet-18

bf16's gain grows with the convolutions' share of the step: the preset's
width-1/4 network spends much of its step in batch norm, copies and the
optimizer, which bf16 does not speed up; ``--config cifar-resnet18`` shows a
full-width network on the same CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch
from harness import emit, report, time_interleaved  # benchmarks/ is the script's folder, first on sys.path
from lightly_peer import lightly_moco_step

from mocoplus import MoCoPlus
from pipeline.precision import resolve_precision
from pipeline.train.optim import build_optimizer
from pipeline.train.run_config import load_config
from pipeline.train.step import TrainingStep


def make_step(variant: str, preset: str, batch: int):
    """A closure running one training step of ``variant`` on fixed views; and its query views per step."""
    config = load_config(preset, [f"train.global_batch={batch}"])
    model_config = replace(config.model, dual_view="symmetric", negatives="band")
    if variant == "preset":
        model_config = config.model
    if variant == "lightly_moco":
        precision = resolve_precision("auto")
        size = config.data.image_size
        generator = torch.Generator().manual_seed(0)
        views = [
            torch.randn(batch, 3, size, size, generator=generator).contiguous(memory_format=precision.memory_format())
            for _ in range(2)
        ]
        return lightly_moco_step(config, precision, views), 1, precision.name
    if variant == "preset_plain_bn":
        model_config = replace(config.model, key_bn="plain")
    if variant == "moco_v2":
        model_config = replace(model_config, dual_view="none", negatives="all", num_negatives=None, skip_negatives=0)
    precision = resolve_precision("fp32" if variant == "enhanced_fp32" else "auto")
    torch.manual_seed(0)
    model = MoCoPlus(replace(model_config, warmup_epochs=0)).to(memory_format=precision.memory_format()).train()
    optimizer = build_optimizer(model.query_encoder, config)
    generator = torch.Generator().manual_seed(0)
    size = config.data.image_size
    views = [
        torch.randn(batch, 3, size, size, generator=generator).contiguous(memory_format=precision.memory_format())
        for _ in range(2)
    ]

    step = TrainingStep(model, optimizer, precision)
    return (lambda: step(*views, epoch=1)), (2 if model_config.dual_view == "symmetric" else 1), precision.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion-mnist-cpu", help="the training preset (or config file)")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (after one warm-up)")
    args = parser.parse_args(argv)
    batch = args.batch or load_config(args.config).train.global_batch
    variants = ("preset", "preset_plain_bn", "enhanced", "moco_v2", "enhanced_fp32")
    variants += ("lightly_moco",) if _has_lightly() else ()
    started = time.perf_counter()
    steps, views, precisions = {}, {}, {}
    for name in variants:
        steps[name], views[name], precisions[name] = make_step(name, args.config, batch)
    # one warm-up call each (oneDNN picks its kernels on the first), then round-robin
    samples = time_interleaved(steps, warmup=1, repeats=args.repeats)
    seconds = {name: [ms / 1e3 for ms in values] for name, values in samples.items()}
    results = {}
    for name in variants:
        median = statistics.median(seconds[name])
        results[name] = {
            "precision": precisions[name],
            "query_views_per_step": views[name],
            "step_seconds_median": median,
            "step_seconds_all": seconds[name],
            "images_per_s": batch / median,
            "view_images_per_s": batch * views[name] / median,
        }
    lightly_shares = layer_shares(steps["lightly_moco"]) if "lightly_moco" in steps else None
    per_view_cost = results["moco_v2"]["view_images_per_s"] / results["enhanced"]["view_images_per_s"]
    results_report = {
        "command": "python benchmarks/bench_train.py " + " ".join(argv or sys.argv[1:]),
        "config": args.config,
        "batch": batch,
        "variants": results,
        "enhanced_cost_per_view_vs_moco_v2": per_view_cost,
        "target_cost_per_view_at_most": 1.10,
        "bf16_speedup_over_fp32": results["enhanced_fp32"]["step_seconds_median"]
        / results["enhanced"]["step_seconds_median"],
        "target_bf16_speedup_at_least": 2.5,
        "preset_images_per_s_vs_lightly": (
            results["preset"]["images_per_s"] / results["lightly_moco"]["images_per_s"]
            if "lightly_moco" in results
            else "lightly not installed (pip install lightly)"
        ),
        "preset_plain_bn_images_per_s_vs_lightly": (
            results["preset_plain_bn"]["images_per_s"] / results["lightly_moco"]["images_per_s"]
            if "lightly_moco" in results
            else None
        ),
        "lightly_time_shares": lightly_shares,
        "ceiling_vs_lightly_at_the_same_network": 1 / lightly_shares["network_layers"] if lightly_shares else None,
        "target_vs_lightly_at_least": 1.5,
        "moco_v2_images_per_s_vs_lightly": (
            results["moco_v2"]["view_images_per_s"] / results["lightly_moco"]["images_per_s"]
            if "lightly_moco" in results
            else None
        ),
    }
    emit(report("train", results_report, started=started))
    return 0


CONVOLUTIONS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward")
NETWORK_LAYERS = (
    *CONVOLUTIONS,
    "aten::native_batch_norm", "aten::native_batch_norm_backward",  # batch norm
    "aten::clamp_min_", "aten::clamp_min", "aten::relu_", "aten::threshold_backward",  # ReLU
)  # fmt: skip


def layer_shares(step, calls: int = 5) -> dict[str, float]:
    """The fractions of ``step``'s self CPU time in convolutions and in all the network's layers (``calls`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            step()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)

    def share(ops: tuple[str, ...]) -> float:
        return sum(event.self_cpu_time_total for event in events if event.key in ops) / total

    return {"convolutions": share(CONVOLUTIONS), "network_layers": share(NETWORK_LAYERS)}


def _has_lightly() -> bool:
    try:
        import lightly  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
