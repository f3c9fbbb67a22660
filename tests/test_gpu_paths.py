"""The GPU paths' logic, on the CPU: what can be checked without a GPU is checked here (tests/test_gpu.py
holds the tests that need one).

RNG states restored whatever device a checkpoint was loaded to, bf16 chosen
only where it is native, one GPU per torchrun process, the FAISS parameter
space that fits the index (GPU or CPU, replicas), float16 lookup tables for
GPU IVF-PQ only, per-request nprobe on a replica set, the CUDA provider's
options, `serve --workers` spread over the GPUs, and the packaging that keeps
the CPU and GPU runtimes apart.
"""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import tomllib
import torch

from artifacts.embedding_set import write_embedding_set
from artifacts.index_bundle import (
    IndexBundle,
    is_gpu_index,
    is_index_set,
    needs_float16_lookup_tables,
    parameter_space,
    set_index_parameter,
    takes_search_parameters,
)
from artifacts.model_bundle import cuda_provider_options, preload_cuda_libraries
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig
from pipeline.precision import Precision, bf16_is_native, cuda_capability_has_bf16
from pipeline.train.placement import cuda_device_for, resolve_training_precision
from pipeline.train.run_config import TrainConfig
from pipeline.train.state import rng_state, set_rng_state
from serving import gpus

ROOT = Path(__file__).parents[1]


def draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.random()


# --- training ---------------------------------------------------------------------------------------------


def test_rng_states_come_back_from_a_checkpoint_file_and_repeat_the_draws(tmp_path):
    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = draws()
    state = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)
    set_rng_state(state["rng"])
    assert draws() == expected


def test_rng_states_are_taken_as_cpu_byte_tensors_whatever_their_dtype_and_layout():
    """What a CUDA ``map_location`` does to the states is undone on the CPU side: a copy to CPU uint8."""
    saved = rng_state()
    expected = draws()
    altered = {**saved, "torch": saved["torch"].to(torch.int16)}  # not a ByteTensor any more
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(altered["torch"])  # what the old code did with a state that was not one
    set_rng_state(altered)
    assert draws() == expected


@pytest.mark.parametrize(
    ("capability", "native"), [((6, 1), False), ((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]
)
def test_auto_bf16_on_cuda_only_where_it_is_native(capability, native):
    assert cuda_capability_has_bf16(capability) is native  # V100 (7.0) and T4 (7.5) emulate bf16


def test_fp16_is_named_fp16_and_needs_a_gpu():
    assert Precision("cuda", torch.float16, channels_last=True).name == "fp16"
    assert bf16_is_native(torch.device("meta")) is False
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_training_precision("fp16", torch.device("cpu"))


def test_each_torchrun_process_needs_its_own_gpu():
    assert cuda_device_for(1, 2) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 1 needs GPU 1, but 1 CUDA device\(s\) are visible"):
        cuda_device_for(1, 1)


def test_the_collective_timeout_is_a_positive_number_of_seconds():
    assert TrainConfig().collective_timeout >= 3600  # covers a long kNN pass on rank 0
    with pytest.raises(ValueError, match="collective_timeout must be > 0"):
        TrainConfig(collective_timeout=0)


# --- FAISS ----------------------------------------------------------------------------------------------


def vectors(n: int = 3000, d: int = 16, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def trained(factory: str, data: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(data)
    index.add(data)
    return index


def replicas_of(index: faiss.Index, count: int = 2) -> faiss.Index:
    replicas = faiss.IndexReplicas()
    copies = [faiss.clone_index(index) for _ in range(count)]
    for copy in copies:
        replicas.addIndex(copy)
    replicas.referenced_objects = copies  # the set does not own its members (FAISS's own keep-alive attribute)
    return replicas


def members_nprobe(replicas: faiss.Index) -> list[int]:
    return [faiss.extract_index_ivf(replicas.at(i)).nprobe for i in range(replicas.count())]


def test_cpu_indexes_get_the_cpu_parameter_space_through_any_wrapper():
    data = vectors()
    for factory in ("Flat", "IVF32,Flat", "OPQ4,IVF32,PQ4x4", "HNSW16"):
        index = trained(factory, data)
        assert not is_gpu_index(index)
        assert type(parameter_space(index)) is faiss.ParameterSpace
    ivf = trained("IVF32,Flat", data)
    replicas = replicas_of(ivf)
    assert is_index_set(replicas) and not is_gpu_index(replicas)
    set_index_parameter(replicas, "nprobe", 7)  # reaches every member
    assert members_nprobe(replicas) == [7, 7]


def test_a_gpu_index_gets_the_gpu_parameter_space(monkeypatch):
    """faiss-gpu is absent here: a GPU index class by its name, and GpuParameterSpace standing in for it."""

    class GpuIndexIVFFlat(faiss.IndexIVFFlat):  # what faiss-gpu's clone of an IVF index is called
        pass

    class GpuParameterSpace(faiss.ParameterSpace):
        pass

    monkeypatch.setattr(faiss, "GpuParameterSpace", GpuParameterSpace, raising=False)
    quantizer = faiss.IndexFlatIP(16)
    index = GpuIndexIVFFlat(quantizer, 16, 8, faiss.METRIC_INNER_PRODUCT)
    assert is_gpu_index(index)
    assert type(parameter_space(index)) is GpuParameterSpace
    assert type(parameter_space(faiss.IndexIVFFlat(quantizer, 16, 8))) is faiss.ParameterSpace


def test_float16_lookup_tables_for_gpu_ivf_pq_only():
    data = vectors()
    assert needs_float16_lookup_tables(trained("IVF32,PQ8x4", data))
    assert needs_float16_lookup_tables(trained("OPQ4,IVF32,PQ4x4", data))  # under the pre-transform too
    for factory in ("Flat", "IVF32,Flat", "HNSW16"):  # float16 here would store the vectors themselves lossily
        assert not needs_float16_lookup_tables(trained(factory, data))


def test_replica_sets_refuse_search_parameters_so_the_bundle_sets_them_on_the_index(tmp_path):
    data = vectors(4000)
    emb = write_embedding_set(tmp_path / "emb", data, bundle_hash="a" * 64)
    build_index(emb, tmp_path / "index", IndexConfig(kind="ivf", queries=200), progress=False)
    plain, replicated = IndexBundle(tmp_path / "index"), IndexBundle(tmp_path / "index")
    replicated.index = replicas_of(replicated.index)  # what faiss-gpu makes on two GPUs, here of CPU copies
    replicated._per_call = takes_search_parameters(replicated.index)
    assert takes_search_parameters(plain.index) and not replicated._per_call
    params, _ = plain.search_parameters(3)
    with pytest.raises(RuntimeError, match="not supported"):
        replicated.index.search(data[:2], 5, params=params)  # FAISS's refusal, which the bundle now avoids
    tuned = plain.tuned_effort
    set_index_parameter(replicated.index, "nprobe", tuned)
    queries = data[::97] + 0.05

    def ids(bundle, effort):
        return [[hit.id for hit in row] for row in bundle.search(queries, 10, effort)]

    for effort in (1, 2, 32, None):
        assert ids(replicated, effort) == ids(plain, effort)
    assert members_nprobe(replicated.index) == [tuned, tuned]

    answers: dict[tuple[int, int], list] = {}

    def worker(thread: int) -> None:  # concurrent overrides never leak into each other
        for round_ in range(20):
            effort = 1 + (thread + round_) % 3
            answers[thread, round_] = (effort, ids(replicated, effort))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = {effort: ids(plain, effort) for effort in (1, 2, 3)}
    assert all(found == expected[effort] for effort, found in answers.values())


# --- ONNX Runtime and the service -------------------------------------------------------------------------


def test_cuda_provider_options_pick_the_gpu_and_the_heuristic_conv_search():
    assert cuda_provider_options() == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    assert cuda_provider_options(3, "EXHAUSTIVE")["device_id"] == "3"
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        cuda_provider_options(0, "FASTEST")
    with pytest.raises(ValueError, match="device_id"):
        cuda_provider_options(-1)


def test_preloading_cuda_libraries_is_harmless_where_there_are_none():
    import onnxruntime

    preload_cuda_libraries(onnxruntime)  # the CPU runtime: nothing to load, no error
    preload_cuda_libraries(object())  # an ONNX Runtime before 1.21: no preload_dlls


def test_serve_workers_claim_distinct_slots_spread_over_the_gpus(tmp_path, monkeypatch):
    folder = gpus.make_slots(tmp_path / "slots", 3)
    held = len(gpus._held)
    try:
        assert [gpus.claim_slot(folder) for _ in range(3)] == [0, 1, 2]  # each claim is its own open file lock
        with pytest.raises(RuntimeError, match="all 3 worker slots"):
            gpus.claim_slot(folder)
        gpus._held.pop(held).close()  # the worker holding slot 0 died: its slot is free again
        assert gpus.claim_slot(folder) == 0
    finally:
        while len(gpus._held) > held:
            gpus._held.pop().close()
    assert [gpus.device_for_slot(slot, 2) for slot in range(5)] == [0, 1, 0, 1, 0]
    assert gpus.device_for_slot(3, 0) == 0
    assert gpus.cuda_device_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    monkeypatch.delenv(gpus.SLOTS_ENV, raising=False)
    assert gpus.worker_device(5) == 5  # one process: the configured device


# --- packaging --------------------------------------------------------------------------------------------


def test_cpu_and_gpu_runtimes_are_exclusive_extras_with_one_cuda_major():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda requirements: {re.split(r"[\[<>=~ ;]", r, maxsplit=1)[0] for r in requirements}  # noqa: E731
    runtimes = {"onnxruntime", "faiss-cpu", "onnxruntime-gpu", "faiss-gpu", "faiss-gpu-cu12"}
    assert not names(project["dependencies"]) & runtimes  # a plain install imposes neither
    extras = project["optional-dependencies"]
    assert names(extras["cpu"]) == {"onnxruntime", "faiss-cpu"} <= names(extras["dev"])  # make test: CPU
    assert names(extras["gpu"]) == {"onnxruntime-gpu", "faiss-gpu"} and not names(extras["test"]) & runtimes
    gpu = " ".join(extras["gpu"])
    assert "<1.27" in gpu and "<1.16" in gpu  # onnxruntime-gpu 1.27 and later are CUDA 13 builds
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "nvidia/cuda:12." in dockerfile and "whl/cu12" in dockerfile  # the same major in the image
    assert "onnxruntime-gpu>=1.21,<1.27" in dockerfile and "faiss-gpu>=1.14.3,<1.16" in dockerfile
    assert "faiss-gpu-cu12" not in dockerfile and "uninstall" not in dockerfile
