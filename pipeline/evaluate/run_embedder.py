"""A training run's key encoder as the exported model would embed: grid pooling, then the whitening.

The label-free evaluation of a run (`pipeline.evaluate.views`) needs two things
the labelled suite does not: the corpus's keys and pictures beside its vectors
(to find each view's original and to score raw pixels), and the embedding of
pictures that are not in any shard (the altered views). Both go through the
one transform here — the evaluation stream's resize, the training
normalisation, the key encoder's grid embedding and, where the run's recipe
says so, a PCA whitening fitted on the corpus — so a view and its original are
embedded alike, as `mocoplus export` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mocoplus.backbones import GridEmbedding
from mocoplus.whitening import PcaWhitening, WhiteningConfig
from pipeline.data.augment import AugmentConfig, eval_transform
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.knn import extract_features
from pipeline.precision import Precision, resolve_precision
from pipeline.progress import StageProgress
from pipeline.train.checkpoints import load_run
from pipeline.train.run_config import RunConfig, config_from_dict


@dataclass(frozen=True)
class Corpus:
    """Every live picture of a shard set: its key, its embedding and its uint8 picture at the model's size."""

    keys: list[str]
    vectors: Tensor  # [N, D]
    pictures: Tensor  # uint8 [N, C, S, S]


class RunEmbedder:
    """The key encoder of a run's checkpoint, embedding uint8 pictures as the exported bundle would."""

    def __init__(self, network: GridEmbedding, config: RunConfig, device: torch.device) -> None:
        self.network, self.config, self.device = network, config, device
        self.augment: AugmentConfig = config.augmentation
        self.precision: Precision = resolve_precision("auto", device)
        self.whitening: PcaWhitening | None = None  # fitted on the corpus by `corpus`

    @classmethod
    def load(cls, run_dir: Path, checkpoint: str = "auto") -> RunEmbedder:
        model, state, _path = load_run(run_dir, checkpoint)
        config = config_from_dict(state["config"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        network = GridEmbedding(model.key_encoder.backbone, config.model.embedding_grid).to(device)
        return cls(network, config, device)

    @property
    def size(self) -> int:
        return self.config.data.image_size

    @property
    def mode(self) -> str:
        return self.augment.input_mode

    def _features(self, batches) -> Tensor:
        return extract_features(
            self.network,
            batches,
            transform=lambda images: eval_transform(images, self.augment),
            device=self.device,
            precision=self.precision,
        )

    def corpus(self, shards: str, *, workers: int, bar: StageProgress, batch_size: int = 256) -> Corpus:
        """Keys, vectors and pictures of every picture of ``shards``; fits the run's whitening on them."""
        stream = EvalStream(shards, self.size, self.mode, StreamConfig(batch_size=batch_size, workers=workers), 0, 1)
        keys: list[str] = []
        pictures: list[Tensor] = []
        task = bar.task(f"corpus {Path(str(shards)).name}"[:22], total=stream.shards.samples, unit="images")

        def batches():
            for batch in stream:
                keys.extend(batch.keys)
                pictures.append(batch.images)
                bar.advance(task, len(batch.keys))
                yield batch.images

        features = self._features(batches())
        bar.finish(task)
        if self.config.model.embedding_whitening == "pca":
            dims = self.config.model.embedding_dims
            self.whitening = PcaWhitening.fit(features.split(4096), WhiteningConfig(dims=dims))
            features = self.whitening(features)
        return Corpus(keys, features, torch.cat(pictures) if pictures else torch.zeros(0, dtype=torch.uint8))

    def embed_pictures(self, pictures: np.ndarray) -> Tensor:
        """Vectors of uint8 pictures ``[N, S, S, C]`` (already at the model's size), whitened like the corpus."""
        if self.config.model.embedding_whitening == "pca" and self.whitening is None:
            raise RuntimeError("the run's embedding is whitened: embed its corpus (corpus) before other pictures")
        images = torch.from_numpy(np.ascontiguousarray(pictures)).permute(0, 3, 1, 2)
        features = self._features(images.split(256))
        return self.whitening(features) if self.whitening is not None else features
