"""What the training loop does around its steps, one hook per job: metrics log, progress, checkpoints, kNN.

The loop (`pipeline.train.trainer.Trainer.run`) takes its hooks as an
argument and calls them in list order: ``before_run`` once, ``after_step``
after each optimisation step, ``after_epoch`` when an epoch ends (or the run
stops inside one), ``after_run`` when the loop ends normally, and ``close``
always, also on an error. A hook sees the run only through `RunView` (where
it stands, where it writes, a checkpoint on demand, the budget's clock) and
keeps its own results: the kNN monitor's scores are its attributes, saved in
each checkpoint through ``state`` and restored on resume through
``load_state``. The order matters: the checkpoint of an epoch is written
before the kNN monitor marks it best, and the metrics log is closed before the
curves are drawn from it. `standard_hooks` is the list every run uses.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from artifacts.run_folder import RunFolder
from pipeline.data.augment import eval_transform
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.knn import knn_top1, labelled_features
from pipeline.pictures.curves import draw_curves
from pipeline.precision import Precision
from pipeline.progress import StageProgress
from pipeline.train.checkpoints import mark_best
from pipeline.train.placement import barrier
from pipeline.train.run_config import RunConfig


class RunView(Protocol):
    """What a hook may read of the run and ask of it; the trainer is one."""

    @property
    def step(self) -> int: ...

    @property
    def total_steps(self) -> int: ...

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def run_dir(self) -> Path: ...

    @property
    def is_main(self) -> bool: ...

    def save(self, epoch: int) -> Path | None:
        """A checkpoint of the run now (written by rank 0, every rank waits); its path on rank 0."""
        ...

    def clock(self) -> float:
        """The time budget's clock (seconds)."""
        ...


class Hook:
    """A job done around the loop's steps; every method is a no-op unless the hook needs it."""

    def before_run(self, run: RunView) -> None:
        pass

    def after_step(self, run: RunView, epoch: int, record: dict[str, float], last: bool) -> None:
        pass

    def after_epoch(self, run: RunView, epoch: int, stopped_by: str | None) -> None:
        pass

    def after_run(self, run: RunView, loss: float, stopped_by: str | None) -> None:
        """The loop ended by itself: its steps done or a stop request honoured."""

    def close(self, run: RunView) -> None:
        """Always called once the loop is over, also when an error ended it."""

    def state(self) -> dict[str, Any]:
        """What this hook keeps in each checkpoint (keys of the checkpoint's top level)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back what `state` saved, from the checkpoint a run resumes."""

    @property
    def reserve_seconds(self) -> float:
        """Seconds this hook needs at the run's end, which a time budget keeps free."""
        return 0.0


class MetricsLog(Hook):
    """``metrics.jsonl`` (and TensorBoard when asked) on rank 0: a line every ``log_every`` steps."""

    def __init__(self, log_every: int, *, tensorboard: bool = False) -> None:
        self.log_every, self.tensorboard = log_every, tensorboard
        self.file: IO[str] | None = None
        self.writer: Any = None

    def before_run(self, run: RunView) -> None:
        if run.is_main:
            self.file = open(RunFolder(run.run_dir).metrics, "a")  # noqa: SIM115
            self.writer = _tensorboard(run.run_dir) if self.tensorboard else None

    def after_step(self, run: RunView, epoch: int, record: dict[str, float], last: bool) -> None:
        if self.file is None or run.step % self.log_every:
            return
        self.write({"step": run.step, "epoch": epoch, **record})
        if self.writer is not None:
            for name, value in record.items():
                self.writer.add_scalar(f"train/{name}", value, run.step)

    def write(self, line: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()

    def close(self, run: RunView) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressReport(Hook):
    """The progress bar (or log lines): step count, loss and throughput."""

    def __init__(self, bar: StageProgress) -> None:
        self.bar = bar
        self.task: Any = None

    def before_run(self, run: RunView) -> None:
        self.task = self.bar.task("pretraining", total=run.total_steps, completed=run.step, unit="steps")

    def after_step(self, run: RunView, epoch: int, record: dict[str, float], last: bool) -> None:
        self.bar.update(
            self.task,
            completed=run.step,
            total=run.total_steps,
            status=f"epoch {epoch} loss {record['loss']:.3f} {record['images_per_s']:,.0f} img/s",
        )

    def after_run(self, run: RunView, loss: float, stopped_by: str | None) -> None:
        self.bar.finish(self.task, status=f"loss {loss:.3f}" + (f", stopped by {stopped_by}" if stopped_by else ""))


class Checkpointing(Hook):
    """A checkpoint every ``every`` steps inside an epoch (0: none), and at every epoch's end or stop."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.last_path: Path | None = None

    def after_step(self, run: RunView, epoch: int, record: dict[str, float], last: bool) -> None:
        end_of_epoch = run.step % run.steps_per_epoch == 0
        if not last and self.every and run.step % self.every == 0 and not end_of_epoch:
            run.save(epoch)

    def after_epoch(self, run: RunView, epoch: int, stopped_by: str | None) -> None:
        self.last_path = run.save(epoch)


@dataclass(frozen=True)
class Encoder:
    """The network the kNN monitor scores, where it runs and at what precision."""

    backbone: torch.nn.Module
    device: torch.device
    precision: Precision


class KnnMonitor(Hook):
    """Weighted kNN top-1 of the key encoder at the end of every ``eval.every_epochs`` epochs and of the run.

    Runs on rank 0 only, and never after a stop request (only the checkpoint
    fits between a SIGTERM and the kill that follows it). The best score
    marks its epoch's checkpoint ``best``; the pass's duration is kept, so a
    time budget leaves room for the final one. Its scores are its own:
    ``last``, ``best`` (kept in checkpoints as ``best_knn_top1``).
    """

    def __init__(
        self, config: RunConfig, encoder: Encoder, checkpoints: Checkpointing, log: MetricsLog, bar: StageProgress
    ) -> None:
        self.config, self.encoder, self.checkpoints, self.log, self.bar = config, encoder, checkpoints, log, bar
        self.last: float | None = None
        self.best: float | None = None
        self.seconds = 0.0

    @property
    def reserve_seconds(self) -> float:
        return self.seconds

    def state(self) -> dict[str, Any]:
        return {"best_knn_top1": self.best}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best_knn_top1")

    def after_epoch(self, run: RunView, epoch: int, stopped_by: str | None) -> None:
        config = self.config
        if stopped_by is not None or not config.data.eval_queries:
            return
        if (epoch + 1) % config.eval.every_epochs and run.step < run.total_steps:
            return
        if run.is_main:
            started = run.clock()
            self.last = self.measure()
            self.seconds = run.clock() - started
            if self.best is None or self.last > self.best:
                self.best = self.last
                assert self.checkpoints.last_path is not None
                info = {"step": run.step, "epoch": epoch, "knn_top1": self.last}
                mark_best(run.run_dir, self.checkpoints.last_path, info)
            self.log.write({"step": run.step, "epoch": epoch, "knn_top1": self.last})
        barrier()

    def measure(self) -> float:
        """Weighted kNN top-1 of the key encoder's pooled features: memory = training shards, queries = eval."""
        from mocoplus.backbones import GridEmbedding

        config, bar, encoder = self.config, self.bar, self.encoder
        stream_config = StreamConfig(batch_size=config.eval.batch_size, workers=config.data.workers)
        augment = config.augmentation
        size, memory_shards = config.data.image_size, config.data.eval_memory or config.data.train
        memory = EvalStream(memory_shards, size, augment.input_mode, stream_config, rank=0, world_size=1)
        queries = EvalStream(config.data.eval_queries, size, augment.input_mode, stream_config, rank=0, world_size=1)
        known = (memory.shards.samples, queries.shards.samples)
        task = bar.task("kNN monitor", total=sum(known) if all(known) else None, unit="images")
        embedding = GridEmbedding(encoder.backbone, config.model.embedding_grid)
        (bank, bank_labels), (query, query_labels) = (
            labelled_features(
                embedding,
                stream,
                transform=lambda x: eval_transform(x, augment),
                device=encoder.device,
                precision=encoder.precision,
                on_batch=lambda count: bar.advance(task, count),
            )
            for stream in (memory, queries)
        )
        classes = int(max(bank_labels.max(), query_labels.max())) + 1
        accuracy = knn_top1(
            bank,
            bank_labels,
            query,
            query_labels,
            num_classes=classes,
            k=config.eval.knn_k,
            temperature=config.eval.knn_temperature,
        )
        bar.finish(task, status=f"top-1 {accuracy:.2%}", hide=True)
        return accuracy


class RunCurves(Hook):
    """``RUN/curves.png`` from the run's metrics when the run ends, also on an error (then it matters most)."""

    def close(self, run: RunView) -> None:
        if not run.is_main:
            return
        curves = RunFolder(run.run_dir).curves
        try:
            draw_curves([run.run_dir], curves)
        except Exception as error:  # matplotlib missing or broken, a disk full: the checkpoints matter, not the picture
            print(f"warning: {curves} not drawn: {error}", file=sys.stderr)


@dataclass(frozen=True)
class StandardHooks:
    """The hooks every run uses, in the order the loop must call them; ``knn`` holds the monitor's scores."""

    log: MetricsLog
    progress: ProgressReport
    checkpoints: Checkpointing
    knn: KnnMonitor
    curves: RunCurves

    def __iter__(self) -> Iterator[Hook]:
        return iter((self.log, self.progress, self.checkpoints, self.knn, self.curves))


def standard_hooks(config: RunConfig, encoder: Encoder, bar: StageProgress) -> StandardHooks:
    """The metrics log, progress, checkpoints, kNN monitor and curves of a run of ``config``."""
    log = MetricsLog(config.train.log_every, tensorboard=config.train.tensorboard)
    checkpoints = Checkpointing(config.train.checkpoint_every)
    knn = KnnMonitor(config, encoder, checkpoints, log, bar)
    return StandardHooks(log, ProgressReport(bar), checkpoints, knn, RunCurves())


class Pace:
    """Images per second of each step (into its record) and over the run; a step's clock starts with its epoch."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.images, self.seconds = 0, 0.0
        self.step_started = time.perf_counter()

    def start_epoch(self) -> None:
        self.step_started = time.perf_counter()

    def tick(self, batch_size: int, record: dict[str, float]) -> None:
        images = batch_size * self.world_size
        now = time.perf_counter()
        record["images_per_s"] = images / (now - self.step_started)
        self.images += images
        self.seconds += now - self.step_started
        self.step_started = now

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError(f"train.tensorboard needs the tensorboard package ({error})") from None
    return SummaryWriter(str(run_dir / "tensorboard"))
