"""The corpus commands: ``mocoplus embed`` (shards → embedding set), ``index`` (→ index bundle), ``search``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from artifacts.model_bundle import Provider
from flows.cli.config_options import FromConfig, config_options
from flows.cli.errors import one_line_errors
from flows.cli.options import choice, from_env, progress_option
from pipeline.embed.config import EmbedConfig
from pipeline.index.config import IndexConfig

commands = typer.Typer()


@commands.command(
    "embed",
    help=(
        "Embed every sample of a shard set with a model bundle: one part (.npy matrix + .json keys, labels,\n"
        "skipped samples) per input shard, then manifest.json. Reruns skip finished parts.\n\n"
        "Examples:\n\n"
        "  mocoplus embed models/fmnist --data shards/fmnist-train --out emb/fmnist-train\n\n"
        "  mocoplus embed models/fmnist --data shards/big --out /shared/emb --shard-index 0 --num-shards 4   # 1 of 4"
    ),
)
@one_line_errors
@config_options(FromConfig(EmbedConfig, "config", ("batch_size", "workers", "provider", "threads", "fp16")))
def embed_command(
    model: Annotated[Path, typer.Argument(help="A model bundle (from mocoplus export).")],
    data: Annotated[str, typer.Option(help="Shards to embed (folder, manifest, .tar, brace pattern, pipe:).")],
    out: Annotated[Path, typer.Option(help="The embedding set folder.")],
    config: EmbedConfig,
    shard_index: Annotated[
        int | None, typer.Option(min=0, help="This process's share of the shards (default: $RANK, else 0) ...")
    ] = None,
    num_shards: Annotated[
        int | None, typer.Option(min=1, help="... out of this many processes (default: $WORLD_SIZE, else 1).")
    ] = None,
    progress: Annotated[bool, progress_option()] = True,
) -> None:
    """Embed a shard set with a model bundle."""
    from pipeline.embed.embed import embed

    config = replace(
        config,
        shard_index=from_env(shard_index, "RANK", EmbedConfig.shard_index),
        num_shards=from_env(num_shards, "WORLD_SIZE", EmbedConfig.num_shards),
    )
    result = embed(model, data, out, config, progress=progress)
    state = "complete, manifest written" if result.complete else "other shares still to run"
    typer.echo(
        f"{result.out_dir}: {result.parts_written} parts written ({result.samples:,} samples, "
        f"{result.skipped_samples} skipped), {result.parts_skipped} already done; {state}"
    )


@commands.command(
    "index",
    help=(
        "Build a FAISS index bundle from an embedding set: index.faiss, its id map (keys, labels), index.json.\n\n"
        "--kind auto picks by size and memory budget: Flat (exact) up to 50k vectors, HNSW32 up to 2M,\n"
        "IVF-Flat while the raw vectors fit the budget, OPQ + IVF-PQ beyond. The search parameter (nprobe,\n"
        "efSearch) is tuned to the smallest value whose recall@k against exact search on held-out queries\n"
        "reaches --target-recall; index.json records it with the measured recall, QPS and build times.\n\n"
        "Examples:\n\n"
        "  mocoplus index emb/fmnist --out indexes/fmnist\n\n"
        "  mocoplus index emb/web --out indexes/web --kind ivfpq --memory-budget 2G --target-recall 0.9\n\n"
        "  mocoplus index emb/web --out indexes/web --kind ivfpq --num-shards 8 --workers 2   # 2 processes\n\n"
        "  mocoplus index emb/photos --out indexes/photos --update --keep 3   # after ingest --update and embed"
    ),
)
@one_line_errors
@config_options(
    FromConfig(
        IndexConfig,
        "config",
        ("kind", "metric", "target_recall", "k", "memory_budget", "queries", "num_shards", "merge", "gpu"),
    )
)
def index_command(
    context: typer.Context,
    embeddings: Annotated[Path, typer.Argument(help="An embedding set (from mocoplus embed).")],
    out: Annotated[
        Path,
        typer.Option(
            help="The index bundle folder to create (must not exist, or be empty; or, with --update, to update)."
        ),
    ],
    config: IndexConfig,
    workers: Annotated[
        int, typer.Option(min=1, help="Local processes filling the shards at once (with --num-shards).")
    ] = 1,
    update: Annotated[
        bool,
        typer.Option(
            help="Write the next version of the bundle: add the new vectors, drop removed ones, re-tune, switch "
            "'current' atomically (retrains when the vectors added since training pass half, and says why)."
        ),
    ] = False,
    keep: Annotated[int, typer.Option(min=1, help="With --update: versions to keep, the current one included.")] = 3,
    progress: Annotated[bool, progress_option()] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print index.json instead of a summary.")] = False,
) -> None:
    """Build, tune and write a FAISS index for an embedding set."""
    from pipeline.index.build import build_index
    from pipeline.index.update import update_index

    if update:  # the bundle keeps its options; those given on this command line change them
        given = {name: getattr(config, name) for name in asdict(config) if _given(context, name)}
        result = update_index(embeddings, out, given, keep=keep, progress=progress, workers=workers)
    else:
        result = build_index(embeddings, out, config, progress=progress, workers=workers)
    info = result.info
    if as_json:
        typer.echo(json.dumps(info))
        return
    version = f" version {info['index_version']}" if info.get("index_version") else ""
    if result.up_to_date:
        typer.echo(f"{out}{version}: already up to date (built from these embeddings with these options)")
        return
    report, change = info["recall_at_k"], info.get("update")
    params = ", ".join(f"{name}={value}" for name, value in info["search"]["params"].items()) or "exact"
    if change and info.get("index_version") != 1 and "reason" not in info.get("trained", {}):
        how = (
            f"+{change['added']:,} added, −{change['removed']:,} removed in {change['total_seconds']:.1f} s "
            f"(no retraining; {info['trained']['added_since']:,} added since training)"
        )
    else:
        how = f"built in {info['build']['total_seconds']:.1f} s"
        if info["build"].get("parts_kept"):
            parts = info["build"]["parts"]
            how += f" (resumed: {info['build']['parts_kept']} of {len(parts)} shards kept from an interrupted build)"
        if info.get("trained", {}).get("reason"):
            how = f"rebuilt: {info['trained']['reason']}; {how}"
    if report.get("recall") is None:  # a handful of vectors: none can be held out to measure on
        measured = f"{params}: recall not measured (too few vectors to hold any out)"
    else:
        measured = (
            f"{params}: recall@{report['k']} {report['recall']:.3f} (target {report.get('target', 1.0)}) "
            f"at {report.get('qps', 0):,.0f} queries/s"
        )
    typer.echo(
        f"{out}{version}: {info['factory']} ({info['reason']}), {info['count']:,} vectors, "
        f"{info['bytes'] / 2**20:.1f} MiB, {how}; {measured}"
    )
    if not report.get("target_met", True):
        typer.echo(f"warning: the target recall was not reached; {report['recall']:.3f} is the best this index gives")


@commands.command(
    "search",
    help=(
        "Search an index bundle with images, corpus keys or vectors.\n\n"
        "QUERY is an image file, key:KEY (a sample of the indexed corpus) or a .npy of vectors ([D] or [N, D]).\n"
        "Scores are similarities, higher is closer. A query that cannot be read is reported and the others go\n"
        "on; the exit code is 1 if any failed.\n\n"
        "Examples:\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist shirt.png\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist key:train_00042 -k 5 --json\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist queries.npy --nprobe 32\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist key:test_00000 key:test_00001 --grid results.png\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist shirt.png --version 1   # an older version"
    ),
)
@one_line_errors
def search_command(
    index: Annotated[Path, typer.Argument(help="An index bundle (from mocoplus index).")],
    queries: Annotated[list[str], typer.Argument(help="Image files, key:KEY, or .npy files of vectors.")],
    model: Annotated[Path, typer.Option(help="The model bundle the index was built with.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Results per query.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per query.")] = False,
    nprobe: Annotated[int | None, typer.Option(min=1, help="Override the tuned nprobe (IVF indexes).")] = None,
    ef: Annotated[int | None, typer.Option(min=1, help="Override the tuned efSearch (HNSW indexes).")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="Search on GPU (needs faiss-gpu).")] = False,
    version: Annotated[
        int | None, typer.Option(min=1, help="Search this version of the bundle (default: its current one).")
    ] = None,
    provider: Annotated[
        Provider,
        typer.Option(parser=choice(Provider, "provider"), help="ONNX Runtime provider for image queries: cpu or cuda."),
    ] = "cpu",
    grid: Annotated[
        Path | None,
        typer.Option(
            help="Also draw the results to this PNG: a row per query, its neighbours with key, label and score "
            "(images read from the shards the index was embedded from)."
        ),
    ] = None,
) -> None:
    """Search an index with images, keys or vectors."""
    from artifacts.index_bundle import IndexBundle
    from artifacts.model_bundle import ModelBundle
    from pipeline.search import search_queries

    bundle = ModelBundle(model, provider=provider)
    searcher = IndexBundle(index, gpu=gpu, version=version)
    searcher.check_model(bundle.hash, model)
    override = _search_override(searcher.search_parameter, nprobe, ef)
    searcher.set_search_parameter(override)
    console, errors = Console(highlight=False), Console(stderr=True, highlight=False, soft_wrap=True)
    drawn, answered, failed = [], 0, 0  # only what a grid draws is kept: memory stays one batch of queries
    max_rows = _grid_rows() if grid is not None else 0
    label_name = _label_namer(searcher)
    for query, results in search_queries(queries, searcher, bundle.embed, bundle.size, k):
        if results is None:
            failed += 1
            if as_json:
                typer.echo(json.dumps({"query": query.name, "error": query.error}, allow_nan=False))
            errors.print(f"error: {query.name}: {query.error}", markup=False)
            continue
        answered += 1
        if len(drawn) < max_rows:
            drawn.append((query, results))
        if as_json:
            hits = [hit.as_dict() | {"label_name": label_name(hit.label) or None} for hit in results]
            typer.echo(json.dumps({"query": query.name, "results": hits}, allow_nan=False))
            continue
        table = Table(title=query.name, title_justify="left")
        for column in ("rank", "key", "label", "score"):
            table.add_column(column, justify="left" if column == "key" else "right")
        for hit in results:
            table.add_row(str(hit.rank), hit.key, label_name(hit.label), f"{hit.score:.4f}")
        console.print(table)
    if grid is not None and drawn:
        from pipeline.pictures.grid import MAX_NEIGHBOURS, MAX_ROWS, draw_search_results

        queries_drawn, hits_drawn = zip(*drawn, strict=True)
        draw_search_results(list(queries_drawn), list(hits_drawn), searcher, grid, f"{index.name}: top {k}")
        cut = answered > MAX_ROWS or k > MAX_NEIGHBOURS
        note = f" (the first {MAX_ROWS} queries, {MAX_NEIGHBOURS} neighbours each at most)" if cut else ""
        errors.print(f"grid: {grid}{note}", markup=False)
    if failed:
        raise typer.Exit(code=1)


def _label_namer(searcher) -> Callable[[int], str]:
    """A hit's label as its class name (the corpus's shard manifest, as the search page shows it); the number
    where the corpus names no classes or its embedding set is gone, ``""`` for unlabelled samples."""
    from artifacts.corpus_images import CorpusImages, CorpusImagesError

    try:
        return CorpusImages.of_index(searcher).label_name
    except CorpusImagesError:
        return lambda label: "" if label < 0 else str(label)


def _given(context: typer.Context, option: str) -> bool:
    """Whether the command line named ``option`` (not left at its default)."""
    source = context.get_parameter_source(option)
    return source is not None and source.name != "DEFAULT"


def _grid_rows() -> int:
    from pipeline.pictures.grid import MAX_ROWS

    return MAX_ROWS


def _search_override(parameter: str | None, nprobe: int | None, ef: int | None) -> int | None:
    """The one override that fits the index's search parameter; a clear error for the other."""
    if nprobe is not None and parameter != "nprobe":
        raise ValueError(f"--nprobe applies to IVF indexes; this index's parameter is {parameter or 'none (exact)'}")
    if ef is not None and parameter != "efSearch":
        raise ValueError(f"--ef applies to HNSW indexes; this index's parameter is {parameter or 'none (exact)'}")
    return nprobe if nprobe is not None else ef
