"""`mocoplus evaluate`: how good is a run's representation, and is it better than pixels?

Every protocol freezes the backbone and uses its pooled features of the whole
image (the evaluation stream's resize and centre crop, the training
normalisation), computed once per stream for the query and the key encoder
together:

- **the retrieval suite** (`pipeline.evaluate.retrieval`): weighted kNN-200, majority
  1-, 5- and 20-NN and precision@10, cosine similarity, the training features
  as memory and the held-out images as queries;
- **linear probe**: multinomial logistic regression on the L2-normalised
  training features, fitted by full-batch L-BFGS with a small L2 penalty (a
  convex problem, so no learning-rate schedule to tune), scored on the
  held-out features.

``baselines`` (``pixels``, ``hog``; `pipeline.evaluate.baselines`) are scored by the
same suite on the very images the encoder saw, so the table compares like
with like. With ``whiten`` (the run's ``model.embedding_whitening = "pca"``
by default) each encoder's features are PCA-whitened, fitted on the memory
set (`mocoplus.whitening`), as the exported model does; the baselines are
then scored both as they are and whitened the same way, so the post-processing
is offered to every feature alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from artifacts.shard_set import resolve_shards
from mocoplus import MoCoPlus
from mocoplus.backbones import GridEmbedding
from mocoplus.whitening import PcaWhitening, WhiteningConfig
from pipeline.data.augment import eval_transform
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.evaluate.baselines import BASELINES, baseline_features
from pipeline.evaluate.retrieval import WEIGHTED_K, WEIGHTED_TEMPERATURE, RetrievalScores, retrieval_scores
from pipeline.knn import knn_top1, labelled_features
from pipeline.precision import resolve_precision
from pipeline.progress import StageProgress, stage_progress
from pipeline.train.checkpoints import load_run
from pipeline.train.run_config import config_from_dict

ENCODERS = ("query", "key")


@dataclass(frozen=True)
class EncoderScores:
    """``knn_top1``: the run's own kNN rule (``eval.knn_k``, ``eval.knn_temperature``), as the monitor scores it.

    ``linear_top1`` is None when the linear probe was not asked for.
    """

    knn_top1: float
    linear_top1: float | None
    retrieval: RetrievalScores


@dataclass(frozen=True)
class Evaluation:
    checkpoint: str
    step: int
    train_samples: int
    eval_samples: int
    encoders: dict[str, EncoderScores]
    baselines: dict[str, RetrievalScores]
    whitening: str = "none"  # "pca": encoders whitened, and each baseline also scored whitened ("<name>, whitened")

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class _Backbones(nn.Module):
    """The chosen encoders' embeddings side by side: one decode of each image gives all their features."""

    def __init__(self, model: MoCoPlus, grid: int, encoders: tuple[str, ...]) -> None:
        super().__init__()
        backbones = {"query": model.query_encoder.backbone, "key": model.key_encoder.backbone}
        self.embeddings = nn.ModuleList(GridEmbedding(backbones[name], grid) for name in encoders)

    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([embedding(images) for embedding in self.embeddings], dim=1)


@dataclass(frozen=True)
class _Split:
    features: Tensor
    labels: Tensor
    images: Tensor | None  # the uint8 images the features were computed from, kept for the baselines


def _features(
    network: nn.Module,
    shards: str,
    *,
    size: int,
    mode: str,
    transform,
    batch_size: int,
    workers: int,
    device,
    keep_images: bool,
    bar: StageProgress,
) -> _Split:
    stream = EvalStream(shards, size, mode, StreamConfig(batch_size=batch_size, workers=workers), rank=0, world_size=1)
    precision = resolve_precision("auto", device)
    images: list[Tensor] = []
    task = bar.task(f"features {Path(str(shards)).name}"[:22], total=stream.shards.samples, unit="images")

    def batches():
        for batch in stream:
            if keep_images:
                images.append(batch.images)
            bar.advance(task, len(batch.labels))
            yield batch

    try:
        features, labels = labelled_features(
            network, batches(), transform=transform, device=device, precision=precision
        )
    except ValueError as error:
        raise ValueError(f"{shards}: {error}") from None
    bar.finish(task)
    return _Split(features, labels, torch.cat(images) if keep_images else None)


def run_features(
    run_dir: Path,
    shards: str,
    *,
    checkpoint: str = "auto",
    encoder: str = "key",
    grid: int | None = None,
    workers: int = 2,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """One encoder's features (before any whitening) and labels of every image of ``shards``: for studies that
    score many post-processings of one pass (``benchmarks/bench_dims.py``)."""
    model, state, _path = load_run(run_dir, checkpoint)
    config = config_from_dict(state["config"])
    target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    augment = config.augmentation
    network = _Backbones(model, grid or config.model.embedding_grid, (encoder,)).to(target)
    with stage_progress(progress) as bar:
        split = _features(
            network, shards, size=config.data.image_size, mode=augment.input_mode,
            transform=lambda x: eval_transform(x, augment), batch_size=512, workers=workers, device=target,
            keep_images=False, bar=bar,
        )  # fmt: skip
    return split.features, split.labels


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
    baselines: tuple[str, ...] = (),
    progress: bool = True,
    grid: int | None = None,
    whiten: bool | None = None,
    dims: int | None = None,
    linear: bool = True,
    encoders: tuple[str, ...] = ENCODERS,
) -> Evaluation:
    """The retrieval suite, kNN and linear-probe top-1 of both encoders of a run, and of ``baselines``.

    ``train_shards`` are the memory and the probe's training set, ``eval_shards`` the queries.
    ``grid``, ``whiten`` and ``dims`` override the run's ``model.embedding_grid``, ``model.embedding_whitening``
    and ``model.embedding_dims`` (the whitening's leading directions kept, the baselines' alike);
    ``linear=False`` skips the linear probe (minutes for wide embeddings on a CPU); ``encoders`` picks
    ``query`` and/or ``key`` (the exported one).
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    if not encoders or set(encoders) - set(ENCODERS) or len(set(encoders)) != len(encoders):
        raise ValueError(f"encoders must be distinct names from {', '.join(ENCODERS)}; got {encoders}")
    for shards in (train_shards, eval_shards):  # a bad path fails now, not after minutes of features
        resolve_shards(shards)
    model, state, path = load_run(run_dir, checkpoint)
    config = config_from_dict(state["config"])
    whitening = whiten if whiten is not None else config.model.embedding_whitening == "pca"
    dims = dims or config.model.embedding_dims
    target = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    augment = config.augmentation
    network = _Backbones(model, grid or config.model.embedding_grid, encoders).to(target)
    options = {
        "size": config.data.image_size,
        "mode": augment.input_mode,
        "transform": lambda x: eval_transform(x, augment),
        "batch_size": batch_size,
        "workers": workers,
        "device": target,
        "keep_images": bool(baselines),
    }
    with stage_progress(progress) as bar:
        train = _features(network, train_shards, bar=bar, **options)
        test = _features(network, eval_shards, bar=bar, **options)
        task = bar.task("scoring", total=len(encoders) + len(baselines), unit="feature sets")
        classes = int(max(train.labels.max(), test.labels.max())) + 1
        scores = _score_encoders(
            train, test, config, classes, bar, task, encoders, whiten=dims if whitening else False, linear=linear
        )
        baseline_scores = {}
        for name in baselines:
            bar.update(task, status=name)
            bank, queries = baseline_features(name, train.images, test.images)
            baseline_scores[name] = retrieval_scores(bank, train.labels, queries, test.labels, num_classes=classes)
            if whitening:
                bank, queries = whitened(bank, queries, dims)
                baseline_scores[f"{name}, whitened"] = retrieval_scores(
                    bank, train.labels, queries, test.labels, num_classes=classes
                )
            bar.advance(task)
        bar.finish(task, status="done")
    return Evaluation(
        str(path),
        int(state["step"]),
        len(train.labels),
        len(test.labels),
        scores,
        baseline_scores,
        "pca" if whitening else "none",
    )


def whitened(bank: Tensor, queries: Tensor, dims: int | None = None) -> tuple[Tensor, Tensor]:
    """Both sets PCA-whitened with the map fitted on the memory set ``bank`` (never on the queries), keeping
    the leading ``dims`` directions (None: all)."""
    # streamed: no float64 copy of the whole memory set
    whitening = PcaWhitening.fit(bank.split(4096), WhiteningConfig(dims=dims))
    return whitening(bank), whitening(queries)


def _score_encoders(
    train: _Split,
    test: _Split,
    config,
    classes: int,
    bar: StageProgress,
    task: int,
    encoders: tuple[str, ...],
    *,
    whiten: int | bool | None,
    linear: bool,
) -> dict[str, EncoderScores]:
    """The suite, the run's kNN rule and the linear probe for each encoder (features side by side in one tensor).

    ``whiten``: False, or the whitening's dims (None: all directions).
    """
    width = train.features.shape[1] // len(encoders)
    scores = {}
    for index, name in enumerate(encoders):
        bar.update(task, status=f"{name} encoder")
        part = slice(index * width, (index + 1) * width)
        bank, queries = train.features[:, part], test.features[:, part]
        if whiten is not False:
            bank, queries = whitened(bank, queries, whiten)
        suite = retrieval_scores(bank, train.labels, queries, test.labels, num_classes=classes)
        if (config.eval.knn_k, config.eval.knn_temperature) == (WEIGHTED_K, WEIGHTED_TEMPERATURE):
            knn = suite.weighted_knn200  # the same rule on the same similarities: not computed twice
        else:
            knn = knn_top1(
                bank,
                train.labels,
                queries,
                test.labels,
                num_classes=classes,
                k=config.eval.knn_k,
                temperature=config.eval.knn_temperature,
            )
        probe = linear_probe(bank, train.labels, queries, test.labels) if linear else None
        scores[name] = EncoderScores(knn, probe, suite)
        bar.advance(task)
    return scores
