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

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor
from torch.nn import functional as F

from mocoplus import MoCoConfig, MoCoPlus
from mocoplus.config import NEGATIVES, NegativeSampling
from mocoplus.losses import contrastive_loss
from pipeline.train.precision import bf16_is_native, resolve_precision

SELECTION_BUDGET = 0.10  # the target: selection adds at most 10% to a step
REFERENCE_BATCH = 256  # the batch the objective is always timed at, whatever the step batch


@dataclass(frozen=True)
class Settings:
    """Every knob of one run; dumped verbatim into the JSON so a result explains itself."""

    batch: int = REFERENCE_BATCH
    dim: int = 128
    queue_sizes: tuple[int, ...] = (4096, 65536)
    modes: tuple[str, ...] = NEGATIVES
    k: int = 1024
    skip: int = 16
    threshold: float = 0.5
    temperature: float = 0.2
    clusters: int = 10
    cluster_noise: float = 1.0
    positive_noise: float = 0.5
    warmup: int = 3
    repeats: int = 15
    step_batch: int = 256
    step_warmup: int = 1
    step_repeats: int = 3
    step_queue_sizes: tuple[int, ...] = (4096, 65536)
    arch: str = "resnet18"
    width: float = 1.0
    image_size: int = 32
    bn_splits: int = 8
    device: str = "cpu"
    threads: int = 1
    step_dtype: str = "auto"
    channels_last: bool | None = None
    seed: int = 0
    quick: bool = False


# --------------------------------------------------------------------------- timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    """CUDA kernels are asynchronous: without a sync the clock measures launches, not work."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Milliseconds per call for each function, run round-robin.

    Interleaving (a, b, c, a, b, c, ...) rather than blocking (a, a, a, b, ...)
    spreads the load of a shared machine evenly over the candidates, so their
    ratios stay meaningful even when absolute times drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def summarise(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """Median for the headline (robust to the odd preempted run); min/max/IQR show the spread."""
    ordered = sorted(samples_ms)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "min_ms": round(ordered[0], 3),
        "max_ms": round(ordered[-1], 3),
        "iqr_ms": round(quartiles[2] - quartiles[0], 3),
        "repeats": len(ordered),
    }


# --------------------------------------------------------------------------- environment


def resolve_step_precision(settings: Settings, device: torch.device) -> tuple[torch.dtype, bool, dict[str, object]]:
    """(autocast dtype, channels_last, detection report) for the training step, as the trainer picks them.

    ``auto`` is `pipeline.train.precision`'s rule: bf16 autocast + channels_last where
    bf16 is native on the device (detected through oneDNN / CUDA), else fp32.
    """
    precision = resolve_precision(settings.step_dtype, device)
    dtype = precision.autocast_dtype or torch.float32
    channels_last = precision.channels_last if settings.channels_last is None else settings.channels_last
    report = {
        "bf16_native": bf16_is_native(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "decided_by": "pipeline.train.precision.resolve_precision",
    }
    return dtype, channels_last, report


def environment(device: torch.device, threads: int) -> dict[str, object]:
    """What a reader needs to compare two results: hardware, library versions, threads."""
    env: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "requested_threads": threads,
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = cpu_model_name()
    return env


def load_average() -> list[float] | None:
    """1/5/15-minute load: on a shared machine it says how much of the spread is other people's work."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo where there is one (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        above = similarities > settings.threshold
        kept_per_row = (~above).sum(dim=1)
    return {
        "mean_similarity": round(similarities.mean().item(), 4),
        "p99_similarity": round(similarities.flatten()[:1_000_000].quantile(0.99).item(), 4),
        "threshold_dropped_fraction": round(above.float().mean().item(), 4),
        "rows_with_fewer_than_k_below_threshold": round((kept_per_row < settings.k).float().mean().item(), 4),
    }


# --------------------------------------------------------------------------- objective


def sampling_for(mode: str, settings: Settings) -> NegativeSampling:
    """The NegativeSampling each mode is benchmarked with (k shared so modes do comparable work).

    Every mode of `NEGATIVES` needs its row here: a new one fails loudly instead of being timed as another.
    """
    options = {
        "all": {},
        "topk": {"k": settings.k},
        "band": {"k": settings.k, "skip": settings.skip},
        "threshold": {"k": settings.k, "threshold": settings.threshold},
        "debiased": {},  # the whole queue, re-estimated
        "hard-weighted": {},
    }
    if mode not in options:
        raise ValueError(f"no benchmark settings for negatives mode {mode!r}: add it to sampling_for")
    return NegativeSampling(mode=mode, **options[mode])


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


def training_step(
    model: MoCoPlus,
    optimizer: torch.optim.Optimizer,
    views: tuple[Tensor, Tensor],
    autocast: Callable[[], AbstractContextManager[object]],
) -> Callable[[], None]:
    """Forward (query + momentum key encoder + objective + enqueue), backward and SGD step.

    Backward runs outside autocast, as the PyTorch AMP recipe prescribes; the
    objective itself runs in fp32 regardless (mocoplus.losses turns autocast off).
    """

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(views[0], views[1], epoch=1, progress=0.5)
        out.loss.backward()
        optimizer.step()

    return run


def bench_step(settings: Settings, device: torch.device, dtype: torch.dtype, channels_last: bool) -> dict[str, object]:
    """Median training-step time per queue size (the ``all`` objective at that K is inside the step)."""
    if settings.step_batch % settings.bn_splits:
        raise SystemExit(f"--step-batch must be a multiple of --bn-splits={settings.bn_splits}")
    sync = synchronizer(device)
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.step_batch, 3, settings.image_size, settings.image_size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = tuple(torch.randn(shape, generator=generator).to(device, memory_format=memory_format) for _ in range(2))

    def autocast() -> AbstractContextManager[object]:
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    results: dict[str, object] = {}
    for queue_size in settings.step_queue_sizes:
        log(f"training step B={settings.step_batch} K={queue_size} ({dtype}, channels_last={channels_last})")
        model = step_model(settings, queue_size, device, channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=5e-4)
        step = training_step(model, optimizer, (views[0], views[1]), autocast)
        samples = time_interleaved(
            {"step": step}, warmup=settings.step_warmup, repeats=settings.step_repeats, sync=sync
        )
        results[f"K={queue_size}"] = summarise(samples["step"])
        del model, optimizer, step
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


# --------------------------------------------------------------------------- CLI


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones: those flags state their resolved default in their help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror the Settings fields one to one, so the JSON's settings reproduce a run."""
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description="Time the contrastive objective per negatives mode and its overhead in a MoCo training step.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few repeats, step batch 32 timed at the largest K only, K=65536 kept",
    )
    parser.add_argument("--batch", type=int, default=defaults.batch, help="objective batch B")
    parser.add_argument("--dim", type=int, default=defaults.dim, help="embedding dimension d")
    parser.add_argument("--queue-sizes", type=int, nargs="+", default=list(defaults.queue_sizes), help="queue sizes K")
    parser.add_argument("--modes", nargs="+", choices=NEGATIVES, default=list(defaults.modes), help="negatives modes")
    parser.add_argument("-k", "--k", type=int, default=defaults.k, help="negatives kept by topk/band/threshold")
    parser.add_argument("--skip", type=int, default=defaults.skip, help="most-similar entries band mode skips")
    parser.add_argument("--threshold", type=float, default=defaults.threshold, help="threshold mode's cut-off")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="InfoNCE temperature τ")
    parser.add_argument("--clusters", type=int, default=defaults.clusters, help="cluster centres of the inputs")
    parser.add_argument("--cluster-noise", type=float, default=defaults.cluster_noise, help="spread within a cluster")
    parser.add_argument("--warmup", type=int, default=None, help=f"objective warm-up calls [{defaults.warmup}]")
    parser.add_argument("--repeats", type=int, default=None, help=f"objective timed calls [{defaults.repeats}]")
    parser.add_argument("--step-batch", type=int, default=None, help=f"training-step batch [{defaults.step_batch}]")
    parser.add_argument("--step-warmup", type=int, default=None, help=f"step warm-up calls [{defaults.step_warmup}]")
    parser.add_argument("--step-repeats", type=int, default=None, help=f"step timed calls [{defaults.step_repeats}]")
    parser.add_argument(
        "--step-queue-sizes",
        type=int,
        nargs="*",
        default=None,
        help="queue sizes the step is timed at [--queue-sizes; largest only with --quick]; give none to skip the step",
    )
    parser.add_argument(
        "--arch", choices=("resnet18", "resnet34", "resnet50"), default=defaults.arch, help="step backbone"
    )
    parser.add_argument("--width", type=float, default=defaults.width, help="backbone width multiplier")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="step image side (px)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:n] [cuda when available, else cpu]")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [all usable cores]")
    parser.add_argument(
        "--step-dtype",
        choices=("auto", "bf16", "fp32"),
        default=defaults.step_dtype,
        help="step autocast dtype; auto = bf16 where native",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last model and inputs [on with bf16]",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of inputs and weights")
    return parser


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags → Settings; ``--quick`` only fills what the user left unset, so explicit flags win."""
    base = Settings()
    quick = {"warmup": 1, "repeats": 3, "step_batch": 32, "step_warmup": 1, "step_repeats": 2}
    chosen = {name: getattr(args, name) for name in quick}
    for name, value in chosen.items():
        if value is None:
            chosen[name] = quick[name] if args.quick else getattr(base, name)
    queue_sizes = tuple(args.queue_sizes)
    step_queue_sizes = tuple(args.step_queue_sizes) if args.step_queue_sizes is not None else queue_sizes
    if args.quick and args.step_queue_sizes is None:
        step_queue_sizes = (max(queue_sizes),)  # the smoke run's budget goes to one step size, the largest K
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return replace(
        base,
        batch=args.batch,
        dim=args.dim,
        queue_sizes=queue_sizes,
        modes=tuple(dict.fromkeys(["all", *args.modes])),  # "all" is the baseline every ratio needs
        k=args.k,
        skip=args.skip,
        threshold=args.threshold,
        temperature=args.temperature,
        clusters=args.clusters,
        cluster_noise=args.cluster_noise,
        step_queue_sizes=step_queue_sizes,
        arch=args.arch,
        width=args.width,
        image_size=args.image_size,
        device=device,
        threads=args.threads or usable_cores(),
        step_dtype=args.step_dtype,
        channels_last=args.channels_last,
        seed=args.seed,
        quick=args.quick,
        **chosen,
    )


def reproducing_command(settings: Settings) -> str:
    """Every setting spelled out as a flag, so the run reproduces even if the defaults change."""
    layout: tuple[str, ...] = ()
    if settings.channels_last is not None:
        layout = ("--channels-last" if settings.channels_last else "--no-channels-last",)
    argv = [
        "python",
        "benchmarks/bench_objective.py",
        *("--batch", str(settings.batch), "--dim", str(settings.dim)),
        *("--queue-sizes", *map(str, settings.queue_sizes), "--modes", *settings.modes),
        *("--k", str(settings.k), "--skip", str(settings.skip), "--threshold", str(settings.threshold)),
        *("--temperature", str(settings.temperature), "--clusters", str(settings.clusters)),
        *("--cluster-noise", str(settings.cluster_noise)),
        *("--warmup", str(settings.warmup), "--repeats", str(settings.repeats)),
        *("--step-batch", str(settings.step_batch), "--step-warmup", str(settings.step_warmup)),
        *("--step-repeats", str(settings.step_repeats), "--step-queue-sizes", *map(str, settings.step_queue_sizes)),
        *("--arch", settings.arch, "--width", str(settings.width), "--image-size", str(settings.image_size)),
        *("--device", settings.device, "--threads", str(settings.threads), "--step-dtype", settings.step_dtype),
        *layout,
        *("--seed", str(settings.seed)),
    ]
    return shlex.join(argv)


def log(message: str) -> None:
    """Progress to stderr: stdout carries only the JSON."""
    print(f"[bench_objective] {message}", file=sys.stderr, flush=True)


def run(settings: Settings, invoked: Sequence[str]) -> dict[str, object]:
    """The whole benchmark; returns the JSON-ready result."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    started = time.perf_counter()
    load_at_start = load_average()
    dtype, channels_last, detection = resolve_step_precision(settings, device)
    log(f"device={device} threads={torch.get_num_threads()} step dtype={dtype} channels_last={channels_last}")

    batches = [settings.batch] if settings.step_batch == settings.batch else [settings.batch, settings.step_batch]
    objective = {f"B={batch}": bench_objective(settings, device, batch) for batch in batches}
    step = bench_step(settings, device, dtype, channels_last) if settings.step_queue_sizes else {}
    return {
        "benchmark": "mocoplus objective per negatives mode + share of a training step",
        "command": reproducing_command(settings),
        "invoked_as": shlex.join(["python", *invoked]),
        "environment": environment(device, settings.threads),
        "precision": {
            "step_dtype": str(dtype).removeprefix("torch."),
            "step_channels_last": channels_last,
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
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
