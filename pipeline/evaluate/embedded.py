"""`mocoplus evaluate --memory EMB --queries EMB`: the retrieval suite of the vectors a model serves.

The run form of `mocoplus evaluate` (`pipeline.evaluate.evaluate`) scores a
training run's encoders in PyTorch; this form scores two embedding sets that
`mocoplus embed` wrote with an exported bundle — the very vectors the index
holds and the service returns, whitening and all — so what a user evaluates is
exactly what is served, and no model pass is repeated: the flows embed once
and evaluate from the sets.

- the memory set's live rows are the memory, the query set's the queries (both
  labelled, one model bundle);
- ``baselines`` (pixels, HOG) are scored by the same suite on the same samples
  (by key), as they are and PCA-whitened to the model's width (fitted on the
  memory set): like with like in the vector's size too. Their features come
  from `pipeline.evaluate.cache`, computed once per shard set;
- ``against`` (another model bundle, the published one in the ``pretrain``
  flow's quality gate) embeds the same shards (kept in the cache by bundle and
  shard set) and is scored beside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError
from artifacts.model_bundle import ModelBundle, read_model_json
from pipeline.evaluate.baselines import BASELINES, baseline
from pipeline.evaluate.cache import baseline_rows, default_cache, embeddings_folder, shard_set_of
from pipeline.evaluate.evaluate import linear_probe, whitened
from pipeline.evaluate.retrieval import RetrievalScores, retrieval_scores
from pipeline.progress import StageProgress, stage_progress


@dataclass(frozen=True)
class ScoredModel:
    model: str
    bundle_hash: str
    dim: int
    scores: RetrievalScores
    linear_top1: float | None = None  # the linear probe on these vectors, when asked for


@dataclass(frozen=True)
class EmbeddingEvaluation:
    """The model's suite on its embedding sets, its baselines', and (with ``against``) the other model's."""

    memory: str
    queries: str
    memory_samples: int
    query_samples: int
    model: ScoredModel
    baselines: dict[str, RetrievalScores]
    against: ScoredModel | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, dict[str, float]]]:
        """(feature set, scores) in table order: the model, the other one, then the baselines."""
        rows = [(f"model {self.model.bundle_hash[:12]} ({self.model.dim}-d)", self.model.scores.as_dict())]
        if self.against is not None:
            rows.append(
                (f"against {self.against.bundle_hash[:12]} ({self.against.dim}-d)", self.against.scores.as_dict())
            )
        return rows + [(name, scores.as_dict()) for name, scores in self.baselines.items()]


@dataclass(frozen=True)
class _Labelled:
    vectors: torch.Tensor
    keys: list[str]
    labels: torch.Tensor


def live_vectors(embeddings: EmbeddingSet) -> tuple[list[str], torch.Tensor]:
    """The keys and float32 vectors of the live rows of ``embeddings``."""
    rows = embeddings.live_rows()
    keys, _labels = embeddings.keys_and_labels()
    return [keys[row] for row in rows], torch.from_numpy(embeddings.rows(rows).astype("float32"))


def _labelled(embeddings: EmbeddingSet, role: str) -> _Labelled:
    """The live rows of ``embeddings`` with their keys and labels; every one must carry a label."""
    rows = embeddings.live_rows()
    labels = embeddings.keys_and_labels()[1][rows]
    if len(rows) == 0 or (labels < 0).any():
        raise EmbeddingSetError(
            f"{embeddings.path} ({role}): the suite needs labelled samples; "
            f"{int((labels < 0).sum())} of {len(rows)} have no label (score it with --unlabelled)"
        )
    keys, vectors = live_vectors(embeddings)
    return _Labelled(vectors, keys, torch.from_numpy(labels))


def _suite(bank: _Labelled, asked: _Labelled, classes: int) -> RetrievalScores:
    """The suite; NaN scores for vectors that are not all finite (a diverged model: no neighbour means anything)."""
    if not (torch.isfinite(bank.vectors).all() and torch.isfinite(asked.vectors).all()):
        return RetrievalScores(*[math.nan] * len(fields(RetrievalScores)))
    return retrieval_scores(bank.vectors, bank.labels, asked.vectors, asked.labels, num_classes=classes)


def evaluate_embeddings(
    memory: Path,
    queries: Path,
    *,
    baselines: tuple[str, ...] = (),
    against: Path | None = None,
    cache: Path | None = None,
    workers: int = 2,
    progress: bool = True,
    linear: bool = False,
) -> EmbeddingEvaluation:
    """The retrieval suite of the embedding sets ``memory`` and ``queries``, beside ``baselines`` and ``against``;
    ``linear`` adds the linear probe of the model's vectors (`pipeline.evaluate.evaluate.linear_probe`)."""
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    memory_set, query_set = EmbeddingSet(memory), EmbeddingSet(queries)
    if memory_set.bundle_hash != query_set.bundle_hash:
        raise EmbeddingSetError(
            f"{memory} and {queries} hold vectors of two models ({memory_set.bundle_hash[:12]}, "
            f"{query_set.bundle_hash[:12]}): embed both with one bundle"
        )
    cache = Path(cache) if cache is not None else default_cache()
    bank, asked = _labelled(memory_set, "memory"), _labelled(query_set, "queries")
    classes = int(max(bank.labels.max(), asked.labels.max())) + 1
    suite = _suite(bank, asked, classes)
    probe = None
    if linear and math.isfinite(suite.nn1):
        probe = linear_probe(bank.vectors, bank.labels, asked.vectors, asked.labels)
    model = ScoredModel(str(memory_set.manifest.get("model", "")), memory_set.bundle_hash, memory_set.dim, suite, probe)
    with stage_progress(progress) as bar:
        other = None
        if against is not None:
            other = _score_against(Path(against), memory_set, query_set, cache, workers, bar)
        scored = _score_baselines(baselines, memory_set, query_set, bank, asked, classes, cache, workers, bar)
    return EmbeddingEvaluation(str(memory), str(queries), len(bank.keys), len(asked.keys), model, scored, other)


def image_format(embeddings: EmbeddingSet) -> tuple[int, str]:
    """The size and mode the set's model reads images at (its model.json, where the set says it is)."""
    try:
        info = read_model_json(Path(embeddings.manifest.get("model", "")))
    except ValueError as error:
        raise EmbeddingSetError(f"{embeddings.path}: its model bundle is needed for the image size ({error})") from None
    return int(info["input"]["resize"]["size"]), str(info["input"].get("trained_mode", "RGB"))


def _score_baselines(
    names: tuple[str, ...],
    memory_set: EmbeddingSet,
    query_set: EmbeddingSet,
    bank: _Labelled,
    asked: _Labelled,
    classes: int,
    cache: Path,
    workers: int,
    bar: StageProgress,
) -> dict[str, RetrievalScores]:
    if not names:
        return {}
    size, mode = image_format(memory_set)
    bank_rows = baseline_rows(names, shard_set_of(memory_set), size, mode, cache, bar, workers)
    query_rows = baseline_rows(names, shard_set_of(query_set), size, mode, cache, bar, workers)
    task = bar.task("baselines", total=len(names), unit="feature sets")
    scores = {}
    for name in names:
        bar.update(task, status=name)
        pair = baseline(name).pair(bank_rows[name].aligned(bank.keys), query_rows[name].aligned(asked.keys))
        scores[name] = retrieval_scores(pair[0], bank.labels, pair[1], asked.labels, num_classes=classes)
        white_bank, white_queries = whitened(*pair, dims=memory_set.dim)
        scores[f"{name}, whitened to {white_bank.shape[1]}-d"] = retrieval_scores(
            white_bank, bank.labels, white_queries, asked.labels, num_classes=classes
        )
        bar.advance(task)
    bar.finish(task, status="done")
    return scores


def embedded_against(
    model: Path, embeddings: EmbeddingSet, cache: Path, workers: int, bar: StageProgress
) -> tuple[EmbeddingSet, ModelBundle]:
    """The shards of ``embeddings`` embedded by another bundle ``model``, kept in the cache (once per bundle
    and shard set)."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.embed import embed

    bundle = ModelBundle(model, spin=False)
    shards = shard_set_of(embeddings)
    folder = embeddings_folder(cache, bundle.hash, shards, bundle.size)
    task = bar.task(f"against {shards.name}"[:22], total=None, unit="images")
    done = embed(model, str(shards), folder, EmbedConfig(workers=workers), progress=False)
    bar.finish(task, status=f"{done.samples:,} embedded now")
    return EmbeddingSet(folder), bundle


def _score_against(
    model: Path,
    memory_set: EmbeddingSet,
    query_set: EmbeddingSet,
    cache: Path,
    workers: int,
    bar: StageProgress,
) -> ScoredModel:
    """``model``'s suite on the same shards (embedded into the cache)."""
    (bank_set, bundle), (query_set_other, _) = (
        embedded_against(model, embeddings, cache, workers, bar) for embeddings in (memory_set, query_set)
    )
    bank, asked = _labelled(bank_set, "memory, against"), _labelled(query_set_other, "queries, against")
    classes = int(max(bank.labels.max(), asked.labels.max())) + 1
    return ScoredModel(str(model), bundle.hash, bundle.dim, _suite(bank, asked, classes))
