"""The run folder contract: what `mocoplus train` writes, by name, and the torch-free ways to look into it.

A run folder (``mocoplus train --out RUN``) holds:

- ``config.json`` — the validated run config, written when training starts (``--resume`` reads it back);
- ``metrics.jsonl`` — a JSON object per line: one every ``train.log_every`` steps (``step``, ``epoch``,
  ``loss``, ``lr``, similarities...) and one per kNN evaluation (``knn_top1``); a resumed run cuts the
  lines logged after its checkpoint;
- ``curves.png`` — the training curves drawn from ``metrics.jsonl`` when training ends;
- ``checkpoints/`` — ``step-NNNNNNNN.pt`` (the newest ``train.keep_last``), ``last.json`` naming the
  newest, and ``best.pt`` + ``best.json`` (the best kNN top-1 so far, when the run is evaluated).

The writers are `pipeline.train` (trainer, hooks, checkpoints — the checkpoint files themselves are torch
pickles, read and written there); the readers are the trainer (resume), `pipeline.pictures.curves`, the
evaluation and export stages, the ``pretrain`` flow and the benchmarks, all through these names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE, METRICS_FILE, CURVES_FILE = "config.json", "metrics.jsonl", "curves.png"
CHECKPOINT_DIR, LAST_FILE, BEST_FILE, BEST_INFO = "checkpoints", "last.json", "best.pt", "best.json"
STEP_FILE = re.compile(r"step-(\d{8})\.pt")
MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl: a line a step


def step_file_name(step: int) -> str:
    return f"step-{step:08d}.pt"


@dataclass(frozen=True)
class RunFolder:
    """The files of the run folder ``path`` (none of them need exist)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def curves(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST_FILE

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST_FILE

    @property
    def best_info(self) -> Path:
        return self.checkpoints / BEST_INFO

    def step_files(self) -> list[Path]:
        """The kept ``step-NNNNNNNN.pt`` files, oldest first (temp files and others are not among them)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(path for path in self.checkpoints.iterdir() if STEP_FILE.fullmatch(path.name))

    def has_checkpoints(self) -> bool:
        """Whether a run to resume is here: a checkpoint was written."""
        return bool(self.step_files()) or self.best.is_file()

    def metric_records(self) -> Iterator[dict[str, Any]]:
        """``metrics.jsonl``'s objects with an integer ``step``, in order; a line cut by a kill, or not an
        object, is skipped. `FileNotFoundError` when the run has logged nothing yet."""
        if not self.metrics.is_file():
            raise FileNotFoundError(f"{self.path} has no {METRICS_FILE}: not a training run, or it logged nothing yet")
        with open(self.metrics) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    yield record
