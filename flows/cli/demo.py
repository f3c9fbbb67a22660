"""``mocoplus demo``: the whole chain on Fashion-MNIST through the end-to-end flow, with a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.errors import one_line_errors
from flows.cli.tables import retrieval_table
from flows.demo import DemoConfig

commands = typer.Typer()


@commands.command(
    "demo",
    epilog=(
        "Examples:\n\n"
        "  mocoplus demo                 # the whole chain in about 10 minutes on 2 CPU cores\n\n"
        "  mocoplus demo --out /tmp/demo --minutes 20"
    ),
)
@one_line_errors(interrupted="interrupted; rerun to continue (finished stages are skipped)")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for shards, run, model, corpus and demo.json.")] = Path(
        "demo-out"
    ),
    minutes: Annotated[
        float, typer.Option(min=1, help="Time budget; training gets what the rest leaves.")
    ] = DemoConfig.minutes,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Training overrides (repeatable).")] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train exactly this many steps instead of planning from --minutes (a look at the "
            "chain's mechanics, not a trained model).",
        ),
    ] = None,
    gate: Annotated[
        bool,
        typer.Option(
            help="The quality gate: publish the model only when it beats raw pixels (--no-gate: publish "
            "it anyway, with --steps)."
        ),
    ] = True,
) -> None:
    """Ingest, pretrain, export, embed, evaluate, index and search Fashion-MNIST on the CPU (the end-to-end flow)."""
    from flows.demo import run_demo
    from pipeline.data.fashion_mnist import CLASS_NAMES

    report = run_demo(out, DemoConfig(minutes=minutes, overrides=overrides or [], steps=steps, gate=gate))

    def name(label: int | None) -> str:
        return CLASS_NAMES[label] if label is not None and 0 <= label < len(CLASS_NAMES) else "?"

    table = Table(title=f"mocoplus demo: Fashion-MNIST, {report['seconds'] / 60:.1f} min")
    table.add_column("measure")
    table.add_column("value", justify="right")
    steps, dim = report["planned_steps"], report["dim"]
    table.add_row(
        f"kNN top-1 (served {dim}-d vectors, {steps:,} training step{'s' if steps != 1 else ''})",
        f"{report['knn_top1']:.2%}",
    )
    table.add_row("quality gate", "passed" if report["gate"]["passed"] else "refused (published: --no-gate)")
    table.add_row(f"recall@10 ({report['index']})", f"{report['recall_at_10']:.3f}")
    table.add_row(
        "seconds per stage", ", ".join(f"{name} {value:.0f}" for name, value in report["stage_seconds"].items())
    )
    console = Console()
    console.print(table)
    title = f"retrieval on the 10,000 test images, 60,000 training images as memory: the served {dim}-d vectors"
    rows = [
        (f"model ({dim}-d)" if name == "model" else name, scores, None) for name, scores in report["retrieval"].items()
    ]
    console.print(retrieval_table(title, rows))
    search = report["search"]
    neighbours = ", ".join(name(hit["label"]) for hit in search["neighbours"])
    console.print(f"search: {search['query']} ({name(search['label'])}) → {neighbours}")
    for picture, path in report.get("pictures", {}).items():
        typer.echo(f"{picture}: {path}")  # whole, never wrapped: a path to copy
    console.print(
        f"wrote {Path(out) / 'demo.json'}; model {report['paths']['model']}, index {report['paths']['index']}"
    )
