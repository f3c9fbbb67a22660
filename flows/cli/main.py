"""The root `mocoplus` app: the version flag, one-line usage errors, and the command groups in help order.

The ``mocoplus`` console script and ``python -m flows.cli`` both call `main`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from artifacts.atomic import package_version
from flows.cli import corpus, data, demo, pictures, run, serve
from flows.cli.errors import OneLineUsageErrors

ABOUT = "Train MoCo embeddings with dual-view loss and hard negatives, export them, index and search."

app = typer.Typer(
    name="mocoplus",
    cls=OneLineUsageErrors,
    help=ABOUT,
    epilog="Example: mocoplus demo --out ./demo-out",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
# the order of `mocoplus --help`: the chain as a user walks it
for group in (
    demo.commands,
    data.commands,
    run.commands,
    corpus.commands,
    pictures.commands,
    serve.commands,
    serve.flows_commands,
):
    app.add_typer(group)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mocoplus {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train MoCo embeddings with dual-view loss and hard negatives, export them, index and search."""


def main() -> None:
    """Console-script entry point (``mocoplus = "flows.cli.main:main"``)."""
    app()
