"""A setting's help text, written beside its type and default in the stage's config dataclass.

``batch_size: Annotated[int, Help("Images per ONNX Runtime call.")] = 256``:
the command line builds its option from the field (`flows.cli.config_options`:
name, type, default and this help), so a setting is described once, where it
is defined. Torch-free, and below every package that defines a config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Help:
    """What a setting means, for ``--help``; ``byte_size``: the command line takes it as 512M, 1G, ..."""

    text: str
    byte_size: bool = False
