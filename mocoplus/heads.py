"""The projection head: MoCo v2's Linear → ReLU → Linear, optionally with batch norm."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class ProjectionHead(nn.Sequential):
    """Maps backbone features to the contrastive embedding space.

    With ``norm_layer`` it is Linear → BN → ReLU → Linear (SimCLR, MoCo v3):
    the BN centres the hidden features, so a freshly initialised encoder does
    not map every image near one common direction, and small CPU-sized runs
    start learning within tens of steps instead of hundreds.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module] | None = None
    ) -> None:
        hidden: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=norm_layer is None)]
        if norm_layer is not None:
            hidden.append(norm_layer(hidden_dim))
        super().__init__(*hidden, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.out_dim = out_dim


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns unnormalised embeddings."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))
