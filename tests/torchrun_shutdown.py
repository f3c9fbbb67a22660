"""A torchrun entry point: train a few steps, ending as asked, then report this rank's OS threads.

Run by `tests/test_train.py` with the cyclic garbage collector off, so that
only reference counting can free the DistributedDataParallel wrapper: the
gloo process group's worker threads must be joined when `train()` returns or
raises, not left for the interpreter's shutdown (where one that still
released a tensor aborted the process). ``END`` is how training ends:
``finish`` (its last step), ``sigterm`` (rank 1 is sent SIGTERM at its second
step) or ``error`` (rank 1's second loss is NaN, which every rank then fails on).
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
from pathlib import Path

END_STEP = 2


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def end_training_on_rank_1(end: str) -> None:
    """Make rank 1's step `END_STEP` end the run as ``end`` says (``finish``: leave it alone)."""
    from pipeline.train.trainer import Trainer

    original = Trainer._train_step

    def train_step(trainer: Trainer, batch, epoch: int) -> dict[str, float]:
        record = original(trainer, batch, epoch)
        if trainer.placement.rank == 1 and trainer.step + 1 == END_STEP:
            if end == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif end == "error":
                record = {**record, "loss": math.nan}
        return record

    if end != "finish":
        Trainer._train_step = train_step  # type: ignore[method-assign]


def main(end: str, shards: str, run: str, report: str, *overrides: str) -> None:
    gc.disable()
    from pipeline.train.run_config import load_config, with_data
    from pipeline.train.trainer import train

    end_training_on_rank_1(end)
    config = with_data(load_config("fashion-mnist-cpu", list(overrides)), train=shards)
    before = thread_count()
    try:
        outcome = f"stopped by {train(config, Path(run), progress=False).stopped_by}"
    except FloatingPointError as error:
        outcome = f"error: {error}"
    after = thread_count()
    rank = os.environ["RANK"]
    Path(report, f"rank-{rank}.json").write_text(json.dumps({"before": before, "after": after, "outcome": outcome}))


if __name__ == "__main__":
    main(*sys.argv[1:])
