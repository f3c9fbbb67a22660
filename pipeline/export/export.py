"""`mocoplus export`: a run's encoder as a self-describing model bundle.

See docs/architecture.md, "The contracts".

The bundle is what everything downstream of training loads — the embedding
jobs, the index builder and the service — without PyTorch:

- ``encoder.onnx``: one file (no external-data side file), opset ``--opset``;
- ``encoder.pt``: the same function as TorchScript;
- ``model.json``: the input and output contract, where the model came from,
  the parity measured at export, and the bundle's content hash.

Preprocessing lives inside the graph, so no client can get it wrong: the
model takes ``images: uint8[N, H, W, 3]`` RGB at the trained resolution and
does the float conversion, the luma conversion for models trained on gray
images, and the training normalisation itself; it returns
``embedding: float32[N, D]``, L2-normalised. Images of another size are
resized by the policy `artifacts.images.fit_square` implements (shorter side to
H, bilinear, centre crop), which `model.json` spells out.

With whitening (``--whiten``, or the run's ``model.embedding_whitening =
"pca"``) the graph also holds a PCA whitening of the features before the L2
normalisation, fitted at export on the training shards through this very
graph's preprocessing and backbone (`mocoplus.whitening`), keeping the
leading ``--dims`` principal directions (the run's ``model.embedding_dims``;
none: all); ``model.json`` says what it was fitted on.

Before the bundle appears, torch eager, TorchScript and ONNX Runtime embed
the same real images (the run's held-out shards, or ``--calibration``) at
several batch sizes; a difference above the tolerance (1e-4) fails the export
and leaves nothing behind. The bundle is written in a hidden temp folder and
renamed into place.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from artifacts.atomic import TEMP_PREFIX, building_dir, package_version, reusable_output, sha256_file
from artifacts.model_bundle import (
    BUNDLE_FORMAT,
    INPUT_NAME,
    MODEL_JSON,
    ONNX_FILE,
    OUTPUT_NAME,
    TORCHSCRIPT_FILE,
    ModelBundle,
    model_contract,
    read_model_json,
    write_model_json,
)
from artifacts.versions import CURRENT, version_name, versions
from mocoplus.backbones import GridEmbedding
from mocoplus.heads import Encoder
from mocoplus.whitening import CovarianceAccumulator, PcaWhitening, WhiteningConfig
from pipeline.data.augment import AugmentConfig
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.export.config import PARITY_BATCH_SIZES, ExportConfig
from pipeline.export.quantize import FP32_EDGE_LAYERS, quantize_int8
from pipeline.progress import StageProgress, stage_progress
from pipeline.train.checkpoints import load_run, resolve_checkpoint
from pipeline.train.run_config import config_from_dict

# int8 keeps the whitening's leading 256 directions unless --dims says otherwise: whitening amplifies the
# rounding of the int8 features in the trailing low-variance directions. Mean cosine of int8 to fp32 on the
# demo's model (docs/results.md, "Compact embeddings"): 0.995 at 256 dims, 0.991 at 512, 0.984 at 1,024, 0.971 at
# all 2,043 (refused below 0.99).
INT8_WHITENING_DIMS = 256
# ITU-R 601 luma, the weights PIL's RGB → L conversion uses: what training saw for gray data.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class ExportError(ValueError):
    """The export cannot produce a bundle that keeps its contract (e.g. parity above tolerance)."""


class EmbeddingModel(nn.Module):
    """uint8 RGB ``[N, H, W, 3]`` → L2-normalised float32 ``[N, D]``, preprocessing included.

    ``augment`` says what training fed the network: for gray-trained models
    the RGB input is reduced to luma (exact for gray images, whose three
    channels are equal) and replicated to the network's channels; then the
    training mean and std. ``whitening`` (fitted on `features`) maps the
    features before the normalisation.
    """

    def __init__(self, encoder: Encoder, augment: AugmentConfig, *, projection: bool, grid: int = 1) -> None:
        super().__init__()
        if projection and grid != 1:
            raise ValueError("the projection head takes globally pooled features: export it with embedding grid 1")
        self.backbone = GridEmbedding(encoder.backbone, grid)
        self.head = encoder.head if projection else None
        self.gray = augment.input_mode == "L"
        self.channels = augment.channels
        self.register_buffer("luma", torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(augment.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(augment.std).view(1, -1, 1, 1))
        self.whitening: PcaWhitening | None = None

    def features(self, images: Tensor) -> Tensor:
        """The network's features of uint8 RGB images, before whitening and normalisation."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if self.gray or self.channels == 1:  # a one-channel stem takes luma whatever the images' mode
            x = (x * self.luma).sum(dim=1, keepdim=True).expand(-1, self.channels, -1, -1)
        x = (x - self.mean) / self.std
        features = self.backbone(x)
        return features if self.head is None else self.head(features)

    def forward(self, images: Tensor) -> Tensor:
        features = self.features(images)
        if self.whitening is not None:
            features = self.whitening(features)
        return F.normalize(features, dim=1)


def whitening_statistics(
    model: EmbeddingModel, shards: str, size: int, limit: int, bar: StageProgress
) -> CovarianceAccumulator:
    """Mean and covariance of ``model``'s features over (the first ``limit`` or all) images of ``shards``: one
    pass, from which a whitening of any width is fitted (`PcaWhitening.from_accumulator`)."""
    stream = EvalStream(shards, size, "RGB", StreamConfig(batch_size=256, workers=2), rank=0, world_size=1)
    total = min(limit, stream.shards.samples) if limit else stream.shards.samples
    task = bar.task("whitening", total=total, unit="images")
    accumulator = CovarianceAccumulator()
    with torch.no_grad():
        for batch in stream:
            images = batch.images.permute(0, 2, 3, 1)[: total - accumulator.count]
            accumulator.add(model.features(images.contiguous()))
            bar.advance(task, len(images))
            if accumulator.count >= total:
                break
    bar.finish(task, status=f"fitted on {accumulator.count:,} images")
    return accumulator


def int8_dims_to_try(dims: int) -> list[int]:
    """An int8 export's default whitening widths, widest first: ``dims``, half, a quarter (at least 32)."""
    return [width for width in (dims, dims // 2, dims // 4) if width >= 32] or [dims]


def whitening_dims(config: ExportConfig, run_dims: int | None) -> int | None:
    """The whitening's leading directions kept: ``--dims``, else the run's, at most `INT8_WHITENING_DIMS` for
    int8 (None: all)."""
    if config.dims is not None:
        return config.dims
    if config.quantize == "int8":
        return min(run_dims or INT8_WHITENING_DIMS, INT8_WHITENING_DIMS)
    return run_dims


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    model_json: dict[str, Any]
    up_to_date: bool = False  # ``bundle`` already held this export of the same checkpoint with the same options


def parity_images(shards: str, size: int, count: int) -> np.ndarray:
    """Up to ``count`` real images from ``shards`` as uint8 RGB ``[N, size, size, 3]`` (the serving resize)."""
    stream = EvalStream(shards, size, "RGB", StreamConfig(batch_size=min(count, 256), workers=0), rank=0, world_size=1)
    batches, total = [], 0
    for batch in stream:
        batches.append(batch.images.permute(0, 2, 3, 1).numpy())
        total += len(batches[-1])
        if total >= count:
            break
    if not batches:
        raise ValueError(f"{shards}: no images for the parity check")
    return np.ascontiguousarray(np.concatenate(batches)[:count])


def _in_batches(function, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([function(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


def measure_parity(model: nn.Module, scripted, bundle: ModelBundle, images: np.ndarray) -> dict[str, Any]:
    """Max abs difference of TorchScript and ONNX Runtime from eager fp32, over several batch sizes."""

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    def torchscript(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(batch)).numpy()

    reference = eager(images)
    worst = {"torchscript": 0.0, "onnxruntime": 0.0}
    cosines = []
    for batch_size in PARITY_BATCH_SIZES:
        for name, function in (("torchscript", torchscript), ("onnxruntime", bundle.embed)):
            output = _in_batches(function, images, batch_size)
            worst[name] = max(worst[name], float(np.abs(output - reference).max()))
            if name == "onnxruntime":  # the reference rows are unit-norm
                cosines.append((output * reference).sum(axis=1) / np.linalg.norm(output, axis=1))
    cosine = np.concatenate(cosines)
    return {
        "images": len(images),
        "batch_sizes": list(PARITY_BATCH_SIZES),
        "torchscript_max_abs_diff": worst["torchscript"],
        "onnxruntime_max_abs_diff": worst["onnxruntime"],
        "onnxruntime_mean_cosine": float(cosine.mean()),
        "onnxruntime_min_cosine": float(cosine.min()),
    }


def check_parity(parity: dict[str, Any], config: ExportConfig, refused: list[dict[str, Any]] | None = None) -> None:
    """fp32: both runtimes within ``tolerance`` of eager; int8: TorchScript so, ONNX by mean cosine (``refused``:
    the wider whitenings an int8 export tried before, named in the error)."""
    failures = []
    if parity["torchscript_max_abs_diff"] > config.tolerance:
        failures.append(f"TorchScript max abs difference {parity['torchscript_max_abs_diff']:.2e}")
    if config.quantize == "none" and parity["onnxruntime_max_abs_diff"] > config.tolerance:
        failures.append(f"ONNX Runtime max abs difference {parity['onnxruntime_max_abs_diff']:.2e}")
    if failures:
        raise ExportError(f"parity check failed: {'; '.join(failures)} > tolerance {config.tolerance:g}")
    if config.quantize == "int8" and parity["onnxruntime_mean_cosine"] < config.min_cosine:
        cosine = f"{parity['onnxruntime_mean_cosine']:.4f}"
        if refused:
            tried = ", ".join(f"{entry['mean_cosine']:.4f} with {entry['dims']}" for entry in refused)
            cosine += f" with the whitening's {parity.get('dims', 'fewest')} directions ({tried})"
        advice = "; fewer --dims or --no-whiten keep more of it" if refused else ""
        raise ExportError(
            f"int8 parity check failed: mean cosine to fp32 {cosine} < {config.min_cosine}{advice} "
            "(more or more typical --calibration images may help)"
        )


def _export_onnx(model: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        verbose=False,
    )
    program.save(str(path), external_data=False)
    _strip_stack_traces(path)


def _strip_stack_traces(path: Path) -> None:
    """Drop the exporter's per-node Python stack traces: they name source lines, so two exports of one
    checkpoint from different checkouts would differ in bytes (and bundle hash) with the same graph."""
    import onnx

    model = onnx.load(str(path))
    for graph in [model.graph, *(function for function in model.functions)]:
        for node in graph.node:
            kept = [prop for prop in node.metadata_props if prop.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def _write_models(
    model: nn.Module, example: Tensor, folder: Path, config: ExportConfig, calibration: np.ndarray | None
) -> torch.jit.ScriptModule:
    """``encoder.pt`` (frozen trace) and ``encoder.onnx`` (fp32, or int8 from the fp32 graph) into ``folder``."""
    import onnx  # deferred: only export needs the onnx package's checker

    with warnings.catch_warnings():
        # torch.jit is deprecated upstream; the bundle still ships TorchScript for C++ / libtorch users
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
        torch.jit.save(scripted, str(folder / TORCHSCRIPT_FILE))
    if calibration is None:
        _export_onnx(model, example, folder / ONNX_FILE, config.opset)
    else:
        fp32 = folder / f"{TEMP_PREFIX}fp32.onnx"
        _export_onnx(model, example, fp32, config.opset)
        quantize_int8(fp32, folder / ONNX_FILE, calibration)
        fp32.unlink()
    onnx.checker.check_model(str(folder / ONNX_FILE), full_check=True)
    return scripted


def _export_inputs(run_dir: Path, config: ExportConfig) -> tuple[Path, dict[str, Any]]:
    """The checkpoint an export takes and what makes two exports the same (its content hash, the options)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found")
    checkpoint = resolve_checkpoint(run_dir, config.checkpoint)
    return checkpoint, {"checkpoint_sha256": sha256_file(checkpoint), "options": {**asdict(config), "checkpoint": None}}


def export_version(
    run_dir: Path, root: Path, config: ExportConfig = ExportConfig(), *, progress: bool = True
) -> ExportResult:
    """Export into the next version of the model root ``root`` (`artifacts.versions`), or find the version that
    already holds this export. ``current`` is not touched: publishing is the caller's decision (the
    ``pretrain`` flow's quality gate)."""
    run_dir, root = Path(run_dir), Path(root)
    if (root / MODEL_JSON).exists():
        raise ExportError(
            f"{root} is a model bundle itself, not a root of versions: move it to {root / version_name(1)} "
            f"and link {root / CURRENT} to {version_name(1)} (ln -s), or choose another folder"
        )
    _checkpoint, inputs = _export_inputs(run_dir, config)
    numbers, same = versions(root, MODEL_JSON), json.loads(json.dumps(inputs))
    for number in numbers:
        if read_model_json(root / version_name(number)).get("inputs") == same:
            return export(run_dir, root / version_name(number), config, progress=progress)
    return export(run_dir, root / version_name(max(numbers, default=0) + 1), config, progress=progress)


def export(
    run_dir: Path, out_dir: Path, config: ExportConfig = ExportConfig(), *, progress: bool = True
) -> ExportResult:
    """Export ``run_dir``'s encoder to a model bundle at ``out_dir``; see the module docstring.

    A rerun into a finished ``out_dir`` from the same checkpoint (by content)
    with the same options is up to date; other contents of ``out_dir`` are an error.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint, inputs = _export_inputs(run_dir, config)
    existing = reusable_output(out_dir, MODEL_JSON, inputs)
    if existing is not None:
        return ExportResult(out_dir, existing, up_to_date=True)
    moco, state, checkpoint = load_run(run_dir, str(checkpoint))
    run_config = config_from_dict(state["config"])
    augment = run_config.augmentation
    encoder = moco.key_encoder if config.encoder == "key" else moco.query_encoder
    grid = config.grid or (1 if config.head == "projection" else run_config.model.embedding_grid)
    model = EmbeddingModel(encoder, augment, projection=config.head == "projection", grid=grid).eval()
    dims = whitening_dims(config, run_config.model.embedding_dims)
    whiten = config.whiten
    if whiten is None:
        whiten = config.head == "none" and run_config.model.embedding_whitening == "pca"
    size = run_config.data.image_size
    images = parity_images(
        config.calibration or run_config.data.eval_queries or run_config.data.train, size, config.parity_images
    )
    calibration = None
    if config.quantize == "int8":
        calibration = parity_images(config.calibration or run_config.data.train, size, config.calibration_images)

    with building_dir(out_dir) as work, stage_progress(progress) as bar:
        fitted_on, statistics = config.whiten_data or run_config.data.train, None
        if whiten:
            statistics = whitening_statistics(model, fitted_on, size, config.whiten_images, bar)
        # int8 of a whitened model without --dims: the widest whitening whose int8 graph keeps the cosine floor
        # (the rounding of a briefly trained model's features needs fewer directions); what failed is recorded
        automatic = statistics is not None and config.quantize == "int8" and config.dims is None and dims is not None
        tries, refused = int8_dims_to_try(dims) if automatic else [dims], []
        task = bar.task("export", total=2 * len(tries), unit="steps")
        for attempt, tried_dims in enumerate(tries):
            whitening = None
            if statistics is not None:
                whitening_config = WhiteningConfig(dims=tried_dims)
                model.whitening = PcaWhitening.from_accumulator(statistics, whitening_config)
                whitening = {
                    "method": "pca",
                    **asdict(whitening_config),
                    "input_dim": model.whitening.in_dim,
                    "fitted_on": fitted_on,
                    "images": statistics.count,
                    **({"int8_refused": refused} if refused else {}),
                }
            info, scripted = _write_bundle(
                model, work, images, config, calibration, bar, task,
                source=_Source(run_dir, checkpoint, int(state["step"]), run_config, grid, inputs), whitening=whitening,
            )  # fmt: skip
            parity = measure_parity(model, scripted, ModelBundle(work), images)
            if attempt + 1 < len(tries) and parity["onnxruntime_mean_cosine"] < config.min_cosine:
                refused.append({"dims": tried_dims, "mean_cosine": round(parity["onnxruntime_mean_cosine"], 4)})
                continue
            check_parity({**parity, "dims": tried_dims}, config, refused)
            break
        bar.finish(task, status="parity checked")
        info["parity"] = {**parity, "tolerance": config.tolerance}
        if config.quantize == "int8":
            info["parity"]["min_mean_cosine"] = config.min_cosine
            info["quantization"] = {
                "method": "ONNX Runtime static QDQ: per-channel int8 weights (7 bits), uint8 activations, "
                f"moving-average MinMax calibration; the first and last {FP32_EDGE_LAYERS} weighted layers fp32",
                "calibration_images": len(calibration) if calibration is not None else 0,
                "calibration_shards": config.calibration or run_config.data.train,
            }
        write_model_json(work, info)
    return ExportResult(out_dir, info)


@dataclass(frozen=True)
class _Source:
    """Where an exported model comes from: what model.json records besides the graph's contract."""

    run_dir: Path
    checkpoint: Path
    step: int
    run_config: Any
    grid: int
    inputs: dict[str, Any]


def _write_bundle(
    model: EmbeddingModel,
    work: Path,
    images: np.ndarray,
    config: ExportConfig,
    calibration: np.ndarray | None,
    bar: StageProgress,
    task: int,
    *,
    source: _Source,
    whitening: dict[str, Any] | None,
) -> tuple[dict[str, Any], torch.jit.ScriptModule]:
    """The graphs and model.json (parity not yet measured) into ``work``."""
    augment, run_config = source.run_config.augmentation, source.run_config
    bar.update(task, status="TorchScript and ONNX" + (", int8 calibration" if calibration is not None else ""))
    example = torch.from_numpy(images[:2])
    scripted = _write_models(model, example, work, config, calibration)
    bar.advance(task)
    bar.update(task, status=f"parity on {len(images)} images")
    with torch.no_grad():
        dim = int(model(example).shape[1])
    contract = model_contract(
        run_config.data.image_size, dim, augment.input_mode, augment.mean, augment.std,
        encoder=config.encoder, head=config.head, opset=config.opset, precision=config.precision,
        whitening=whitening,
    )  # fmt: skip
    info: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "name": config.name or source.run_dir.resolve().name,
        "version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **contract,
        "source": {
            "run": str(source.run_dir.resolve()),
            "checkpoint": str(source.checkpoint),
            "checkpoint_sha256": sha256_file(source.checkpoint),
            "step": source.step,
            "arch": run_config.model.arch,
            "width": run_config.model.width,
        },
        "files": {name: sha256_file(work / name) for name in (ONNX_FILE, TORCHSCRIPT_FILE)},
        "embedding_grid": source.grid,  # the backbone's last map average-pooled to grid × grid (1: global)
        "inputs": source.inputs,
    }
    write_model_json(work, info)
    bar.advance(task)
    return info, scripted
