"""`mocoplus demo`: pretrain MoCoPlus on a Fashion-MNIST slice on the CPU and show that it learns.

What exists of the chain today is the method, so the demo runs that: it reads
a real Fashion-MNIST slice, pretrains MoCoPlus for a few minutes with the
two-view augmentation, and scores the key encoder's pooled features with a
weighted kNN classifier against the very same network at its random
initialisation. kNN accuracy above the random-init baseline is the evidence
the method learns something. Results go to ``OUT/demo.json``, written
atomically.

The in-memory training loop here is a stop-gap: the trainer stage (streaming
shards, checkpoints, DDP) replaces it, and the demo will then compose ingest →
train → export → embed → index instead.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

import mocoplus
from mocoplus import MoCoConfig, MoCoPlus
from pipeline.artifacts import prepare_out_dir, progress_bar, write_json_atomic
from pipeline.augment import AugmentConfig, TwoViewAugment, eval_transform, small_grayscale_preset
from pipeline.fashion_mnist import CLASS_NAMES, FashionMNISTSplit, find_fashion_mnist, load_split
from pipeline.knn import extract_features, knn_top1
from pipeline.optim import lr_multiplier
from pipeline.precision import PRECISIONS, Precision, PrecisionName, resolve_precision


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; the defaults take about four minutes on two CPU cores.

    Defaults are the method's (symmetric dual-view loss, band hard negatives
    after a one-epoch warm-up) on ResNet-18 at width 0.25 with a CIFAR stem,
    bf16 on CPUs that have it: ~0.9 s per step of 256 images, so six epochs
    of the 10k slice (234 steps) fit the time box. Tuned on this slice for
    short runs, where MoCo is still early in training: the projection head's
    batch norm (``head_bn``) and a 25-step lr warm-up keep a random network
    from mapping every image into one narrow cone, which cost a short run most
    of its budget, and τ = 0.2 (MoCo v2's) beat τ = 0.1 and 0.3. ``steps``
    overrides ``epochs`` (smoke tests). ``precision='auto'`` is bf16 autocast
    where the CPU has native bf16, fp32 elsewhere.
    """

    data_dir: str | None = None
    train_size: int = 10_000
    test_size: int = 2_000
    batch_size: int = 256
    epochs: int = 6
    steps: int | None = None
    lr: float = 0.06
    lr_warmup_steps: int = 25
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    image_size: int = 32
    arch: str = "resnet18"
    width: float = 0.25
    head_bn: bool = True
    queue_size: int = 4096
    momentum: float = 0.99
    temperature: float = 0.2
    dual_view: str = "symmetric"
    negatives: str = "band"
    num_negatives: int = 1024
    skip_negatives: int = 16
    warmup_epochs: int = 1
    knn_k: int = 200
    knn_temperature: float = 0.1
    precision: PrecisionName = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_size < self.batch_size or self.batch_size < 1:
            raise ValueError(f"train_size ({self.train_size}) must be at least batch_size ({self.batch_size}) >= 1")
        if self.test_size < 1 or self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("test_size, epochs and steps must be positive")
        if self.lr <= 0 or self.lr_warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and lr_warmup_steps >= 0; got {self.lr}, {self.lr_warmup_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        moco = self.moco  # validates the method's fields now, before any data is read
        if self.batch_size % moco.bn_splits:
            raise ValueError(f"batch_size must be a multiple of {moco.bn_splits} (split-BN); got {self.batch_size}")

    @property
    def moco(self) -> MoCoConfig:
        return MoCoConfig(
            arch=self.arch,  # type: ignore[arg-type]
            width=self.width,
            cifar_stem=True,
            head_bn=self.head_bn,
            queue_size=self.queue_size,
            momentum=self.momentum,
            temperature=self.temperature,
            dual_view=self.dual_view,  # type: ignore[arg-type]
            negatives=self.negatives,  # type: ignore[arg-type]
            num_negatives=self.num_negatives,
            skip_negatives=self.skip_negatives,
            warmup_epochs=self.warmup_epochs,
        )

    @property
    def augment(self) -> AugmentConfig:
        return small_grayscale_preset(output_size=self.image_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.train_size // self.batch_size  # the last partial batch is dropped: split-BN needs full ones

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class EpochStats:
    """Means over one epoch's steps (the last epoch may be partial when ``steps`` is set)."""

    epoch: int
    steps: int
    loss: float
    positive_similarity: float
    selected_negative_similarity: float


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` measured; ``to_json`` is the content of ``demo.json``."""

    config: DemoConfig
    precision: str
    knn_top1_random_init: float
    knn_top1_trained: float
    epochs: list[EpochStats]
    steps: int
    train_images_per_s: float
    elapsed_s: float
    output: Path
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.epochs[-1].loss

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "precision": self.precision,
            "steps": self.steps,
            "epochs": [asdict(epoch) for epoch in self.epochs],
            "final_loss": self.final_loss,
            "knn": {
                "k": self.config.knn_k,
                "temperature": self.config.knn_temperature,
                "bank_size": self.config.train_size,
                "query_size": self.config.test_size,
                "top1_random_init": self.knn_top1_random_init,
                "top1_trained": self.knn_top1_trained,
            },
            "train_images_per_s": self.train_images_per_s,
            "elapsed_s": self.elapsed_s,
            "versions": self.versions,
        }


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the block only (MoCo's batch shuffle and weight init use it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _Knn:
    """Scores a backbone by weighted kNN: train slice as the bank, test slice as queries."""

    def __init__(
        self,
        config: DemoConfig,
        train: FashionMNISTSplit,
        test: FashionMNISTSplit,
        precision: Precision,
        progress: Progress,
    ) -> None:
        self.config, self.precision, self.progress = config, precision, progress
        self.train_images, self.test_images = torch.from_numpy(train.images), torch.from_numpy(test.images)
        self.train_labels, self.test_labels = torch.from_numpy(train.labels), torch.from_numpy(test.labels)

    def top1(self, backbone: torch.nn.Module, description: str) -> float:
        task = self.progress.add_task(description, total=2, status="")
        features = []
        for images in (self.train_images, self.test_images):
            features.append(
                extract_features(
                    backbone,
                    images,
                    batch_size=512,
                    transform=lambda batch: eval_transform(batch, self.config.augment),
                    precision=self.precision,
                )
            )
            self.progress.advance(task)
        accuracy = knn_top1(
            features[0],
            self.train_labels,
            features[1],
            self.test_labels,
            num_classes=len(CLASS_NAMES),
            k=self.config.knn_k,
            temperature=self.config.knn_temperature,
        )
        self.progress.update(task, status=f"top-1 {accuracy:.1%}")
        return accuracy


def _train(
    model: MoCoPlus, images: torch.Tensor, config: DemoConfig, precision: Precision, progress: Progress
) -> tuple[list[EpochStats], float]:
    """The temporary in-memory pretraining loop; returns per-epoch stats and training images/s."""
    augment = TwoViewAugment(config.augment)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    total, per_epoch, batch = config.total_steps, config.steps_per_epoch, config.batch_size
    task = progress.add_task("pretraining", total=total, status="")
    sums: dict[int, np.ndarray] = {}  # epoch → summed (steps, loss, positive sim, selected negative sim)
    model.to(memory_format=precision.memory_format()).train()  # oneDNN's bf16 convolutions are NHWC-native
    start = time.perf_counter()
    for step in range(total):
        epoch, index = divmod(step, per_epoch)
        if index == 0:
            order = torch.randperm(len(images), generator=generator)
        views = augment(images[order[index * batch : (index + 1) * batch]], generator)
        view1, view2 = (view.contiguous(memory_format=precision.memory_format()) for view in views)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_multiplier(step, total, config.lr_warmup_steps, "cosine")
        with precision.autocast():
            out = model(view1, view2, epoch=epoch, progress=step / total)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step}; try a lower lr")
        stats = out.stats
        row = np.array([1.0, loss, stats.positive_similarity.item(), stats.selected_negative_similarity.item()])
        sums[epoch] = sums.get(epoch, np.zeros(4)) + row
        rate = (step + 1) * batch / (time.perf_counter() - start)
        progress.update(task, advance=1, status=f"epoch {epoch} loss {loss:.3f} {rate:,.0f} img/s")
    elapsed = time.perf_counter() - start
    epochs = [EpochStats(e, int(s[0]), *(float(v) for v in s[1:] / s[0])) for e, s in sorted(sums.items())]
    return epochs, total * batch / elapsed


def run_demo(config: DemoConfig, out_dir: Path, progress: bool = True) -> DemoResult:
    """Pretrain on the Fashion-MNIST slice, kNN-score random-init vs trained, write ``demo.json``.

    Raises `FileNotFoundError` when the dataset is missing, `ValueError` for a
    corrupt dataset or a bad config and `OSError` for an unusable ``out_dir``.
    """
    started = time.perf_counter()
    out_dir = prepare_out_dir(out_dir)
    data_dir = find_fashion_mnist(Path(config.data_dir) if config.data_dir else None)
    train = load_split(data_dir, "train", limit=config.train_size)
    test = load_split(data_dir, "test", limit=config.test_size)
    if len(train) < config.train_size or len(test) < config.test_size:
        raise ValueError(
            f"Fashion-MNIST in {data_dir} has {len(train)} training and {len(test)} test images; "
            f"asked for {config.train_size} and {config.test_size}"
        )
    precision = resolve_precision(config.precision)
    with progress_bar(progress) as bar, _seeded(config.seed):
        model = MoCoPlus(config.moco)
        knn = _Knn(config, train, test, precision, bar)
        random_top1 = knn.top1(model.key_encoder.backbone, "kNN, random init")
        epochs, images_per_s = _train(model, knn.train_images, config, precision, bar)
        trained_top1 = knn.top1(model.key_encoder.backbone, "kNN, trained")
    result = DemoResult(
        config=config,
        precision=precision.name,
        knn_top1_random_init=random_top1,
        knn_top1_trained=trained_top1,
        epochs=epochs,
        steps=config.total_steps,
        train_images_per_s=images_per_s,
        elapsed_s=time.perf_counter() - started,
        output=out_dir / "demo.json",
        versions={
            "mocoplus": mocoplus.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    )
    write_json_atomic(result.output, result.to_json())
    return result
