"""`MoCoConfig`: every knob of the method in one validated dataclass.

Validation happens at construction so a bad config fails with one clear line
before any tensor is allocated, not as a shape error deep inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

from mocoplus.negatives import ALL_NEGATIVES, Negatives, NegativeSampling

Arch = Literal["resnet18", "resnet34", "resnet50"]
DualView = Literal["none", "symmetric", "key-anchor"]
KeyBatchNorm = Literal["auto", "shuffle", "sync", "split", "plain"]
MomentumSchedule = Literal["constant", "cosine"]
EmbeddingWhitening = Literal["none", "pca"]

# each choice spelt once, in its Literal (negatives: in the `NEGATIVE_MODES` table)
ARCHS: tuple[str, ...] = get_args(Arch)
DUAL_VIEWS: tuple[str, ...] = get_args(DualView)
KEY_BATCH_NORMS: tuple[str, ...] = get_args(KeyBatchNorm)
MOMENTUM_SCHEDULES: tuple[str, ...] = get_args(MomentumSchedule)
EMBEDDING_WHITENINGS: tuple[str, ...] = get_args(EmbeddingWhitening)


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class MoCoConfig:
    """The method's hyper-parameters; defaults are MoCo v2 on ResNet-50.

    ``hidden_dim=None`` sizes the projection MLP's hidden layer like the
    backbone's feature width, as MoCo v2 does; ``head_bn`` adds batch norm to
    it (SimCLR / MoCo v3), which small CPU-sized runs need to start learning
    quickly.
    """

    # encoders
    arch: Arch = "resnet50"  # a `mocoplus.backbones.BACKBONES` name
    width: float = 1.0
    cifar_stem: bool = False
    stem_stride: int = 1
    in_channels: int = 3  # what the stem takes: the augmentation's channels (1: gray fed as one channel)
    hidden_dim: int | None = None
    embedding_dim: int = 128
    embedding_grid: int = 1  # the embedding: the backbone's last map pooled to grid × grid (1: global pool)
    # "pca": evaluate and export whiten the embedding, fitted on the memory (training) set's features
    embedding_whitening: EmbeddingWhitening = "none"
    embedding_dims: int | None = None  # with whitening: keep the leading principal directions (None: all)
    head_bn: bool = False
    # key encoder and queue
    queue_size: int = 65536
    momentum: float = 0.999
    momentum_schedule: MomentumSchedule = "constant"
    key_bn: KeyBatchNorm = "auto"
    bn_splits: int = 8
    # objective
    temperature: float = 0.2
    dual_view: DualView = "none"
    key_anchor_weight: float = 1.0
    negatives: Negatives = "all"
    num_negatives: int | None = None
    skip_negatives: int = 0
    negative_threshold: float | None = None
    skip_negatives_fraction: float = 0.0
    debias_prior: float = 0.1  # τ⁺: the share of the queue expected to share the anchor's class
    hardness: float = 1.0  # β of hard-weighted
    warmup_epochs: int = 0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _require_choice("arch", self.arch, ARCHS)
        _require_choice("dual_view", self.dual_view, DUAL_VIEWS)
        _require_choice("key_bn", self.key_bn, KEY_BATCH_NORMS)
        _require_choice("momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        _require_choice("embedding_whitening", self.embedding_whitening, EMBEDDING_WHITENINGS)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (gray) or 3 (RGB); got {self.in_channels}")
        if not self.width > 0:  # `not >` also refuses NaN
            raise ValueError(f"width must be > 0; got {self.width}")
        if self.embedding_dim < 1 or (self.hidden_dim is not None and self.hidden_dim < 1) or self.embedding_grid < 1:
            raise ValueError("embedding_dim, hidden_dim and embedding_grid must be positive")
        if self.embedding_dims is not None and self.embedding_dims < 1:
            raise ValueError(f"embedding_dims must be >= 1 (or unset: all); got {self.embedding_dims}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1; got {self.queue_size}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1]; got {self.momentum}")
        if self.bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1; got {self.bn_splits}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if not self.key_anchor_weight >= 0:
            raise ValueError(f"key_anchor_weight must be >= 0; got {self.key_anchor_weight}")
        if self.warmup_epochs < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"warmup_epochs and warmup_steps must be >= 0; got {self.warmup_epochs}, {self.warmup_steps}"
            )
        _ = self.sampling  # builds (and so validates) the negative-sampling fields

    @property
    def sampling(self) -> NegativeSampling:
        """The hard-negative selection once warm-up is over: this config's fields of the same names."""
        return NegativeSampling(**{name.name: getattr(self, name.name) for name in fields(NegativeSampling)})

    def sampling_at(self, epoch: int, step: int = 0) -> NegativeSampling:
        """`all` during warm-up (whole epochs, or steps): a random encoder has no meaningful hard negatives."""
        return ALL_NEGATIVES if epoch < self.warmup_epochs or step < self.warmup_steps else self.sampling
