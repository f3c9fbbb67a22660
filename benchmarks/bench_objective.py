"""Benchmark: what hard-negative selection costs, alone and as a share of a training step.

The issue's target is "hard-negative selection adds at most 10% to a training
step". That is a claim about a ratio, so this script measures both sides:

1. the objective alone (similarities + selection + loss, forward and backward)
   for every ``negatives`` mode at B=256, d=128 and each queue size K, with the
   ratio to ``all`` at the same K;
2. one full MoCoPlus training step (ResNet-18, CIFAR stem, 32 px), then the
   selection overhead ``(t_mode - t_all) / t_step``.

The objective is also timed at the step's batch size when that is not 256,
because an overhead measured at one batch and divided by a step at another is
not the fraction a trainer would see.

Prints one JSON object on stdout; progress goes to stderr so the output can be
piped straight into a file or ``jq``.

    python benchmarks/bench_objective.py --quick          # smoke run, about a minute on CPU
    python benchmarks/bench_objective.py                  # full run

On a CPU shared with other jobs, OpenMP threads on every core stall on each
other at every op boundary and small kernels slow down many-fold (compare
``min_ms`` with ``median_ms``, and ``load_average``); ``--threads 1`` then gives
steadier ratios than the default.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial

import harness  # benchmarks/ is the script's folder, first on sys.path
import torch
from harness import environment, load_average, summarise, synchronizer, time_interleaved, usable_cores
from objective_settings import Settings, build_parser, reproducing_command, settings_from_args
from torch import Tensor
from torch.nn import functional as F

from mocoplus import MoCoConfig, MoCoPlus
from mocoplus.losses import contrastive_loss
from mocoplus.negatives import NEGATIVE_MODES, NegativeSampling
from pipeline.precision import Precision, bf16_is_native, resolve_precision
from pipeline.train.step import TrainingStep

SELECTION_BUDGET = 0.10  # the target: selection adds at most 10% to a step


# --------------------------------------------------------------------------- environment


def resolve_step_precision(settings: Settings, device: torch.device) -> tuple[Precision, dict[str, object]]:
    """The training step's precision as the trainer picks it (``--channels-last`` may override the layout).

    ``auto`` is `pipeline.precision`'s rule: bf16 autocast + channels_last where
    bf16 is native on the device (detected through oneDNN / CUDA), else fp32.
    """
    precision = resolve_precision(settings.step_dtype, device)
    if settings.channels_last is not None:
        precision = replace(precision, channels_last=settings.channels_last)
    report = {
        "bf16_native": bf16_is_native(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "decided_by": "pipeline.precision.resolve_precision",
    }
    return precision, report


# --------------------------------------------------------------------------- inputs


def clustered_unit_vectors(count: int, centers: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    """Unit vectors scattered around random cluster centres.

    Uniform random vectors in 128-d have cosine ≈ 0 ± 0.09 with each other, so
    a 0.5 threshold would drop nothing and every mode would see an
    unrealistically flat similarity profile. With centres of norm 1 and noise of
    norm ``noise``, two members of a cluster have cosine ≈ 1 / (1 + noise²),
    i.e. ≈ 0.5 at the default noise 1.0, so about half of an anchor's
    same-cluster queue entries fall above the threshold.
    """
    dim = centers.shape[1]
    assignment = torch.randint(centers.shape[0], (count,), generator=generator)
    jitter = torch.randn(count, dim, generator=generator) * (noise / math.sqrt(dim))
    return F.normalize(centers[assignment] + jitter, dim=1)


def objective_inputs(settings: Settings, batch: int, queue_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(anchors, positives, queue) drawn from the same clusters; anchors/positives are leaves with grad."""
    generator = torch.Generator().manual_seed(settings.seed)
    centers = F.normalize(torch.randn(settings.clusters, settings.dim, generator=generator), dim=1)
    anchors = clustered_unit_vectors(batch, centers, settings.cluster_noise, generator)
    jitter = torch.randn(batch, settings.dim, generator=generator) * (settings.positive_noise / math.sqrt(settings.dim))
    positives = F.normalize(anchors + jitter, dim=1)
    queue = clustered_unit_vectors(queue_size, centers, settings.cluster_noise, generator)
    return anchors.requires_grad_(True), positives.requires_grad_(True), queue


def similarity_profile(anchors: Tensor, queue: Tensor, settings: Settings) -> dict[str, float]:
    """How the threshold mode sees these inputs: the share it drops and how many rows run short of k."""
    with torch.no_grad():
        similarities = anchors.detach() @ queue.T
        above = similarities > settings.negative_threshold
        kept_per_row = (~above).sum(dim=1)
    return {
        "mean_similarity": round(similarities.mean().item(), 4),
        "p99_similarity": round(similarities.flatten()[:1_000_000].quantile(0.99).item(), 4),
        "threshold_dropped_fraction": round(above.float().mean().item(), 4),
        "rows_short_of_num_negatives": round((kept_per_row < settings.num_negatives).float().mean().item(), 4),
    }


# --------------------------------------------------------------------------- objective


def sampling_for(mode: str, settings: Settings) -> NegativeSampling:
    """The NegativeSampling each mode is benchmarked with: the settings' value of every field the mode reads.

    The fields come from the mode's entry in `NEGATIVE_MODES` (``num_negatives``,
    ``skip_negatives``, ``negative_threshold`` are shared so modes do comparable
    work; the rest keep their defaults), so a new mode is timed with its own selector and parameters,
    never as another mode.
    """
    parameters = NEGATIVE_MODES[mode].parameters
    return NegativeSampling(
        negatives=mode, **{name: getattr(settings, name) for name in parameters if hasattr(settings, name)}
    )


def objective_step(
    anchors: Tensor, positives: Tensor, queue: Tensor, sampling: NegativeSampling, temperature: float
) -> Callable[[], None]:
    """One forward + backward of the objective, as a trainer runs it (grads into anchors/positives only)."""

    def run() -> None:
        anchors.grad = None
        positives.grad = None
        contrastive_loss(anchors, positives, queue, temperature=temperature, sampling=sampling).loss.backward()

    return run


def bench_objective(settings: Settings, device: torch.device, batch: int) -> dict[str, object]:
    """Per K: every mode's time, its ratio to ``all`` and its extra ms over ``all``."""
    sync = synchronizer(device)
    results: dict[str, object] = {}
    for queue_size in settings.queue_sizes:
        anchors, positives, queue = (t.to(device) for t in objective_inputs(settings, batch, queue_size))
        anchors, positives = anchors.detach().requires_grad_(True), positives.detach().requires_grad_(True)
        log(f"objective B={batch} K={queue_size}: {', '.join(settings.modes)}")
        fns = {
            mode: objective_step(anchors, positives, queue, sampling_for(mode, settings), settings.temperature)
            for mode in settings.modes
        }
        samples = time_interleaved(fns, warmup=settings.warmup, repeats=settings.repeats, sync=sync)
        per_mode = {mode: summarise(samples[mode]) for mode in settings.modes}
        base = per_mode["all"]["median_ms"] if "all" in per_mode else None
        for stats in per_mode.values():
            if base:
                stats["ratio_to_all"] = round(stats["median_ms"] / base, 3)
                stats["extra_ms_vs_all"] = round(stats["median_ms"] - base, 3)
        results[f"K={queue_size}"] = {"inputs": similarity_profile(anchors, queue, settings), **per_mode}
    return results


# --------------------------------------------------------------------------- training step


def step_model(settings: Settings, queue_size: int, device: torch.device, channels_last: bool) -> MoCoPlus:
    """The full MoCoPlus module as the issue specifies it: dual_view none, negatives all, split BN."""
    config = MoCoConfig(
        arch=settings.arch,
        cifar_stem=True,
        width=settings.width,
        queue_size=queue_size,
        negatives="all",
        dual_view="none",
        key_bn="split",
        bn_splits=settings.bn_splits,
        temperature=settings.temperature,
    )
    model = MoCoPlus(config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def bench_step(settings: Settings, device: torch.device, precision: Precision) -> dict[str, object]:
    """Median training-step time per queue size (the ``all`` objective at that K is inside the step)."""
    if settings.step_batch % settings.bn_splits:
        raise SystemExit(f"--step-batch must be a multiple of --bn-splits={settings.bn_splits}")
    sync = synchronizer(device)
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.step_batch, 3, settings.image_size, settings.image_size)
    views = tuple(
        torch.randn(shape, generator=generator).to(device, memory_format=precision.memory_format()) for _ in range(2)
    )

    results: dict[str, object] = {}
    for queue_size in settings.step_queue_sizes:
        log(f"training step B={settings.step_batch} K={queue_size} ({precision})")
        model = step_model(settings, queue_size, device, precision.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=5e-4)
        training_step = TrainingStep(model, optimizer, precision, device)
        samples = time_interleaved(
            {"step": partial(training_step, views[0], views[1], epoch=1, progress=0.5)},
            warmup=settings.step_warmup,
            repeats=settings.step_repeats,
            sync=sync,
        )
        results[f"K={queue_size}"] = summarise(samples["step"])
        del model, optimizer, training_step
    return results


# --------------------------------------------------------------------------- the verdict


def step_time_for(step: dict[str, object], queue_size: int) -> tuple[int, float] | None:
    """(K, step median) at ``queue_size``, else at the nearest timed K: the network, not K, dominates the step."""
    if not step:
        return None
    timed = {int(key.split("=")[1]): value["median_ms"] for key, value in step.items()}
    nearest = min(timed, key=lambda size: abs(math.log(size / queue_size)))
    return nearest, timed[nearest]


def overhead_fractions(
    objective: dict[str, dict[str, object]], step: dict[str, object], settings: Settings
) -> dict[str, object]:
    """(t_mode - t_all) / t_step per (K, mode), at the step's own batch and, when different, at B=256.

    Only the fraction at the step's batch is honest: the objective's cost
    scales with B, so it is the one compared against the 10% budget.
    """
    step_key = f"B={settings.step_batch}"
    reference_key = f"B={settings.batch}"
    fractions: dict[str, object] = {}
    for queue_size in settings.queue_sizes:
        timed = step_time_for(step, queue_size)
        if timed is None:
            continue
        step_queue_size, t_step = timed
        row: dict[str, object] = {"step_ms": t_step, "step_queue_size": step_queue_size}
        for mode in settings.modes:
            if mode == "all":
                continue
            extra = objective[step_key][f"K={queue_size}"][mode]["extra_ms_vs_all"]
            entry: dict[str, object] = {"fraction_of_step": round(extra / t_step, 4)}
            if reference_key != step_key:
                extra_reference = objective[reference_key][f"K={queue_size}"][mode]["extra_ms_vs_all"]
                entry[f"fraction_of_step_objective_at_B{settings.batch}"] = round(extra_reference / t_step, 4)
            entry["within_budget"] = entry["fraction_of_step"] <= SELECTION_BUDGET
            row[mode] = entry
        fractions[f"K={queue_size}"] = row
    return fractions


def log(message: str) -> None:
    harness.log("bench_objective", message)


def run(settings: Settings, invoked: Sequence[str]) -> dict[str, object]:
    """The whole benchmark; returns the JSON-ready result."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    started = time.perf_counter()
    load_at_start = load_average()
    precision, detection = resolve_step_precision(settings, device)
    log(f"device={device} threads={torch.get_num_threads()} step {precision}")

    batches = [settings.batch] if settings.step_batch == settings.batch else [settings.batch, settings.step_batch]
    objective = {f"B={batch}": bench_objective(settings, device, batch) for batch in batches}
    step = bench_step(settings, device, precision) if settings.step_queue_sizes else {}
    return {
        "benchmark": "mocoplus objective per negatives mode + share of a training step",
        "command": reproducing_command(settings),
        "invoked_as": shlex.join(["python", *invoked]),
        "environment": {**environment(device), "requested_threads": settings.threads},
        "precision": {
            "step_dtype": str(precision.autocast_dtype or torch.float32).removeprefix("torch."),
            "step_channels_last": precision.channels_last,
            "objective_dtype": "float32 (mocoplus.losses disables autocast)",
            "bf16_detection": detection,
        },
        "settings": asdict(settings),
        "objective": objective,
        "step": {"batch": settings.step_batch, "arch": settings.arch, "image_size": settings.image_size, **step},
        "selection_overhead": {
            "definition": "(t_mode - t_all) / t_step, objective timed at the step's batch",
            "budget": SELECTION_BUDGET,
            **overhead_fractions(objective, step, settings),
        },
        "load_average": {"start": load_at_start, "end": load_average(), "usable_cores": usable_cores()},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run, print the JSON on stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(build_parser().parse_args(argv))
    result = run(settings, [sys.argv[0], *argv])
    harness.emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
