"""The ``pretrain`` Prefect flow: ingest if missing → train → export a candidate → embed → gate → publish.

Orchestration only. Training runs as a ``torchrun`` subprocess with
``nproc`` processes (gloo on CPU, NCCL on GPUs), its log lines streamed into
the Prefect logger; a retry, or a rerun of the flow, continues the run from
its newest checkpoint (``--resume``), and a finished run resumes to nothing.
Ingest is skipped when the shard set's manifest is there, export when a
version of the model root already comes from the checkpoint it would export,
embedding part by part when done. The evaluation scores the served vectors
(one pass: the export's own whitening fit, one embedding of each shard set),
and the quality gate decides whether users get the new model.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact

from artifacts.run_folder import RunFolder
from artifacts.shard_set import MANIFEST_NAME
from flows.index_corpus import embed_share
from flows.pictures import publish_curves
from flows.timing import StageClock


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
    if RunFolder(run_dir).has_checkpoints():
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


@task(retries=1, retry_delay_seconds=10)
def export_candidate(run_dir: str, model_root: str, dims: int | None = None) -> str:
    """Export the run's best checkpoint as the model root's next version (or find the version that holds it).

    Not yet published: ``current`` still names the published model until the gate passes.
    """
    from pipeline.export.config import ExportConfig
    from pipeline.export.export import export_version

    result = export_version(Path(run_dir), Path(model_root), ExportConfig(dims=dims))
    logger = get_run_logger()
    if result.up_to_date:
        logger.info("%s already exports %s: up to date", result.bundle, result.model_json["source"]["checkpoint"])
    else:
        logger.info("exported %s (%d-d)", result.bundle, result.model_json["output"]["dim"])
    return str(result.bundle)


def embed_for_evaluation(model: str, shards: str, cache: str, shares: int) -> str:
    """``shards`` through ``model`` into the cache (`pipeline.evaluate.cache`) in ``shares`` parallel tasks (those
    of ``index-corpus``); finished parts are skipped."""
    from artifacts.model_bundle import read_model_json
    from pipeline.evaluate.cache import embeddings_folder

    info = read_model_json(Path(model))
    folder = str(embeddings_folder(Path(cache), info["bundle_hash"], Path(shards), info["input"]["resize"]["size"]))
    embed_share.map(unmapped(model), unmapped(shards), unmapped(folder), range(shares), unmapped(shares)).result()
    return folder


@task
def evaluate_candidate(
    memory: str, queries: str, baselines: list[str], against: str | None, cache: str, linear_probe: bool
) -> dict[str, Any]:
    """The suite of the candidate's served vectors beside the published model (``against``) and the baselines."""
    from pipeline.evaluate.embedded import evaluate_embeddings

    result = evaluate_embeddings(
        Path(memory), Path(queries), baselines=tuple(baselines), against=Path(against) if against else None,
        cache=Path(cache), linear=linear_probe,
    )  # fmt: skip
    return result.to_json()


@task
def quality_gate(evaluation: dict[str, Any], candidate: str, tolerance: float) -> dict[str, Any]:
    """Pass or refuse the candidate; the decision and the table go to a markdown artifact and the log either way."""
    from pipeline.evaluate.gate import GateConfig, quality_gate
    from pipeline.evaluate.retrieval import RetrievalScores

    def scores(record: dict[str, float]) -> RetrievalScores:
        return RetrievalScores(**record)

    against = evaluation["against"]
    decision = quality_gate(
        scores(evaluation["model"]["scores"]),
        scores(evaluation["baselines"]["pixels"]),
        scores(against["scores"]) if against else None,
        GateConfig(tolerance=tolerance),
    )
    table = evaluation_table(evaluation)
    verdict = f"quality gate {decision.summary()}: candidate {candidate}" + (
        f" against the published {against['model']}" if against else " (no published model yet)"
    )
    create_markdown_artifact(f"**{verdict}**\n\n{table}", key="pretrain-gate", description=verdict)
    get_run_logger().info("%s\n%s", verdict, table)
    return {"passed": decision.passed, "reasons": list(decision.reasons), "tolerance": tolerance, "labels": True}


@task
def evaluate_candidate_views(memory: str, against: str | None, cache: str) -> dict[str, Any]:
    """Label-free: altered views of a sample of the training corpus searched among the candidate's vectors,
    beside raw pixels and the published model (``against``)."""
    from pipeline.evaluate.views import evaluate_embedding_views

    result = evaluate_embedding_views(
        Path(memory), against=Path(against) if against else None, cache=Path(cache), progress=False
    )
    return result.to_json() | {"against_model": against}


@task
def view_quality_gate(evaluation: dict[str, Any], candidate: str, tolerance: float) -> dict[str, Any]:
    """The label-free gate (`pipeline.evaluate.gate.view_gate`); decision and table to the artifact and log."""
    from pipeline.evaluate.gate import view_gate

    def scores(record: dict[str, Any]) -> dict[str, float]:
        return {f"recall@{k}": value for k, value in record["recall"].items()}

    against = evaluation["against"]
    decision = view_gate(
        scores(evaluation["model"]), scores(evaluation["pixels"]), scores(against) if against else None, tolerance
    )
    header = ["features", *scores(evaluation["model"])]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    rows = [("candidate", evaluation["model"]), ("published", against), ("pixels", evaluation["pixels"])]
    lines += [
        f"| {name} | " + " | ".join(f"{value:.2%}" for value in scores(record).values()) + " |"
        for name, record in rows
        if record
    ]
    table = "\n".join(lines)
    verdict = f"label-free quality gate {decision.summary()}: candidate {candidate}" + (
        f" against the published {evaluation['against_model']}" if against else " (no published model yet)"
    )
    note = (
        f"{evaluation['sample']:,} pictures × {evaluation['views']} altered views searched among "
        f"{evaluation['corpus']:,}; recall@k of the originals"
    )
    create_markdown_artifact(f"**{verdict}**\n\n{note}\n\n{table}", key="pretrain-gate", description=verdict)
    get_run_logger().info("%s\n%s\n%s", verdict, note, table)
    return {"passed": decision.passed, "reasons": list(decision.reasons), "tolerance": tolerance, "labels": False}


def shards_labelled(shards: str) -> bool:
    """Whether a shard set's manifest says its samples carry labels (a bare shard list: assumed not)."""
    from artifacts.shard_set import read_manifest

    try:
        return bool(read_manifest(Path(shards)).labelled)
    except (OSError, ValueError):
        return False


def evaluation_table(evaluation: dict[str, Any]) -> str:
    """The suite of every feature set as a markdown table, in %."""
    from pipeline.evaluate.retrieval import SCORE_LABELS

    rows = [("candidate", evaluation["model"])]
    if evaluation["against"]:
        rows.append(("published", evaluation["against"]))
    header = ["features", "dim", *SCORE_LABELS.values(), "linear probe"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for name, scored in rows:
        probe = scored.get("linear_top1")
        lines.append(
            f"| {name} `{scored['bundle_hash'][:12]}` | {scored['dim']} | "
            + " | ".join(f"{value:.2%}" for value in scored["scores"].values())
            + f" | {'—' if probe is None else f'{probe:.2%}'} |"
        )
    for name, suite in evaluation["baselines"].items():
        lines.append(f"| {name} | | " + " | ".join(f"{value:.2%}" for value in suite.values()) + " | — |")
    return "\n".join(lines)


@task
def publish_model(model_root: str, candidate: str) -> str:
    """Switch ``model_root/current`` to the candidate's version (one atomic rename)."""
    from artifacts.versions import switch_current

    number = int(Path(candidate).name.removeprefix("v"))
    switch_current(Path(model_root), number)
    get_run_logger().info("published %s as %s", candidate, Path(model_root) / "current")
    return model_root


class QualityGateError(ValueError):
    """The candidate model is worse than the published one, or than raw pixels: it was not published."""


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
    cache: str | None = None,
    gate_tolerance: float = 0.01,
    dims: int | None = None,
    shares: int = 2,
    gate: bool = True,
) -> dict[str, Any]:
    """Shards from ``source`` (if missing) → a trained run → a candidate bundle → its quality gate → published.

    ``model_dir`` is a root of versions (`artifacts.versions`): the candidate is exported as its next version,
    the training and held-out shards are embedded with it (into ``cache``, default ``<run_dir>/../cache``),
    the suite scores those served vectors beside raw pixels (always), ``baselines`` (``hog``) and the
    published model, and ``current`` switches to the candidate only when the gate passes
    (`pipeline.evaluate.gate`, ``gate_tolerance``); a refused candidate fails the flow. Without labelled
    held-out shards the gate is label-free (`pipeline.evaluate.views`: altered views of a sample of the
    training corpus searched for their originals, beside raw pixels and the published model, and the
    kNN monitor is off); ``gate=False`` publishes
    whatever the gate says (a look at the chain's mechanics with a model too small to learn), said alike.
    ``dims`` overrides the run's ``model.embedding_dims``; ``shares`` embed in parallel; ``monitor=False``
    trains without the kNN monitor (the demo's budget).
    """
    cache = cache or str(Path(run_dir).resolve().parent / "cache")
    clock = StageClock()
    with clock.stage("ingest"):
        data = ingest_if_missing(source, shards)
        held_out = ingest_if_missing(eval_source, eval_shards) if eval_source and eval_shards else None
    with clock.stage("train"):
        labelled = bool(held_out) and shards_labelled(str(held_out)) and shards_labelled(data)
        run = train_run(data, held_out if monitor and labelled else None, run_dir, config, list(overrides or []), nproc)
    with clock.stage("curves"):
        curves = publish_curves(run)
    with clock.stage("export"):
        candidate = export_candidate(run, model_dir, dims)
    result: dict[str, Any] = {"shards": data, "eval_shards": held_out, "run": run, "curves": curves,
                              "candidate": candidate, "model": model_dir, "seconds": clock.seconds}  # fmt: skip
    with clock.stage("embed"):
        memory = embed_for_evaluation(candidate, data, cache, shares)
        queries = embed_for_evaluation(candidate, held_out, cache, shares) if labelled else None
    published = _published(model_dir)
    against = published if published and Path(published).resolve() != Path(candidate).resolve() else None
    names = ["pixels", *(name for name in baselines or [] if name != "pixels")]
    with clock.stage("evaluate"):
        if queries is not None:
            evaluation = evaluate_candidate(memory, queries, names, against, cache, linear_probe)
            decision = quality_gate(evaluation, candidate, gate_tolerance)
        else:
            get_run_logger().info("no labelled held-out shards: the gate scores %s without labels", candidate)
            evaluation = evaluate_candidate_views(memory, against, cache)
            decision = view_quality_gate(evaluation, candidate, gate_tolerance)
    result |= {"embeddings": {"memory": memory, "queries": queries}, "evaluation": evaluation, "gate": decision}
    if not decision["passed"]:
        if gate:
            raise QualityGateError(f"{candidate} was not published: {'; '.join(decision['reasons'])}")
        get_run_logger().warning("gate off: %s is published although the gate refused it", candidate)
    publish_model(model_dir, candidate)
    return result


def _published(model_root: str) -> str | None:
    """The version ``model_root/current`` names, if any."""
    from artifacts.versions import current_version, version_name

    number = current_version(Path(model_root))
    return str(Path(model_root) / version_name(number)) if number is not None else None
