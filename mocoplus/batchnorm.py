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
    """Batch norm whose training statistics are per sub-batch (samples i ≡ j mod splits).

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
        n, c = input.shape[:2]
        if n % self.num_splits:
            raise ValueError(
                f"split batch norm needs a batch divisible by bn_splits={self.num_splits}; got {n} samples"
            )
        splits = self.num_splits
        running_mean = self.running_mean.repeat(splits)
        running_var = self.running_var.repeat(splits)
        output = F.batch_norm(
            _fold_splits_into_channels(input, splits),
            running_mean,
            running_var,
            self.weight.repeat(splits),
            self.bias.repeat(splits),
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        # A fresh tensor, not a view: the in-place ReLU that follows in a ResNet would
        # otherwise send autograd down its slow as_strided path for views.
        output = _unfold_splits_from_channels(output, input.shape, splits).clone()
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(splits, c).mean(dim=0))
            self.running_var.copy_(running_var.view(splits, c).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _fold_splits_into_channels(x: Tensor, splits: int) -> Tensor:
    """[N, C, ...] → [N/s, s·C, ...]: sample a·s + b becomes row a, channels b·C … b·C + C − 1.

    A channels_last input is regrouped in NHWC order and stays channels_last,
    so the convolutions after this layer keep their fast layout.
    """
    n, c, *spatial = x.shape
    if not _is_channels_last(x):
        return x.reshape(n // splits, c * splits, *spatial)
    h, w = spatial
    nhwc = x.permute(0, 2, 3, 1).reshape(n // splits, splits, h, w, c)
    return nhwc.permute(0, 2, 3, 1, 4).reshape(n // splits, h, w, splits * c).permute(0, 3, 1, 2)


def _unfold_splits_from_channels(x: Tensor, shape: torch.Size, splits: int) -> Tensor:
    """Inverse of `_fold_splits_into_channels`, keeping channels_last when it came in."""
    if not _is_channels_last(x):
        return x.reshape(shape)
    n, c, h, w = shape
    grouped = x.permute(0, 2, 3, 1).reshape(n // splits, h, w, splits, c)
    return grouped.permute(0, 3, 1, 2, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)
