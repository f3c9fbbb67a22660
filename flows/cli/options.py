"""Option helpers shared by the command groups: choices from ``Literal`` types, byte sizes, env fallbacks.

Defaults and choices are read from the stages' config dataclasses and their
``Literal`` types, so a value is typed once; these helpers turn them into
Typer parsers with the stages' own wording for a refused value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, get_args

import typer

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def choice(literal: Any, name: str) -> Callable[[str], str]:
    """A parser that accepts the values of ``literal`` and refuses others as "NAME must be one of ...; got X"."""
    values: tuple[str, ...] = get_args(literal)

    def parse(text: str) -> str:
        if text not in values:
            raise typer.BadParameter(f"{name} must be one of {', '.join(values)}; got {text!r}")
        return text

    return parse


def byte_size(text: str) -> int:
    """``"512M"``, ``"1G"``, ``"64k"`` or plain bytes → bytes (binary multiples)."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in _UNITS and cleaned[-1:] else (cleaned, "")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text!r} is not a size such as 512M or 1G")
    if value < 1:
        raise typer.BadParameter(f"{text!r} must be at least one byte")
    return int(value)


def byte_text(size: int) -> str:
    """A stage's byte default as the command line spells it: 512 MiB → ``"512M"`` (`byte_size` reads it back)."""
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def from_env(value: int | None, variable: str, default: int) -> int:
    """An option's value, else a torchrun-style environment variable, else ``default``."""
    if value is not None:
        return value
    text = os.environ.get(variable, "")
    if not text:
        return default
    if not text.strip().isdigit():
        raise ValueError(f"${variable} must be a non-negative integer; got {text!r}")
    return int(text)


def progress_option() -> Any:
    """``--progress/--no-progress``, the same on every long-running command."""
    return typer.Option(help="Show progress (a bar on a terminal, lines otherwise).")
