"""What the training loop does around its steps, one hook per job: metrics log, progress, checkpoints, kNN.

The loop (`pipeline.train.trainer.Trainer.run`) calls ``after_step`` on every
hook after each optimisation step and ``after_epoch`` when an epoch ends (or
the run stops inside one), in list order: the checkpoint of an epoch is
written before the kNN monitor marks it best.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from artifacts.run_folder import RunFolder
from pipeline.data.augment import eval_transform
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.knn import knn_top1, labelled_features
from pipeline.pictures.curves import draw_curves
from pipeline.progress import StageProgress
from pipeline.train.checkpoints import mark_best
from pipeline.train.placement import barrier

if TYPE_CHECKING:
    from pipeline.train.trainer import Trainer


class Hook(Protocol):
    def after_step(self, epoch: int, record: dict[str, float], last: bool) -> None: ...

    def after_epoch(self, epoch: int, stopped_by: str | None) -> None: ...


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard when asked) on rank 0: a line every ``train.log_every`` steps."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        main = trainer.placement.is_main
        self.file: IO[str] | None = open(RunFolder(trainer.run_dir).metrics, "a") if main else None  # noqa: SIM115
        self.writer = _tensorboard(trainer.run_dir) if main and trainer.config.train.tensorboard else None

    def after_step(self, epoch: int, record: dict[str, float], last: bool) -> None:
        step = self.trainer.step
        if self.file is None or step % self.trainer.config.train.log_every:
            return
        self.write({"step": step, "epoch": epoch, **record})
        if self.writer is not None:
            for name, value in record.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def after_epoch(self, epoch: int, stopped_by: str | None) -> None:
        pass

    def write(self, line: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


class ProgressReport:
    """The progress bar (or log lines): step count, loss and throughput."""

    def __init__(self, trainer: Trainer, bar: StageProgress) -> None:
        self.trainer, self.bar = trainer, bar
        self.task = bar.task("pretraining", total=trainer.total_steps, completed=trainer.step, unit="steps")

    def after_step(self, epoch: int, record: dict[str, float], last: bool) -> None:
        self.bar.update(
            self.task,
            completed=self.trainer.step,
            total=self.trainer.total_steps,
            status=f"epoch {epoch} loss {record['loss']:.3f} {record['images_per_s']:,.0f} img/s",
        )

    def after_epoch(self, epoch: int, stopped_by: str | None) -> None:
        pass

    def finish(self, loss: float, stopped_by: str | None) -> None:
        self.bar.finish(self.task, status=f"loss {loss:.3f}" + (f", stopped by {stopped_by}" if stopped_by else ""))


class Checkpointing:
    """A checkpoint every ``train.checkpoint_every`` steps inside an epoch, and at every epoch's end or stop."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.last_path: Path | None = None

    def after_step(self, epoch: int, record: dict[str, float], last: bool) -> None:
        trainer, every = self.trainer, self.trainer.config.train.checkpoint_every
        end_of_epoch = trainer.step % trainer.steps_per_epoch == 0
        if not last and every and trainer.step % every == 0 and not end_of_epoch:
            trainer.save(epoch)

    def after_epoch(self, epoch: int, stopped_by: str | None) -> None:
        self.last_path = self.trainer.save(epoch)


class KnnMonitor:
    """Weighted kNN top-1 of the key encoder at the end of every ``eval.every_epochs`` epochs and of the run.

    Runs on rank 0 only, and never after a stop request (only the checkpoint
    fits between a SIGTERM and the kill that follows it). The best score
    marks its epoch's checkpoint ``best``; the pass's duration is kept, so a
    time budget leaves room for the final one.
    """

    def __init__(self, trainer: Trainer, checkpoints: Checkpointing, log: MetricsLog, bar: StageProgress) -> None:
        self.trainer, self.checkpoints, self.log, self.bar = trainer, checkpoints, log, bar

    def after_step(self, epoch: int, record: dict[str, float], last: bool) -> None:
        pass

    def after_epoch(self, epoch: int, stopped_by: str | None) -> None:
        trainer, config = self.trainer, self.trainer.config
        if stopped_by is not None or not config.data.eval_queries:
            return
        if (epoch + 1) % config.eval.every_epochs and trainer.step < trainer.total_steps:
            return
        if trainer.placement.is_main:
            started = trainer.clock()
            trainer.last_knn = self.measure()
            trainer.knn_seconds = trainer.clock() - started
            if trainer.best_knn is None or trainer.last_knn > trainer.best_knn:
                trainer.best_knn = trainer.last_knn
                assert self.checkpoints.last_path is not None
                info = {"step": trainer.step, "epoch": epoch, "knn_top1": trainer.last_knn}
                mark_best(trainer.run_dir, self.checkpoints.last_path, info)
            self.log.write({"step": trainer.step, "epoch": epoch, "knn_top1": trainer.last_knn})
        barrier()

    def measure(self) -> float:
        """Weighted kNN top-1 of the key encoder's pooled features: memory = training shards, queries = eval."""
        from mocoplus.backbones import GridEmbedding

        trainer, config, bar = self.trainer, self.trainer.config, self.bar
        stream_config = StreamConfig(batch_size=config.eval.batch_size, workers=config.data.workers)
        augment = trainer.augment
        size, memory_shards = config.data.image_size, config.data.eval_memory or config.data.train
        memory = EvalStream(memory_shards, size, augment.input_mode, stream_config, rank=0, world_size=1)
        queries = EvalStream(config.data.eval_queries, size, augment.input_mode, stream_config, rank=0, world_size=1)
        known = (memory.shards.samples, queries.shards.samples)
        task = bar.task("kNN monitor", total=sum(known) if all(known) else None, unit="images")
        embedding = GridEmbedding(trainer.model.key_encoder.backbone, config.model.embedding_grid)
        (bank, bank_labels), (query, query_labels) = (
            labelled_features(
                embedding,
                stream,
                transform=lambda x: eval_transform(x, augment),
                device=trainer.device,
                precision=trainer.precision,
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


def draw_run_curves(run_dir: Path) -> Path | None:
    """``RUN/curves.png`` from the run's metrics, when it ends or is stopped; a picture never fails a run."""
    try:
        return draw_curves([run_dir], RunFolder(run_dir).curves)
    except Exception as error:  # matplotlib missing or broken, a disk full: the checkpoints matter, not the picture
        print(f"warning: {RunFolder(run_dir).curves} not drawn: {error}", file=sys.stderr)
        return None
