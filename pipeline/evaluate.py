"""`mocoplus evaluate`: how good is a run's representation? kNN and linear-probe top-1, per encoder.

Both protocols freeze the backbone and use its pooled features of the whole
image (the evaluation stream's resize and centre crop, the training
normalisation), computed once per stream for the query and the key encoder
together:

- **weighted kNN** (k = 200, τ = 0.1 by default, MoCo's CIFAR monitor): the
  training features are the memory, each held-out image votes by similarity;
- **linear probe**: multinomial logistic regression on the L2-normalised
  training features, fitted by full-batch L-BFGS with a small L2 penalty (a
  convex problem, so no learning-rate schedule to tune), scored on the
  held-out features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mocoplus import MoCoPlus
from pipeline.augment import eval_transform
from pipeline.checkpoints import load_checkpoint, resolve_checkpoint
from pipeline.data import EvalStream, StreamConfig
from pipeline.knn import knn_top1, labelled_features
from pipeline.precision import resolve_precision
from pipeline.run_config import config_from_dict

ENCODERS = ("query", "key")


@dataclass(frozen=True)
class EncoderScores:
    knn_top1: float
    linear_top1: float


@dataclass(frozen=True)
class Evaluation:
    checkpoint: str
    step: int
    train_samples: int
    eval_samples: int
    encoders: dict[str, EncoderScores]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "encoders": {name: asdict(scores) for name, scores in self.encoders.items()}}


class _BothBackbones(nn.Module):
    """Query and key backbone side by side: one decode of each image gives both encoders' features."""

    def __init__(self, model: MoCoPlus) -> None:
        super().__init__()
        self.query, self.key = model.query_encoder.backbone, model.key_encoder.backbone

    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([self.query(images), self.key(images)], dim=1)


def load_run(run_dir: Path, checkpoint: str = "auto") -> tuple[MoCoPlus, dict, Path]:
    """The model of a run's checkpoint (``auto``: best if the run has one, else last), its config and path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found")
    path = resolve_checkpoint(run_dir, checkpoint)
    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    model = MoCoPlus(config.model)
    model.load_state_dict(state["model"])
    return model.eval(), state, path


def _features(
    network: nn.Module, shards: str, *, size: int, mode: str, transform, batch_size: int, workers: int, device
) -> tuple[Tensor, Tensor]:
    stream = EvalStream(shards, size, mode, StreamConfig(batch_size=batch_size, workers=workers), rank=0, world_size=1)
    precision = resolve_precision("auto", device)
    try:
        return labelled_features(network, stream, transform=transform, device=device, precision=precision)
    except ValueError as error:
        raise ValueError(f"{shards}: {error}") from None


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    weight_decay: float = 1e-4,
) -> float:
    """Top-1 of multinomial logistic regression on L2-normalised, standardised features (full-batch L-BFGS).

    Standardising each dimension with the training statistics (a BatchNorm
    without affine, as MAE's linear probe) keeps a few large, nearly constant
    dimensions of pooled ReLU features from dominating the conditioning.
    """
    x, x_test = F.normalize(train_features.float(), dim=1), F.normalize(test_features.float(), dim=1)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    linear = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), train_labels) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (linear(x_test).argmax(dim=1) == test_labels).float().mean().item()


def evaluate(
    run_dir: Path,
    train_shards: str,
    eval_shards: str,
    *,
    checkpoint: str = "auto",
    batch_size: int = 512,
    workers: int = 2,
    device: str = "auto",
) -> Evaluation:
    """kNN and linear-probe top-1 of both encoders of a run, memory/training set ``train_shards``."""
    model, state, path = load_run(run_dir, checkpoint)
    config = config_from_dict(state["config"])
    target = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    augment = config.augmentation
    network = _BothBackbones(model).to(target)
    options = {
        "size": config.data.image_size,
        "mode": augment.input_mode,
        "transform": lambda x: eval_transform(x, augment),
        "batch_size": batch_size,
        "workers": workers,
        "device": target,
    }
    train_features, train_labels = _features(network, train_shards, **options)
    test_features, test_labels = _features(network, eval_shards, **options)
    width = train_features.shape[1] // 2
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = {}
    for index, name in enumerate(ENCODERS):
        part = slice(index * width, (index + 1) * width)
        knn = knn_top1(
            train_features[:, part],
            train_labels,
            test_features[:, part],
            test_labels,
            num_classes=classes,
            k=config.eval.knn_k,
            temperature=config.eval.knn_temperature,
        )
        linear = linear_probe(train_features[:, part], train_labels, test_features[:, part], test_labels)
        scores[name] = EncoderScores(knn, linear)
    return Evaluation(str(path), int(state["step"]), len(train_labels), len(test_labels), scores)
