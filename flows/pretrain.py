"""The ``pretrain`` Prefect flow: ingest if missing → train under torchrun → evaluate → export.

Orchestration only. Training runs as a ``torchrun`` subprocess with
``nproc`` processes (gloo on CPU, NCCL on GPUs), its log lines streamed into
the Prefect logger; a retry, or a rerun of the flow, continues the run from
its newest checkpoint (``--resume``), and a finished run resumes to nothing.
Ingest is skipped when the shard set's manifest is there, export when the
bundle already comes from the checkpoint it would export.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from artifacts.shard_set import MANIFEST_NAME
from flows.pictures import publish_curves


def ensure_shards(source: str, shards: str) -> bool:
    """Ingest ``source`` into ``shards`` unless the shard set's manifest is there; True if it ingested."""
    if (Path(shards) / MANIFEST_NAME).is_file():
        return False
    from pipeline.data.ingest import ingest

    ingest(source, Path(shards))
    return True


@task(retries=1, retry_delay_seconds=10)
def ingest_if_missing(source: str, shards: str) -> str:
    ingested = ensure_shards(source, shards)
    get_run_logger().info("%s %s", shards, f"ingested from {source}" if ingested else "has its manifest: skipped")
    return shards


def train_command(
    data: str, eval_shards: str | None, run_dir: str, config: str, overrides: list[str], nproc: int
) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m flows.cli train ...``; ``--resume`` once there are checkpoints."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # progress on: its stderr is a pipe here, so the trainer writes a plain line every few seconds, relayed below
    command += ["-m", "flows.cli", "train", "--data", data, "--out", run_dir, "--config", config]
    command += [argument for override in overrides for argument in ("--set", override)]
    if eval_shards:
        command += ["--eval", eval_shards]
    if any((Path(run_dir) / "checkpoints").glob("*.pt")):
        command.append("--resume")
    return command


@task(retries=2, retry_delay_seconds=[10, 60])
def train_run(data: str, eval_shards: str | None, run_dir: str, config: str, overrides: list[str], nproc: int) -> str:
    logger = get_run_logger()
    command = train_command(data, eval_shards, run_dir, config, overrides, nproc)
    logger.info("launching: %s", " ".join(command))
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            logger.info(line.rstrip())
    if process.returncode != 0:
        raise RuntimeError(f"training exited with {process.returncode}: " + " | ".join(tail))
    return run_dir


@task
def evaluate_run(
    run_dir: str, train_shards: str, eval_shards: str, baselines: list[str], linear_probe: bool = True
) -> dict[str, Any]:
    """The retrieval suite (and linear probe) of the key encoder (the exported one), beside ``baselines``.

    Written as a Prefect artifact. The run's ``model.embedding_whitening`` decides whether the encoder is
    whitened, as its export is.
    """
    from pipeline.evaluate.evaluate import evaluate
    from pipeline.evaluate.retrieval import SCORE_LABELS

    result = evaluate(
        Path(run_dir),
        train_shards,
        eval_shards,
        workers=0,
        baselines=tuple(baselines),
        linear=linear_probe,
        encoders=("key",),
    ).to_json()
    rows = [
        (f"{name} encoder", scores["retrieval"], scores["linear_top1"]) for name, scores in result["encoders"].items()
    ]
    rows += [(name, scores, None) for name, scores in result["baselines"].items()]
    header = ["features", *SCORE_LABELS.values(), "linear probe"]
    create_markdown_artifact(
        f"| {' | '.join(header)} |\n|{'---|' * len(header)}\n"
        + "\n".join(
            f"| {name} | "
            + " | ".join(f"{value:.2%}" for value in suite.values())
            + " | "
            + ("—" if linear is None else f"{linear:.2%}")
            + " |"
            for name, suite, linear in rows
        ),
        key="pretrain-evaluation",
        description=f"pretrain: {run_dir} at step {result['step']}",
    )
    key = result["encoders"]["key"]
    return {
        "step": result["step"],
        "knn_top1": key["knn_top1"],
        "linear_top1": key["linear_top1"],
        "whitening": result["whitening"],
        "retrieval": {"key encoder": key["retrieval"], **result["baselines"]},
    }


@task(retries=1, retry_delay_seconds=10)
def export_run(run_dir: str, model_dir: str) -> str:
    """Export the run's best checkpoint (up to date when ``model_dir`` already holds exactly that export)."""
    from pipeline.export.export import export

    result = export(Path(run_dir), Path(model_dir))
    if result.up_to_date:
        get_run_logger().info("%s already exports %s: up to date", model_dir, result.model_json["source"]["checkpoint"])
    return model_dir


@flow(name="pretrain", log_prints=True)
def pretrain(
    source: str,
    shards: str,
    run_dir: str,
    model_dir: str,
    eval_source: str | None = None,
    eval_shards: str | None = None,
    config: str = "fashion-mnist-cpu",
    overrides: list[str] | None = None,
    nproc: int = 1,
    baselines: list[str] | None = None,
    linear_probe: bool = True,
    monitor: bool = True,
) -> dict[str, Any]:
    """Shards from ``source`` (if missing) → a trained run → its evaluation (with held-out shards) → a bundle.

    ``baselines`` (``pixels``, ``hog``) are scored by the same retrieval suite beside the encoder;
    ``linear_probe=False`` skips the probe; ``monitor=False`` trains without the kNN monitor, whose pass over
    the training and held-out images the evaluation repeats (both: the demo's budget).
    """
    data = ingest_if_missing(source, shards)
    held_out = ingest_if_missing(eval_source, eval_shards) if eval_source and eval_shards else None
    run = train_run(data, held_out if monitor else None, run_dir, config, list(overrides or []), nproc)
    curves = publish_curves(run)
    scores = evaluate_run(run, data, held_out, list(baselines or []), linear_probe) if held_out else {}
    model = export_run(run, model_dir)
    return {"shards": data, "eval_shards": held_out, "run": run, "model": model, "curves": curves, **scores}
