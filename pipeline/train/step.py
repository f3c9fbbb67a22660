"""One MoCoPlus optimisation step, shared by the trainer and every benchmark that times training.

Forward under the precision's autocast (the query encoder, the momentum key
encoder and its EMA update, the objective, the enqueue — all inside
`MoCoPlus.forward`), then backward through the grad scaler (a no-op unless
fp16), the optimizer step and the LR schedule. Written once, so a benchmark
times exactly what a run executes and a change to the step reaches both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mocoplus.builder import MoCoOutput
from pipeline.precision import Precision


@dataclass(frozen=True)
class StepResult:
    """The model's output (loss with its graph freed, stats, momentum) and the LR the step used."""

    out: MoCoOutput
    lr: float

    def record(self) -> dict[str, float]:
        """The per-step metrics a run logs (each a host sync: benchmarks timing the step alone skip this)."""
        stats = self.out.stats
        return {
            "loss": self.out.loss.item(),
            "lr": self.lr,
            "momentum": self.out.momentum,
            "positive_similarity": stats.positive_similarity.item(),
            "negative_similarity": stats.negative_similarity.item(),
            "selected_negative_similarity": stats.selected_negative_similarity.item(),
        }


@dataclass
class TrainingStep:
    """``step(view1, view2, ...)``: one forward, backward and update of ``network``.

    ``network`` is the `MoCoPlus` module or its DistributedDataParallel /
    ``torch.compile`` wrapper; views are moved to ``device`` in the
    precision's memory layout (free when they are already there).
    """

    network: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (an immutable device)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))

    def placed(self, views: Tensor) -> Tensor:
        return views.to(self.device, non_blocking=True).contiguous(memory_format=self.precision.memory_format())

    def __call__(self, view1: Tensor, view2: Tensor, small: Tensor | None = None, **position: float) -> StepResult:
        """One step on a batch's views; ``position`` (epoch, step, progress) goes to `MoCoPlus.forward` as is."""
        view1, view2 = self.placed(view1), self.placed(view2)
        small = None if small is None else self.placed(small)
        with self.precision.autocast():
            out = self.network(view1, view2, small=small, **position)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()  # the scaler is a pass-through unless fp16 enabled it
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        return StepResult(out, lr)
