"""MoCoPlus: encoders, momentum, queue, batch norm variants, state dict, learning."""

from __future__ import annotations

import copy
import math
from collections import deque

import pytest
import torch
import torchvision
from reference import naive_info_nce
from torch import nn
from torch.nn import functional as F

from mocoplus import MoCoConfig, MoCoPlus, momentum_at
from mocoplus.backbones import build_backbone
from mocoplus.batchnorm import SplitBatchNorm
from mocoplus.queue import KeyQueue

TINY = {"arch": "resnet18", "width": 0.125, "cifar_stem": True, "embedding_dim": 16, "queue_size": 50, "bn_splits": 4}


def tiny_model(**overrides) -> MoCoPlus:
    return MoCoPlus(MoCoConfig(**{**TINY, **overrides}))


def images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_key_encoder_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    model = tiny_model(momentum=0.9)
    optimizer = torch.optim.SGD(model.query_encoder.parameters(), lr=0.5)
    model(images(8), images(8, seed=1)).loss.backward()
    optimizer.step()  # θq moves; θk must not follow until the next forward
    assert all(p.grad is None for p in model.key_encoder.parameters())
    assert all(not p.requires_grad for p in model.key_encoder.parameters())

    key_before = [p.clone() for p in model.key_encoder.parameters()]
    query_now = [p.clone() for p in model.query_encoder.parameters()]
    out = model(images(8, seed=2), images(8, seed=3))
    assert out.momentum == 0.9
    for k_after, k_before, q in zip(model.key_encoder.parameters(), key_before, query_now, strict=True):
        torch.testing.assert_close(k_after, 0.9 * k_before + 0.1 * q)
    assert any(not torch.equal(a, b) for a, b in zip(key_before, model.key_encoder.parameters(), strict=True))


def test_cosine_momentum_rises_from_base_to_one():
    assert momentum_at(0.0, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(0.5, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(1.0, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(0.7, 0.99, "constant") == 0.99
    model = tiny_model(momentum=0.9, momentum_schedule="cosine")
    assert model(images(8), images(8), progress=1.0).momentum == pytest.approx(1.0)


@pytest.mark.parametrize(("size", "batches"), [(5, [3, 3, 3]), (7, [2, 9, 4]), (4, [4, 4]), (6, [1, 13, 5, 2])])
def test_queue_is_fifo_with_wrap_around_for_any_sizes(size, batches):
    queue = KeyQueue(size, 2)
    reference: deque[float] = deque(queue.keys[:, 0].tolist(), maxlen=size)  # oldest first, from slot 0
    counter = 0
    for count in batches:
        keys = torch.arange(counter, counter + count, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
        counter += count
        queue.enqueue(keys)
        reference.extend(keys[:, 0].tolist())
        pointer = int(queue.pointer)
        in_age_order = torch.cat([queue.keys[pointer:], queue.keys[:pointer]])[:, 0]  # oldest slot is the pointer
        assert in_age_order.tolist() == list(reference)


def test_keys_enter_the_queue_after_the_loss_and_symmetric_enqueues_both_views():
    torch.manual_seed(0)
    model = tiny_model(queue_size=64)
    before = model.queue.keys.clone()
    model.eval()  # deterministic BN so the expected loss can be recomputed
    x1, x2 = images(8), images(8, seed=1)
    out = model(x1, x2)
    q1 = F.normalize(model.query_encoder(x1), dim=1)
    k2 = F.normalize(model.key_encoder(x2), dim=1)
    expected = -torch.log_softmax(torch.cat([(q1 * k2).sum(1, keepdim=True), q1 @ before.T], 1) / 0.2, 1)[:, 0].mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue.keys[:8], k2)
    assert int(model.queue.pointer) == 8

    symmetric = tiny_model(queue_size=64, dual_view="symmetric")
    symmetric(x1, x2)
    assert int(symmetric.queue.pointer) == 16


def test_state_dict_round_trip_includes_the_queue():
    torch.manual_seed(0)
    model = tiny_model()
    for step in range(3):
        model(images(8, seed=step), images(8, seed=step + 10)).loss.backward()
    state = copy.deepcopy(model.state_dict())
    assert {"queue.keys", "queue.pointer"} <= state.keys()
    restored = tiny_model()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.queue.keys, model.queue.keys)
    assert int(restored.queue.pointer) == int(model.queue.pointer) == 24 % 50
    model.eval()
    restored.eval()
    torch.manual_seed(5)
    a = model(images(8, seed=7), images(8, seed=8)).loss
    torch.manual_seed(5)
    b = restored(images(8, seed=7), images(8, seed=8)).loss
    torch.testing.assert_close(a, b)


def naive_split_batch_norm(x: torch.Tensor, layer: SplitBatchNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group ``g`` = samples ``g, g + s, g + 2s, ...`` normalised by its own biased mean/var; running stats moved
    by the groups' mean unbiased ones."""
    dims = (0, *range(2, x.dim()))
    shape = (1, -1, *([1] * (x.dim() - 2)))
    splits = layer.num_splits
    outputs, means, variances = [], [], []
    for group in range(splits):
        part = x[group::splits]
        mean = part.mean(dim=dims, keepdim=True)
        var = part.var(dim=dims, unbiased=False, keepdim=True)
        outputs.append((part - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(shape) + layer.bias.view(shape))
        means.append(mean.flatten())
        variances.append(part.var(dim=dims, unbiased=True))
    momentum = layer.momentum
    running_mean = (1 - momentum) * torch.zeros(x.shape[1]) + momentum * torch.stack(means).mean(0)
    running_var = (1 - momentum) * torch.ones(x.shape[1]) + momentum * torch.stack(variances).mean(0)
    interleaved = torch.stack(outputs, dim=1).reshape(x.shape)  # sample a·s + g is row a of group g
    return interleaved, running_mean, running_var


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((8, 3, 4, 4), False), ((8, 3, 4, 4), True), ((12, 5), False)],
    ids=["maps", "maps-channels-last", "features"],
)
def test_split_batch_norm_normalises_each_interleaved_group_on_its_own(shape, channels_last):
    """Interleaved, not contiguous, groups: a folder's stream puts related pictures side by side, and groups of
    neighbours would normalise their shared content away (a briefly trained photo model lost a fifth of its recall)."""
    torch.manual_seed(0)
    split = SplitBatchNorm(shape[1], num_splits=2 if len(shape) == 4 else 3)
    nn.init.uniform_(split.weight)
    nn.init.uniform_(split.bias)
    x = torch.randn(*shape) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    naive_input = x.detach().clone().requires_grad_()
    x.requires_grad_()
    out = split(x)
    reference = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    expected, running_mean, running_var = naive_split_batch_norm(naive_input, split)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.running_mean, running_mean)
    torch.testing.assert_close(split.running_var, running_var)
    # the same gradients as the naive form, to the input and to the affine parameters
    weights = torch.randn(shape)
    (out * weights).sum().backward()
    grad_weight, grad_bias = split.weight.grad.clone(), split.bias.grad.clone()
    split.zero_grad()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, naive_input.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_weight, split.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_bias, split.bias.grad, rtol=1e-4, atol=1e-5)
    if channels_last:  # the convolution after it keeps its fast layout
        assert out.is_contiguous(memory_format=torch.channels_last)
    # in eval mode it is plain batch norm with the same state
    reference.load_state_dict(split.state_dict())
    split.eval()
    reference.eval()
    torch.testing.assert_close(split(x), reference(x))
    with pytest.raises(ValueError, match="divisible by bn_splits"):
        split.train()(torch.randn(shape[0] + 1, *shape[1:]))


def test_split_bn_is_the_single_device_default_and_shuffles_keys_without_reordering_them():
    model = tiny_model()
    assert model.key_bn == "split"
    assert any(isinstance(m, SplitBatchNorm) for m in model.key_encoder.modules())
    model.eval()  # eval BN is per-sample, so shuffling must be invisible in the output
    x = images(8)
    torch.testing.assert_close(model.encode_keys(x), F.normalize(model.key_encoder(x), dim=1))
    assert tiny_model(key_bn="plain").key_bn == "plain"


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_backbones_keep_torchvision_keys_and_feature_sizes(arch, dim):
    backbone = build_backbone(arch)
    assert backbone.out_dim == dim
    reference = getattr(torchvision.models, arch)(weights=None)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in backbone.state_dict().items()} == expected


def test_cifar_stem_and_width_multiplier():
    backbone = build_backbone("resnet18", width=0.25, cifar_stem=True).eval()
    assert backbone.out_dim == 128
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 128)
    features = {}
    backbone.layer4.register_forward_hook(lambda module, inputs, output: features.update(out=output))
    backbone(torch.randn(1, 3, 32, 32))
    assert features["out"].shape[-2:] == (4, 4)  # 32 / 8: the CIFAR stem does not downsample
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vgg16")


def test_grid_embedding_pools_the_last_map_into_cells_and_grid_one_is_the_global_pool():
    from mocoplus.backbones import GridEmbedding

    backbone = build_backbone("resnet18", width=0.25, cifar_stem=True).eval()
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(GridEmbedding(backbone, 1)(images), backbone(images))
    cells = GridEmbedding(backbone, 2)
    assert cells.out_dim == 512 and cells(images).shape == (3, 512)
    feature_map = backbone.feature_map(images)  # [3, 128, 4, 4]: the top-left cell is the mean of its 2×2 corner
    torch.testing.assert_close(cells(images).view(3, 128, 2, 2)[..., 0, 0], feature_map[..., :2, :2].mean((2, 3)))
    with pytest.raises(ValueError, match="grid must be >= 1"):
        GridEmbedding(backbone, 0)


def test_a_stride_two_cifar_stem_halves_the_maps_and_keeps_the_feature_size():
    backbone = build_backbone("resnet18", width=0.25, cifar_stem=True, stem_stride=2).eval()
    features = {}
    backbone.layer1.register_forward_hook(lambda module, inputs, output: features.update(out=output))
    assert backbone(torch.randn(1, 3, 28, 28)).shape == (1, 128)
    assert features["out"].shape[-2:] == (14, 14)  # 28 / 2 into layer1: a quarter of the multiply-adds
    for bad in ({"stem_stride": 3, "cifar_stem": True}, {"stem_stride": 2, "cifar_stem": False}):
        with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
            build_backbone("resnet18", **bad)


def test_warmup_uses_every_negative_then_the_selection():
    config = MoCoConfig(**TINY, negatives="band", num_negatives=8, skip_negatives=2, warmup_epochs=2)
    assert config.sampling_at(0).negatives == "all" and config.sampling_at(1).negatives == "all"
    assert config.sampling_at(2).negatives == "band" and config.sampling_at(2).num_negatives == 8
    x1, x2 = images(8), images(8, seed=1)

    def first_loss(config: MoCoConfig, epoch: int) -> torch.Tensor:
        torch.manual_seed(0)
        return MoCoPlus(config).eval()(x1, x2, epoch=epoch).loss

    plain = MoCoConfig(**TINY)
    torch.testing.assert_close(first_loss(config, epoch=1), first_loss(plain, epoch=1))
    assert first_loss(config, epoch=2) < first_loss(plain, epoch=2)  # 8 negatives instead of 50


def test_small_crops_are_extra_anchors_with_the_second_views_key_against_the_naive_reference():
    """Multi-crop: loss = mean over [q1; small crops] of l(anchor, k2, queue), each crop weighing as much as q1."""
    torch.manual_seed(0)
    model = tiny_model().eval()  # eval: BN with running statistics, so encoding apart and together agree
    x1, x2, small = images(4), images(4, seed=1), images(8, size=8, seed=2)
    queue = model.queue.keys.clone()

    out = model(x1, x2, small=small)

    with torch.no_grad():
        anchors = torch.cat([model.encode_queries(x1), model.encode_queries(small)]).double()
        key = F.normalize(model.key_encoder(x2), dim=1).double()
        expected = naive_info_nce(anchors, key.repeat(3, 1), queue.double(), model.config.temperature)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="small views must be n × the batch of 4"):
        model(x1, x2, small=images(6, size=8))


def test_small_crops_get_gradient_and_the_queue_takes_only_the_global_keys():
    torch.manual_seed(0)
    model = tiny_model()
    small = images(8, size=8, seed=2).requires_grad_(True)
    model(images(4), images(4, seed=1), small=small).loss.backward()
    assert small.grad is not None and small.grad.abs().sum() > 0
    assert int(model.queue.pointer) == 4  # keys of view2 only: small crops are never keys


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dual_view": "both"}, "dual_view must be one of"),
        ({"negatives": "topk"}, "needs num_negatives"),
        ({"queue_size": 0}, "queue_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"momentum": 1.5}, "momentum"),
        ({"key_bn": "group"}, "key_bn"),
        ({"arch": "vit"}, "arch"),
    ],
)
def test_bad_configs_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoCoConfig(**{**TINY, **overrides})


DUAL = ["none", "symmetric", "key-anchor"]
SELECTION = {
    "all": {},
    "topk": {"num_negatives": 16},
    "band": {"num_negatives": 16, "skip_negatives": 2},
    "threshold": {"negative_threshold": 0.9, "num_negatives": 16},
}


def synthetic_views(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two shifted, noisy views of fresh smooth random images: instance discrimination with no false negatives."""
    base = F.interpolate(torch.randn(batch, 3, 4, 4, generator=generator), size=16, mode="bilinear")

    def view() -> torch.Tensor:
        shift = int(torch.randint(-2, 3, (), generator=generator))
        return torch.roll(base, shifts=shift, dims=-1) + 0.1 * torch.randn(base.shape, generator=generator)

    return view(), view()


@pytest.mark.parametrize("dual_view", DUAL)
@pytest.mark.parametrize("negatives", list(SELECTION))
def test_thirty_steps_lower_the_loss_in_every_mode(dual_view, negatives):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = tiny_model(dual_view=dual_view, negatives=negatives, momentum=0.9, head_bn=True, **SELECTION[negatives])
    optimizer = torch.optim.Adam(model.query_encoder.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        out = model(*synthetic_views(generator, 32), progress=step / 30)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    # steps 0–1 still compare against the random vectors the queue starts with
    early, late = sum(losses[2:7]) / 5, sum(losses[-5:]) / 5
    assert late < 0.95 * early, losses


def test_head_bn_uses_split_bn_on_one_device_and_plain_bn_otherwise():
    split = tiny_model(head_bn=True)
    assert isinstance(split.query_encoder.head[1], SplitBatchNorm)
    assert isinstance(split.key_encoder.head[1], SplitBatchNorm)
    plain = tiny_model(head_bn=True, key_bn="plain")
    assert type(plain.query_encoder.head[1]) is nn.BatchNorm1d
    assert len(tiny_model().query_encoder.head) == 3  # MoCo v2: Linear, ReLU, Linear


def test_a_one_channel_stem_takes_gray_images_as_they_are():
    backbone = build_backbone("resnet18", width=0.125, cifar_stem=True, in_channels=1).eval()
    assert backbone.conv1.in_channels == 1 and backbone(torch.randn(2, 1, 28, 28)).shape == (2, 64)
    model = tiny_model(in_channels=1)
    gray = images(8)[:, :1]
    assert torch.isfinite(model(gray, gray.flip(3)).loss)
    with pytest.raises(ValueError, match=r"in_channels must be 1 \(gray\) or 3"):
        MoCoConfig(**TINY, in_channels=2)


def test_the_run_config_refuses_a_stem_that_does_not_take_the_augmentations_channels():
    from pipeline.train.run_config import load_config

    gray = ["augment.channels=1", "augment.mean=[0.286]", "augment.std=[0.353]"]
    with pytest.raises(ValueError, match=r"model.in_channels \(3\) must equal augment.channels \(1\)"):
        load_config("fashion-mnist-cpu", gray)
    assert load_config("fashion-mnist-cpu", [*gray, "model.in_channels=1"]).model.in_channels == 1


class PatchBackbone(nn.Module):
    """A ViT-style backbone in a few lines: 4×4 patches embedded, mixed by one attention layer, laid out on their
    grid as the feature map."""

    def __init__(self, spec) -> None:
        super().__init__()
        self.out_dim = round(32 * spec.width)
        self.patches = nn.Conv2d(spec.in_channels, self.out_dim, kernel_size=4, stride=4)
        self.mixer = nn.TransformerEncoderLayer(
            self.out_dim, nhead=2, dim_feedforward=2 * self.out_dim, batch_first=True
        )

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.patches(images)
        tokens = self.mixer(grid.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(grid.shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).mean(dim=(2, 3))


def test_a_new_backbone_is_one_module_and_its_entry_in_the_table(monkeypatch):
    """Registered under a name, a backbone of another family trains in MoCoPlus and feeds the grid embedding."""
    import mocoplus.backbones
    import mocoplus.config
    from mocoplus.backbones import GridEmbedding

    monkeypatch.setitem(mocoplus.backbones.BACKBONES, "patches", PatchBackbone)
    monkeypatch.setattr(mocoplus.config, "ARCHS", (*mocoplus.config.ARCHS, "patches"))
    model = tiny_model(arch="patches", width=1.0, key_bn="plain")
    torch.manual_seed(0)
    output = model(images(8), images(8, seed=1))
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.query_encoder.backbone.patches.weight.grad is not None
    cells = GridEmbedding(model.key_encoder.backbone, 2)
    assert cells.out_dim == 128 and cells(images(3)).shape == (3, 128)
