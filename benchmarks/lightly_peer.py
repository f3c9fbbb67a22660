"""The peer: one MoCo step built from lightly's blocks, on mocoplus's backbone, for side-by-side timing.

lightly (a benchmark-only dependency: ``pip install lightly``) is the
reference library of the field's importable blocks. Its MoCo recipe is
``MoCoProjectionHead`` on a backbone, an EMA key encoder
(``update_momentum``), ``batch_shuffle`` for shuffle-BN and ``NTXentLoss``
with a memory bank as the queue. The backbone here is the very module mocoplus
trains (same architecture, width, stem and plain batch norm), so the
comparison times the method's machinery, not two different networks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.precision import Precision
from pipeline.train.run_config import RunConfig


def lightly_moco_step(config: RunConfig, precision: Precision, views: list[Tensor]) -> Callable[[], None]:
    """A closure running one lightly MoCo v2 step (forward, backward, SGD, EMA, memory bank) on ``views``."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum

    from mocoplus.backbones import build_backbone

    model_config = config.model
    torch.manual_seed(0)
    backbone = build_backbone(
        model_config.arch, width=model_config.width, cifar_stem=model_config.cifar_stem,
        stem_stride=model_config.stem_stride, in_channels=model_config.in_channels,
    )  # fmt: skip
    head = MoCoProjectionHead(
        backbone.out_dim, model_config.hidden_dim or backbone.out_dim, model_config.embedding_dim,
        batch_norm=model_config.head_bn,
    )  # fmt: skip
    query = torch.nn.Sequential(backbone, head).to(memory_format=precision.memory_format()).train()
    key = copy.deepcopy(query)
    deactivate_requires_grad(key)
    criterion = NTXentLoss(
        temperature=model_config.temperature, memory_bank_size=(model_config.queue_size, model_config.embedding_dim)
    )
    optimizer = torch.optim.SGD(query.parameters(), lr=config.optim.lr, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        update_momentum(query, key, m=model_config.momentum)
        with precision.autocast():
            q = query(views[0])
            with torch.no_grad():
                shuffled, shuffle = batch_shuffle(views[1])
                k = batch_unshuffle(key(shuffled), shuffle)
            loss = criterion(q.float(), k.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step
