"""The training run's configuration: dataclasses, TOML presets and files, ``--set`` overrides.

A run is described by five sections, each a frozen dataclass that validates
itself: ``model`` (`mocoplus.MoCoConfig`: the method), ``data`` (shards,
augmentation preset, loading), ``optim`` (optimizer and schedule), ``train``
(length, batch, precision, checkpoints) and ``eval`` (the kNN monitor); and a
sixth, ``augment``, of overrides of the augmentation preset's fields
(`pipeline.data.augment.AugmentConfig`, e.g. ``augment.scale=[0.4, 1.0]``), so a
recipe can tune its crops and jitter without a new preset. ``--config``
names a preset shipped in ``pipeline/train/presets/NAME.toml`` or a TOML/JSON file;
``--set section.field=value`` overrides any field (the value in TOML syntax:
``3``, ``0.1``, ``true``, ``"band"``; a bare word is taken as a string). A
misspelt field or a value of the wrong type is a `ValueError` that names the
field. The resolved configuration is saved in the run folder as
``config.json``, which `load_config` reads back as it reads any file.

Learning-rate scaling is explicit: ``optim.lr`` is the rate at
``optim.base_batch`` images, and the run uses ``lr × train.global_batch /
base_batch`` (the linear scaling rule), whatever the number of processes the
global batch is split over.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import tomllib

from artifacts.files import UnreadableFileError, read_regular_file
from mocoplus import MoCoConfig
from pipeline.data.augment import PRESETS as AUGMENT_PRESETS
from pipeline.data.augment import AugmentConfig
from pipeline.precision import PRECISIONS

PRESET_DIR = Path(__file__).parent / "presets"
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16  # levels of [ and { in a config value; the deepest real one needs 3


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are loaded. ``train`` is usually given by ``--data``."""

    train: str = ""
    eval_memory: str = ""  # kNN monitor memory bank; empty: the training shards
    eval_queries: str = ""  # held-out shards for the kNN monitor; empty: no monitor
    augment: str = "small-grayscale"
    image_size: int = 32
    workers: int = 2
    shuffle_buffer: int = 2000
    samples_per_epoch: int = 0  # 0: the manifest's count

    def __post_init__(self) -> None:
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}; got {self.augment!r}")
        if self.image_size < 8 or self.workers < 0 or self.shuffle_buffer < 1 or self.samples_per_epoch < 0:
            raise ValueError("need image_size >= 8, workers >= 0, shuffle_buffer >= 1, samples_per_epoch >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """SGD (or LARS) with momentum, linear warm-up then cosine decay, per step."""

    optimizer: Literal["sgd", "lars"] = "sgd"
    lr: float = 0.06
    base_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    lars_trust: float = 0.001

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "lars") or self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optimizer must be sgd or lars and schedule cosine or constant; got {self}")
        if self.lr <= 0 or self.base_batch < 1 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("need lr > 0, base_batch >= 1, 0 <= momentum < 1, weight_decay >= 0")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0; got {self.warmup_epochs}")


@dataclass(frozen=True)
class TrainConfig:
    """Length, batch, numerics and checkpoints. ``global_batch`` is split evenly over the processes."""

    epochs: int = 10
    global_batch: int = 256
    max_steps: int = 0  # 0: epochs × steps per epoch; else stop there (smoke runs, tests)
    # seconds of wall-clock; > 0: the schedule is re-planned from the measured pace so that it ends (LR at 0,
    # last checkpoint and kNN pass done) when the budget is spent; epochs and max_steps stay upper bounds
    time_budget: float = 0.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    checkpoint_every: int = 0  # steps; 0: at each epoch's end only
    keep_last: int = 3
    seed: int = 0
    log_every: int = 1
    tensorboard: bool = False
    # seconds a rank may wait at a collective (the process group's timeout): covers the kNN monitor, which
    # runs on rank 0 while the others wait at a barrier (NCCL's own default, 10 minutes, is too short)
    collective_timeout: float = 3600.0

    def __post_init__(self) -> None:
        if not self.collective_timeout > 0:
            raise ValueError(f"collective_timeout must be > 0 seconds; got {self.collective_timeout}")
        if self.epochs < 1 or self.global_batch < 2 or self.max_steps < 0 or not self.time_budget >= 0:
            raise ValueError("need epochs >= 1, global_batch >= 2, max_steps >= 0 and time_budget >= 0")
        if self.precision not in (*PRECISIONS, "fp16"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32; got {self.precision!r}")
        if self.checkpoint_every < 0 or self.keep_last < 1 or self.log_every < 1:
            raise ValueError("need checkpoint_every >= 0, keep_last >= 1 and log_every >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """The kNN monitor (MoCo's CIFAR demo: weighted kNN, k = 200, τ = 0.1) on the key encoder."""

    knn_k: int = 200
    knn_temperature: float = 0.1
    every_epochs: int = 1
    batch_size: int = 512

    def __post_init__(self) -> None:
        if self.knn_k < 1 or self.knn_temperature <= 0 or self.every_epochs < 1 or self.batch_size < 1:
            raise ValueError("need knn_k >= 1, knn_temperature > 0, every_epochs >= 1 and batch_size >= 1")


@dataclass(frozen=True)
class RunConfig:
    model: MoCoConfig = field(default_factory=MoCoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: dict[str, Any] = field(default_factory=dict)  # fields of data.augment's preset to override

    def __post_init__(self) -> None:
        channels = self.augmentation.channels  # builds (and so validates) the augmentation with its overrides
        if self.model.in_channels != channels:
            raise ValueError(
                f"model.in_channels ({self.model.in_channels}) must equal augment.channels ({channels}): "
                "the network's stem takes what the augmentation gives it"
            )
        if self.train.global_batch % self.model.bn_splits and self.model.key_bn in ("split", "auto"):
            raise ValueError(
                f"train.global_batch ({self.train.global_batch}) must be a multiple of model.bn_splits "
                f"({self.model.bn_splits}) for split batch norm"
            )

    @property
    def augmentation(self) -> AugmentConfig:
        """``data.augment``'s preset at ``data.image_size``, with the ``augment`` section's overrides applied."""
        try:
            preset = replace(AUGMENT_PRESETS[self.data.augment](), output_size=self.data.image_size)
            return replace(preset, **self.augment)
        except (TypeError, ValueError) as error:
            raise ValueError(f"augment: {error}") from None

    @property
    def lr(self) -> float:
        """The learning rate actually used: ``optim.lr`` scaled linearly from ``base_batch`` to the global batch."""
        return self.optim.lr * self.train.global_batch / self.optim.base_batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS: dict[str, type] = {
    item.name: typing.get_type_hints(RunConfig)[item.name] for item in fields(RunConfig) if item.name != "augment"
}
# Overridable augmentation fields; the output size is data.image_size, so that there is one place to set it.
AUGMENT_FIELDS = {item.name for item in fields(AugmentConfig)} - {"output_size"}


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits ``hint`` (ints pass as floats, lists as tuples); else a `ValueError` naming ``path``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{path} must be one of {', '.join(map(repr, typing.get_args(hint)))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(path, value, option)
            except ValueError:
                continue
        raise ValueError(f"{path}: {value!r} fits none of {hint}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list; got {value!r}")
        return tuple(value)
    if hint is type(None):
        if value is not None:
            raise ValueError(f"{path} must be empty")
        return None
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{path} must be a finite number; got {value!r}")
        return float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ValueError(f"{path} must be {getattr(hint, '__name__', hint)}; got {value!r} ({type(value).__name__})")
    return value


def _checked_fields(name: str, cls: type, values: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """``values`` type-checked against ``cls``'s fields; a key outside ``known`` is refused, naming a close one."""
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {name}.{close[0]}?)" if close else ""
            raise ValueError(f"unknown config field {name}.{key}{hint}")
    return {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in values.items()}


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    checked = _checked_fields(name, cls, values, {item.name for item in fields(cls)})
    try:
        return cls(**checked)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated `RunConfig` from nested dicts (a TOML document, or a saved ``config.json``)."""
    if not isinstance(data, dict):
        raise ValueError(f"a config is a table of sections; got {type(data).__name__}")
    names = [*SECTIONS, "augment"]
    for name in data:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            raise ValueError(f"unknown config section {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    sections: dict[str, Any] = {}
    for name in names:
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise ValueError(f"config section {name!r} must be a table; got {values!r}")
        if name == "augment":
            if "output_size" in values:
                raise ValueError("augment.output_size is set by data.image_size")
            sections[name] = _checked_fields(name, AugmentConfig, values, AUGMENT_FIELDS)
        else:
            sections[name] = _build_section(name, SECTIONS[name], values)
    return RunConfig(**sections)


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.toml"))


def read_config_file(spec: str | Path) -> dict[str, Any]:
    """The nested dict of a preset name or a ``.toml``/``.json`` file."""
    path = Path(spec)
    if not path.suffix and (PRESET_DIR / f"{spec}.toml").is_file():
        path = PRESET_DIR / f"{spec}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"config {spec!r} is neither a preset ({', '.join(preset_names())}) nor a file")
    language = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = read_regular_file(path, MAX_CONFIG_BYTES).decode()
        data = _bounded_parse(json.loads if path.suffix == ".json" else tomllib.loads, text)
    except UnreadableFileError as error:
        raise ValueError(f"{path}: {error}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid {language} ({error})") from None
    except NestedTooDeeplyError as error:
        raise ValueError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a {language} table of sections")
    return data


class NestedTooDeeplyError(ValueError):
    """A config value nested deeper than any config needs (`MAX_CONFIG_DEPTH`)."""


def _bounded_parse(parse: Callable[[str], Any], text: str) -> Any:
    """``parse(text)``, its recursion bounded: a value nested past `MAX_CONFIG_DEPTH` is one error.

    The parsers recurse once per level of ``[``/``{``: thousands of them exhaust
    the interpreter's stack (a ``RecursionError`` traceback). Nesting is
    measured on the text first (brackets outside strings and comments), so a
    hostile file is refused before the parser descends into it.
    """
    depth = _bracket_depth(text)
    if depth > MAX_CONFIG_DEPTH:
        raise NestedTooDeeplyError(f"values nested {depth} levels deep (a config needs at most {MAX_CONFIG_DEPTH})")
    try:
        return parse(text)
    except RecursionError:  # a form the bracket count does not see: still one line, never a traceback
        raise NestedTooDeeplyError(f"values nested too deeply (a config needs at most {MAX_CONFIG_DEPTH})") from None


def _bracket_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in TOML or JSON text, outside quoted strings and ``#`` comments."""
    depth = deepest = 0
    quote: str | None = None
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if quote is not None:
            if char == "\\" and quote.startswith('"'):
                index += 1  # an escaped character inside a basic string
            elif text.startswith(quote, index):
                index += len(quote) - 1
                quote = None
        elif char in "\"'":
            quote = char * 3 if text.startswith(char * 3, index) else char
            index += len(quote) - 1
        elif char == "#":
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
        index += 1
    return deepest


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.field=value`` → (section, field, value); the value is read as TOML, else as a plain string."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"an override is section.field=value (e.g. train.epochs=3); got {text!r}")
    try:
        value = _bounded_parse(tomllib.loads, f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except NestedTooDeeplyError as error:
        raise ValueError(f"override {name.strip()}: {error}") from None
    return section, key, value


def load_config(spec: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A preset or file (default: built-in defaults) with ``section.field=value`` overrides applied."""
    data = read_config_file(spec) if spec else {}
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ValueError(f"config section {section!r} must be a table")
        data[section][key] = value
    return config_from_dict(data)


def with_data(config: RunConfig, **changes: Any) -> RunConfig:
    """``config`` with ``data`` fields replaced (``--data``/``--eval`` on the command line)."""
    return replace(config, data=replace(config.data, **changes))
