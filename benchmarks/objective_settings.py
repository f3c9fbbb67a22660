"""The settings of `bench_objective.py`: one dataclass, its flags one to one, and the command that reproduces it.

Every knob is dumped into the JSON, and `reproducing_command` spells each out
as a flag, so a result explains itself and reruns even if the defaults change.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, replace

import torch
from harness import usable_cores

from mocoplus.negatives import NEGATIVES

REFERENCE_BATCH = 256  # the batch the objective is always timed at, whatever the step batch


@dataclass(frozen=True)
class Settings:
    """Every knob of one run; dumped verbatim into the JSON so a result explains itself."""

    batch: int = REFERENCE_BATCH
    dim: int = 128
    queue_sizes: tuple[int, ...] = (4096, 65536)
    modes: tuple[str, ...] = NEGATIVES
    num_negatives: int = 1024  # the settings of `mocoplus.negatives.NegativeSampling`, by their names
    skip_negatives: int = 16
    negative_threshold: float = 0.5
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
    parser.add_argument(
        "--num-negatives", type=int, default=defaults.num_negatives, help="negatives kept by topk/band/threshold"
    )
    parser.add_argument(
        "--skip-negatives", type=int, default=defaults.skip_negatives, help="most-similar entries band mode skips"
    )
    parser.add_argument(
        "--negative-threshold", type=float, default=defaults.negative_threshold, help="threshold mode's cut-off"
    )
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
        num_negatives=args.num_negatives,
        skip_negatives=args.skip_negatives,
        negative_threshold=args.negative_threshold,
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
        *("--num-negatives", str(settings.num_negatives), "--skip-negatives", str(settings.skip_negatives)),
        *("--negative-threshold", str(settings.negative_threshold)),
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
