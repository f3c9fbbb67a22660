"""`mocoplus train`: MoCoPlus pretraining on streamed shards, on one CPU or GPU or under torchrun.

One process trains on the CPU or its GPU; under ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` set) each process joins a process group (NCCL
on GPU, gloo on CPU), takes ``global_batch / world_size`` images per step and
the model is wrapped in DistributedDataParallel; keys are all-gathered into
one queue that every rank holds identically (`mocoplus.builder`).

Each step the ranks agree (one all-reduce of two flags) on whether any rank
saw a non-finite loss or was asked to stop (SIGTERM, SIGINT): on a stop all
ranks finish the step, rank 0 writes a checkpoint and everyone exits cleanly;
on a NaN or inf loss the run fails with a clear error and the last good
checkpoint stays the newest. ``--resume`` reloads the newest checkpoint
(weights, queue, optimizer, schedule, scaler, RNG states), truncates
``metrics.jsonl`` back to it and replays the epoch's deterministic batch
stream to the step where it stopped, so the resumed loss curve matches the
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel

from artifacts.atomic import prepare_out_dir, sweep_stale_temps, write_json_atomic
from mocoplus import MoCoPlus
from mocoplus.backbones import GridEmbedding
from pipeline.data.augment import eval_transform
from pipeline.data.streams import EvalStream, StreamConfig, TrainStream
from pipeline.evaluate.knn import knn_top1, labelled_features
from pipeline.progress import StageProgress, stage_progress
from pipeline.train.checkpoints import checkpoint_dir, load_checkpoint, mark_best, resolve_checkpoint, save_checkpoint
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.precision import Precision, resolve_precision
from pipeline.train.run_config import RunConfig, config_from_dict

CHECKPOINT_FORMAT = "mocoplus.checkpoint"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "train.json"
REPLAN_AFTER_STEPS, REPLAN_EVERY_STEPS = 20, 10  # a time budget's pace: measured after 20 steps, every 10


# --- placement ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed_placement() -> Iterator[Placement]:
    """This process's rank and device; joins (and leaves) a process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        yield Placement(rank, dist.get_world_size() if dist.is_initialized() else 1, device)
    finally:
        if joined:
            dist.destroy_process_group()


def resolve_training_precision(name: str, device: torch.device) -> Precision:
    """``fp16`` (GPU only, with a grad scaler) on top of `resolve_precision`'s auto/bf16/fp32."""
    if name != "fp16":
        return resolve_precision(name, device)
    if device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU (it relies on a grad scaler); use bf16 or auto on the CPU")
    return Precision(device.type, torch.float16, channels_last=True)


# --- stopping -----------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name


# --- state ----------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (loadable with ``weights_only``)."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(item) for item in value) if isinstance(value, list | tuple) else value


def state_fingerprint(model: MoCoPlus) -> str:
    """sha256 of every weight (query and key encoder) and the queue: what DDP ranks must agree on.

    Batch-norm running statistics are left out: each rank computes them on its
    own images (DDP re-broadcasts the query encoder's at the next forward).
    """
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *(("queue." + n, b) for n, b in model.queue.named_buffers())]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epoch: int
    final_loss: float
    images_per_s: float
    knn_top1: float | None
    best_knn_top1: float | None
    stopped_by: str | None
    replicas_identical: bool | None


class Trainer:
    """Builds model, optimizer and streams for ``config`` and runs (or resumes) the loop in ``run_dir``."""

    def __init__(self, config: RunConfig, run_dir: Path, placement: Placement, *, resume: bool, progress: bool):
        if not config.data.train:
            raise ValueError("no training shards: give --data (or data.train in the config)")
        if config.train.global_batch % placement.world_size:
            raise ValueError(
                f"train.global_batch {config.train.global_batch} does not split over {placement.world_size} processes"
            )
        self.config, self.run_dir, self.placement, self.progress = config, Path(run_dir), placement, progress
        self.device = placement.device
        self.precision = resolve_training_precision(config.train.precision, self.device)
        self.augment = config.augmentation
        batch = config.train.global_batch // placement.world_size
        stream_config = StreamConfig(
            batch_size=batch,
            workers=config.data.workers,
            shuffle_buffer=config.data.shuffle_buffer,
            seed=config.train.seed,
        )
        self.stream = TrainStream(
            config.data.train,
            self.augment,
            stream_config,
            samples_per_epoch=config.data.samples_per_epoch or None,
            rank=placement.rank,
            world_size=placement.world_size,
        )
        self.steps_per_epoch = self.stream.batches_per_epoch
        full = config.train.epochs * self.steps_per_epoch
        self.step_cap = min(full, config.train.max_steps) if config.train.max_steps else full
        self.total_steps = self.step_cap  # a time budget re-plans it (`_replan`)
        self.elapsed_before = 0.0  # wall-clock seconds of earlier segments of a resumed run
        self.knn_seconds = 0.0  # the last kNN pass's duration: the budget keeps room for the final one

        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.model = MoCoPlus(config.model).to(self.device, memory_format=self.precision.memory_format())
        self.optimizer = build_optimizer(self.model.query_encoder, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch, lambda: self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.autocast_dtype == torch.float16)
        self.network: torch.nn.Module = self.model
        if placement.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.train.compile:
            self.network = torch.compile(self.network)  # type: ignore[assignment]

        self.step = 0
        self.started: float | None = None  # when this process's segment of the run began (perf_counter)
        self.best_knn: float | None = None
        self.last_knn: float | None = None
        torch.manual_seed(config.train.seed + 1_000_003 * placement.rank)  # shuffle-BN's draws differ per rank
        if resume:
            self._resume()  # restores the RNG states too
        elif _has_checkpoints(self.run_dir):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume, or choose another --out")

    # -- checkpoints --

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "epoch": epoch,
            "best_knn_top1": self.best_knn,
            "elapsed_s": self.elapsed_before + (self._now() - self.started if self.started is not None else 0.0),
            "total_steps": self.total_steps,
            "config": self.config.to_dict(),
        }

    def _save(self, epoch: int) -> Path | None:
        path = None
        if self.placement.is_main:
            path = save_checkpoint(self.run_dir, self._state(epoch), self.step, keep_last=self.config.train.keep_last)
        _barrier()
        return path

    def _resume(self) -> None:
        path = resolve_checkpoint(self.run_dir, "last")
        state = load_checkpoint(path, map_location=self.device)
        saved = config_from_dict(state["config"])
        if asdict(saved.model) != asdict(self.config.model):
            raise ValueError(f"{path} was trained with another model config; resume with the run's own config.json")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.placement.world_size == 1:
            set_rng_state(state["rng"])
        self.step, self.best_knn = int(state["step"]), state.get("best_knn_top1")
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.config.train.time_budget:
            self.total_steps = min(int(state.get("total_steps", self.step_cap)), self.step_cap)
        if self.placement.is_main:
            _truncate_metrics(self.run_dir / METRICS_NAME, self.step)

    # -- the loop --

    def run(self) -> TrainResult:
        config, placement = self.config, self.placement
        if placement.is_main:
            prepare_out_dir(self.run_dir)
            for folder in (self.run_dir, checkpoint_dir(self.run_dir)):
                sweep_stale_temps(folder)  # a checkpoint or metrics file half-written by a killed run
            write_json_atomic(self.run_dir / CONFIG_NAME, config.to_dict())
        _barrier()
        metrics = open(self.run_dir / METRICS_NAME, "a") if placement.is_main else None  # noqa: SIM115
        writer = _tensorboard(self.run_dir) if placement.is_main and config.train.tensorboard else None
        loss_value, images, train_seconds = math.nan, 0, 0.0
        stopped_by: str | None = None
        epoch = self.step // self.steps_per_epoch
        self.started, first_step = self._now(), self.step
        try:
            with StopRequest() as stop, stage_progress(self.progress and placement.is_main) as bar:
                task = bar.task("pretraining", total=self.total_steps, completed=self.step, unit="steps")
                while self.step < self.total_steps and stopped_by is None:
                    epoch, skip = divmod(self.step, self.steps_per_epoch)
                    step_started = time.perf_counter()
                    for index, batch in enumerate(self.stream.epoch(epoch)):
                        if index < skip:
                            continue  # replaying the interrupted epoch's deterministic stream up to the checkpoint
                        record = self._train_step(batch, epoch)
                        loss_value = record["loss"]
                        stopped_by = self._agree(record, stop.requested)
                        self.step += 1
                        if config.train.time_budget:
                            self._replan(first_step)
                        images += batch.view1.shape[0] * placement.world_size
                        now = time.perf_counter()
                        record["images_per_s"] = batch.view1.shape[0] * placement.world_size / (now - step_started)
                        train_seconds += now - step_started
                        step_started = now
                        if metrics is not None and self.step % config.train.log_every == 0:
                            metrics.write(json.dumps({"step": self.step, "epoch": epoch, **record}) + "\n")
                            metrics.flush()
                            if writer is not None:
                                for name, value in record.items():
                                    writer.add_scalar(f"train/{name}", value, self.step)
                        bar.update(
                            task,
                            completed=self.step,
                            total=self.total_steps,
                            status=f"epoch {epoch} loss {loss_value:.3f} {record['images_per_s']:,.0f} img/s",
                        )
                        end_of_epoch = self.step % self.steps_per_epoch == 0
                        if stopped_by or self.step >= self.total_steps:
                            break
                        every = config.train.checkpoint_every
                        if every and self.step % every == 0 and not end_of_epoch:
                            self._save(epoch)
                    if stopped_by is None:
                        self._end_of_epoch(epoch, bar)
                    else:  # a stop only checkpoints: no kNN pass between SIGTERM and the kill that follows it
                        self._save(epoch)
                bar.finish(task, status=f"loss {loss_value:.3f}" + (f", stopped by {stopped_by}" if stopped_by else ""))
        finally:
            if metrics is not None:
                metrics.close()
            if writer is not None:
                writer.close()
        identical = self._replicas_identical()
        result = TrainResult(
            self.run_dir,
            self.step,
            epoch,
            loss_value,
            images / max(train_seconds, 1e-9),
            self.last_knn,
            self.best_knn,
            stopped_by,
            identical,
        )
        if placement.is_main:
            write_json_atomic(self.run_dir / SUMMARY_NAME, {**asdict(result), "run_dir": str(self.run_dir)})
        return result

    def _train_step(self, batch, epoch: int) -> dict[str, float]:
        layout = self.precision.memory_format()

        def placed(views: torch.Tensor) -> torch.Tensor:
            return views.to(self.device, non_blocking=True).contiguous(memory_format=layout)

        view1, view2 = placed(batch.view1), placed(batch.view2)
        small = None if batch.small is None else placed(batch.small)
        with self.precision.autocast():
            out = self.network(
                view1, view2, small=small, epoch=epoch, progress=self.step / self.total_steps, step=self.step
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        stats = out.stats
        return {
            "loss": out.loss.item(),
            "lr": lr,
            "momentum": out.momentum,
            "positive_similarity": stats.positive_similarity.item(),
            "negative_similarity": stats.negative_similarity.item(),
            "selected_negative_similarity": stats.selected_negative_similarity.item(),
            "decode_failures": float(batch.decode_failures),
        }

    def _now(self) -> float:
        """The clock of the time budget (seconds)."""
        return time.perf_counter()

    def _replan(self, first_step: int) -> None:
        """Set the run's length from its pace so far, so that it ends when ``train.time_budget`` is spent.

        The pace (steps per second since this process started, kNN passes and
        checkpoints included) is re-measured every few steps; the time of the last
        kNN pass is kept back for the final one. The cosine LR and momentum
        schedules read `total_steps`, so they reach their ends at the budget. Ranks
        take the smallest plan, so all of them stop at the same step.
        """
        done = self.step - first_step
        if done < REPLAN_AFTER_STEPS or done % REPLAN_EVERY_STEPS:
            return
        assert self.started is not None
        elapsed = self._now() - self.started
        left = self.config.train.time_budget - self.elapsed_before - elapsed - self.knn_seconds
        planned = min(self.step + max(0, int(left * done / max(elapsed, 1e-9))), self.step_cap)
        if self.placement.world_size > 1:
            plan = torch.tensor([planned], device=self.device)
            torch.distributed.all_reduce(plan, op=torch.distributed.ReduceOp.MIN)
            planned = int(plan.item())
        self.total_steps = max(planned, self.step)

    def _agree(self, record: dict[str, float], stop: str | None) -> str | None:
        """All ranks learn whether any saw a non-finite loss (→ error) or a stop request (→ 'SIGTERM'...)."""
        flags = torch.tensor([float(not math.isfinite(record["loss"])), float(stop is not None)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            raise FloatingPointError(
                f"the loss became non-finite at step {self.step + 1} (rank {self.placement.rank}: {record['loss']}); "
                "the last good checkpoint is kept. Lower optim.lr or use precision fp32/bf16"
            )
        return (stop or "stop request on another rank") if flags[1] > 0 else None

    def _end_of_epoch(self, epoch: int, bar: StageProgress) -> None:
        path = self._save(epoch)
        config = self.config
        if not config.data.eval_queries or ((epoch + 1) % config.eval.every_epochs and self.step < self.total_steps):
            return
        if self.placement.is_main:
            started = self._now()
            self.last_knn = self.knn_monitor(bar)
            self.knn_seconds = self._now() - started
            if self.best_knn is None or self.last_knn > self.best_knn:
                self.best_knn = self.last_knn
                assert path is not None
                mark_best(self.run_dir, path, {"step": self.step, "epoch": epoch, "knn_top1": self.last_knn})
            with open(self.run_dir / METRICS_NAME, "a") as metrics:
                metrics.write(json.dumps({"step": self.step, "epoch": epoch, "knn_top1": self.last_knn}) + "\n")
        _barrier()

    def knn_monitor(self, bar: StageProgress) -> float:
        """Weighted kNN top-1 of the key encoder's pooled features: memory = training shards, queries = eval."""
        config = self.config
        stream_config = StreamConfig(batch_size=config.eval.batch_size, workers=config.data.workers)
        mode = self.augment.input_mode
        size, memory_shards = config.data.image_size, config.data.eval_memory or config.data.train
        memory = EvalStream(memory_shards, size, mode, stream_config, rank=0, world_size=1)
        queries = EvalStream(config.data.eval_queries, size, mode, stream_config, rank=0, world_size=1)
        known = (memory.shards.samples, queries.shards.samples)
        task = bar.task("kNN monitor", total=sum(known) if all(known) else None, unit="images")
        embedding = GridEmbedding(self.model.key_encoder.backbone, config.model.embedding_grid)
        (bank, bank_labels), (query, query_labels) = (
            labelled_features(
                embedding,
                stream,
                transform=lambda x: eval_transform(x, self.augment),
                device=self.device,
                precision=self.precision,
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

    def _replicas_identical(self) -> bool | None:
        if not dist.is_initialized():
            return None
        prints: list[str | None] = [None] * self.placement.world_size
        dist.all_gather_object(prints, state_fingerprint(self.model))
        return len(set(prints)) == 1


def _has_checkpoints(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(folder.glob("*.pt"))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (the run is replayed from there)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in kept))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError(f"train.tensorboard needs the tensorboard package ({error})") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(config: RunConfig, run_dir: Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; works alone or under torchrun."""
    with distributed_placement() as placement:
        return Trainer(config, run_dir, placement, resume=resume, progress=progress).run()
