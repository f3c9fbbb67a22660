"""The index bundle contract: open one and search it, and write one (`mocoplus index`) — no torch here.

An index bundle is ``index.faiss`` (the FAISS index), its id map
(`artifacts.id_map`: id → sample key, label and embedding-set row, in
memory-mapped arrays, so a bundle of tens of millions of keys opens in
milliseconds and holds in memory only what searches touch), ``index.json`` (factory string, metric, tuned search
parameter, measured recall@k and QPS, build times, the model bundle hash) and,
in a version made by ``mocoplus index --update``, ``deleted.npy``: the ids of
removed samples, which every search filters out in FAISS itself (an
``IDSelectorBitmap`` of live ids, so the top k are k live hits). A bundle
folder holds versions of these (`artifacts.versions`); readers open the
current one unless asked for another.
The search CLI and the service open bundles through `IndexBundle`, so both
refuse an index made with another model, read the index memory-mapped where
FAISS can (flat codes and IVF lists are then paged in on demand, not loaded),
and report scores the same way: similarities, higher is closer — the inner
product for ``ip`` indexes, the negated squared distance for ``l2`` ones.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from artifacts.atomic import sha256_file
from artifacts.files import read_npy
from artifacts.id_map import IdMap, IdMapError, write_id_map
from artifacts.jsonfile import MAX_JSON_BYTES, read_json
from artifacts.query_vectors import QueryVectorError, query_vector_problem
from artifacts.versions import resolve_version

if TYPE_CHECKING:
    from artifacts.embedding_set import EmbeddingSet

INDEX_FORMAT = 2  # 1: keys.json, read whole (refused: rebuild)
INDEX_JSON, INDEX_FILE = "index.json", "index.faiss"
DELETED_FILE = "deleted.npy"  # ids of removed samples, kept in the index but never returned
INDEX_KIND = "mocoplus.index"
SEARCH_PARAMETERS = ("nprobe", "efSearch")  # what index.json's "search" may tune: IVF's and HNSW's
FAISS_DEFAULTS = {"nprobe": 1, "efSearch": 16}
# a query vector's largest norm: scores are float32 (inner products, or squared L2 distances up to about
# norm²), so beyond sqrt(float32 max) ≈ 1.8e19 they overflow to infinity and rank nothing; embeddings have norm 1
MAX_QUERY_NORM = 1e18  # what an index searches with before anything is set


class IndexBundleError(ValueError):
    """An index bundle that is missing, damaged, or does not belong to the model it is used with."""


class OldIndexFormatError(IndexBundleError):
    """A bundle of a format this version no longer reads: rebuilt by the user, never silently."""


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    key: str
    label: int
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "key": self.key,
            "label": None if self.label < 0 else self.label,
            "score": self.score,
        }


def gpu_index(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` on all visible GPUs; a clear error without faiss-gpu, a GPU, or GPU support for the kind.

    One GPU gets a plain GPU index; several get an ``IndexReplicas`` of one copy each.
    """
    if not hasattr(faiss, "StandardGpuResources"):
        raise IndexBundleError("--gpu needs faiss-gpu (docs/gpu.md); this FAISS build is CPU-only")
    if faiss.get_num_gpus() < 1:
        raise IndexBundleError("--gpu: faiss-gpu sees no CUDA device")
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        raise IndexBundleError("--gpu: FAISS has no GPU HNSW index; drop --gpu or use --kind ivf")
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = needs_float16_lookup_tables(index)
    return faiss.index_cpu_to_all_gpus(index, co=options)


def needs_float16_lookup_tables(index: faiss.Index) -> bool:
    """Whether the GPU clone of ``index`` should compute in float16: IVF-PQ only.

    For an IVF-PQ index the cloner's ``useFloat16`` means float16 lookup tables,
    which GPU IVF-PQ needs for long codes (the planner's usual 64-byte codes do
    not fit shared memory in float32); for Flat and IVF-Flat it would store the
    vectors themselves in float16, a loss the plan never asked for.
    """
    try:
        return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFPQ)
    except RuntimeError:  # not an IVF index
        return False


def _wrapped(index: faiss.Index) -> list[faiss.Index]:
    """The indexes ``index`` delegates to: a pre-transform's inner index, a replica or shard set's members."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return [index.index]
    if is_index_set(index):
        return [index.at(i) for i in range(index.count())]
    return []


def is_index_set(index: faiss.Index) -> bool:
    """An ``IndexReplicas``/``IndexShards``: FAISS's wrappers that spread one index over devices."""
    names = ("IndexReplicas", "IndexShards", "IndexShardsIVF")
    sets = tuple(getattr(faiss, name) for name in names if hasattr(faiss, name))
    return isinstance(index, sets) or isinstance(faiss.downcast_index(index), sets)


def is_gpu_index(index: faiss.Index) -> bool:
    """Whether ``index``, or an index it wraps (pre-transform, replicas, shards), lives on a GPU.

    Read from the class names (``GpuIndexIVFFlat``...), so it also answers, "no", where FAISS has no GPU part.
    """
    if any(type(candidate).__name__.startswith("GpuIndex") for candidate in (index, faiss.downcast_index(index))):
        return True
    return any(is_gpu_index(inner) for inner in _wrapped(index))


def parameter_space(index: faiss.Index) -> faiss.ParameterSpace:
    """The parameter space that can set ``nprobe``/``efSearch`` on ``index``.

    A GPU IVF index (alone, in replicas, under a pre-transform) needs
    ``GpuParameterSpace``: the CPU one knows only CPU index classes and raises.
    """
    if is_gpu_index(index):
        space = getattr(faiss, "GpuParameterSpace", None)
        if space is None:
            raise IndexBundleError("a GPU index, but this FAISS build has no GpuParameterSpace")
        return space()
    return faiss.ParameterSpace()


def set_index_parameter(index: faiss.Index, name: str, value: int) -> None:
    """Set ``nprobe``/``efSearch`` on ``index`` through any wrapper (pre-transform, GPU clone, replicas)."""
    parameter_space(index).set_index_parameter(index, name, int(value))


def takes_search_parameters(index: faiss.Index) -> bool:
    """Whether ``index.search`` accepts per-call ``SearchParameters``: replica and shard sets refuse them."""
    index = faiss.downcast_index(index)
    if is_index_set(index):
        return False
    return all(takes_search_parameters(inner) for inner in _wrapped(index))


def read_index_json(path: Path) -> dict[str, Any]:
    info_path = Path(path) / INDEX_JSON
    info = read_json(info_path, IndexBundleError, f"{path} is not an index bundle: no {INDEX_JSON}")
    if info.get("kind") == INDEX_KIND and info.get("format") == 1:
        raise OldIndexFormatError(
            f"{path} is a format-1 index bundle (keys.json, read whole), which this version no longer reads: "
            "rebuild it with `mocoplus index EMBEDDINGS --out NEW_FOLDER` and serve that"
        )
    if info.get("kind") != INDEX_KIND or info.get("format") != INDEX_FORMAT:
        raise IndexBundleError(f"{info_path} is not a format-{INDEX_FORMAT} mocoplus index description")
    for name, kind, least in (("count", int, 0), ("dim", int, 1), ("bundle_hash", str, None)):
        value = info.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) or (least is not None and value < least):
            rule = f"an integer >= {least}" if least is not None else "a string"
            raise IndexBundleError(f"{info_path}: {name!r} must be {rule}; got {str(value)[:40]!r}")
    return info


class IndexBundle:
    """A loaded index bundle: the FAISS index, its id → key/label maps, and its description.

    ``path`` is a bundle folder (its current version is opened, or ``version``)
    or one version's folder; `path` is then the version folder read.
    """

    def __init__(self, path: Path | str, *, gpu: bool = False, mmap: bool = True, version: int | None = None) -> None:
        self.root = Path(path)
        self.path = resolve_version(self.root, version)
        self.info = read_index_json(self.path)
        self.index = _read_faiss(self.path / INDEX_FILE, mmap)
        try:
            self.ids = IdMap(self.path)
        except IdMapError as error:
            raise IndexBundleError(f"id map unreadable: {str(error)[:300]}") from None
        self.keys, self.labels, self.rows = self.ids.keys, self.ids.labels, self.ids.rows
        self.deleted = _read_deleted(self.path, self.index.ntotal)
        live = self.index.ntotal - len(self.deleted)
        if not (len(self.ids) == self.index.ntotal and live == self.info["count"]):
            raise IndexBundleError(
                f"{self.path}: {self.index.ntotal} vectors ({len(self.deleted)} deleted), {len(self.ids)} ids "
                f"in the id map, index.json says {self.info['count']}: the bundle is damaged"
            )
        self._selector = live_selector(self.deleted, self.index.ntotal)
        if self.index.d != self.info["dim"]:
            raise IndexBundleError(f"{self.path}: index dimension {self.index.d}, index.json says {self.info['dim']}")
        self._embeddings: tuple[tuple[int, int, int], EmbeddingSet | None] | None = None  # `_indexed_embeddings`
        self._embeddings_lock = threading.Lock()
        self._parameter, self._params = _search_settings(self.info, self.path / INDEX_JSON)
        if gpu:
            self.index = gpu_index(self.index)
        # a replica set (faiss-gpu on several GPUs) refuses per-call SearchParameters: an override is set on
        # the index instead, under this lock, and put back after the search
        self._per_call = takes_search_parameters(self.index)
        self._lock = threading.Lock()
        self._setting = self.tuned_effort or FAISS_DEFAULTS.get(self._parameter or "")  # what the index holds now
        for name, value in self._params.items():
            try:
                set_index_parameter(self.index, name, value)
            except RuntimeError:
                raise IndexBundleError(
                    f"{self.path / INDEX_JSON}: {name} does not apply to a {self.info.get('index_kind')} index"
                ) from None

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def count(self) -> int:
        """Searchable vectors: those indexed minus the removed ones."""
        return int(self.info["count"])

    @property
    def version(self) -> int | None:
        """This version's number in its bundle folder (None: a bundle built before versions)."""
        value = self.info.get("index_version")
        return value if isinstance(value, int) else None

    @property
    def metric(self) -> str:
        return str(self.info["metric"])

    @property
    def bundle_hash(self) -> str:
        return str(self.info["bundle_hash"])

    @property
    def search_parameter(self) -> str | None:
        return self._parameter

    @property
    def tuned_effort(self) -> int | None:
        """The tuned ``nprobe``/``efSearch`` a search uses without an override (None: exact, or untuned)."""
        return self._params.get(self._parameter) if self._parameter else None

    def check_model(self, model_hash: str, model_path: object = "the model") -> None:
        """Refuse a model other than the one whose embeddings this index holds."""
        if model_hash != self.bundle_hash:
            raise IndexBundleError(
                f"index {self.path} was built from embeddings of model bundle {self.bundle_hash[:12]}, "
                f"but {model_path} is bundle {model_hash[:12]}: its vectors would not be comparable; "
                "re-embed and re-index with this model, or search with the model the index was built with"
            )

    def set_search_parameter(self, value: int | None) -> None:
        """Override the tuned ``nprobe``/``efSearch`` (None: keep the tuned value)."""
        if value is None:
            return
        if self.search_parameter is None:
            raise IndexBundleError(f"a {self.info['index_kind']} index is exact: it has no search parameter to set")
        if value < 1:
            raise IndexBundleError(f"{self.search_parameter} must be >= 1; got {value}")
        with self._lock:
            set_index_parameter(self.index, self.search_parameter, int(value))
            self._setting = int(value)

    def is_live(self, position: int) -> bool:
        """Whether id ``position`` is a sample's (not one removed by an update)."""
        return self._selector is None or bool(self._selector.is_member(position))

    def id_of(self, key: str) -> int:
        """The id of the live sample ``key`` (a replaced sample's old id stays in the index, deleted)."""
        try:
            live = [position for position in self.ids.ids_of(key) if self.is_live(position)]
        except IdMapError as error:
            raise IndexBundleError(str(error)) from None
        if not live:
            raise KeyError(f"no sample with key {key!r} in index {self.root}")
        return live[-1]

    def vector_of(self, key: str) -> np.ndarray:
        """The stored vector for a corpus ``key``: from the embedding set when it is still the one indexed, else
        from the index itself."""
        from artifacts.embedding_set import EmbeddingSetError

        row = self.id_of(key)
        embeddings = self._indexed_embeddings()
        if embeddings is not None:
            try:
                return embeddings.rows(self.rows[row : row + 1])[0]
            except (EmbeddingSetError, OSError):  # a part changed behind its manifest's back
                pass
        return _reconstruct(self.index, row)

    def _indexed_embeddings(self) -> EmbeddingSet | None:
        """The embedding set this index was built from, while it is still that very set (its manifest's sha256
        as indexed). Opened once and kept while its manifest file is unchanged: a key search parses no JSON,
        and a set being re-embedded (its manifest withdrawn or rewritten) is never read for it."""
        from artifacts.embedding_set import EMBEDDINGS_MANIFEST, EmbeddingSet, EmbeddingSetError

        recorded = self.info.get("embeddings") or {}
        if not recorded.get("path"):
            return None
        manifest = Path(recorded["path"]) / EMBEDDINGS_MANIFEST
        try:
            status = manifest.stat()
        except OSError:
            return None
        stamp = (status.st_ino, status.st_size, status.st_mtime_ns)
        with self._embeddings_lock:
            if self._embeddings is None or self._embeddings[0] != stamp:
                opened: EmbeddingSet | None = None
                try:
                    candidate = EmbeddingSet(recorded["path"])
                    expected = recorded.get("manifest_sha256")
                    if (
                        candidate.bundle_hash == self.bundle_hash
                        and int(recorded.get("rows", candidate.count + 1)) <= candidate.count
                        and (not expected or sha256_file(manifest) == expected)
                    ):
                        opened = candidate
                except (EmbeddingSetError, OSError):
                    pass
                self._embeddings = (stamp, opened)
            return self._embeddings[1]

    def search_parameters(self, value: int | None) -> tuple[faiss.SearchParameters | None, object]:
        """Per-call parameters: ``nprobe``/``efSearch`` = ``value`` (None: the tuned setting), and the live-id
        filter of a bundle with removed samples.

        Unlike `set_search_parameter`, these leave the index untouched, so concurrent
        requests with different overrides do not race. The second item keeps the inner
        parameters alive while FAISS holds a pointer to them.
        """
        if value is not None:
            if self.search_parameter is None:
                raise IndexBundleError(f"a {self.info['index_kind']} index is exact: it has no search parameter to set")
            if value < 1:
                raise IndexBundleError(f"{self.search_parameter} must be >= 1; got {value}")
        if value is None and self._selector is None:
            return None, None
        return search_parameters_for(
            self.index, self.search_parameter, value if value is not None else self._setting, self._selector
        )

    def search(self, vectors: np.ndarray, k: int, effort: int | None = None) -> list[list[Hit]]:
        """Top-``k`` hits for each row of ``vectors`` (float32 ``[N, dim]``), best first.

        ``effort`` overrides the tuned ``nprobe``/``efSearch`` for this call only.
        Raises `QueryVectorError` for a vector that cannot be searched (see
        `query_vector_problem`) or whose scores still come out non-finite.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors must be [N, {self.dim}]; got shape {list(vectors.shape)}")
        for row, vector in enumerate(vectors):
            problem = query_vector_problem(vector)
            if problem:
                raise QueryVectorError(f"query vector {row}: {problem}")
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        count = min(k, self.count)
        if not count:
            return [[] for _ in vectors]
        if self._per_call:
            params, _keep = self.search_parameters(effort)
            scores, ids = self.index.search(vectors, count, params=params)
        else:  # replicas take no per-call filter: ask for enough extra hits to drop the removed ones
            count = min(count + len(self.deleted), self.index.ntotal)
            self.search_parameters(effort)  # checks the override
            with self._lock:
                if effort is not None:
                    set_index_parameter(self.index, self.search_parameter, effort)  # type: ignore[arg-type]
                try:
                    scores, ids = self.index.search(vectors, count)
                finally:
                    if effort is not None and self._setting is not None:
                        set_index_parameter(self.index, self.search_parameter, self._setting)  # type: ignore[arg-type]
        if not np.isfinite(scores[ids >= 0]).all():
            raise QueryVectorError("the scores of these query vectors overflow float32; send vectors of norm about 1")
        if self.metric == "l2":
            scores = -scores
        if len(self.deleted) and not self._per_call:
            ids = np.where(np.isin(ids, self.deleted), -1, ids)
        return [
            [
                Hit(rank, int(i), self.ids.key(i), int(self.labels[i]), float(score))
                for rank, (i, score) in enumerate(
                    ((i, s) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0), 1
                )
                if rank <= k
            ]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]


def search_parameters_for(
    index: faiss.Index, parameter: str | None, value: int | None, selector: faiss.IDSelector | None
) -> tuple[faiss.SearchParameters, object]:
    """Per-call parameters for ``index``: ``parameter`` = ``value`` (when both are set) and the id filter
    ``selector`` (when set), wrapped for an OPQ pre-transform; and what must stay alive while FAISS uses them."""
    if parameter == "nprobe":
        inner = faiss.SearchParametersIVF()
        if value is not None:
            inner.nprobe = int(value)
    elif parameter == "efSearch":
        inner = faiss.SearchParametersHNSW()
        if value is not None:
            inner.efSearch = int(value)
    else:
        inner = faiss.SearchParameters()
    if selector is not None:
        inner.sel = selector
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = inner
        return outer, (inner, selector)
    return inner, (inner, selector)


def live_selector(deleted: np.ndarray, total: int) -> faiss.IDSelector | None:
    """An id filter that passes every id in [0, total) except ``deleted`` (None when nothing is deleted)."""
    if not len(deleted):
        return None
    alive = np.ones(total, dtype=bool)
    alive[deleted] = False
    bitmap = np.packbits(alive, bitorder="little")
    selector = faiss.IDSelectorBitmap(total, faiss.swig_ptr(bitmap))
    selector.bitmap_array = bitmap  # FAISS keeps a pointer: the array lives as long as the selector
    return selector


def _read_deleted(folder: Path, total: int) -> np.ndarray:
    """The bundle's removed ids (none when it has no ``deleted.npy``), checked: unique, in range."""
    if not (folder / DELETED_FILE).exists():
        return np.zeros(0, dtype=np.int64)
    try:
        deleted = np.asarray(read_npy(folder / DELETED_FILE, MAX_JSON_BYTES), dtype=np.int64)
    except (ValueError, TypeError) as error:
        raise IndexBundleError(f"{folder / DELETED_FILE}: unreadable ({str(error)[:200]})") from None
    if deleted.ndim != 1 or (len(deleted) and (deleted.min() < 0 or deleted.max() >= total)):
        raise IndexBundleError(f"{folder / DELETED_FILE}: ids must be a list in [0, {total})")
    if len(np.unique(deleted)) != len(deleted):
        raise IndexBundleError(f"{folder / DELETED_FILE}: an id is listed twice")
    return np.sort(deleted)


def _search_settings(info: dict[str, Any], where: Path) -> tuple[str | None, dict[str, int]]:
    """index.json's ``search``: the tunable parameter and its tuned value, checked before FAISS sees them.

    FAISS takes any name and any value (``efSearch: -5`` answers with one wrong hit), and a malformed
    ``search`` would surface later as a traceback, so each is refused here with one line.
    """
    search = info.get("search", {})
    if not isinstance(search, dict):
        raise IndexBundleError(f"{where}: 'search' must be an object; got {json.dumps(search)}")
    parameter, params = search.get("parameter"), search.get("params", {})
    if parameter is not None and parameter not in SEARCH_PARAMETERS:
        raise IndexBundleError(
            f"{where}: unknown search parameter {parameter!r}; known: {', '.join(SEARCH_PARAMETERS)}"
        )
    if not isinstance(params, dict):
        raise IndexBundleError(f"{where}: 'search.params' must be an object; got {json.dumps(params)}")
    for name, value in params.items():
        if name != parameter:
            expected = f"only {parameter!r}" if parameter else "none (the index is exact)"
            raise IndexBundleError(f"{where}: search parameter {name!r} is not this index's; expected {expected}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IndexBundleError(f"{where}: search parameter {name} must be an integer >= 1; got {value!r}")
    return parameter, dict(params)


def _read_faiss(path: Path, mmap: bool) -> faiss.Index:
    if not path.is_file():
        raise IndexBundleError(f"{path.parent} is not an index bundle: no {path.name}")
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR  # a merged on-disk index finds its .ivfdata beside it
    if mmap:
        flags |= faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError:
        if not mmap:
            raise IndexBundleError(f"{path}: not a readable FAISS index") from None
    try:  # some index types cannot be memory-mapped: read them into memory
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError:
        raise IndexBundleError(f"{path}: not a readable FAISS index") from None


def _reconstruct(index: faiss.Index, row: int) -> np.ndarray:
    try:
        return index.reconstruct(row)
    except RuntimeError:  # IVF indexes need their id → list map first
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        return index.reconstruct(row)


# --- the writer side (`mocoplus index`) -------------------------------------------------------------


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG)


def write_faiss_index(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index``, its failures as `OSError` in one line (FAISS raises a RuntimeError with a C++ trace).

    A full disk or a read-only folder is then the command line's one ``error:``
    line like every other storage error; the bundle folder being built is a
    temp folder, so nothing half-written is ever taken for a finished index.
    """
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as error:
        text = str(error)
        known = next((code for code in STORAGE_ERRNOS if os.strerror(code) in text), None)
        reason = os.strerror(known) if known is not None else (text.strip().splitlines() or ["write failed"])[-1]
        raise OSError(known or errno.EIO, f"cannot write {path}: {reason}") from None


def write_index_files(
    folder: Path, index: faiss.Index, embeddings: EmbeddingSet, rows: np.ndarray, deleted: np.ndarray | None = None
) -> None:
    """The index and its id map into a bundle folder being built: id i is embedding-set row ``rows[i]``;
    ``deleted``: ids of removed samples (an updated version's)."""
    write_faiss_index(index, folder / INDEX_FILE)
    write_id_map(folder, embeddings.keys_and_labels_by_part(), rows, embeddings.count)
    if deleted is not None and len(deleted):
        np.save(folder / DELETED_FILE, np.sort(np.asarray(deleted, dtype=np.int64)))


def write_index_json(folder: Path, info: dict[str, Any]) -> None:
    """``index.json`` last: the bundle folder is renamed into place after it (`artifacts.atomic.building_dir`)."""
    (folder / INDEX_JSON).write_text(json.dumps(info, indent=2) + "\n")
