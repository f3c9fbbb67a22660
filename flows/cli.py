"""The `mocoplus` command line (DESIGN §4).

Commands import their stage (and so torch) inside the function body: ``mocoplus
--help`` stays instant, and commands that need neither torch nor prefect
(serve, search) will work where those are not installed. Expected failures
(missing data, bad paths, bad values) print one ``error: ...`` line to stderr
and exit 1; a traceback means a bug.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

EXPECTED_ERRORS = (FileNotFoundError, ValueError, OSError, FloatingPointError)

app = typer.Typer(
    name="mocoplus",
    help="Train MoCo embeddings with dual-view loss and hard negatives, export them, index and search.",
    epilog="Example: mocoplus demo --out ./demo-out",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    """One ``error:`` line on stderr (never wrapped, never read as markup) and a non-zero exit."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", markup=False)
    return typer.Exit(code=code)


def _package_version() -> str:
    """From the installed metadata, not ``mocoplus.__version__``: importing mocoplus imports torch."""
    try:
        return version("mocoplus")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mocoplus {_package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train MoCo embeddings with dual-view loss and hard negatives, export them, index and search."""


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mocoplus demo      # defaults: a few minutes on 2 CPU cores\n\n"
        "  mocoplus demo --out /tmp/demo --epochs 5\n\n"
        "  mocoplus demo --train-size 1024 --steps 10   # smoke run"
    )
)
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for demo.json (created if missing).")] = Path("demo-out"),
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs over the training slice.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Exact training steps (overrides --epochs).")] = None,
    train_size: Annotated[int | None, typer.Option(min=1, help="Training images (kNN bank).")] = None,
    test_size: Annotated[int | None, typer.Option(min=1, help="Test images (kNN queries).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=8, help="Images per step (a multiple of 8).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Fashion-MNIST IDX folder (default: $MOCOPLUS_FASHION_MNIST_DIR, else the Debian one)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Pretrain MoCoPlus on a Fashion-MNIST slice on the CPU and compare kNN top-1 with random init."""
    from pipeline.demo import DemoConfig, run_demo  # imported here: torch loads only when the command runs

    overrides = {
        "epochs": epochs,
        "steps": steps,
        "train_size": train_size,
        "test_size": test_size,
        "batch_size": batch_size,
        "seed": seed,
        "data_dir": str(data_dir) if data_dir is not None else None,
    }
    try:
        config = DemoConfig(**{name: value for name, value in overrides.items() if value is not None})
        result = run_demo(config, out, progress=progress)
    except EXPECTED_ERRORS as error:
        raise _fail(str(error) or type(error).__name__) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", code=130) from None

    table = Table(title="mocoplus demo: Fashion-MNIST, weighted kNN top-1")
    table.add_column("encoder")
    table.add_column("kNN top-1", justify="right")
    table.add_row("random init", f"{result.knn_top1_random_init:.2%}")
    table.add_row(f"trained ({result.steps} steps)", f"{result.knn_top1_trained:.2%}")
    console = Console()
    console.print(table)
    console.print(
        f"final loss {result.final_loss:.3f} · precision {result.precision} · "
        f"{result.train_images_per_s:,.0f} img/s · {result.elapsed_s:.0f} s · wrote {result.output}"
    )


def main() -> None:
    """Console-script entry point (``mocoplus = "flows.cli:main"``)."""
    app()


if __name__ == "__main__":
    main()
