"""Backbones: what the method reads of a network, and the ResNets behind that interface.

A `Backbone` is any module with ``out_dim`` channels, a ``feature_map`` of
images ``[N, in_channels, H, W]`` → ``[N, out_dim, h, w]`` (a ViT's patch tokens
laid out on their grid are one), and a call that pools it to ``[N, out_dim]``.
`MoCoPlus` puts its projection head on the pooled features; the kNN monitor,
evaluation and export read the map through `GridEmbedding`. `BACKBONES` maps
each ``model.arch`` to its builder, which gets a `BackboneSpec` (width, stem,
input channels, the norm layer the key encoder's batch norm mode needs): a new
backbone is one module with a builder and its entry there (and its name in
`mocoplus.config.Arch`, checked against the table at import).

The ResNets: torchvision's `ResNet` hard-codes the 64-channel stem and the
7×7/stride-2 conv plus max-pool that shrink a 28–64 px image to nothing. We
reuse its blocks, ``_make_layer`` and ``forward`` and only choose the widths
and the stem, so the state-dict keys stay torchvision's (conv1, bn1, layer1…4)
and ``width=1`` models can load torchvision weights. The classifier is an
identity: the output is the pooled feature vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol, get_args

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from mocoplus.config import Arch

NormLayer = Callable[[int], nn.Module]


class Backbone(Protocol):
    """A network the method can train: a feature map of ``out_dim`` channels, and that map pooled."""

    out_dim: int

    def feature_map(self, images: Tensor) -> Tensor:
        """``[N, in_channels, H, W]`` → ``[N, out_dim, h, w]``, before pooling."""
        ...

    def __call__(self, images: Tensor) -> Tensor:
        """The feature map average-pooled: ``[N, out_dim]``."""
        ...


@dataclass(frozen=True)
class BackboneSpec:
    """What every backbone builder is given (`BACKBONES`)."""

    width: float = 1.0  # channel multiplier
    cifar_stem: bool = False  # a stem for 28–64 px inputs instead of one for 224 px photos
    stem_stride: int = 1
    in_channels: int = 3  # 1 for gray images fed as one channel, 3 for RGB (or gray replicated)
    norm_layer: NormLayer = nn.BatchNorm2d


class ResNetBackbone(ResNet):
    """A torchvision ResNet trunk returning pooled features of size ``out_dim``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        width: float = 1.0,
        cifar_stem: bool = False,
        stem_stride: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ would build the fixed-width model
        widths = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self._norm_layer = norm_layer
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        if cifar_stem:  # 3×3, no max-pool: stride 1 keeps 32×32 into layer1, stride 2 halves it (4× fewer MACs)
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=stem_stride, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_dim = widths[3] * block.expansion
        self._init_weights(zero_init_residual)

    def feature_map(self, images: Tensor) -> Tensor:
        """The last stage's output ``[N, C, h, w]``, before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's initialisation (Kaiming fan-out convs, unit BN)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)


class GridEmbedding(nn.Module):
    """A backbone's last feature map average-pooled to ``grid`` × ``grid`` cells and flattened: the embedding.

    ``grid=1`` is the usual global average pool (the features the projection
    head is trained on). A coarse grid keeps where in the image a pattern is,
    which global pooling throws away and which matters for retrieval among
    aligned images (Fashion-MNIST's garments are centred): the cells are
    regional descriptors in the spirit of R-MAC, at ``C·grid²`` dimensions.
    Training is unchanged; only what the kNN monitor, ``evaluate`` and ``export``
    read from the backbone.
    """

    def __init__(self, backbone: Backbone, grid: int = 1) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"embedding grid must be >= 1; got {grid}")
        self.backbone, self.grid = backbone, grid
        self.out_dim = backbone.out_dim * grid * grid

    def forward(self, images: Tensor) -> Tensor:
        if self.grid == 1:
            return self.backbone(images)
        return F.adaptive_avg_pool2d(self.backbone.feature_map(images), self.grid).flatten(1)


def resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int], spec: BackboneSpec) -> ResNetBackbone:
    """A ResNet of ``block``s, ``layers`` per stage; ``spec.stem_stride`` 2 only with the CIFAR stem."""
    if spec.stem_stride not in (1, 2) or (spec.stem_stride != 1 and not spec.cifar_stem):
        raise ValueError(f"stem_stride must be 1 or 2, and 2 needs cifar_stem; got {spec.stem_stride}")
    return ResNetBackbone(
        block,
        layers,
        width=spec.width,
        cifar_stem=spec.cifar_stem,
        stem_stride=spec.stem_stride,
        norm_layer=spec.norm_layer,
        in_channels=spec.in_channels,
    )


BACKBONES: dict[str, Callable[[BackboneSpec], nn.Module]] = {
    "resnet18": partial(resnet, BasicBlock, [2, 2, 2, 2]),
    "resnet34": partial(resnet, BasicBlock, [3, 4, 6, 3]),
    "resnet50": partial(resnet, Bottleneck, [3, 4, 6, 3]),
}

if set(get_args(Arch)) != set(BACKBONES):  # the config's choices and the table must name the same backbones
    raise ImportError(f"Arch {get_args(Arch)} and BACKBONES {tuple(BACKBONES)} disagree")


def build_backbone(arch: str, **spec: object) -> nn.Module:
    """The backbone ``arch`` (a `BACKBONES` name) built with `BackboneSpec` ``spec``: ``width``, ``cifar_stem``
    (for 28–64 px inputs), ``stem_stride`` (1 or 2), ``in_channels`` (1 or 3), ``norm_layer``."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(BACKBONES)}")
    if spec.get("in_channels", 3) not in (1, 3):
        raise ValueError(f"in_channels must be 1 (gray) or 3 (RGB); got {spec['in_channels']}")
    return BACKBONES[arch](BackboneSpec(**spec))  # type: ignore[arg-type]
