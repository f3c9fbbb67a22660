"""The picture commands: ``mocoplus plot`` (runs → training curves) and ``map`` (embedding set → 2-D map).

(``mocoplus search --grid`` draws search results; training draws ``RUN/curves.png`` itself.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.errors import one_line_errors
from flows.cli.options import choice
from pipeline.pictures.embedding_map import MapConfig, MapMethod

commands = typer.Typer()


@commands.command(
    "plot",
    help=(
        "Draw training curves of runs (their metrics.jsonl) to a PNG.\n\n"
        "Panels: loss, learning rate, momentum, kNN top-1 per epoch, and the mean positive / all-negative / "
        "selected-negative similarity. Several runs share one figure (one colour each) to compare recipes. "
        "Training writes RUN/curves.png itself when it ends or stops.\n\n"
        "Examples:\n\n"
        "  mocoplus plot runs/fmnist     # redraws runs/fmnist/curves.png\n\n"
        "  mocoplus plot runs/topk runs/threshold --out compare.png"
    ),
)
@one_line_errors
def plot_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (from mocoplus train).")],
    out: Annotated[Path | None, typer.Option(help="The PNG to write (default: RUN/curves.png for one run).")] = None,
) -> None:
    """Draw training curves of one or more runs."""
    from artifacts.run_folder import CURVES_FILE
    from pipeline.pictures.curves import draw_curves

    if out is None:
        if len(runs) > 1:
            raise ValueError("several runs share one figure: name it with --out FILE.png")
        out = runs[0] / CURVES_FILE
    typer.echo(str(draw_curves(runs, out)))


@commands.command(
    "map",
    help=(
        "Draw an embedding set in 2-D (UMAP or t-SNE), coloured by label, to a PNG.\n\n"
        "A seeded sample is projected with UMAP (umap-learn) or t-SNE (scikit-learn) on cosine distance and "
        "coloured by label, with the class names of the shard set's manifest as the legend.\n\n"
        "Examples:\n\n"
        "  mocoplus map emb/fmnist-test --out map.png\n\n"
        "  mocoplus map emb/fmnist-train --out map-tsne.png --method tsne --sample 5000"
    ),
)
@one_line_errors
def map_command(
    embeddings: Annotated[Path, typer.Argument(help="An embedding set (from mocoplus embed).")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")],
    method: Annotated[
        MapMethod, typer.Option(parser=choice(MapMethod, "map method"), help="umap or tsne.")
    ] = MapConfig.method,
    sample: Annotated[int, typer.Option(min=10, help="Points to draw (a seeded random sample).")] = MapConfig.sample,
    seed: Annotated[int, typer.Option(help="Seed of the sample and the projection.")] = MapConfig.seed,
) -> None:
    """Project an embedding set to 2-D and draw it coloured by label."""
    from artifacts.embedding_set import EmbeddingSet
    from pipeline.pictures.embedding_map import draw_map, map_embeddings

    embedding_set = EmbeddingSet(embeddings)
    config = MapConfig(method=method, sample=sample, seed=seed)
    typer.echo(f"projecting {min(sample, embedding_set.live_count):,} vectors with {method} ...", err=True)
    projected = map_embeddings(embedding_set, config)
    typer.echo(str(draw_map(projected, out, f"{embeddings.name} ({method})")))
