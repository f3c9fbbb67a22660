"""The index bundle's id map: memory-mapped keys, labels and rows, looked up without loading them whole."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from artifacts.embedding_set import write_embedding_set
from artifacts.id_map import KEYS_FILE, OFFSETS_FILE, IdMap, IdMapError, write_id_map
from artifacts.index_bundle import INDEX_JSON, IndexBundle, IndexBundleError
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig
from pipeline.index.update import update_index

PARTS = [  # two embedding-set parts: keys and labels in row order
    (["a.png", "été/ü.png", "", "dup"], [3, None, 0, 1]),
    (["dup", "z" * 300], [2, -1]),
]


def test_keys_labels_and_rows_come_back_in_id_order(tmp_path):
    rows = np.array([5, 0, 3, 1, 4], dtype=np.int64)  # row 2 ("") left out, ids in a shuffled order
    write_id_map(tmp_path, PARTS, rows, row_count=6)
    ids = IdMap(tmp_path)
    flat_keys = [key for keys, _ in PARTS for key in keys]
    flat_labels = [-1 if label is None else label for _, labels in PARTS for label in labels]
    assert list(ids.keys) == [flat_keys[row] for row in rows]
    assert ids.keys[-1] == "dup" and ids.keys[1:3] == ["a.png", "dup"]
    assert ids.labels.tolist() == [flat_labels[row] for row in rows]
    assert ids.rows.tolist() == rows.tolist()
    assert ids.ids_of("dup") == [2, 4]  # a replaced sample: both ids, the bundle keeps the live one
    assert ids.ids_of("été/ü.png") == [3] and ids.ids_of("z" * 300) == [0]
    assert ids.ids_of("missing") == [] and ids.ids_of("") == []
    with pytest.raises(IndexError):
        ids.keys[5]
    assert not list(tmp_path.glob(".*"))  # the writer's spool is gone


def test_a_map_of_hundreds_of_thousands_of_keys_opens_and_answers_without_loading_them(tmp_path):
    count = 300_000
    keys = [f"shard-{row // 1000:06d}/photo-{row:09d}.jpg" for row in range(count)]
    write_id_map(tmp_path, [(keys, [row % 10 for row in range(count)])], np.arange(count)[::-1].copy(), count)
    size = (tmp_path / KEYS_FILE).stat().st_size
    assert size > 9_000_000
    tracemalloc.start()
    try:
        ids = IdMap(tmp_path)
        found = [ids.ids_of(keys[row]) for row in range(0, count, 3001)]
        named = [ids.keys[position] for position in range(0, count, 3001)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == [[count - 1 - row] for row in range(0, count, 3001)]
    assert named == [keys[count - 1 - position] for position in range(0, count, 3001)]
    assert peak < 1_000_000, peak  # the keys alone are 9 MB; as Python strings (keys.json) over 25 MB


def test_a_damaged_map_is_refused_in_one_line(tmp_path):
    write_id_map(tmp_path, PARTS, np.arange(6), row_count=6)
    offsets = np.load(tmp_path / OFFSETS_FILE)
    np.save(tmp_path / OFFSETS_FILE, offsets[:-1])
    with pytest.raises(IdMapError, match="do not agree: the bundle is damaged"):
        IdMap(tmp_path)
    np.save(tmp_path / OFFSETS_FILE, offsets)
    (tmp_path / KEYS_FILE).write_bytes((tmp_path / KEYS_FILE).read_bytes()[:-1])
    with pytest.raises(IdMapError, match=r"keys\.bin holds"):
        IdMap(tmp_path)
    (tmp_path / KEYS_FILE).write_bytes(b"\xff" * int(offsets[-1]))
    with pytest.raises(IdMapError, match="not UTF-8"):
        IdMap(tmp_path).keys[0]
    (tmp_path / "short").mkdir()
    with pytest.raises(ValueError, match="parts hold 6 keys"):
        write_id_map(tmp_path / "short", PARTS, np.arange(3), row_count=7)
    assert not list((tmp_path / "short").iterdir())


def test_a_format_1_bundle_is_refused_with_how_to_rebuild(tmp_path):
    emb = write_embedding_set(tmp_path / "emb", np.eye(20, 8, dtype=np.float32), bundle_hash="h")
    build_index(emb, tmp_path / "index", IndexConfig(kind="flat"), progress=False)
    info_path = tmp_path / "index" / "current" / INDEX_JSON
    info = json.loads(info_path.read_text())
    bundle = IndexBundle(tmp_path / "index")
    assert bundle.keys[bundle.id_of("v7")] == "v7" and bundle.rows[bundle.id_of("v7")] == 7
    info_path.write_text(json.dumps({**info, "format": 1}))
    with pytest.raises(IndexBundleError, match=r"format-1 index bundle .* rebuild it with `mocoplus index"):
        IndexBundle(tmp_path / "index")
    with pytest.raises(IndexBundleError, match=r"format-1 index bundle"):  # not rebuilt with default options
        update_index(emb, tmp_path / "index", progress=False)
    assert json.loads(info_path.read_text())["format"] == 1 and len(list((tmp_path / "index").iterdir())) == 2
