"""Benchmark: inference speed of one encoder in every form the bundle offers, side by side, on CPU.

Exports the run's key encoder twice (fp32 and ``--quantize int8``) into a
temp folder, then times, round-robin in one process so machine load hits
all alike, the median of ``--repeats`` calls at each batch size:

- ``torch_fp32``: eager PyTorch, fp32 (the model with its in-graph preprocessing);
- ``torch_bf16``: eager PyTorch, bf16 autocast + channels_last (where the CPU has native bf16);
- ``torchscript``: the bundle's ``encoder.pt``;
- ``onnxruntime_fp32`` / ``onnxruntime_int8``: the bundles through `artifacts.model_bundle.ModelBundle`.

Also reports FLOPs per image (torch's FLOP counter, 2 per multiply-add) and
each variant's share of this CPU's fp32 GEMM peak, measured here with a
2048² matmul. With ``--train``/``--test`` shards it scores the fp32, bf16 and
int8 embeddings by weighted kNN (k=200, τ=0.1), so the speed of each
variant sits next to its accuracy. ``--preset`` benchmarks a preset's network
at random initialisation instead of a trained run (speed only, e.g.
``cifar-resnet18`` at 32 px or 224 px via ``--set data.image_size=224``).

    python benchmarks/bench_export.py --run runs/fmnist --train shards/fmnist-train --test shards/fmnist-test
    python benchmarks/bench_export.py --preset cifar-resnet18 --calibration shards/fmnist-test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from harness import emit, environment, load_average, time_once  # benchmarks/ is the script's folder, first on sys.path
from torch.utils.flop_counter import FlopCounterMode

from artifacts.model_bundle import TORCHSCRIPT_FILE, ModelBundle
from mocoplus import MoCoPlus
from pipeline.export.config import ExportConfig
from pipeline.export.export import EmbeddingModel, export, parity_images
from pipeline.knn import knn_top1
from pipeline.precision import resolve_precision
from pipeline.train.checkpoints import load_run, save_checkpoint
from pipeline.train.run_config import config_from_dict, load_config


def untrained_run(preset: str, overrides: list[str], folder: Path) -> Path:
    """A run folder holding one checkpoint of ``preset``'s network at its random initialisation."""
    config = load_config(preset, overrides)
    torch.manual_seed(0)
    state = {"format": "mocoplus.checkpoint", "model": MoCoPlus(config.model).state_dict(), "step": 0, "epoch": 0}
    save_checkpoint(folder, {**state, "config": config.to_dict()}, 0, keep_last=1)
    return folder


def gemm_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 matmul throughput (FLOP/s): the ceiling the convolutions are measured against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(time_once(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def flops_per_image(model: torch.nn.Module, image: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image[:1])
    return counter.get_total_flops()


def variants(model: torch.nn.Module, folder: Path) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    scripted = torch.jit.load(str(folder / "fp32" / TORCHSCRIPT_FILE))
    bf16 = resolve_precision("auto")
    channels_last = copy.deepcopy(model).to(memory_format=bf16.memory_format())

    def torch_fp32(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    def torch_bf16(images: np.ndarray) -> np.ndarray:
        with torch.no_grad(), bf16.autocast():
            return channels_last(torch.from_numpy(images)).float().numpy()

    def torchscript(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(images)).numpy()

    runs = {"torch_fp32": torch_fp32, "torchscript": torchscript}
    if bf16.name == "bf16":
        runs["torch_bf16"] = torch_bf16
    runs["onnxruntime_fp32"] = ModelBundle(folder / "fp32", threads=torch.get_num_threads()).embed
    runs["onnxruntime_int8"] = ModelBundle(folder / "int8", threads=torch.get_num_threads()).embed
    return runs


def embed_all(function: Callable[[np.ndarray], np.ndarray], shards: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.streams import EvalStream, StreamConfig

    stream = EvalStream(shards, size, "RGB", StreamConfig(batch_size=256, workers=2), rank=0, world_size=1)
    vectors, labels = [], []
    for batch in stream:
        vectors.append(function(batch.images.permute(0, 2, 3, 1).contiguous().numpy()))
        labels.append(batch.labels.numpy())
    return np.concatenate(vectors), np.concatenate(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a trained run folder")
    source.add_argument("--preset", help="a training preset, at random initialisation (speed only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="preset override")
    parser.add_argument("--calibration", default="", help="shards for parity and int8 calibration")
    parser.add_argument("--train", default="", help="labelled shards: kNN memory (with --test)")
    parser.add_argument("--test", default="", help="labelled held-out shards: kNN queries")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        run = args.run or untrained_run(args.preset, args.overrides, folder / "run")
        export(run, folder / "fp32", ExportConfig(checkpoint="last", calibration=args.calibration))
        export(run, folder / "int8", ExportConfig(checkpoint="last", calibration=args.calibration, quantize="int8"))
        moco, state, _ = load_run(run, "last")
        config = config_from_dict(state["config"])
        model = EmbeddingModel(moco.key_encoder, config.augmentation, projection=False).eval()
        size = config.data.image_size
        shards = args.calibration or config.data.eval_queries or config.data.train
        images = parity_images(shards, size, max(args.batches))
        runs = variants(model, folder)
        flops = flops_per_image(model, torch.from_numpy(images))
        peak = gemm_peak_flops()
        seconds: dict[tuple[str, int], list[float]] = {(name, batch): [] for name in runs for batch in args.batches}
        for name, batch in seconds:
            runs[name](images[:batch])  # warm-up: kernel selection, first allocations
        for _ in range(args.repeats):
            for (name, batch), times in seconds.items():
                times.append(time_once(lambda name=name, batch=batch: runs[name](images[:batch])))
        results: dict[str, dict[str, object]] = {name: {} for name in runs}
        for (name, batch), times in seconds.items():
            per_second = batch / statistics.median(times)
            results[name][f"batch_{batch}"] = {
                "images_per_s": per_second,
                "share_of_fp32_gemm_peak": per_second * flops / peak,
            }
        for name in runs:
            largest = results[name][f"batch_{max(args.batches)}"]["images_per_s"]
            results[name]["speedup_vs_torch_fp32"] = (
                largest / results["torch_fp32"][f"batch_{max(args.batches)}"]["images_per_s"]
            )
        if args.train and args.test:
            for name in ("torch_fp32", "torch_bf16", "onnxruntime_int8"):
                if name in runs:
                    memory, memory_labels = embed_all(runs[name], args.train, size)
                    queries, query_labels = embed_all(runs[name], args.test, size)
                    results[name]["knn_top1"] = knn_top1(
                        torch.from_numpy(memory),
                        torch.from_numpy(memory_labels),
                        torch.from_numpy(queries),
                        torch.from_numpy(query_labels),
                        num_classes=int(memory_labels.max()) + 1,
                        k=config.eval.knn_k,
                        temperature=config.eval.knn_temperature,
                    )
    report = {
        "benchmark": "export",
        "command": "python benchmarks/bench_export.py " + " ".join(argv or sys.argv[1:]),
        "environment": environment(),
        "torch": torch.__version__,
        "network": {"arch": config.model.arch, "width": config.model.width, "image_size": size},
        "flops_per_image": flops,
        "fp32_gemm_peak_gflops": peak / 1e9,
        "variants": results,
        "load_average": load_average(),
    }
    emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
