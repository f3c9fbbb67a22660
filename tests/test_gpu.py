"""The GPU paths on a GPU: every test here is marked ``gpu`` and skips, saying why, without what it needs.

`pytest -m gpu` runs them (`benchmarks/gpu_check.sh` does, among its steps).
Three kinds of need, each its own skip reason: a CUDA device for torch, the
CUDA execution provider of ONNX Runtime (onnxruntime-gpu), and faiss-gpu with
a visible GPU. tests/test_gpu_paths.py checks on the CPU the logic of the
same paths.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import distributed_workers
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from reference import naive_info_nce, unit_vectors

from mocoplus import MoCoConfig, MoCoPlus
from mocoplus.losses import info_nce
from pipeline.precision import bf16_is_native, cuda_capability_has_bf16, resolve_precision
from pipeline.train.step import TrainingStep

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False")


def _ort_cuda() -> str | None:
    """Why the CUDA execution provider is not usable here (None: it is)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "needs onnxruntime-gpu: ONNX Runtime is not installed"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        providers = onnxruntime.get_available_providers()
        return f"needs ONNX Runtime's CUDA provider (onnxruntime-gpu); this one has {providers}"
    return None if CUDA else "needs a CUDA GPU: torch.cuda.is_available() is False"


def _faiss_gpu() -> str | None:
    """Why faiss-gpu is not usable here (None: it is)."""
    if importlib.util.find_spec("faiss") is None:
        return "needs faiss-gpu: FAISS is not installed"
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return "needs faiss-gpu: this FAISS build is CPU-only"
    if faiss.get_num_gpus() < 1:
        return "needs faiss-gpu with a visible GPU: faiss.get_num_gpus() is 0"
    return None


needs_ort_cuda = pytest.mark.skipif(_ort_cuda() is not None, reason=_ort_cuda() or "")
needs_faiss_gpu = pytest.mark.skipif(_faiss_gpu() is not None, reason=_faiss_gpu() or "")

TINY = {"arch": "resnet18", "width": 0.25, "cifar_stem": True, "embedding_dim": 32, "queue_size": 256}
DEVICE = torch.device("cuda", 0)


# --- the method and the training step ---------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(
    "selection",
    [
        {"negatives": "all"},
        {"negatives": "band", "num_negatives": 16, "skip_negatives": 4},
        {"negatives": "hard-weighted", "debias_prior": 0.1, "hardness": 1.0},
    ],
    ids=["all", "band", "hard-weighted"],
)
def test_the_loss_on_cuda_matches_the_cpu_float64_reference(selection):
    generator = torch.Generator().manual_seed(0)
    anchors, positives, queue = (unit_vectors(generator, n, 32) for n in (16, 16, 200))
    on_gpu = info_nce(*(t.to(DEVICE, torch.float32) for t in (anchors, positives, queue)), temperature=0.2, **selection)
    expected = naive_info_nce(anchors, positives, queue, 0.2, **selection)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.double().cpu(), expected, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("precision_name", ["fp32", "bf16", "fp16"])
def test_training_steps_on_cuda_keep_the_queue_on_the_gpu_and_the_loss_finite(precision_name):
    from pipeline.train.placement import resolve_training_precision

    if precision_name == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    precision = resolve_training_precision(precision_name, DEVICE)
    torch.manual_seed(0)
    model = MoCoPlus(MoCoConfig(**TINY, key_bn="split", bn_splits=4)).to(
        DEVICE, memory_format=precision.memory_format()
    )
    optimizer = torch.optim.SGD(model.query_encoder.parameters(), lr=0.03, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.autocast_dtype == torch.float16)
    step = TrainingStep(model, optimizer, precision, DEVICE, scaler=scaler)
    images = torch.rand(64, 3, 32, 32)
    losses = [float(step(images, images.flip(-1), epoch=1, step=i).out.loss) for i in range(12)]
    assert model.queue.keys.device.type == "cuda" and model.queue.keys.dtype == torch.float32
    assert int(model.queue.pointer) == (12 * 64) % 256
    assert all(np.isfinite(losses)), losses
    assert precision.name == precision_name


@needs_cuda
def test_split_bn_with_channels_last_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    model = MoCoPlus(MoCoConfig(**TINY, key_bn="split", bn_splits=4))
    images = torch.rand(32, 3, 32, 32)
    on_cpu = model.key_encoder(images)
    model.to(DEVICE, memory_format=torch.channels_last)
    on_gpu = model.key_encoder(images.to(DEVICE).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=2e-3, atol=2e-3)  # TF32 convolutions on Ampere+


@needs_cuda
def test_auto_precision_on_this_gpu_is_bf16_only_where_it_is_native():
    native = cuda_capability_has_bf16(torch.cuda.get_device_capability(DEVICE))
    assert bf16_is_native(DEVICE) is native
    assert resolve_precision("auto", DEVICE).name == ("bf16" if native else "fp32")


@needs_cuda
def test_training_batches_arrive_pinned_for_asynchronous_copies(fashion_shards):
    from pipeline.data.augment import small_grayscale_preset
    from pipeline.data.streams import StreamConfig, TrainStream

    config = StreamConfig(batch_size=32, workers=2, shuffle_buffer=50, pin_memory=True)
    batch = next(iter(TrainStream(fashion_shards, small_grayscale_preset(), config, rank=0, world_size=1).epoch(0)))
    assert batch.view1.is_pinned() and batch.view2.is_pinned()


@needs_cuda
def test_resume_on_cuda_restores_the_rng_states_and_continues_the_loss_curve(fashion_shards, tmp_path, monkeypatch):
    from test_train import losses, tiny_config

    from pipeline.train.checkpoints import load_checkpoint, resolve_checkpoint
    from pipeline.train.trainer import Trainer, train

    overrides = ("train.max_steps=8", "train.checkpoint_every=100", "train.precision=fp32")
    full = train(tiny_config(fashion_shards, *overrides), tmp_path / "full", progress=False)
    original = Trainer._agree
    monkeypatch.setattr(Trainer, "_agree", lambda self, r, s: original(self, r, "SIGTERM" if self.step == 2 else s))
    train(tiny_config(fashion_shards, *overrides), tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    assert "cuda" in load_checkpoint(resolve_checkpoint(tmp_path / "resumed", "last"))["rng"]
    resumed = train(tiny_config(fashion_shards, *overrides), tmp_path / "resumed", resume=True, progress=False)
    assert resumed.steps == full.steps == 8
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "resumed")), torch.tensor(losses(tmp_path / "full")), rtol=2e-3, atol=2e-3
    )


# --- distributed ----------------------------------------------------------------------------------------


@needs_cuda
def test_an_nccl_world_of_one_gathers_shuffles_and_steps(tmp_path):
    mp.spawn(distributed_workers.nccl_world_of_one, args=(1, tmp_path / "store", tmp_path), nprocs=1, join=True)
    result = torch.load(tmp_path / "nccl-0.pt")
    assert result["backend"] == "nccl" and result["gathered"] and result["roundtrip"]
    assert np.isfinite(result["loss"])


@needs_cuda
@pytest.mark.parametrize("key_bn", ["auto", "sync"])
def test_two_gloo_ranks_sharing_one_gpu_train_ddp_with_shuffle_bn_and_sync_bn(key_bn, tmp_path):
    args = (2, tmp_path / "store", tmp_path, key_bn)
    mp.spawn(distributed_workers.ddp_step_on_a_shared_gpu, args=args, nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"gpu-{rank}.pt") for rank in (0, 1))
    assert rank0["key_bn"] == rank1["key_bn"] == ("shuffle" if key_bn == "auto" else "sync")
    assert rank0["synced"] == rank1["synced"] == (key_bn == "sync")
    assert rank0["queue_device"].startswith("cuda")
    torch.testing.assert_close(rank0["grad"], rank1["grad"])  # DDP averaged the gradients
    torch.testing.assert_close(rank0["weights"], rank1["weights"])
    torch.testing.assert_close(rank0["queue"], rank1["queue"])  # keys all-gathered into one queue
    assert rank0["pointer"] == rank1["pointer"] == 16 % 10  # 2 ranks × 8 keys into 10 slots


# --- ONNX Runtime ---------------------------------------------------------------------------------------


@needs_ort_cuda
def test_the_exported_bundle_embeds_alike_on_the_cuda_provider_and_the_cpu(bundle):
    from artifacts.model_bundle import ModelBundle

    cpu = ModelBundle(bundle, provider="cpu")
    cuda = ModelBundle(bundle, provider="cuda")
    assert cuda.session.get_providers()[0] == "CUDAExecutionProvider"
    options = cuda.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC" and options["device_id"] == "0"
    images = np.random.default_rng(0).integers(0, 256, (37, cpu.size, cpu.size, 3), dtype=np.uint8)
    a, b = cpu.embed(images), cuda.embed(images)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.999 and np.abs(a - b).max() < 1e-2


# --- FAISS ----------------------------------------------------------------------------------------------


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


@needs_faiss_gpu
def test_faiss_gpu_searches_an_ivf_pq_index_with_64_byte_codes():
    import faiss

    from artifacts.index_bundle import gpu_index, is_gpu_index, set_index_parameter

    data = _unit(20_000, 128)
    cpu = faiss.index_factory(128, "IVF256,PQ64", faiss.METRIC_INNER_PRODUCT)
    cpu.train(data)
    cpu.add(data)
    gpu = gpu_index(cpu)  # float16 lookup tables: 64-byte codes need them on the GPU
    assert is_gpu_index(gpu)
    for index in (cpu, gpu):
        set_index_parameter(index, "nprobe", 32)
    _, found_cpu = cpu.search(data[:200], 10)
    _, found_gpu = gpu.search(data[:200], 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found_cpu, found_gpu, strict=True)])
    assert overlap > 0.9


@needs_faiss_gpu
@pytest.mark.parametrize("num_shards", [1, 2])
def test_faiss_gpu_builds_tunes_and_searches_an_index_bundle(num_shards, tmp_path):
    from artifacts.embedding_set import write_embedding_set
    from artifacts.index_bundle import IndexBundle
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig
    from pipeline.index.tune import recall_at_k

    data = _unit(30_000, 64, seed=1)
    emb = write_embedding_set(tmp_path / "emb", data, bundle_hash="a" * 64, parts=3)
    config = IndexConfig(kind="ivf", queries=300, gpu=True, num_shards=num_shards)
    info = build_index(emb, tmp_path / "index", config, progress=False).info
    assert info["build"]["gpu"] and info["recall_at_k"]["target_met"]
    bundle = IndexBundle(Path(tmp_path / "index"), gpu=True)
    queries = _unit(200, 64, seed=2)
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    found = np.array([[bundle.rows[hit.id] for hit in row] for row in bundle.search(queries, 10)])
    assert recall_at_k(found, truth) >= 0.9
    few = np.array([[bundle.rows[hit.id] for hit in row] for row in bundle.search(queries, 10, effort=1)])
    assert recall_at_k(few, truth) < recall_at_k(found, truth)  # the per-request nprobe took effect
