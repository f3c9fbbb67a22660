"""The optimizer and the learning-rate schedule of a training run.

SGD with momentum (MoCo's choice) or LARS (layer-wise trust ratios, for very
large batches). Weight decay and LARS adaptation skip biases and batch-norm
parameters (1-D tensors), as is standard. The schedule is a per-step
multiplier (linear warm-up, then cosine decay to 0 or constant) in a
`LambdaLR`, so it is checkpointed and resumed with the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.train.run_config import RunConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor step is scaled by ‖w‖ / ‖∇w + wd·w‖ (You et al., 2017).

    Tensors in a group with ``lars=False`` (biases, norms) take plain SGD steps.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 0.001):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "trust": trust})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            adapt = group.get("lars", True)
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.add(param, alpha=group["weight_decay"])
                if adapt:
                    weight_norm, grad_norm = param.norm(), grad.norm()
                    if weight_norm > 0 and grad_norm > 0:
                        grad = grad.mul(group["trust"] * weight_norm / grad_norm)
                buffer = self.state[param].get("momentum_buffer")
                if buffer is None:
                    buffer = self.state[param]["momentum_buffer"] = grad.clone()
                else:
                    buffer.mul_(group["momentum"]).add_(grad)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable weights with decay (and LARS adaptation); biases and norm parameters without either."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0, "lars": False}]


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.optim.weight_decay)
    if config.optim.optimizer == "lars":
        return LARS(groups, lr=config.lr, momentum=config.optim.momentum, trust=config.optim.lars_trust)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.optim.momentum)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 (or constant) by ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    steps_per_epoch: int,
    total_steps: int | Callable[[], int],
) -> torch.optim.lr_scheduler.LambdaLR:
    """A callable ``total_steps`` is asked at every step: a time-budgeted run re-plans its length as it goes."""
    warmup = round(config.optim.warmup_epochs * steps_per_epoch)
    total = total_steps if callable(total_steps) else lambda: total_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total(), warmup, config.optim.schedule)
    )
