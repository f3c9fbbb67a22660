"""Command-line options derived from a stage's config dataclass: name, type, default and help typed once.

A command names the dataclass and the fields it exposes; `config_options`
gives the command one option per field (``--batch-size`` for ``batch_size``,
the field's default, its `artifacts.settings.Help` text, a choice parser for a
``Literal``, a size parser for a byte count) and calls it with the built
config instead of the separate values. Values are checked by the dataclass
itself, so a bad one fails with the stage's own one-line message::

    @config_options(FromConfig(EmbedConfig, "config", ("batch_size", "workers", "provider", "fp16")))
    def embed_command(model: ..., config: EmbedConfig, progress: ... = True) -> None: ...
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Annotated, Any, Literal, get_args, get_origin

import typer

from artifacts.settings import Help
from flows.cli.options import byte_size, byte_text, choice


@dataclass(frozen=True)
class FromConfig:
    """Options for ``names`` of the dataclass ``config``, passed to the command as its parameter ``into``.

    ``flags``: the option's name where the command line spells a field otherwise
    (``{"body_timeout_s": "--body-timeout"}``). A field whose default comes from a
    factory (all cores, say) is left unset unless given, so the factory decides.
    """

    config: type
    into: str
    names: tuple[str, ...]
    flags: Mapping[str, str] = field(default_factory=dict)

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.config, include_extras=True)
        by_name = {item.name: item for item in fields(self.config)}
        unknown = [name for name in self.names if name not in by_name]
        if unknown:
            raise TypeError(f"{self.config.__name__} has no field {unknown[0]!r}")
        return [self._parameter(by_name[name], hints[name]) for name in self.names]

    def _parameter(self, item: Any, hint: Any) -> inspect.Parameter:
        kind, help_ = _unpack(hint)
        if help_ is None:
            raise TypeError(f"{self.config.__name__}.{item.name} has no Help: write Annotated[type, Help('...')]")
        flag = self.flags.get(item.name, "--" + item.name.replace("_", "-"))
        default = None if item.default is MISSING else item.default
        options: dict[str, Any] = {"help": help_.text}
        annotation: Any = kind
        if help_.byte_size:  # shown and typed as 4G; the parser (also of the default) gives bytes
            options.update(parser=byte_size, metavar="<size>")
            default = byte_text(default) if default is not None else None
        elif get_origin(kind) is Literal:
            options["parser"] = choice(kind, flag.removeprefix("--"))
        if kind is bool or set(get_args(kind)) == {bool, type(None)}:  # a switch: --x turns it on, --no-x off
            names = [f"{flag}/--no-{flag.removeprefix('--')}"]
        else:
            names = [flag]
        if item.default is MISSING:  # a factory's default: unset unless given
            annotation, options["show_default"] = annotation | None, False
        return inspect.Parameter(
            item.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[annotation, typer.Option(*names, **options)],
            default=default,
        )

    def build(self, values: dict[str, Any]) -> Any:
        """The config from its options' values (a factory's field left to its factory unless given)."""
        factories = {item.name for item in fields(self.config) if item.default is MISSING}
        return self.config(
            **{name: value for name, value in values.items() if value is not None or name not in factories}
        )


def _unpack(hint: Any) -> tuple[Any, Help | None]:
    """``Annotated[T, Help(...)]`` → (T, the Help); a bare T → (T, None)."""
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        return base, next((extra for extra in extras if isinstance(extra, Help)), None)
    return hint, None


def field_names(config: type) -> tuple[str, ...]:
    """Every field of the dataclass ``config``: for a command that exposes them all."""
    return tuple(item.name for item in fields(config))


def config_options(*specs: FromConfig) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of ``specs`` in place of its parameters named by their ``into``."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)  # Typer reads a given signature as it is
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            spec = next((spec for spec in specs if spec.into == parameter.name), None)
            if spec is None:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            else:
                parameters.extend(spec.parameters())
        missing = [spec.into for spec in specs if spec.into not in signature.parameters]
        if missing:
            raise TypeError(f"{command.__name__} has no parameter {missing[0]!r} to receive its config")

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for spec in specs:
                values[spec.into] = spec.build({name: values.pop(name) for name in spec.names})
            return command(**values)

        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return run

    return decorate
