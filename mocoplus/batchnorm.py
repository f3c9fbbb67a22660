"""Split-BN: multi-GPU batch statistics emulated on one device.

MoCo needs batch norm statistics computed over sub-batches that do not line up
between query and key encoders, otherwise the encoders "cheat" through BN
(He et al., 2020, §3.3). Multi-GPU runs get that from shuffle-BN; on one device
we normalise ``num_splits`` groups of the batch separately, as the MoCo CIFAR
demo does, and shuffle the key batch. In eval mode it is plain batch norm, so
exported models see an ordinary batch-norm state. One class serves the
backbone's 2-D maps and the projection head's 1-D features.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm


class SplitBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are per sub-batch (the batch cut into ``num_splits`` equal slices).

    Accepts [N, C] and [N, C, H, W] inputs alike, so the same layer type
    serves the backbone and the projection head.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input [N, C, ...]; got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        splits = self.num_splits
        if input.shape[0] % splits:
            raise ValueError(
                f"split batch norm needs a batch divisible by bn_splits={splits}; got {input.shape[0]} samples"
            )
        # Every split moves its own copy of the running statistics one momentum step; the
        # layer keeps their mean, as one batch-norm layer per device would after an all-reduce.
        running_mean = self.running_mean.expand(splits, -1).clone()
        running_var = self.running_var.expand(splits, -1).clone()
        momentum = self.momentum if self.momentum is not None else 0.1
        # Each split is a contiguous slice of the batch in NCHW and channels_last alike, so the
        # fused kernel runs on it where it lies, and the concatenation keeps the input's layout.
        # (Folding the splits into channels instead copied every activation twice on
        # channels_last tensors: a quarter of a CPU training step. Writing each slice's output
        # in place through a custom autograd function measured no faster than this.)
        output = torch.cat(
            [
                F.batch_norm(part, running_mean[i], running_var[i], self.weight, self.bias, True, momentum, self.eps)
                for i, part in enumerate(input.chunk(splits))
            ]
        )
        with torch.no_grad():
            self.running_mean.copy_(running_mean.mean(dim=0))
            self.running_var.copy_(running_var.mean(dim=0))
            self.num_batches_tracked.add_(1)
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"
