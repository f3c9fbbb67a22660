"""The optimizer and its schedule: the learning-rate multiplier against a naive formula, parameter groups, LARS
against a naive per-tensor reference, resumed state."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from pipeline.train.optim import LARS, build_optimizer, build_scheduler, lr_multiplier, parameter_groups
from pipeline.train.run_config import load_config

# --- the learning-rate schedule ---------------------------------------------------------------------------------------


def naive_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    return (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (100, 0), (37, 5), (10, 1)])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_multiplier_matches_the_naive_formula(total, warmup, schedule):
    for step in range(total + 3):
        assert lr_multiplier(step, total, warmup, schedule) == pytest.approx(
            naive_multiplier(step, total, warmup, schedule), abs=1e-12
        ), step


def test_warmup_is_linear_and_reaches_one_at_its_last_step():
    warmup = 8
    values = [lr_multiplier(step, 100, warmup, "cosine") for step in range(warmup)]
    assert values[0] == pytest.approx(1 / warmup)
    assert values[-1] == pytest.approx(1.0)
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert steps == pytest.approx([1 / warmup] * (warmup - 1))
    assert lr_multiplier(warmup, 100, warmup, "cosine") == pytest.approx(1.0)  # the cosine starts at its top


def test_cosine_decays_monotonically_to_zero():
    total, warmup = 50, 5
    values = [lr_multiplier(step, total, warmup, "cosine") for step in range(warmup, total + 1)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    midpoint = warmup + (total - warmup) / 2
    assert lr_multiplier(int(midpoint), total, warmup, "cosine") == pytest.approx(
        naive_multiplier(int(midpoint), total, warmup, "cosine")
    )
    assert lr_multiplier(total + 10, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_stays_one_after_warmup():
    assert [lr_multiplier(step, 20, 0, "constant") for step in range(25)] == [1.0] * 25
    assert [lr_multiplier(step, 20, 4, "constant") for step in range(4, 25)] == [1.0] * 21


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_scheduler_sets_base_lr_times_the_multiplier(schedule):
    config = load_config(
        None,
        [
            "optim.lr=0.2",
            "optim.base_batch=128",
            "train.global_batch=256",
            "optim.warmup_epochs=0.5",
            f"optim.schedule={schedule}",
        ],
    )
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=config.lr, momentum=0.9)
    steps_per_epoch, total = 8, 24
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=steps_per_epoch, total_steps=total)
    warmup = 4  # 0.5 epochs × 8 steps
    for k in range(total + 2):
        expected = 0.4 * naive_multiplier(k, total, warmup, schedule)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), k
        weight.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_resumes_at_the_same_lr():
    config = load_config(None, ["optim.warmup_epochs=1"])
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5, total_steps=30)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()

    other = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=config.lr)
    resumed = build_scheduler(other, config, steps_per_epoch=5, total_steps=30)
    other.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        other.step()
        resumed.step()
        assert other.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-15)


# --- parameter groups and optimizers ----------------------------------------------------------------------------------


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
        nn.LayerNorm(5),
    )


def test_parameter_groups_split_weights_from_biases_and_norms():
    model = small_net()
    groups = parameter_groups(model, weight_decay=1e-3)
    decayed, plain = groups
    decayed_ids = {id(p) for p in decayed["params"]}
    plain_ids = {id(p) for p in plain["params"]}
    assert decayed_ids == {id(model[0].weight), id(model[4].weight)}
    assert plain_ids == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[4].bias),
        id(model[5].weight),
        id(model[5].bias),
    }
    assert decayed["weight_decay"] == 1e-3 and decayed.get("lars", True) is True
    assert plain["weight_decay"] == 0.0 and plain["lars"] is False
    assert all(p.ndim == 1 for p in plain["params"]) and all(p.ndim > 1 for p in decayed["params"])


def test_parameter_groups_skip_frozen_parameters():
    model = small_net()
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    grouped = {id(p) for group in parameter_groups(model, 0.1) for p in group["params"]}
    assert id(model[0].weight) not in grouped and id(model[1].bias) not in grouped
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_build_optimizer_uses_the_scaled_lr_and_the_groups(optimizer):
    config = load_config(
        None,
        [
            f"optim.optimizer={optimizer}",
            "optim.lr=0.1",
            "optim.base_batch=64",
            "train.global_batch=128",
            "optim.weight_decay=0.01",
            "optim.momentum=0.8",
            "optim.lars_trust=0.02",
        ],
    )
    built = build_optimizer(small_net(), config)
    assert isinstance(built, LARS if optimizer == "lars" else torch.optim.SGD)
    decayed, plain = built.param_groups
    for group in built.param_groups:
        assert group["lr"] == pytest.approx(0.2)
        assert group["momentum"] == 0.8
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    if optimizer == "lars":
        assert decayed["trust"] == 0.02
        assert decayed.get("lars", True) is True and plain["lars"] is False


def naive_lars(
    weights: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor]],
    *,
    adapt: list[bool],
    decay: list[float],
    lr: float,
    momentum: float,
    trust: float,
) -> list[torch.Tensor]:
    """LARS one tensor at a time in float64: g = ∇ + wd·w; g *= trust·‖w‖/‖g‖ (adapted, norms > 0); v = m·v + g."""
    weights = [w.double().clone() for w in weights]
    buffers: list[torch.Tensor | None] = [None] * len(weights)
    for grads in grads_per_step:
        for i, (w, grad) in enumerate(zip(weights, grads, strict=True)):
            g = grad.double() + decay[i] * w
            if adapt[i]:
                w_norm = math.sqrt(sum(float(x) ** 2 for x in w.flatten()))
                g_norm = math.sqrt(sum(float(x) ** 2 for x in g.flatten()))
                if w_norm > 0 and g_norm > 0:
                    g = g * (trust * w_norm / g_norm)
            buffers[i] = g.clone() if buffers[i] is None else momentum * buffers[i] + g
            weights[i] = w - lr * buffers[i]
    return weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lars_matches_a_naive_per_tensor_reference(generator, dtype):
    shapes = [(4, 3, 3, 3), (5, 16), (7,), (5,)]
    adapt = [True, True, False, False]
    decay = [0.01, 0.01, 0.0, 0.0]
    lr, momentum, trust = 0.5, 0.9, 0.02
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    grads_per_step = [[torch.randn(shape, generator=generator) * 3 for shape in shapes] for _ in range(5)]

    params = [nn.Parameter(w.clone().to(dtype)) for w in initial]
    optimizer = LARS(
        [
            {"params": params[:2], "weight_decay": decay[0]},
            {"params": params[2:], "weight_decay": 0.0, "lars": False},
        ],
        lr=lr,
        momentum=momentum,
        trust=trust,
    )
    for grads in grads_per_step:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.to(dtype)
        optimizer.step()

    expected = naive_lars(initial, grads_per_step, adapt=adapt, decay=decay, lr=lr, momentum=momentum, trust=trust)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6)
    # the trust ratio actually did something: adapted tensors moved far less than a plain SGD step would
    plain_move = lr * grads_per_step[0][0].norm()
    assert (params[0].detach() - initial[0]).norm() < plain_move / 10


def test_lars_trust_ratio_makes_the_step_size_independent_of_the_gradient_scale(generator):
    weight = torch.randn(6, 4, generator=generator)
    grad = torch.randn(6, 4, generator=generator)
    moved = []
    for scale in (1e-3, 1.0, 1e3):
        param = nn.Parameter(weight.clone())
        optimizer = LARS([param], lr=1.0, momentum=0.0, trust=0.01)
        param.grad = grad * scale
        optimizer.step()
        moved.append(param.detach() - weight)
    for other in moved[1:]:
        torch.testing.assert_close(other, moved[0], rtol=1e-5, atol=1e-7)
    assert moved[0].norm() == pytest.approx(0.01 * weight.norm().item(), rel=1e-5)


def test_lars_zero_weight_takes_the_plain_gradient_step(generator):
    grad = torch.randn(3, 4, generator=generator)
    param = nn.Parameter(torch.zeros(3, 4))
    optimizer = LARS([param], lr=0.1, momentum=0.9, weight_decay=0.01, trust=0.001)
    param.grad = grad.clone()
    optimizer.step()
    torch.testing.assert_close(param.detach(), -0.1 * grad, rtol=0, atol=1e-7)


def test_lars_zero_gradient_leaves_the_weight_alone_and_skips_missing_grads(generator):
    weight = torch.randn(3, 4, generator=generator)
    zero_grad = nn.Parameter(weight.clone())
    no_grad = nn.Parameter(weight.clone())
    optimizer = LARS([zero_grad, no_grad], lr=0.1, momentum=0.9, trust=0.001)
    zero_grad.grad = torch.zeros(3, 4)
    optimizer.step()
    assert torch.equal(zero_grad.detach(), weight) and torch.isfinite(zero_grad).all()
    assert torch.equal(no_grad.detach(), weight)
    assert no_grad not in optimizer.state


def test_lars_state_dict_resumes_the_momentum(generator):
    shapes = [(4, 5), (5,)]
    initial = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(4)]

    def make(weights):
        params = [nn.Parameter(w.clone()) for w in weights]
        groups = [
            {"params": params[:1], "weight_decay": 0.1},
            {"params": params[1:], "weight_decay": 0.0, "lars": False},
        ]
        return params, LARS(groups, lr=0.3, momentum=0.9, trust=0.05)

    params, optimizer = make(initial)
    for step_grads in grads[:2]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    resumed_params, resumed = make([p.detach() for p in params])
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as a file would give it
    for step_grads in grads[2:]:
        for pair in ((params, optimizer), (resumed_params, resumed)):
            for p, g in zip(pair[0], step_grads, strict=True):
                p.grad = g.clone()
            pair[1].step()
    for a, b in zip(params, resumed_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
