"""The run commands: ``mocoplus train`` (shards → run), ``evaluate`` (run → scores), ``export`` (run → bundle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.cli.config_options import FromConfig, config_options
from flows.cli.errors import one_line_errors
from flows.cli.options import progress_option
from flows.cli.tables import retrieval_table, view_recall_table
from pipeline.evaluate.config import ViewConfig
from pipeline.export.config import ExportConfig

commands = typer.Typer()

GRID_HELP = "Pool the embedding over a grid×grid grid (default: the run's)."
EXPORT_OPTIONS = ("checkpoint", "encoder", "head", "opset", "calibration", "quantize", "grid", "whiten", "whiten_data",
                  "whiten_images", "dims")  # fmt: skip


@commands.command(
    "train",
    epilog=(
        "Examples:\n\n"
        "  mocoplus train --data shards/fmnist-train --eval shards/fmnist-test --out runs/fmnist "
        "--config fashion-mnist-cpu\n\n"
        "  mocoplus train --data shards/fmnist-train --out runs/quick --config fashion-mnist-cpu "
        "--set train.epochs=1 --set model.negatives=topk\n\n"
        "  mocoplus train --out runs/fmnist --resume      # continue from the newest checkpoint\n\n"
        "  torchrun --nproc_per_node=2 --no-python mocoplus train --data SHARDS --out RUN --config cifar-resnet18"
    ),
)
@one_line_errors(interrupted="interrupted; the newest checkpoint is in --out (continue with --resume)")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Run folder: config.json, checkpoints/, metrics.jsonl.")],
    data: Annotated[
        str | None, typer.Option(help="Training shards (a shard set folder, brace pattern, pipe: URL).")
    ] = None,
    eval_shards: Annotated[
        str | None, typer.Option("--eval", help="Held-out labelled shards for the kNN monitor at each epoch's end.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="A preset (fashion-mnist-cpu, photos-cpu, cifar-resnet18, imagenet-resnet50) or a TOML/JSON file."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: section.field=value (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    progress: Annotated[
        bool, typer.Option(help="Show progress on rank 0 (a bar on a terminal, lines otherwise).")
    ] = True,
) -> None:
    """Pretrain MoCoPlus on shards: one CPU/GPU, or every process of a torchrun launch."""
    from artifacts.run_folder import CONFIG_FILE
    from pipeline.train.run_config import load_config, with_data
    from pipeline.train.trainer import train

    spec = config if config or not resume else str(out / CONFIG_FILE)
    if resume and not config and not (out / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{out} holds no run to resume (no {CONFIG_FILE}, no checkpoints)")
    run_config = load_config(spec, overrides or [])
    changes = {"train": data} if data else {}
    if eval_shards:
        changes["eval_queries"] = eval_shards
    run_config = with_data(run_config, **changes)
    result = train(run_config, out, resume=resume, progress=progress)
    knn = f" · kNN top-1 {result.knn_top1:.2%}" if result.knn_top1 is not None else ""
    stopped = f" · stopped by {result.stopped_by} (checkpoint written; --resume continues)" if result.stopped_by else ""
    Console(soft_wrap=True, highlight=False).print(
        f"step {result.steps} · epoch {result.epoch} · loss {result.final_loss:.3f} · "
        f"{result.images_per_s:,.0f} img/s{knn}{stopped} · {result.run_dir}"
    )


@commands.command(
    "evaluate",
    epilog=(
        "Two forms: a training run's encoders (RUN --data --eval), or the vectors a model serves (--memory\n"
        "--queries: two embedding sets from mocoplus embed; --against MODEL scores another bundle beside).\n"
        "Without labels, --unlabelled searches altered views of a sample of the corpus (RUN --data, or --memory)\n"
        "for their originals: recall@1 and @10, beside raw pixels.\n\n"
        "Examples:\n\n"
        "  mocoplus evaluate runs/fmnist --data shards/fmnist-train --eval shards/fmnist-test\n\n"
        "  mocoplus evaluate runs/fmnist --data shards/fmnist-train --eval shards/fmnist-test --checkpoint last\n\n"
        "  mocoplus evaluate --memory emb/fmnist-train --queries emb/fmnist-test --baselines pixels,hog\n\n"
        "  mocoplus evaluate --memory emb/fmnist-train --queries emb/fmnist-test --against models/fmnist-old\n\n"
        "  mocoplus evaluate runs/photos --data shards/photos --unlabelled\n\n"
        "  mocoplus evaluate --memory emb/photos --unlabelled --sample 1000"
    ),
)
@one_line_errors
def evaluate_command(
    run: Annotated[Path | None, typer.Argument(help="A run folder (from mocoplus train).")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Labelled training shards: the kNN memory and the linear probe's data (with --unlabelled: the "
            "corpus, labels not needed)."
        ),
    ] = None,
    eval_shards: Annotated[str | None, typer.Option("--eval", help="Labelled held-out shards to score.")] = None,
    memory: Annotated[
        Path | None, typer.Option(help="An embedding set of labelled samples: the memory (instead of a run).")
    ] = None,
    queries: Annotated[
        Path | None, typer.Option(help="An embedding set of labelled held-out samples, by the same model.")
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(help="With --memory: another model bundle, scored on the same shards (embedded once, cached)."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="With --memory: where baseline features and --against vectors are kept "
            "(default: $MOCOPLUS_CACHE or ~/.cache/mocoplus)."
        ),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best, last, or a checkpoint path (default: best if any).")] = "auto",
    baselines: Annotated[
        str, typer.Option(help="Comma-separated label-free baselines scored alike: pixels, hog (empty: none).")
    ] = "",
    workers: Annotated[int, typer.Option(min=0, help="Decoding worker processes.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    progress: Annotated[bool, progress_option()] = True,
    grid: Annotated[int | None, typer.Option(min=1, help=GRID_HELP)] = None,
    whiten: Annotated[
        bool | None,
        typer.Option(
            "--whiten/--no-whiten",
            help="PCA-whiten the embedding, fitted on the memory set; baselines are then scored both ways "
            "(default: the run's model.embedding_whitening).",
        ),
    ] = None,
    dims: Annotated[
        int | None,
        typer.Option(min=1, help="Keep the whitening's leading D directions (default: model.embedding_dims)."),
    ] = None,
    linear: Annotated[bool, typer.Option(help="Fit the linear probe (minutes for wide embeddings).")] = True,
    unlabelled: Annotated[
        bool,
        typer.Option(
            "--unlabelled",
            help="Quality without labels: altered views of a sample of the corpus (--data, or --memory) searched "
            "for their originals; recall@1/@10 beside raw pixels.",
        ),
    ] = False,
    sample: Annotated[
        int, typer.Option(min=1, help="With --unlabelled: pictures whose views are searched.")
    ] = ViewConfig.sample,
    views: Annotated[int, typer.Option(min=1, help="With --unlabelled: altered views per picture.")] = ViewConfig.views,
) -> None:
    """The retrieval suite (weighted kNN-200, 1/5/20-NN, precision@10) and a linear probe, against baselines;
    without labels (--unlabelled), recall of a corpus's pictures from altered views, against raw pixels."""
    if unlabelled:
        _evaluate_unlabelled(run, data, memory, ViewConfig(sample=sample, views=views),
                             against=against, cache=cache, checkpoint=checkpoint, workers=workers,
                             as_json=as_json, progress=progress, refused=(eval_shards, queries, baselines))  # fmt: skip
        return
    names = tuple(name.strip() for name in baselines.split(",") if name.strip())
    if memory is not None or queries is not None:
        if run is not None or data or eval_shards or memory is None or queries is None:
            raise ValueError("evaluate takes either RUN with --data and --eval, or --memory and --queries")
        from pipeline.evaluate.embedded import evaluate_embeddings

        served = evaluate_embeddings(
            memory, queries, baselines=names, against=against, cache=cache, workers=workers, progress=progress
        )
        if as_json:
            typer.echo(json.dumps(served.to_json()))
            return
        title = (
            f"{served.memory_samples:,} vectors of {memory} as memory, {served.query_samples:,} of {queries} "
            "as queries, cosine similarity"
        )
        Console().print(retrieval_table(title, [(name, scores, None) for name, scores in served.rows()]))
        return
    if run is None or not data or not eval_shards or against is not None:
        raise ValueError("evaluate takes either RUN with --data and --eval, or --memory and --queries (and --against)")
    from pipeline.evaluate.evaluate import evaluate

    result = evaluate(
        run,
        data,
        eval_shards,
        checkpoint=checkpoint,
        workers=workers,
        baselines=names,
        progress=progress,
        grid=grid,
        whiten=whiten,
        dims=dims,
        linear=linear,
    )
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    title = (
        f"{result.checkpoint} (step {result.step}): {result.train_samples:,} images as memory, "
        f"{result.eval_samples:,} held-out queries, cosine similarity"
        + (", encoders PCA-whitened (fitted on the memory set)" if result.whitening == "pca" else "")
    )
    rows = [
        (f"{name} encoder", scores.retrieval.as_dict(), scores.linear_top1) for name, scores in result.encoders.items()
    ]
    rows += [(name, scores.as_dict(), None) for name, scores in result.baselines.items()]
    Console().print(retrieval_table(title, rows))


def _evaluate_unlabelled(
    run: Path | None,
    data: str | None,
    memory: Path | None,
    config: ViewConfig,
    *,
    against: Path | None,
    cache: Path | None,
    checkpoint: str,
    workers: int,
    as_json: bool,
    progress: bool,
    refused: tuple[object, ...],
) -> None:
    """`evaluate --unlabelled`: a run on its shards (RUN --data) or an embedding set (--memory)."""
    from pipeline.evaluate.views import evaluate_embedding_views, evaluate_run_views

    if any(refused):
        raise ValueError("--unlabelled scores one corpus: it takes no --eval, --queries or --baselines (pixels are in)")
    if memory is not None:
        if run is not None or data:
            raise ValueError("evaluate --unlabelled takes either RUN with --data, or --memory")
        result = evaluate_embedding_views(
            memory, config, against=against, cache=cache, workers=workers, progress=progress
        )
        corpus, model = str(memory), "model"
    else:
        if run is None or not data or against is not None:
            raise ValueError("evaluate --unlabelled takes either RUN with --data, or --memory (and --against)")
        result = evaluate_run_views(run, data, config, checkpoint=checkpoint, workers=workers, progress=progress)
        corpus, model = data, "key encoder"
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"{result.sample:,} pictures × {result.views} altered views searched among the {result.corpus:,} of "
        f"{corpus} (cosine similarity)",
        markup=False,
    )
    console.print(view_recall_table("without labels", result.rows(model, f"against {against}")), soft_wrap=False)


@commands.command(
    "export",
    help=(
        "Export a run's encoder as a model bundle: encoder.onnx, encoder.pt (TorchScript) and model.json.\n\n"
        "The models take uint8 RGB images [N, H, W, 3] at the trained size and return L2-normalised float32\n"
        "embeddings [N, D]; preprocessing is inside the graph. Torch, TorchScript and ONNX Runtime are checked\n"
        "against each other on real images before the bundle appears.\n\n"
        "Examples:\n\n"
        "  mocoplus export runs/fmnist --out models/fmnist\n\n"
        "  mocoplus export runs/fmnist --out models/fmnist-last --checkpoint last --encoder query\n\n"
        "  mocoplus export runs/fmnist --out models/fmnist-int8 --quantize int8\n\n"
        "  mocoplus export runs/fmnist --out models/fmnist-512 --dims 512"
    ),
)
@one_line_errors
@config_options(FromConfig(ExportConfig, "config", EXPORT_OPTIONS))
def export_command(
    run: Annotated[Path, typer.Argument(help="A run folder (from mocoplus train).")],
    out: Annotated[Path, typer.Option(help="The bundle folder to create (must not exist, or be empty).")],
    config: ExportConfig,
    as_json: Annotated[bool, typer.Option("--json", help="Print model.json instead of a summary.")] = False,
    progress: Annotated[bool, progress_option()] = True,
) -> None:
    """Export a run's encoder to TorchScript and ONNX with its model.json."""
    from pipeline.export.export import export

    result = export(run, out, config, progress=progress)
    info = result.model_json
    if as_json:
        typer.echo(json.dumps(info))
        return
    if result.up_to_date:
        typer.echo(f"{result.bundle}: already up to date (exported from this checkpoint with these options)")
        return
    parity = info["parity"]
    typer.echo(
        f"{result.bundle}: {info['encoder']} encoder, uint8 {info['input']['shape']} → float32 "
        f"[N, {info['output']['dim']}]{', PCA-whitened' if info.get('whitening') else ''}{_int8_note(info)}"
        f" ({info['precision']}), bundle {info['bundle_hash'][:12]}; parity on {parity['images']} images: "
        f"TorchScript {parity['torchscript_max_abs_diff']:.1e}, ONNX Runtime {parity['onnxruntime_max_abs_diff']:.1e}"
        f" (mean cosine {parity['onnxruntime_mean_cosine']:.5f})"
    )


def _int8_note(info: dict) -> str:
    """Which wider whitenings an int8 export tried and refused (their mean cosine to fp32), if any."""
    refused = (info.get("whitening") or {}).get("int8_refused")
    if not refused:
        return ""
    tried = ", ".join(f"{entry['dims']}: {entry['mean_cosine']:.4f}" for entry in refused)
    return f" (int8 mean cosine to fp32 below {info['parity']['min_mean_cosine']} with {tried} directions)"
