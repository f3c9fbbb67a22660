"""Deployments: ``pretrain`` and ``refresh-corpus`` on cron schedules, ``index-corpus`` and ``end-to-end`` on demand.

`serve_deployments` registers them with the Prefect API that ``PREFECT_API_URL``
names (a ``prefect server start``; without one, Prefect's ephemeral local API,
where schedules never fire) and then runs them in this process as their runs
come due: the schedule's, or ones triggered from the UI, the CLI
(``prefect deployment run 'index-corpus/index-corpus'``) or the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import serve

from flows.end_to_end import end_to_end
from flows.index_corpus import index_corpus
from flows.pretrain import pretrain
from flows.refresh_corpus import refresh_corpus


@dataclass(frozen=True)
class DeploymentConfig:
    out: Path  # shards/, run/, model/ and corpus/ live under it
    cron: str = "0 3 * * *"  # pretrain: nightly at 03:00
    config: str = "fashion-mnist-cpu"
    overrides: list[str] = field(default_factory=list)
    source: str = "fashion-mnist:train"
    eval_source: str = "fashion-mnist:test"
    nproc: int = 1
    refresh_cron: str = "0 * * * *"  # refresh-corpus: hourly
    pid_file: Path | None = None  # the service to tell after a refresh (mocoplus serve --pid-file)


def deployments(config: DeploymentConfig) -> list:
    root = config.out.resolve()
    layout = {name: str(root / name) for name in ("run", "model", "corpus")}
    train_shards, test_shards = str(root / "shards" / "train"), str(root / "shards" / "test")
    pretrain_parameters = {
        "source": config.source,
        "shards": train_shards,
        "run_dir": layout["run"],
        "model_dir": layout["model"],
        "eval_source": config.eval_source,
        "eval_shards": test_shards,
        "config": config.config,
        "overrides": config.overrides,
        "nproc": config.nproc,
    }
    return [
        pretrain.to_deployment(
            name="pretrain",
            cron=config.cron,
            parameters=pretrain_parameters,
            description="Ingest if missing, pretrain under torchrun, evaluate, export.",
        ),
        index_corpus.to_deployment(
            name="index-corpus",
            parameters={"model": layout["model"], "data": train_shards, "out": layout["corpus"]},
            description="Embed the corpus in parallel shares, build and check the FAISS index.",
        ),
        refresh_corpus.to_deployment(
            name="refresh-corpus",
            cron=config.refresh_cron,
            parameters={
                "source": config.source,
                "model": layout["model"],
                "shards": train_shards,
                "out": layout["corpus"],
                "pid_file": str(config.pid_file.resolve()) if config.pid_file else None,
            },
            description="ingest --update → embed the new shards → the index's next version → SIGHUP to the service.",
        ),
        end_to_end.to_deployment(
            name="end-to-end",
            parameters={"out": str(root), "config": config.config, "overrides": config.overrides},
            description="pretrain → index-corpus → a search smoke query.",
        ),
    ]


def serve_deployments(config: DeploymentConfig) -> None:
    """Register the deployments and run their flow runs until interrupted (SIGINT/SIGTERM)."""
    serve(*deployments(config), print_starting_message=True)
