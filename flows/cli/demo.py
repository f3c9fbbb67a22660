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
) -> None:
    """Ingest, pretrain, evaluate, export, embed, index and search Fashion-MNIST on the CPU (the end-to-end flow)."""
    from flows.demo import run_demo
    from pipeline.data.fashion_mnist import CLASS_NAMES

    report = run_demo(out, DemoConfig(minutes=minutes, overrides=overrides or []))

    def name(label: int | None) -> str:
        return CLASS_NAMES[label] if label is not None and 0 <= label < len(CLASS_NAMES) else "?"

    table = Table(title=f"mocoplus demo: Fashion-MNIST, {report['seconds'] / 60:.1f} min")
    table.add_column("measure")
    table.add_column("value", justify="right")
    steps = report["planned_steps"]
    table.add_row(f"kNN top-1 (key encoder, {steps:,} step{'s' if steps != 1 else ''})", f"{report['knn_top1']:.2%}")
    if report.get("linear_top1") is not None:
        table.add_row("linear probe top-1", f"{report['linear_top1']:.2%}")
    table.add_row(f"recall@10 ({report['index']})", f"{report['recall_at_10']:.3f}")
    console = Console()
    console.print(table)
    if report.get("retrieval"):
        whitened = ", encoder PCA-whitened" if report.get("whitening") == "pca" else ""
        title = f"retrieval on the 10,000 test images, 60,000 training images as memory{whitened}"
        console.print(retrieval_table(title, [
            (name, scores, None) for name, scores in report["retrieval"].items()
        ]))  # fmt: skip
    search = report["search"]
    neighbours = ", ".join(name(hit["label"]) for hit in search["neighbours"])
    console.print(f"search: {search['query']} ({name(search['label'])}) → {neighbours}")
    for picture, path in report.get("pictures", {}).items():
        typer.echo(f"{picture}: {path}")  # whole, never wrapped: a path to copy
    console.print(
        f"wrote {Path(out) / 'demo.json'}; model {report['paths']['model']}, index {report['paths']['index']}"
    )
