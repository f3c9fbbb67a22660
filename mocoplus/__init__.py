"""mocoplus: MoCo with a dual-view loss and hard-negative selection from the queue.

Pure PyTorch (no file I/O, no CLI): researchers can use it on its own.

    from mocoplus import MoCoConfig, MoCoPlus
    model = MoCoPlus(MoCoConfig(arch="resnet18", cifar_stem=True, dual_view="symmetric", negatives="band",
                                num_negatives=1024, skip_negatives=16))
    out = model(view1, view2, epoch=epoch, progress=step / total_steps)
    out.loss.backward()
"""

from mocoplus.builder import MoCoOutput, MoCoPlus, momentum_at
from mocoplus.config import MoCoConfig
from mocoplus.losses import ContrastiveResult, contrastive_loss, dual_view_loss, info_nce
from mocoplus.negatives import NegativeSampling

__version__ = "0.2.0"

__all__ = [
    "ContrastiveResult",
    "MoCoConfig",
    "MoCoOutput",
    "MoCoPlus",
    "NegativeSampling",
    "__version__",
    "contrastive_loss",
    "dual_view_loss",
    "info_nce",
    "momentum_at",
]
