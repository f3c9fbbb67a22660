"""Weighted kNN evaluation of a frozen representation (InstDisc; the MoCo CIFAR demo's monitor).

No training, so it measures the features alone and is cheap enough to run
between epochs: each query's k most cosine-similar training features vote for
their labels with weight exp(sim / τ). Queries are processed in chunks so the
[queries × bank] similarity matrix never has to fit in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.precision import Precision, resolve_precision


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 512,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
) -> Tensor:
    """Features ``[N, D]`` (float32, on the CPU, not normalised) of ``images`` in eval mode.

    ``images`` is one tensor (cut into ``batch_size`` slices) or an iterable of
    batches (a stream).
    ``transform`` maps a raw batch (e.g. uint8) to the model's input; eval mode
    makes batch norm use its running statistics, so a feature does not depend
    on which other images share its batch. The module's train/eval mode is
    restored afterwards, so this can run in the middle of training.
    ``precision`` (autocast dtype and memory format) defaults to fp32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    precision = precision or resolve_precision("fp32", device)
    features = []
    batches = (
        (images[start : start + batch_size] for start in range(0, len(images), batch_size))
        if isinstance(images, Tensor)
        else images
    )
    try:
        for batch in batches:
            batch = batch.to(device)
            if transform is not None:
                batch = transform(batch)
            batch = batch.contiguous(memory_format=precision.memory_format())
            with precision.autocast():
                features.append(backbone(batch).float().cpu())
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features)


def labelled_features(
    backbone: nn.Module,
    batches: Iterable,
    *,
    transform: Callable[[Tensor], Tensor],
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Features and labels of an evaluation stream's batches (``.images``, ``.labels``), labels checked present.

    ``on_batch`` receives each batch's size (progress bars).
    """
    labels: list[Tensor] = []

    def images():
        for batch in batches:
            labels.append(batch.labels)
            if on_batch is not None:
                on_batch(len(batch.labels))
            yield batch.images

    features = extract_features(backbone, images(), transform=transform, device=device, precision=precision)
    label_tensor = torch.cat(labels)
    if int(label_tensor.min()) < 0:
        raise ValueError("evaluation needs labelled shards (samples with a cls field)")
    return features, label_tensor


@torch.no_grad()
def knn_predict(
    bank_features: Tensor,
    bank_labels: Tensor,
    query_features: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted class ``[M]`` of each query from its ``k`` nearest bank features (cosine similarity).

    Neighbour weights are exp(sim / τ), summed per class; ``k`` larger than the
    bank uses the whole bank. Features need not be normalised.
    """
    if bank_features.ndim != 2 or query_features.ndim != 2 or bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"features must be [N, D] and [M, D]; got {tuple(bank_features.shape)}, {tuple(query_features.shape)}"
        )
    if bank_labels.shape != (bank_features.shape[0],):
        raise ValueError(f"need one label per bank feature; got {tuple(bank_labels.shape)} labels")
    if len(bank_features) == 0 or k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError("need a non-empty bank, k >= 1, temperature > 0 and chunk_size >= 1")
    bank = F.normalize(bank_features.float(), dim=1)
    labels = bank_labels.long().to(bank.device)
    k = min(k, len(bank))
    predictions = []
    for queries in F.normalize(query_features.float(), dim=1).to(bank.device).split(chunk_size):
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        scores = torch.zeros(len(queries), num_classes, device=bank.device)
        scores.scatter_add_(1, labels[neighbours], weights)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_top1(
    bank_features: Tensor,
    bank_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (in [0, 1]) of `knn_predict` on labelled queries."""
    if len(query_labels) != len(query_features) or len(query_labels) == 0:
        raise ValueError(f"need one label per query and at least one query; got {len(query_labels)} labels")
    predicted = knn_predict(
        bank_features,
        bank_labels,
        query_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return (predicted.cpu() == query_labels.long().cpu()).float().mean().item()
