"""Command-line options derived from the stages' config dataclasses (`flows.cli.config_options`).

A setting is typed once, in its dataclass (type, default, `Help`): these tests
hold the commands to that, and check what a user meets — the defaults and help
in ``--help``, sizes as 512M, the dataclass's own message for a bad value.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, fields
from typing import Annotated, Any

import pytest
import typer
from typer.testing import CliRunner

from artifacts.settings import Help
from flows.cli.config_options import FromConfig, config_options
from flows.cli.main import app
from flows.cli.options import byte_size
from pipeline.data.config import IngestConfig
from pipeline.embed.config import EmbedConfig
from pipeline.export.config import ExportConfig
from pipeline.index.config import IndexConfig
from serving.batcher import BatcherConfig
from serving.limits import ConnectionLimits, Limits

DERIVED = {  # command → the dataclasses its options come from
    "serve": (BatcherConfig, Limits, ConnectionLimits),
    "index": (IndexConfig,),
    "embed": (EmbedConfig,),
    "ingest": (IngestConfig,),
    "export": (ExportConfig,),
}


def command_options(name: str) -> dict[str, Any]:
    """The Click options of ``mocoplus NAME``, by parameter name."""
    command = typer.main.get_command(app)
    return {param.name: param for param in command.commands[name].params if param.param_type_name == "option"}


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_each_derived_option_has_its_fields_help_and_default(name):
    options = command_options(name)
    checked = 0
    for config in DERIVED[name]:
        hints = typing.get_type_hints(config, include_extras=True)
        for item in fields(config):
            if item.name not in options:
                continue
            extras = typing.get_args(hints[item.name])[1:]
            help_ = next((extra for extra in extras if isinstance(extra, Help)), None)
            if help_ is None:  # an option of the command's own (embed's --shard-index reads $RANK too)
                continue
            option = options[item.name]
            assert option.help == help_.text, item.name
            if item.default is MISSING:  # a factory decides unless the option is given
                assert option.default is None
            else:  # a size's default is shown as the command line spells it, and parses back to the field's
                parsed = byte_size(option.default) if help_.byte_size else option.default
                assert parsed == item.default, item.name
            checked += 1
    assert checked >= 4


def test_serve_has_an_option_for_every_limit():
    """A new limit gets its --flag with no change to the command."""
    options = command_options("serve")
    for config in (Limits, ConnectionLimits, BatcherConfig):
        assert {item.name for item in fields(config)} <= set(options), config.__name__
    assert options["body_timeout_s"].opts == ["--body-timeout"]  # the command line's spelling, kept


def test_every_switch_can_be_turned_on_and_off():
    """A bool setting is --x/--no-x (ingest's --no-overwrite and --no-update existed before the options were
    derived, and scripts use them)."""
    for name, field_name in (("ingest", "overwrite"), ("ingest", "update"), ("embed", "fp16"), ("export", "whiten")):
        option = command_options(name)[field_name]
        flag = field_name.replace("_", "-")
        assert (option.opts, option.secondary_opts) == ([f"--{flag}"], [f"--no-{flag}"]), (name, field_name)


def test_a_size_is_given_as_512m_and_a_bad_value_gets_the_stages_message(tmp_path, monkeypatch):
    import pipeline.index.build

    built = []
    monkeypatch.setattr(pipeline.index.build, "build_index", lambda *args, **kwargs: built.append(args[2]) or 1 / 0)
    runner = CliRunner()
    runner.invoke(app, ["index", str(tmp_path), "--out", str(tmp_path / "i"), "--memory-budget", "512M", "--k", "5"])
    assert built[0] == IndexConfig(memory_budget=512 << 20, k=5)

    answer = runner.invoke(app, ["serve", "--model", str(tmp_path), "--max-request-memory", "1M"])
    assert answer.exit_code == 1
    assert answer.output.strip().splitlines() == [
        "error: max_request_memory (1,048,576) must hold at least one body of max_body_bytes (67,108,864)"
    ]


@dataclass(frozen=True)
class Toy:
    size: Annotated[int, Help("How big.")] = 3
    undocumented: int = 0


def test_a_field_without_help_or_a_missing_parameter_is_refused_when_the_command_is_defined():
    with pytest.raises(TypeError, match=r"Toy.undocumented has no Help"):
        config_options(FromConfig(Toy, "toy", ("size", "undocumented")))(lambda toy: toy)
    with pytest.raises(TypeError, match="no parameter 'toy'"):
        config_options(FromConfig(Toy, "toy", ("size",)))(lambda other: other)
    with pytest.raises(TypeError, match="has no field 'colour'"):
        config_options(FromConfig(Toy, "toy", ("colour",)))(lambda toy: toy)
