"""The steps of `benchmarks/gpu_check.sh`, one subcommand each; each prints one JSON object as its last line.

Every step says ``status``: ``ok``, ``failed`` (with the reason), ``skipped``
(no CUDA GPU, or an earlier step it needs did not produce its output) or
``unverifiable`` (a package it needs is missing: onnxruntime-gpu, faiss-gpu,
the service's web stack, ...). ``probe`` runs first and writes what this
machine has to ``WORK/probe.json``; the other steps read it, so without a GPU
they answer at once instead of importing torch again.

    python benchmarks/gpu_steps.py probe --work /tmp/gpu-check
    python benchmarks/gpu_steps.py throughput --work /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = ("fastapi", "uvicorn", "multipart", "fastapi_offline", "httptools", "prometheus_client")
TRAIN_PACKAGES = ("torch", "torchvision", "webdataset", "braceexpand", "typer", "rich", "PIL")

STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {}


def step(function: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], dict[str, Any]]:
    STEPS[function.__name__.replace("_", "-")] = function
    return function


def missing(*modules: str) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def probe_of(work: Path) -> dict[str, Any]:
    try:
        return json.loads((work / "probe.json").read_text())
    except (OSError, ValueError):
        return {}


def needs(
    work: Path, *, cuda: bool = True, modules: tuple[str, ...] = (), ort_cuda: bool = False, faiss_gpu: bool = False
):
    """None when this machine has what a step needs, else the step's skipped/unverifiable answer."""
    probe = probe_of(work)
    if cuda and not probe.get("cuda"):
        return {"status": "skipped", "reason": probe.get("cuda_reason", "no CUDA GPU (the probe found none)")}
    absent = missing(*modules)
    if absent:
        return {"status": "unverifiable", "reason": f"missing Python packages: {', '.join(absent)}"}
    if ort_cuda and not probe.get("ort_cuda"):
        return {"status": "unverifiable", "reason": probe.get("ort_reason", "no ONNX Runtime CUDA provider")}
    if faiss_gpu and not probe.get("faiss_gpu"):
        return {"status": "unverifiable", "reason": probe.get("faiss_reason", "no faiss-gpu")}
    return None


def needs_output(path: Path, what: str) -> dict[str, Any] | None:
    return (
        None if path.exists() else {"status": "skipped", "reason": f"no {what} ({path.name}): its step did not finish"}
    )


def run(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)


def mocoplus(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- the steps ------------------------------------------------------------------------------------------


@step
def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Driver, CUDA, cuDNN, NCCL, GPU, ONNX Runtime providers, FAISS: what the later steps can use."""
    found: dict[str, Any] = {"python": sys.version.split()[0]}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,compute_cap"
        result = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True, check=False)
        found["nvidia_smi"] = result.stdout.strip() or result.stderr.strip()[:200]
    if not missing("torch"):
        import torch

        found["torch"] = torch.__version__
        found["torch_cuda"] = torch.version.cuda
        found["cuda"] = torch.cuda.is_available()
        if found["cuda"]:
            found["gpu"] = torch.cuda.get_device_name(0)
            found["capability"] = list(torch.cuda.get_device_capability(0))
            found["gpus"] = torch.cuda.device_count()
            found["cudnn"] = torch.backends.cudnn.version()
            found["nccl"] = (
                ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
            )
            found["bf16_native"] = tuple(found["capability"]) >= (8, 0)
        else:
            found["cuda_reason"] = "no CUDA GPU: torch.cuda.is_available() is False"
    else:
        found["cuda"], found["cuda_reason"] = False, "torch is not installed"
    if missing("onnxruntime"):
        found["ort_cuda"], found["ort_reason"] = False, "onnxruntime-gpu is not installed (no onnxruntime at all)"
    else:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
        found["ort_providers"] = onnxruntime.get_available_providers()
        found["ort_cuda"] = "CUDAExecutionProvider" in found["ort_providers"]
        if not found["ort_cuda"]:
            found["ort_reason"] = f"onnxruntime {onnxruntime.__version__} has no CUDA provider (onnxruntime-gpu needed)"
    if missing("faiss"):
        found["faiss_gpu"], found["faiss_reason"] = False, "faiss-gpu is not installed (no faiss at all)"
    else:
        import faiss

        found["faiss"] = faiss.__version__
        found["faiss_gpu"] = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if not found["faiss_gpu"]:
            found["faiss_reason"] = f"faiss {faiss.__version__} is CPU-only or sees no GPU (faiss-gpu needed)"
    found["missing"] = missing(*TRAIN_PACKAGES, *SERVICE_PACKAGES, "pytest", "httpx")
    (args.work / "probe.json").write_text(json.dumps(found, indent=2))
    if not found.get("cuda"):
        return {"status": "skipped", "reason": found["cuda_reason"], "environment": found}
    return {"status": "ok", "environment": found}


@step
def pytest_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """``pytest -m gpu``: the CUDA tests (tests/test_gpu.py), counted."""
    if (answer := needs(args.work, modules=("pytest", *TRAIN_PACKAGES))) is not None:
        return answer
    report = args.work / "pytest-gpu.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    result = run([*command, "tests/test_gpu.py"], timeout=args.timeout)
    counts = {}
    if report.exists():
        import xml.etree.ElementTree as ElementTree

        suite = ElementTree.parse(report).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
    status = "ok" if result.returncode == 0 else "failed"
    return {"status": status, "counts": counts, "summary": tail(result.stdout, 12), "returncode": result.returncode}


@step
def data(args: argparse.Namespace) -> dict[str, Any]:
    """A synthetic colour shard set (32 px, 10 classes) for the training, export and embedding steps."""
    if (answer := needs(args.work, modules=TRAIN_PACKAGES)) is not None:
        return answer
    import numpy as np
    from PIL import Image

    folder, shards = args.work / "images", args.work / "shards"
    rng = np.random.default_rng(0)
    for label in range(10):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (1, 1, 3))
        for i in range(args.images // 10):
            pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class{label}" / f"{i:05d}.png")
    result = run(mocoplus("ingest", str(folder), "--out", str(shards), "--shard-size", "1000"), timeout=args.timeout)
    if result.returncode:
        return {"status": "failed", "reason": tail(result.stderr)}
    return {"status": "ok", "images": args.images, "shards": str(shards)}


@step
def train_bf16(args: argparse.Namespace) -> dict[str, Any]:
    """A short bf16 `cifar-resnet18` run under torchrun (one process), its images/s from metrics.jsonl."""
    if (
        answer := needs(args.work, modules=TRAIN_PACKAGES) or needs_output(args.work / "shards", "shard set")
    ) is not None:
        return answer
    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = ["train.max_steps=60", "train.precision=bf16", "train.global_batch=256", "data.workers=4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "flows.cli"]
    command = [*torchrun, "train", "--data", str(args.work / "shards"), "--out", str(run_dir)]
    command += ["--config", "cifar-resnet18", "--no-progress", *[part for s in sets for part in ("--set", s)]]
    started = time.perf_counter()
    result = run(command, timeout=args.timeout)
    seconds = time.perf_counter() - started
    if result.returncode:
        return {"status": "failed", "reason": tail(result.stderr), "seconds": round(seconds, 1)}
    from artifacts.run_folder import RunFolder

    records = list(RunFolder(run_dir).metric_records())
    steps = [r for r in records if "loss" in r]
    rates = sorted(r["images_per_s"] for r in steps[10:]) or [0.0]
    return {
        "status": "ok",
        "steps": len(steps),
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "median_images_per_s_after_10_steps": rates[len(rates) // 2],
        "seconds": round(seconds, 1),
    }


@step
def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """`cifar-resnet18` images/s on the GPU: model only (ready views), stream only, end to end; which limits."""
    if (
        answer := needs(args.work, modules=TRAIN_PACKAGES) or needs_output(args.work / "shards", "shard set")
    ) is not None:
        return answer
    sys.path.insert(0, str(ROOT))
    import torch

    from mocoplus import MoCoPlus
    from pipeline.data.streams import StreamConfig, TrainStream
    from pipeline.train.optim import build_optimizer
    from pipeline.train.placement import resolve_training_precision
    from pipeline.train.run_config import load_config
    from pipeline.train.step import TrainingStep

    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    config = load_config("cifar-resnet18", [f"train.global_batch={args.batch}", "train.precision=bf16"])
    precision = resolve_training_precision("bf16", device)
    model = MoCoPlus(config.model).to(device, memory_format=precision.memory_format())
    step_fn = TrainingStep(model, build_optimizer(model.query_encoder, config), precision, device)
    stream_config = StreamConfig(batch_size=args.batch, workers=args.workers, shuffle_buffer=1000, pin_memory=True)
    stream = TrainStream(
        str(args.work / "shards"), config.augmentation, stream_config, samples_per_epoch=10**9, rank=0, world_size=1
    )

    def timed(batches, count: int, work: Callable[[Any], None]) -> float:
        iterator, done = iter(batches), 0
        for _ in range(3):  # warm-up: cuDNN benchmarking, worker start-up
            work(next(iterator))
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(count):
            work(next(iterator))
            done += args.batch
        torch.cuda.synchronize(device)
        return done / (time.perf_counter() - started)

    views = torch.rand(2, args.batch, 3, 32, 32).to(device)
    model_only = timed(iter(lambda: views, None), args.steps, lambda v: step_fn(v[0], v[1], epoch=1))
    stream_only = timed(stream.epoch(0), args.steps, lambda batch: None)
    end_to_end = timed(stream.epoch(1), args.steps, lambda batch: step_fn(batch.view1, batch.view2, epoch=1))
    return {
        "status": "ok",
        "batch": args.batch,
        "loader_workers": args.workers,
        "precision": precision.name,
        "images_per_s": {
            "model_only": round(model_only, 1),
            "stream_only": round(stream_only, 1),
            "end_to_end": round(end_to_end, 1),
        },
        "limited_by": "stream" if stream_only < model_only else "model",
        "gpu_memory_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
    }


@step
def export_parity(args: argparse.Namespace) -> dict[str, Any]:
    """Export the bf16 run's key encoder; embed alike with ONNX Runtime's CUDA and CPU providers?"""
    from artifacts.run_folder import RunFolder

    needed = needs(args.work, modules=(*TRAIN_PACKAGES, "onnx", "onnxscript"), ort_cuda=True)
    if (answer := needed or needs_output(RunFolder(args.work / "run").checkpoints, "trained run")) is not None:
        return answer
    model_dir = args.work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    result = run(mocoplus("export", str(args.work / "run"), "--out", str(model_dir), "--json"), timeout=args.timeout)
    if result.returncode:
        return {"status": "failed", "reason": tail(result.stderr)}
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from artifacts.model_bundle import ModelBundle

    cpu, cuda = ModelBundle(model_dir, provider="cpu"), ModelBundle(model_dir, provider="cuda")
    images = np.random.default_rng(0).integers(0, 256, (256, cpu.size, cpu.size, 3), dtype=np.uint8)
    a, b = cpu.embed(images), cuda.embed(images)
    cosine = (a * b).sum(axis=1)
    cuda.embed(images)
    started = time.perf_counter()
    for _ in range(10):
        cuda.embed(images)
    rate = 10 * len(images) / (time.perf_counter() - started)
    ok = float(cosine.min()) > 0.999
    return {
        "status": "ok" if ok else "failed",
        "min_cosine_cuda_vs_cpu": float(cosine.min()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "cuda_images_per_s_batch_256": round(rate, 1),
        "providers": cuda.session.get_providers(),
    }


@step
def embed_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """`mocoplus embed --provider cuda` over the shard set: images/s end to end."""
    needed = needs(args.work, modules=TRAIN_PACKAGES, ort_cuda=True) or needs_output(
        args.work / "model", "model bundle"
    )
    if needed is not None:
        return needed
    out = args.work / "emb"
    shutil.rmtree(out, ignore_errors=True)
    command = mocoplus("embed", str(args.work / "model"), "--data", str(args.work / "shards"), "--out", str(out))
    started = time.perf_counter()
    result = run([*command, "--provider", "cuda", "--workers", "4", "--no-progress"], timeout=args.timeout)
    seconds = time.perf_counter() - started
    if result.returncode:
        return {"status": "failed", "reason": tail(result.stderr)}
    count = json.loads((out / "manifest.json").read_text())["samples"]
    return {"status": "ok", "images": count, "seconds": round(seconds, 1), "images_per_s": round(count / seconds, 1)}


@step
def faiss_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """`mocoplus index --gpu` (IVF and IVF-PQ) on 200k synthetic vectors, then search on GPU: recall@10 vs exact."""
    if (answer := needs(args.work, modules=("numpy",), faiss_gpu=True)) is not None:
        return answer
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from artifacts.embedding_set import write_embedding_set
    from artifacts.index_bundle import IndexBundle

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((16, 128))
    vectors = rng.standard_normal((args.vectors + 1000, 16)) @ mixing + 0.05 * rng.standard_normal((1, 128))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    corpus, queries = vectors[: args.vectors], vectors[args.vectors :]
    emb = write_embedding_set(args.work / "vectors", corpus, bundle_hash="0" * 64, parts=4)
    truth = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    results = {}
    for kind in ("ivf", "ivfpq"):
        out = args.work / f"index-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        built = run(
            mocoplus("index", str(emb), "--out", str(out), "--kind", kind, "--gpu", "--no-progress"),
            timeout=args.timeout,
        )
        if built.returncode:
            results[kind] = {"status": "failed", "reason": tail(built.stderr)}
            continue
        bundle = IndexBundle(out, gpu=True)
        hits = bundle.search(queries, 10)
        found = np.array([[bundle.rows[h.id] for h in row] + [-1] * (10 - len(row)) for row in hits])
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        started_search = time.perf_counter()
        bundle.search(queries, 10, effort=1)  # the per-request nprobe on the GPU index
        results[kind] = {
            "status": "ok",
            "build_seconds": round(started_search - started, 1),
            "recall_at_10": round(recall, 4),
            "tuned": bundle.tuned_effort,
            "index_json_recall": json.loads((out / "index.json").read_text())["recall_at_k"]["recall"],
        }
    status = "ok" if all(r["status"] == "ok" for r in results.values()) else "failed"
    return {"status": status, "vectors": args.vectors, "dim": 128, "kinds": results}


@step
def serve_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """`mocoplus serve --provider cuda` under a short load of one-image /v1/embed requests: requests/s, p95."""
    needed = needs(args.work, modules=(*SERVICE_PACKAGES, "httpx"), ort_cuda=True)
    if (answer := needed or needs_output(args.work / "model", "model bundle")) is not None:
        return answer
    import socket

    import httpx
    import numpy as np
    from PIL import Image

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = mocoplus("serve", "--model", str(args.work / "model"), "--provider", "cuda", "--port", str(port))
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                return {"status": "failed", "reason": tail(server.stderr.read().decode(errors="replace"))}
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                return {"status": "failed", "reason": "the service never became ready"}
            time.sleep(0.3)
        import io
        from concurrent.futures import ThreadPoolExecutor

        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        image = buffer.getvalue()

        def client(count: int) -> list[tuple[int, float]]:
            answers = []
            with httpx.Client(base_url=url, timeout=30) as session:
                for _ in range(count):
                    started = time.perf_counter()
                    status = session.post("/v1/embed", files=[("images", ("q.png", image, "image/png"))]).status_code
                    answers.append((status, time.perf_counter() - started))
            return answers

        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            answers = [a for part in pool.map(client, [args.requests // args.clients] * args.clients) for a in part]
        seconds = time.perf_counter() - started
        latencies = sorted(latency for status, latency in answers if status == 200)
        statuses: dict[str, int] = {}
        for status, _ in answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        return {
            "status": "ok" if statuses.get("200", 0) == len(answers) else "failed",
            "requests": len(answers),
            "clients": args.clients,
            "requests_per_s": round(len(answers) / seconds, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
            "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None,
            "statuses": statuses,
        }
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--work", type=Path, required=True, help="the check's scratch folder")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for the step's own subprocesses")
    parser.add_argument("--images", type=int, default=6000, help="synthetic training images (data step)")
    parser.add_argument("--batch", type=int, default=512, help="throughput: the preset's batch")
    parser.add_argument("--steps", type=int, default=30, help="throughput: timed steps per measure")
    parser.add_argument("--workers", type=int, default=8, help="throughput: loader workers")
    parser.add_argument("--vectors", type=int, default=200_000, help="faiss-gpu: synthetic corpus size")
    parser.add_argument("--clients", type=int, default=16, help="serve: concurrent clients")
    parser.add_argument("--requests", type=int, default=2000, help="serve: requests in all")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        result = STEPS[args.step](args)
    except subprocess.TimeoutExpired as error:
        result = {
            "status": "failed",
            "reason": f"a subprocess ran past {error.timeout:.0f} s: {' '.join(map(str, error.cmd))[:200]}",
        }
    except Exception as error:  # one step's failure is its own answer, never the check's
        result = {"status": "failed", "reason": f"{type(error).__name__}: {str(error)[:500]}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
