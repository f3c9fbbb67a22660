"""The `mocoplus` command line (DESIGN §4).

Commands import their stage (and so torch) inside the function body: ``mocoplus
--help`` stays instant, and commands that need neither torch nor prefect
(serve, search) will work where those are not installed. Expected failures
(missing data, bad paths, bad values) print one ``error: ...`` line to stderr
and exit 1; a traceback means a bug.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from artifacts.atomic import package_version

EXPECTED_ERRORS = (FileNotFoundError, ValueError, OSError, FloatingPointError)


def _fail(message: str, code: int = 1) -> typer.Exit:
    """One ``error:`` line on stderr (never wrapped, never read as markup) and a non-zero exit."""
    one_line = " ".join(message.split()) or "failed"
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {one_line}", markup=False)
    return typer.Exit(code=code)


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (a missing argument, an unknown option, a bad value) as one ``error:`` line and exit 1.

    Typer draws them as a framed panel with exit 2; every failure of this
    command line is one line, so scripts and people read them alike.
    """

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            _fail("interrupted", code=130)
            sys.exit(130)
        except typer.TyperException as error:  # Typer's (vendored) click usage errors
            context = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError" and context is not None:  # a bare group: its help
                help_text = context.get_help()  # Typer's rich help prints itself and returns ""
                if help_text:
                    typer.echo(help_text)
                sys.exit(0)
            command = context.command_path if context is not None else "mocoplus"
            _fail(f"{error.format_message()} (see: {command} --help)")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="mocoplus",
    cls=_OneLineUsageErrors,
    help="Train MoCo embeddings with dual-view loss and hard negatives, export them, index and search.",
    epilog="Example: mocoplus demo --out ./demo-out",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _one_line_errors(function=None, *, interrupted: str = "interrupted"):
    """Expected failures of a command → one ``error:`` line and exit 1; Ctrl-C → ``interrupted`` and exit 130.

    A traceback then always means a bug. Used bare (``@_one_line_errors``) or
    with the message that tells how to continue after Ctrl-C.
    """

    def decorate(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except EXPECTED_ERRORS as error:
                raise _fail(str(error) or type(error).__name__) from None
            except KeyboardInterrupt:
                raise _fail(interrupted, code=130) from None

        return run

    return decorate(function) if function is not None else decorate


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


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mocoplus demo                 # the whole chain in about 10 minutes on 2 CPU cores\n\n"
        "  mocoplus demo --out /tmp/demo --minutes 20"
    )
)
@_one_line_errors(interrupted="interrupted; rerun to continue (finished stages are skipped)")
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for shards, run, model, corpus and demo.json.")] = Path(
        "demo-out"
    ),
    minutes: Annotated[float, typer.Option(min=1, help="Time budget; training gets what the rest leaves.")] = 10.0,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Training overrides (repeatable).")] = None,
) -> None:
    """Ingest, pretrain, evaluate, export, embed, index and search Fashion-MNIST on the CPU (the end-to-end flow)."""
    from flows.demo import DemoConfig, run_demo
    from pipeline.data.fashion_mnist import CLASS_NAMES

    report = run_demo(out, DemoConfig(minutes=minutes, overrides=overrides or []))

    def name(label: int | None) -> str:
        return CLASS_NAMES[label] if label is not None and 0 <= label < len(CLASS_NAMES) else "?"

    table = Table(title=f"mocoplus demo: Fashion-MNIST, {report['seconds'] / 60:.1f} min")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"kNN top-1 (key encoder, {report['planned_steps']} steps)", f"{report['knn_top1']:.2%}")
    table.add_row("linear probe top-1", f"{report['linear_top1']:.2%}")
    table.add_row(f"recall@10 ({report['index']})", f"{report['recall_at_10']:.3f}")
    console = Console()
    console.print(table)
    if report.get("retrieval"):
        console.print(_retrieval_table("retrieval on the 10,000 test images, 60,000 training images as memory", [
            (name, scores, None) for name, scores in report["retrieval"].items()
        ]))  # fmt: skip
    search = report["search"]
    neighbours = ", ".join(name(hit["label"]) for hit in search["neighbours"])
    console.print(f"search: {search['query']} ({name(search['label'])}) → {neighbours}")
    console.print(
        f"wrote {Path(out) / 'demo.json'}; model {report['paths']['model']}, index {report['paths']['index']}"
    )


def _byte_size(text: str) -> int:
    """``"512M"``, ``"1G"``, ``"64k"`` or plain bytes → bytes (binary multiples)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in units and cleaned[-1:] else (cleaned, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text!r} is not a size such as 512M or 1G")
    if value < 1:
        raise typer.BadParameter(f"{text!r} must be at least one byte")
    return int(value)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mocoplus ingest fashion-mnist:train --out shards/fmnist-train\n\n"
        "  mocoplus ingest ~/photos --out shards/photos --format jpg --max-side 512 --shard-size 2000\n\n"
        "  mocoplus ingest images.csv --out shards/listed   # CSV with a 'path' and an optional 'label' column"
    )
)
@_one_line_errors(interrupted="interrupted; rerun the same command to resume from the last finished shard")
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="An image folder (class subfolders → labels), a .txt/.csv list of paths, "
            "or fashion-mnist[:train|:test]."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the shards and manifest.json.")],
    shard_size: Annotated[int, typer.Option(min=1, help="Samples per shard.")] = 5000,
    shard_bytes: Annotated[
        str, typer.Option(help="Byte cap per shard (e.g. 512M, 1G); a shard closes at whichever limit comes first.")
    ] = "512M",
    image_format: Annotated[
        str, typer.Option("--format", help="Stored image format: png, jpg, webp, or keep (original bytes if possible).")
    ] = "png",
    max_side: Annotated[int | None, typer.Option(min=1, help="Shrink images whose longer side exceeds this.")] = None,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Reject images with more pixels than this (decompression bombs).")
    ] = 64_000_000,
    max_file_bytes: Annotated[
        str, typer.Option(help="Skip files larger than this (e.g. 256M), checked before reading them.")
    ] = "256M",
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: all cores).")] = None,
    name: Annotated[str, typer.Option(help="Shard file prefix: NAME-000000.tar.")] = "shard",
    overwrite: Annotated[bool, typer.Option(help="Replace a shard set made from other input.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines otherwise).")] = True,
) -> None:
    """Write images as WebDataset shards with a manifest; bad inputs are skipped and listed, never fatal."""
    from pipeline.data.ingest import IngestConfig
    from pipeline.data.ingest import ingest as run_ingest

    settings = {"workers": workers} if workers is not None else {}
    config = IngestConfig(
        shard_size=shard_size,
        shard_bytes=_byte_size(shard_bytes),
        image_format=image_format,
        max_side=max_side,
        max_pixels=max_pixels,
        max_file_bytes=_byte_size(max_file_bytes),
        name=name,
        overwrite=overwrite,
        **settings,
    )
    result = run_ingest(source, out, config, progress=progress)

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
    console.print(
        f"{manifest.inputs:,} inputs → {manifest.written:,} samples in {len(manifest.shards)} shards "
        f"({size:,.1f} MiB) · {len(manifest.skipped):,} skipped · {state} · {result.out_dir / 'manifest.json'}",
        highlight=False,
    )
    if manifest.written == 0:
        raise _fail(f"nothing usable was written: all {manifest.inputs:,} inputs were skipped")


@app.command(
    epilog="Examples:\n\n  mocoplus verify shards/fmnist-train\n\n  mocoplus verify shards/fmnist-train --quick"
)
@_one_line_errors
def verify(
    shards: Annotated[Path, typer.Argument(help="A shard set folder (with manifest.json).")],
    quick: Annotated[bool, typer.Option(help="Check hashes, counts and labels only; skip decoding images.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines otherwise).")] = True,
) -> None:
    """Check every shard's sha256 and count against the manifest and decode every sample."""
    from pipeline.data.verify import verify as run_verify

    report = run_verify(shards, quick=quick, progress=progress)
    for problem in report.problems:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"bad: {problem}", markup=False)
    checked = "hashes and counts" if quick else f"hashes, counts and {report.decoded:,} decoded images"
    summary = f"{report.shards} shards, {report.samples:,} samples: {checked}"
    if not report.ok:
        raise _fail(f"{summary}; {len(report.problems):,} problems")
    Console(highlight=False).print(f"ok: {summary}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mocoplus train --data shards/fmnist-train --eval shards/fmnist-test --out runs/fmnist "
        "--config fashion-mnist-cpu\n\n"
        "  mocoplus train --data shards/fmnist-train --out runs/quick --config fashion-mnist-cpu "
        "--set train.epochs=1 --set model.negatives=topk\n\n"
        "  mocoplus train --out runs/fmnist --resume      # continue from the newest checkpoint\n\n"
        "  torchrun --nproc_per_node=2 --no-python mocoplus train --data SHARDS --out RUN --config cifar-resnet18"
    )
)
@_one_line_errors(interrupted="interrupted; the newest checkpoint is in --out (continue with --resume)")
def train(
    out: Annotated[Path, typer.Option("--out", help="Run folder: config.json, checkpoints/, metrics.jsonl.")],
    data: Annotated[
        str | None, typer.Option(help="Training shards (a shard set folder, brace pattern, pipe: URL).")
    ] = None,
    eval_shards: Annotated[
        str | None, typer.Option("--eval", help="Held-out labelled shards for the kNN monitor at each epoch's end.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="A preset (fashion-mnist-cpu, cifar-resnet18, imagenet-resnet50) or a TOML/JSON file."),
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
    from pipeline.train.run_config import load_config, with_data
    from pipeline.train.trainer import CONFIG_NAME
    from pipeline.train.trainer import train as run_train

    spec = config if config or not resume else str(out / CONFIG_NAME)
    if resume and not config and not (out / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{out} holds no run to resume (no {CONFIG_NAME}, no checkpoints)")
    run_config = load_config(spec, overrides or [])
    changes = {"train": data} if data else {}
    if eval_shards:
        changes["eval_queries"] = eval_shards
    run_config = with_data(run_config, **changes)
    result = run_train(run_config, out, resume=resume, progress=progress)
    knn = f" · kNN top-1 {result.knn_top1:.2%}" if result.knn_top1 is not None else ""
    stopped = f" · stopped by {result.stopped_by} (checkpoint written; --resume continues)" if result.stopped_by else ""
    Console(soft_wrap=True, highlight=False).print(
        f"step {result.steps} · epoch {result.epoch} · loss {result.final_loss:.3f} · "
        f"{result.images_per_s:,.0f} img/s{knn}{stopped} · {result.run_dir}"
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mocoplus evaluate runs/fmnist --data shards/fmnist-train --eval shards/fmnist-test\n\n"
        "  mocoplus evaluate runs/fmnist --data shards/fmnist-train --eval shards/fmnist-test --checkpoint last --json"
    )
)
@_one_line_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder (from mocoplus train).")],
    data: Annotated[str, typer.Option(help="Labelled training shards: the kNN memory and the linear probe's data.")],
    eval_shards: Annotated[str, typer.Option("--eval", help="Labelled held-out shards to score.")],
    checkpoint: Annotated[str, typer.Option(help="best, last, or a checkpoint path (default: best if any).")] = "auto",
    baselines: Annotated[
        str, typer.Option(help="Comma-separated label-free baselines scored alike: pixels, hog (empty: none).")
    ] = "",
    workers: Annotated[int, typer.Option(min=0, help="Decoding worker processes.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines otherwise).")] = True,
    grid: Annotated[
        int | None, typer.Option(min=1, help="Pool the embedding over a grid×grid grid (default: the run's).")
    ] = None,
) -> None:
    """The retrieval suite (weighted kNN-200, 1/5/20-NN, precision@10) and a linear probe, against baselines."""
    from pipeline.evaluate.evaluate import evaluate as run_evaluate

    names = tuple(name.strip() for name in baselines.split(",") if name.strip())
    result = run_evaluate(
        run, data, eval_shards, checkpoint=checkpoint, workers=workers, baselines=names, progress=progress, grid=grid
    )
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    title = (
        f"{result.checkpoint} (step {result.step}): {result.train_samples:,} images as memory, "
        f"{result.eval_samples:,} held-out queries, cosine similarity"
    )
    rows = [
        (f"{name} encoder", scores.retrieval.as_dict(), scores.linear_top1) for name, scores in result.encoders.items()
    ]
    rows += [(name, scores.as_dict(), None) for name, scores in result.baselines.items()]
    Console().print(_retrieval_table(title, rows))


def _retrieval_table(title: str, rows: list[tuple[str, dict[str, float], float | None]]) -> Table:
    """The retrieval suite side by side: one column per feature set (name, scores, linear probe or None).

    Scores are rows, so four feature sets fit an 80-column terminal or log.
    """
    from pipeline.evaluate.retrieval import SCORE_LABELS

    table = Table(title=title)
    table.add_column("score")
    for name, _, _ in rows:
        table.add_column(name, justify="right")
    for key, label in SCORE_LABELS.items():
        table.add_row(label, *(f"{scores[key]:.2%}" for _, scores, _ in rows))
    if any(linear is not None for _, _, linear in rows):
        table.add_row("linear probe", *("—" if linear is None else f"{linear:.2%}" for _, _, linear in rows))
    return table


@app.command(
    help=(
        "Export a run's encoder as a model bundle: encoder.onnx, encoder.pt (TorchScript) and model.json.\n\n"
        "The models take uint8 RGB images [N, H, W, 3] at the trained size and return L2-normalised float32\n"
        "embeddings [N, D]; preprocessing is inside the graph. Torch, TorchScript and ONNX Runtime are checked\n"
        "against each other on real images before the bundle appears.\n\n"
        "Examples:\n\n"
        "  mocoplus export runs/fmnist --out models/fmnist\n\n"
        "  mocoplus export runs/fmnist --out models/fmnist-last --checkpoint last --encoder query\n\n"
        "  mocoplus export runs/fmnist --out models/fmnist-int8 --quantize int8"
    )
)
@_one_line_errors
def export(
    run: Annotated[Path, typer.Argument(help="A run folder (from mocoplus train).")],
    out: Annotated[Path, typer.Option(help="The bundle folder to create (must not exist, or be empty).")],
    checkpoint: Annotated[str, typer.Option(help="best, last, or a checkpoint path (default: best if any).")] = "auto",
    encoder: Annotated[str, typer.Option(help="key (the momentum encoder) or query.")] = "key",
    head: Annotated[str, typer.Option(help="none (backbone features) or projection (the MoCo head).")] = "none",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    calibration: Annotated[
        str,
        typer.Option(
            help="Shards for the parity check and int8 calibration (default: the run's held-out shards for "
            "parity, its training shards for calibration)."
        ),
    ] = "",
    quantize: Annotated[str, typer.Option(help="none, or int8 (static QDQ, calibrated on real images).")] = "none",
    as_json: Annotated[bool, typer.Option("--json", help="Print model.json instead of a summary.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines otherwise).")] = True,
    grid: Annotated[
        int | None, typer.Option(min=1, help="Pool the embedding over a grid×grid grid (default: the run's).")
    ] = None,
) -> None:
    """Export a run's encoder to TorchScript and ONNX with its model.json."""
    from pipeline.export.config import ExportConfig
    from pipeline.export.export import export as run_export

    config = ExportConfig(
        checkpoint=checkpoint,
        encoder=encoder,
        head=head,
        opset=opset,
        calibration=calibration,
        quantize=quantize,
        grid=grid,
    )
    result = run_export(run, out, config, progress=progress)
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
        f"[N, {info['output']['dim']}]"
        f" ({info['precision']}), bundle {info['bundle_hash'][:12]}; parity on {parity['images']} images: "
        f"TorchScript {parity['torchscript_max_abs_diff']:.1e}, ONNX Runtime {parity['onnxruntime_max_abs_diff']:.1e}"
        f" (mean cosine {parity['onnxruntime_mean_cosine']:.5f})"
    )


@app.command(
    help=(
        "Embed every sample of a shard set with a model bundle: one part (.npy matrix + .json keys, labels,\n"
        "skipped samples) per input shard, then manifest.json. Reruns skip finished parts.\n\n"
        "Examples:\n\n"
        "  mocoplus embed models/fmnist --data shards/fmnist-train --out emb/fmnist-train\n\n"
        "  mocoplus embed models/fmnist --data shards/big --out /shared/emb --shard-index 0 --num-shards 4   # 1 of 4"
    )
)
@_one_line_errors
def embed(
    model: Annotated[Path, typer.Argument(help="A model bundle (from mocoplus export).")],
    data: Annotated[str, typer.Option(help="Shards to embed (folder, manifest, .tar, brace pattern, pipe:).")],
    out: Annotated[Path, typer.Option(help="The embedding set folder.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Images per ONNX Runtime call.")] = 256,
    workers: Annotated[int, typer.Option(min=0, help="Decoding worker processes.")] = 2,
    provider: Annotated[str, typer.Option(help="cpu or cuda (a hard error if CUDA is unavailable).")] = "cpu",
    fp16: Annotated[bool, typer.Option("--fp16", help="Store float16 vectors (half the disk).")] = False,
    shard_index: Annotated[
        int | None, typer.Option(min=0, help="This process's share of the shards (default: $RANK, else 0) ...")
    ] = None,
    num_shards: Annotated[
        int | None, typer.Option(min=1, help="... out of this many processes (default: $WORLD_SIZE, else 1).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines otherwise).")] = True,
) -> None:
    """Embed a shard set with a model bundle."""
    from pipeline.embed.embed import embed as run_embed
    from pipeline.embed.config import EmbedConfig

    config = EmbedConfig(
        batch_size=batch_size,
        workers=workers,
        provider=provider,
        fp16=fp16,
        shard_index=_from_env(shard_index, "RANK", 0),
        num_shards=_from_env(num_shards, "WORLD_SIZE", 1),
    )
    result = run_embed(model, data, out, config, progress=progress)
    state = "complete, manifest written" if result.complete else "other shares still to run"
    typer.echo(
        f"{result.out_dir}: {result.parts_written} parts written ({result.samples:,} samples, "
        f"{result.skipped_samples} skipped), {result.parts_skipped} already done; {state}"
    )


@app.command(
    name="index",
    help=(
        "Build a FAISS index bundle from an embedding set: index.faiss, keys.json, labels.npy, index.json.\n\n"
        "--kind auto picks by size and memory budget: Flat (exact) up to 50k vectors, HNSW32 up to 2M,\n"
        "IVF-Flat while the raw vectors fit the budget, OPQ + IVF-PQ beyond. The search parameter (nprobe,\n"
        "efSearch) is tuned to the smallest value whose recall@k against exact search on held-out queries\n"
        "reaches --target-recall; index.json records it with the measured recall, QPS and build times.\n\n"
        "Examples:\n\n"
        "  mocoplus index emb/fmnist --out indexes/fmnist\n\n"
        "  mocoplus index emb/web --out indexes/web --kind ivfpq --memory-budget 2G --target-recall 0.9\n\n"
        "  mocoplus index emb/web --out indexes/web --kind ivf --num-shards 8   # sharded build, merged"
    ),
)
@_one_line_errors
def build_index(
    embeddings: Annotated[Path, typer.Argument(help="An embedding set (from mocoplus embed).")],
    out: Annotated[Path, typer.Option(help="The index bundle folder to create (must not exist, or be empty).")],
    kind: Annotated[str, typer.Option(help="auto, flat, hnsw, ivf or ivfpq.")] = "auto",
    metric: Annotated[str, typer.Option(help="ip (inner product: cosine on normalised vectors) or l2.")] = "ip",
    target_recall: Annotated[float, typer.Option(help="recall@k against exact search to tune for.")] = 0.95,
    k: Annotated[int, typer.Option("--k", min=1, help="The k of recall@k.")] = 10,
    memory_budget: Annotated[str, typer.Option(help="Memory the index may use, e.g. 4G or 512M.")] = "4G",
    queries: Annotated[int, typer.Option(min=1, help="Held-out queries for tuning.")] = 1000,
    num_shards: Annotated[int, typer.Option(min=1, help="Build IVF shards on one trained index, then merge.")] = 1,
    gpu: Annotated[bool, typer.Option("--gpu", help="Train, add and tune on GPU (needs faiss-gpu).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines otherwise).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print index.json instead of a summary.")] = False,
) -> None:
    """Build, tune and write a FAISS index for an embedding set."""
    from pipeline.index.build import build_index as run_index
    from pipeline.index.config import IndexConfig

    config = IndexConfig(
        kind=kind,
        metric=metric,
        target_recall=target_recall,
        k=k,
        memory_budget=_byte_size(memory_budget),
        queries=queries,
        num_shards=num_shards,
        gpu=gpu,
    )
    result = run_index(embeddings, out, config, progress=progress)
    info = result.info
    if as_json:
        typer.echo(json.dumps(info))
        return
    if result.up_to_date:
        typer.echo(f"{out}: already up to date (built from these embeddings with these options)")
        return
    report, build = info["recall_at_k"], info["build"]
    params = ", ".join(f"{name}={value}" for name, value in info["search"]["params"].items()) or "exact"
    typer.echo(
        f"{out}: {info['factory']} ({info['reason']}), {info['count']:,} vectors, {info['bytes'] / 2**20:.1f} MiB, "
        f"built in {build['total_seconds']:.1f} s; {params}: recall@{report['k']} {report['recall']:.3f} "
        f"(target {report.get('target', 1.0)}) at {report.get('qps', 0):,.0f} queries/s"
    )
    if not report.get("target_met", True):
        typer.echo(f"warning: the target recall was not reached; {report['recall']:.3f} is the best this index gives")


@app.command(
    help=(
        "Search an index bundle with images, corpus keys or vectors.\n\n"
        "QUERY is an image file, key:KEY (a sample of the indexed corpus) or a .npy of vectors ([D] or [N, D]).\n"
        "Scores are similarities, higher is closer. A query that cannot be read is reported and the others go\n"
        "on; the exit code is 1 if any failed.\n\n"
        "Examples:\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist shirt.png\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist key:train_00042 -k 5 --json\n\n"
        "  mocoplus search indexes/fmnist --model models/fmnist queries.npy --nprobe 32"
    )
)
@_one_line_errors
def search(
    index: Annotated[Path, typer.Argument(help="An index bundle (from mocoplus index).")],
    queries: Annotated[list[str], typer.Argument(help="Image files, key:KEY, or .npy files of vectors.")],
    model: Annotated[Path, typer.Option(help="The model bundle the index was built with.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Results per query.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per query.")] = False,
    nprobe: Annotated[int | None, typer.Option(min=1, help="Override the tuned nprobe (IVF indexes).")] = None,
    ef: Annotated[int | None, typer.Option(min=1, help="Override the tuned efSearch (HNSW indexes).")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="Search on GPU (needs faiss-gpu).")] = False,
    provider: Annotated[str, typer.Option(help="ONNX Runtime provider for image queries: cpu or cuda.")] = "cpu",
) -> None:
    """Search an index with images, keys or vectors."""
    import numpy as np

    from artifacts.index_bundle import IndexBundle
    from artifacts.model_bundle import ModelBundle
    from pipeline.search import resolve_queries

    bundle = ModelBundle(model, provider=provider)
    searcher = IndexBundle(index, gpu=gpu)
    searcher.check_model(bundle.hash, model)
    override = _search_override(searcher.search_parameter, nprobe, ef)
    searcher.set_search_parameter(override)
    resolved = resolve_queries(queries, searcher, bundle.embed, bundle.size)
    good = [query for query in resolved if query.vector is not None]
    hits = iter(searcher.search(np.stack([query.vector for query in good]), k) if good else [])
    console, errors = Console(highlight=False), Console(stderr=True, highlight=False, soft_wrap=True)
    for query in resolved:
        if query.vector is None:
            if as_json:
                typer.echo(json.dumps({"query": query.name, "error": query.error}))
            errors.print(f"error: {query.name}: {query.error}", markup=False)
            continue
        results = next(hits)
        if as_json:
            typer.echo(json.dumps({"query": query.name, "results": [hit.as_dict() for hit in results]}))
            continue
        table = Table(title=query.name, title_justify="left")
        for column in ("rank", "key", "label", "score"):
            table.add_column(column, justify="left" if column == "key" else "right")
        for hit in results:
            table.add_row(str(hit.rank), hit.key, "" if hit.label < 0 else str(hit.label), f"{hit.score:.4f}")
        console.print(table)
    if len(good) < len(resolved):
        raise typer.Exit(code=1)


def _limit(help_text: str) -> typer.models.OptionInfo:
    """A `serve` budget option: unset means the library default, which the help text names in parentheses.

    Values are checked by `Limits` and `ConnectionLimits` (each must be > 0), one place for both uses.
    """
    return typer.Option(show_default=False, help=help_text)


def _given(**values: object) -> dict[str, object]:
    """The options set on the command line: the dataclass defaults stay the one source for the rest."""
    return {name: value for name, value in values.items() if value is not None}


@app.command(
    help=(
        "Serve the embedding and search API (FastAPI on uvicorn, ONNX Runtime, FAISS; no torch).\n\n"
        "Requests from many clients are micro-batched into one ONNX Runtime call (up to --max-batch images or\n"
        "--max-wait-ms); a full queue answers 503 with Retry-After. The model and index are loaded and\n"
        "cross-checked before the server listens; /readyz turns 200 after a warm-up batch. Every request is held\n"
        "to budgets (body bytes and time, request head size and time, decoded image size, search work,\n"
        'decodes and searches at once); past one it gets a JSON error: README "Limits".\n\n'
        "Examples:\n\n"
        "  mocoplus serve --model models/fmnist --index indexes/fmnist\n\n"
        "  mocoplus serve --model models/fmnist --host 0.0.0.0 --port 9000 --max-batch 128 --max-wait-ms 10\n\n"
        "  curl -F images=@shirt.png http://127.0.0.1:8000/v1/embed"
    )
)
@_one_line_errors
def serve(
    model: Annotated[Path, typer.Option(help="The model bundle (from mocoplus export).")],
    index: Annotated[Path | None, typer.Option(help="An index bundle built with this model (enables search).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    provider: Annotated[str, typer.Option(help="cpu or cuda (a hard error if CUDA would fall back).")] = "cpu",
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads (0: its default).")] = 0,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per ONNX Runtime call.")] = 64,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest a batch waits to fill.")] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Most images waiting; beyond, 503.")] = 1024,
    max_images: Annotated[int, typer.Option(min=1, help="Most images in one request.")] = 64,
    workers: Annotated[int, typer.Option(min=1, help="Server processes, each with its own model and batcher.")] = 1,
    max_body_bytes: Annotated[int | None, _limit("Most request body bytes, as received (64 MiB).")] = None,
    body_timeout: Annotated[float | None, _limit("Seconds a request body may take to arrive (60).")] = None,
    max_decoded_bytes: Annotated[int | None, _limit("Most bytes one image may decode to (64 MiB).")] = None,
    max_search_work: Annotated[int | None, _limit("Most queries × k × nprobe/ef in one search (2^24).")] = None,
    max_concurrent_decodes: Annotated[int | None, _limit("Requests decoding images at once (4).")] = None,
    max_concurrent_searches: Annotated[int | None, _limit("Searches running at once (4).")] = None,
    max_waiting: Annotated[
        int | None, _limit("Requests waiting for a decode or search slot; beyond, 503 (64).")
    ] = None,
    head_timeout: Annotated[float | None, _limit("Seconds a request head may take to arrive (10).")] = None,
    max_connections: Annotated[int | None, _limit("Open connections per server process; beyond, 503 (1024).")] = None,
) -> None:
    """Serve the embedding and search API."""
    import uvicorn

    from serving.app import CONFIG_ENV, Service, ServiceConfig, config_to_json, create_app
    from serving.batcher import BatcherConfig
    from serving.payloads import Limits
    from serving.protocol import ConnectionLimits, protocol_factory

    limits = _given(
        max_images=max_images,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout,
        max_decoded_bytes=max_decoded_bytes,
        max_search_work=max_search_work,
        max_concurrent_decodes=max_concurrent_decodes,
        max_concurrent_searches=max_concurrent_searches,
        max_waiting=max_waiting,
    )
    connection = ConnectionLimits(**_given(head_timeout_s=head_timeout, max_connections=max_connections))
    config = ServiceConfig(
        model=model,
        index=index,
        provider=provider,
        threads=threads,
        batcher=BatcherConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue),
        limits=Limits(**limits),
    )
    service = Service(config)
    service.load()
    options = {
        "host": host,
        "port": port,
        "timeout_graceful_shutdown": 30,
        "log_level": "info",
        "http": protocol_factory(connection),  # head size, count and time limits; JSON refusals
        "timeout_keep_alive": connection.keep_alive_s,
    }
    if workers == 1:
        uvicorn.run(create_app(config, service), **options)
        return
    os.environ[CONFIG_ENV] = config_to_json(config)  # checked above; each worker process loads its own copy
    uvicorn.run("serving.app:app_from_env", factory=True, workers=workers, **options)


flows_app = typer.Typer(
    name="flows",
    help="Prefect deployments: pretrain on a cron schedule, index-corpus and end-to-end on demand.",
    no_args_is_help=True,
)
app.add_typer(flows_app)


@flows_app.command(
    "serve",
    help=(
        "Register the deployments with the Prefect API ($PREFECT_API_URL) and run their flow runs here.\n\n"
        "Schedules fire only against a Prefect server (prefect server start); trigger on-demand runs with\n"
        "prefect deployment run 'index-corpus/index-corpus'.\n\n"
        "Examples:\n\n"
        "  prefect server start &   # then: prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api\n\n"
        "  mocoplus flows serve --out /data/mocoplus --cron '0 3 * * *'"
    ),
)
def flows_serve(
    out: Annotated[Path, typer.Option(help="Where shards/, run/, model/ and corpus/ live.")],
    cron: Annotated[str, typer.Option(help="The pretrain schedule (cron, UTC).")] = "0 3 * * *",
    config: Annotated[str, typer.Option(help="Training preset or TOML/JSON file.")] = "fashion-mnist-cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Training overrides (repeatable).")] = None,
    nproc: Annotated[int, typer.Option(min=1, help="Training processes (torchrun --nproc_per_node).")] = 1,
) -> None:
    """Serve the Prefect deployments."""
    from flows.deploy import DeploymentConfig, serve_deployments

    serve_deployments(DeploymentConfig(out=out, cron=cron, config=config, overrides=overrides or [], nproc=nproc))


def _search_override(parameter: str | None, nprobe: int | None, ef: int | None) -> int | None:
    """The one override that fits the index's search parameter; a clear error for the other."""
    if nprobe is not None and parameter != "nprobe":
        raise ValueError(f"--nprobe applies to IVF indexes; this index's parameter is {parameter or 'none (exact)'}")
    if ef is not None and parameter != "efSearch":
        raise ValueError(f"--ef applies to HNSW indexes; this index's parameter is {parameter or 'none (exact)'}")
    return nprobe if nprobe is not None else ef


def _from_env(value: int | None, variable: str, default: int) -> int:
    """An option's value, else a torchrun-style environment variable, else ``default``."""
    if value is not None:
        return value
    text = os.environ.get(variable, "")
    if not text:
        return default
    if not text.strip().isdigit():
        raise ValueError(f"${variable} must be a non-negative integer; got {text!r}")
    return int(text)


def main() -> None:
    """Console-script entry point (``mocoplus = "flows.cli:main"``)."""
    app()


if __name__ == "__main__":
    main()
