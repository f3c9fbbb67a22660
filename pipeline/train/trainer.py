"""`mocoplus train`: MoCoPlus pretraining on streamed shards, on one CPU or GPU or under torchrun.

One process trains on the CPU or its GPU; under ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` set) each process joins a process group (NCCL
on GPU, gloo on CPU), takes ``global_batch / world_size`` images per step and
the model is wrapped in DistributedDataParallel; keys are all-gathered into
one queue that every rank holds identically (`mocoplus.builder`).

The loop is short on purpose: batches → the shared `TrainingStep` → the
hooks it is given (`pipeline.train.hooks`: metrics log, progress,
checkpoints, kNN monitor, curves), which see the run only through
`pipeline.train.hooks.RunView`.
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

import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel

from artifacts.atomic import prepare_out_dir, sweep_stale_temps, write_json_atomic
from artifacts.files import read_regular_file
from artifacts.run_folder import MAX_METRICS_BYTES, RunFolder
from mocoplus import MoCoPlus
from pipeline.data.streams import StreamConfig, TrainBatch, TrainStream
from pipeline.progress import stage_progress
from pipeline.train.checkpoints import checkpoint_dir, load_checkpoint, resolve_checkpoint, save_checkpoint
from pipeline.train.hooks import Encoder, Hook, Pace, standard_hooks
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.placement import Placement, barrier, distributed_placement, resolve_training_precision
from pipeline.train.run_config import RunConfig, config_from_dict
from pipeline.train.signals import StopRequest
from pipeline.train.state import rng_state, set_rng_state, state_fingerprint
from pipeline.train.step import TrainingStep

CHECKPOINT_FORMAT = "mocoplus.checkpoint"
# what the trainer itself keeps in a checkpoint; every other top-level key belongs to a hook (`Hook.state`)
TRAINER_STATE = ("format", "model", "optimizer", "scheduler", "scaler", "rng", "step", "epoch", "elapsed_s",
                 "total_steps", "config")  # fmt: skip
SUMMARY_NAME = "train.json"
REPLAN_AFTER_STEPS, REPLAN_EVERY_STEPS = 20, 10  # a time budget's pace: measured after 20 steps, every 10


@dataclass
class StepPlan:
    """How many steps the run takes; a time budget re-plans it while the LR schedule reads it every step.

    A holder the schedule can share, not a closure over the trainer: such a
    closure made a trainer ↔ scheduler reference cycle that kept the
    DistributedDataParallel wrapper, and with it the gloo process group and
    its worker threads, alive past ``destroy_process_group`` until the
    interpreter's shutdown, where a worker thread that still released a tensor
    aborted the process (``terminate called without an active exception``).
    """

    total: int


@dataclass
class LoopResult:
    """How the loop ended."""

    steps: int
    epoch: int
    final_loss: float
    images_per_s: float
    stopped_by: str | None
    replicas_identical: bool | None


@dataclass
class TrainResult:
    """A run's summary (``RUN/train.json``): how the loop ended and the kNN monitor's scores."""

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

    def __init__(self, config: RunConfig, run_dir: Path, placement: Placement, *, resume: bool):
        if not config.data.train:
            raise ValueError("no training shards: give --data (or data.train in the config)")
        if config.train.global_batch % placement.world_size:
            raise ValueError(
                f"train.global_batch {config.train.global_batch} does not split over {placement.world_size} processes"
            )
        self.config, self.run_dir, self.placement = config, Path(run_dir), placement
        self.device = placement.device
        self.precision = resolve_training_precision(config.train.precision, self.device)
        self.augment = config.augmentation
        stream_config = StreamConfig(
            batch_size=config.train.global_batch // placement.world_size,
            workers=config.data.workers,
            shuffle_buffer=config.data.shuffle_buffer,
            seed=config.train.seed,
            pin_memory=self.device.type == "cuda",
        )
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: cuDNN times its kernels once, then reuses
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
        self.plan = StepPlan(self.step_cap)  # a time budget re-plans it (`_replan`)
        self.elapsed_before = 0.0  # wall-clock seconds of earlier segments of a resumed run
        self.hooks: tuple[Hook, ...] = ()  # those of the run in progress (`run`)
        self.resumed_state: dict[str, Any] = {}  # the hooks' part of the checkpoint resumed from, for them

        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.model = MoCoPlus(config.model).to(self.device, memory_format=self.precision.memory_format())
        self.optimizer = build_optimizer(self.model.query_encoder, config)
        plan = self.plan  # the schedule holds the plan, never the trainer (`StepPlan`)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch, lambda: plan.total)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.autocast_dtype == torch.float16)
        network: torch.nn.Module = self.model
        if placement.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            network = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.train.compile:
            network = torch.compile(network)  # type: ignore[assignment]
        self.training_step: TrainingStep | None = TrainingStep(
            network, self.optimizer, self.precision, self.device, scheduler=self.scheduler, scaler=self.scaler
        )

        self.step = 0
        self.started: float | None = None  # when this process's segment of the run began (perf_counter)
        torch.manual_seed(config.train.seed + 1_000_003 * placement.rank)  # shuffle-BN's draws differ per rank
        if resume:
            self._resume()  # restores the RNG states too
        elif RunFolder(self.run_dir).has_checkpoints():
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume, or choose another --out")

    @property
    def total_steps(self) -> int:
        return self.plan.total

    @total_steps.setter
    def total_steps(self, steps: int) -> None:
        self.plan.total = steps

    @property
    def is_main(self) -> bool:
        return self.placement.is_main

    @property
    def encoder(self) -> Encoder:
        """The key encoder's backbone where it trains: what the kNN monitor scores."""
        return Encoder(self.model.key_encoder.backbone, self.device, self.precision)

    def close(self) -> None:
        """Let go of the network: the DDP wrapper holds the process group, which must go before it is destroyed.

        Also on an error, whose traceback keeps this trainer alive past
        `distributed_placement`'s exit.
        """
        self.training_step = None

    # -- checkpoints --

    def _state(self, epoch: int) -> dict[str, Any]:
        hooks_state = {key: value for hook in self.hooks for key, value in hook.state().items()}
        return {
            **hooks_state,
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "epoch": epoch,
            "elapsed_s": self.elapsed_before + (self.clock() - self.started if self.started is not None else 0.0),
            "total_steps": self.total_steps,
            "config": self.config.to_dict(),
        }

    def save(self, epoch: int) -> Path | None:
        """A checkpoint of the run now (written by rank 0, every rank waits); its path on rank 0."""
        path = None
        if self.placement.is_main:
            path = save_checkpoint(self.run_dir, self._state(epoch), self.step, keep_last=self.config.train.keep_last)
        barrier()
        return path

    def _resume(self) -> None:
        path = resolve_checkpoint(self.run_dir, "last")
        # to the CPU: load_state_dict copies onto the model's and optimizer's devices, and the RNG
        # setters take CPU byte tensors only (a CUDA map_location broke every GPU resume)
        state = load_checkpoint(path, map_location="cpu")
        saved = config_from_dict(state["config"])
        if asdict(saved.model) != asdict(self.config.model):
            raise ValueError(f"{path} was trained with another model config; resume with the run's own config.json")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.placement.world_size == 1:
            set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.resumed_state = {key: value for key, value in state.items() if key not in TRAINER_STATE}
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.config.train.time_budget:
            self.total_steps = min(int(state.get("total_steps", self.step_cap)), self.step_cap)
        if self.placement.is_main:
            _truncate_metrics(RunFolder(self.run_dir).metrics, self.step)

    # -- the loop --

    def run(self, hooks: tuple[Hook, ...]) -> LoopResult:
        """Train until the step plan is done or a stop is requested, calling ``hooks`` around the steps."""
        self._prepare_run_dir()
        self.hooks = hooks
        for hook in hooks:
            hook.load_state(self.resumed_state)
        loss, stopped_by = math.nan, None
        epoch = self.step // self.steps_per_epoch
        self.started, first_step = self.clock(), self.step
        pace = Pace(self.placement.world_size)
        try:
            with StopRequest() as stop:
                for hook in hooks:
                    hook.before_run(self)
                while self.step < self.total_steps and stopped_by is None:
                    epoch = self.step // self.steps_per_epoch
                    pace.start_epoch()
                    for batch in self._batches(epoch):
                        record = self._train_step(batch, epoch)
                        loss, stopped_by = record["loss"], self._agree(record, stop.requested)
                        self.step += 1
                        if self.config.train.time_budget:
                            self._replan(first_step)
                        pace.tick(batch.view1.shape[0], record)
                        last = stopped_by is not None or self.step >= self.total_steps
                        for hook in hooks:
                            hook.after_step(self, epoch, record, last)
                        if last:
                            break
                    for hook in hooks:
                        hook.after_epoch(self, epoch, stopped_by)
                for hook in hooks:
                    hook.after_run(self, loss, stopped_by)
        finally:
            for hook in hooks:  # also when a NaN loss or an error ends the run: the log and curves matter most then
                hook.close(self)
        return LoopResult(self.step, epoch, loss, pace.images_per_s, stopped_by, self._replicas_identical())

    def _prepare_run_dir(self) -> None:
        if self.placement.is_main:
            prepare_out_dir(self.run_dir)
            for folder in (self.run_dir, checkpoint_dir(self.run_dir)):
                sweep_stale_temps(folder)  # a checkpoint or metrics file half-written by a killed run
            write_json_atomic(RunFolder(self.run_dir).config, self.config.to_dict())
        barrier()

    def _batches(self, epoch: int) -> Iterator[TrainBatch]:
        """The epoch's deterministic batch stream, from the step a resumed run stopped at (earlier ones replayed)."""
        return itertools.islice(self.stream.epoch(epoch), self.step - epoch * self.steps_per_epoch, None)

    def _train_step(self, batch: TrainBatch, epoch: int) -> dict[str, float]:
        if self.training_step is None:
            raise RuntimeError("this trainer is closed")
        result = self.training_step(
            batch.view1,
            batch.view2,
            small=batch.small,
            epoch=epoch,
            progress=self.step / self.total_steps,
            step=self.step,
        )
        return {**result.record(), "decode_failures": float(batch.decode_failures)}

    def clock(self) -> float:
        """The clock of the time budget (seconds)."""
        return time.perf_counter()

    def _replan(self, first_step: int) -> None:
        """Set the run's length from its pace so far, so that it ends when ``train.time_budget`` is spent.

        The pace (steps per second since this process started, kNN passes and
        checkpoints included) is re-measured every few steps; the time the hooks
        reserve (the last kNN pass's) is kept back for the final one. The cosine LR and momentum
        schedules read `total_steps`, so they reach their ends at the budget. Ranks
        take the smallest plan, so all of them stop at the same step.
        """
        done = self.step - first_step
        if done < REPLAN_AFTER_STEPS or done % REPLAN_EVERY_STEPS:
            return
        assert self.started is not None
        elapsed = self.clock() - self.started
        reserved = sum(hook.reserve_seconds for hook in self.hooks)  # the kNN monitor's final pass
        left = self.config.train.time_budget - self.elapsed_before - elapsed - reserved
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

    def _replicas_identical(self) -> bool | None:
        if not dist.is_initialized():
            return None
        prints: list[str | None] = [None] * self.placement.world_size
        dist.all_gather_object(prints, state_fingerprint(self.model))
        return len(set(prints)) == 1


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (the run is replayed from there)."""
    if not path.is_file():
        return
    text = read_regular_file(path, MAX_METRICS_BYTES).decode()
    kept = [line for line in text.splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in kept))


def train(config: RunConfig, run_dir: Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a run in ``run_dir`` with the standard hooks; works alone or under torchrun."""
    with distributed_placement(config.train.collective_timeout) as placement:
        trainer = Trainer(config, run_dir, placement, resume=resume)
        try:
            with stage_progress(progress and placement.is_main) as bar:
                hooks = standard_hooks(config, trainer.encoder, bar)
                loop = trainer.run(tuple(hooks))
        finally:
            trainer.close()
    result = TrainResult(
        trainer.run_dir,
        loop.steps,
        loop.epoch,
        loop.final_loss,
        loop.images_per_s,
        hooks.knn.last,
        hooks.knn.best,
        loop.stopped_by,
        loop.replicas_identical,
    )
    if placement.is_main:
        write_json_atomic(trainer.run_dir / SUMMARY_NAME, {**asdict(result), "run_dir": str(trainer.run_dir)})
    return result
