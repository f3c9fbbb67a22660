"""`MoCoPlus`: query encoder, momentum key encoder, queue and the enhanced objective."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mocoplus import distributed
from mocoplus.backbones import build_backbone
from mocoplus.batchnorm import SplitBatchNorm
from mocoplus.config import MoCoConfig
from mocoplus.heads import Encoder, ProjectionHead
from mocoplus.losses import ContrastiveResult, dual_view_loss
from mocoplus.queue import KeyQueue


@dataclass(frozen=True)
class MoCoOutput:
    """What one step produces: the loss to backprop and detached statistics to log."""

    loss: Tensor
    stats: ContrastiveResult
    momentum: float


def momentum_at(progress: float, base: float, schedule: str) -> float:
    """EMA momentum at ``progress`` ∈ [0, 1] of training; ``cosine`` rises from ``base`` to 1 (BYOL)."""
    if schedule == "constant":
        return base
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def resolve_key_bn(key_bn: str) -> str:
    """``auto`` → shuffle-BN across ranks under DDP, split-BN on one device."""
    if key_bn != "auto":
        return key_bn
    return "shuffle" if distributed.world_size() > 1 else "split"


class MoCoPlus(nn.Module):
    """MoCo v2 with a dual-view loss and hard negatives selected from the queue.

    ``forward(view1, view2)`` updates the key encoder by EMA, encodes keys
    without gradient, computes the loss against a snapshot of the queue, then
    enqueues this step's keys (gathered from all ranks).
    """

    def __init__(self, config: MoCoConfig) -> None:
        super().__init__()
        self.config = config
        self.key_bn = resolve_key_bn(config.key_bn)
        split = self.key_bn == "split"
        norm_layer = partial(SplitBatchNorm, num_splits=config.bn_splits) if split else nn.BatchNorm2d
        backbone = build_backbone(
            config.arch,
            width=config.width,
            cifar_stem=config.cifar_stem,
            stem_stride=config.stem_stride,
            in_channels=config.in_channels,
            norm_layer=norm_layer,
        )
        head_norm = (norm_layer if split else nn.BatchNorm1d) if config.head_bn else None
        hidden_dim = config.hidden_dim or backbone.out_dim
        head = ProjectionHead(backbone.out_dim, hidden_dim, config.embedding_dim, norm_layer=head_norm)
        self.query_encoder = Encoder(backbone, head)
        if self.key_bn == "sync":
            self.query_encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.query_encoder)
        self.key_encoder = copy.deepcopy(self.query_encoder)
        self.key_encoder.requires_grad_(False)
        self.queue = KeyQueue(config.queue_size, config.embedding_dim)

    @torch.no_grad()
    def update_key_encoder(self, momentum: float) -> None:
        """θk ← m·θk + (1−m)·θq over parameters.

        The key encoder's BN statistics come from its own forward passes, as in MoCo.
        """
        query = list(self.query_encoder.parameters())
        key = list(self.key_encoder.parameters())
        torch._foreach_mul_(key, momentum)
        torch._foreach_add_(key, query, alpha=1.0 - momentum)

    def encode_queries(self, images: Tensor) -> Tensor:
        return F.normalize(self.query_encoder(images), dim=1)

    @torch.no_grad()
    def encode_keys(self, images: Tensor) -> Tensor:
        """Key embeddings with the batch shuffled first (shuffle-BN / split-BN) unless BN is synced or plain."""
        if self.key_bn in ("sync", "plain"):
            return F.normalize(self.key_encoder(images), dim=1)
        shuffled, restore = distributed.shuffle_across_ranks(images)
        keys = F.normalize(self.key_encoder(shuffled), dim=1)
        return distributed.unshuffle_across_ranks(keys, restore)

    def forward(
        self,
        view1: Tensor,
        view2: Tensor,
        *,
        small: Tensor | None = None,
        epoch: int = 0,
        progress: float = 0.0,
        step: int = 0,
    ) -> MoCoOutput:
        """One step of the objective on two augmented views of the same images.

        ``small`` (multi-crop, ``[n·B, ...]`` crop-major) are extra queries whose
        positive is the key of ``view2``, as ``view1``'s is: they join ``q1`` as
        anchors of the first term, so each query crop weighs the same. ``epoch``
        and ``step`` decide whether hard-negative warm-up is over; ``progress``
        (fraction of training done) drives the cosine momentum schedule.
        """
        config = self.config
        symmetric = config.dual_view == "symmetric"
        q1 = self.encode_queries(view1)
        q2 = self.encode_queries(view2) if symmetric else None
        momentum = momentum_at(progress, config.momentum, config.momentum_schedule)
        self.update_key_encoder(momentum)
        k2 = self.encode_keys(view2)
        k1 = self.encode_keys(view1) if symmetric else None
        negatives = self.queue.keys.clone()  # the loss keeps it for backward; enqueue writes in place
        anchors, positives = q1, k2
        if small is not None:
            crops, rest = divmod(small.shape[0], view1.shape[0])
            if rest or not crops:
                raise ValueError(f"small views must be n × the batch of {view1.shape[0]}; got {small.shape[0]}")
            anchors = torch.cat([q1, self.encode_queries(small)])
            positives = k2.repeat(1 + crops, 1)
        stats = dual_view_loss(
            anchors,
            positives,
            negatives,
            q2=q2,
            k1=k1,
            mode=config.dual_view,
            temperature=config.temperature,
            sampling=config.sampling_at(epoch, step),
            key_anchor_weight=config.key_anchor_weight,
        )
        new_keys = k2 if k1 is None else torch.cat([k1, k2])
        self.queue.enqueue(distributed.concat_all_gather(new_keys))
        return MoCoOutput(loss=stats.loss, stats=stats, momentum=momentum)
