"""The data commands: ``mocoplus ingest`` (images → shard set), ``mocoplus verify`` (shard set → report) and
``mocoplus sample-photos`` (a folder of colour pictures to try the photo path on, made offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.config_options import FromConfig, config_options
from flows.cli.errors import fail, one_line_errors
from flows.cli.options import progress_option
from pipeline.data.config import IngestConfig

commands = typer.Typer()
INGEST_OPTIONS = ("shard_size", "shard_bytes", "image_format", "max_side", "max_pixels", "max_file_bytes", "name",
                  "workers", "overwrite", "update")  # fmt: skip


@commands.command(
    "ingest",
    epilog=(
        "Examples:\n\n"
        "  mocoplus ingest fashion-mnist:train --out shards/fmnist-train\n\n"
        "  mocoplus ingest ~/photos --out shards/photos --format jpg --max-side 512 --shard-size 2000\n\n"
        "  mocoplus ingest ~/photos --out shards/photos --format jpg --max-side 512 --shard-size 2000 --update"
        "   # a day later: new, changed and removed photos\n\n"
        "  mocoplus ingest images.csv --out shards/listed   # CSV with a 'path' and an optional 'label' column"
    ),
)
@one_line_errors(interrupted="interrupted; rerun the same command to resume from the last finished shard")
@config_options(
    FromConfig(
        IngestConfig,
        "config",
        INGEST_OPTIONS,
        flags={"image_format": "--format"},
    )
)
def ingest_command(
    source: Annotated[
        str,
        typer.Argument(
            help="An image folder (class subfolders → labels), a .txt/.csv list of paths, "
            "or fashion-mnist[:train|:test]."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the shards and manifest.json.")],
    config: IngestConfig,
    progress: Annotated[bool, progress_option()] = True,
) -> None:
    """Write images as WebDataset shards with a manifest; bad inputs are skipped and listed, never fatal."""
    from pipeline.data.ingest import ingest

    result = ingest(source, out, config, progress=progress)

    manifest = result.manifest
    console = Console(soft_wrap=True)
    if manifest.skipped:
        table = Table(title=f"skipped inputs ({len(manifest.skipped):,}; all listed in manifest.json)")
        table.add_column("input", overflow="fold")
        table.add_column("reason", overflow="fold")
        for item in manifest.skipped[:20]:
            table.add_row(item.input, item.reason)
        console.print(table)
    size = sum(shard.bytes for shard in manifest.shards) / 2**20
    state = "already up to date" if result.up_to_date else f"{result.images_per_s:,.0f} inputs/s"
    if result.resumed_inputs and not result.up_to_date:
        state += f" (resumed after {result.resumed_inputs:,} inputs)"
    generation = len(manifest.generations) - 1
    if generation > 0 and not result.up_to_date:
        state = f"generation {generation}: +{result.added:,} added, −{result.removed:,} removed · {state}"
    console.print(
        f"{manifest.inputs:,} inputs → {manifest.live:,} samples in {len(manifest.shards)} shards "
        f"({size:,.1f} MiB) · {len(manifest.skipped):,} skipped · {state} · {result.out_dir / 'manifest.json'}",
        highlight=False,
    )
    if manifest.live == 0:
        raise fail(f"nothing usable was written: all {manifest.inputs:,} inputs were skipped")


@commands.command(
    "sample-photos",
    epilog=(
        "Examples:\n\n"
        "  mocoplus sample-photos --out photos                       # 1,900 pictures in 19 class folders\n\n"
        "  mocoplus sample-photos --out photos-test --per-photo 20 --seed 1   # other crops: held-out queries\n\n"
        "  mocoplus sample-photos --out photos-flat --unlabelled     # no class folders, as most folders are"
    ),
)
@one_line_errors
def sample_photos_command(
    out: Annotated[Path, typer.Option("--out", help="The folder to create (must not exist, or be empty).")],
    per_photo: Annotated[int, typer.Option(min=1, help="Pictures cut from each sample photograph.")] = 100,
    seed: Annotated[int, typer.Option(help="Another seed, other crops of the same photographs.")] = 0,
    unlabelled: Annotated[
        bool, typer.Option("--unlabelled", help="Write the pictures flat, without class folders.")
    ] = False,
) -> None:
    """A folder of colour JPEGs (64-300 px) cut from the photographs scikit-image and matplotlib install."""
    from pipeline.data.sample_photos import SAMPLE_PHOTOS, SamplePhotosConfig, write_sample_photos

    count = write_sample_photos(out, SamplePhotosConfig(per_photo=per_photo, seed=seed, labelled=not unlabelled))
    layout = "flat, no labels" if unlabelled else f"{len(SAMPLE_PHOTOS)} class folders"
    Console(highlight=False).print(f"{count:,} pictures of {len(SAMPLE_PHOTOS)} photographs ({layout}) · {out}")


@commands.command(
    "verify",
    epilog="Examples:\n\n  mocoplus verify shards/fmnist-train\n\n  mocoplus verify shards/fmnist-train --quick",
)
@one_line_errors
def verify_command(
    shards: Annotated[Path, typer.Argument(help="A shard set folder (with manifest.json).")],
    quick: Annotated[bool, typer.Option(help="Check hashes, counts and labels only; skip decoding images.")] = False,
    progress: Annotated[bool, progress_option()] = True,
) -> None:
    """Check every shard's sha256 and count against the manifest and decode every sample."""
    from pipeline.data.verify import verify

    report = verify(shards, quick=quick, progress=progress)
    for problem in report.problems:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"bad: {problem}", markup=False)
    checked = "hashes and counts" if quick else f"hashes, counts and {report.decoded:,} decoded images"
    summary = f"{report.shards} shards, {report.samples:,} samples: {checked}"
    if report.generations > 1:
        summary += f"; {report.generations} generations, {report.live:,} samples live"
    if not report.ok:
        raise fail(f"{summary}; {len(report.problems):,} problems")
    Console(highlight=False).print(f"ok: {summary}")
