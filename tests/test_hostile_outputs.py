"""Hostile input, third round, on the CLI side: what a command reads back from its own --out folder,
full and read-only disks, configs nested thousands deep, query vectors whose scores overflow.

Each case asserts what a user sees (one ``error:`` line, or a per-query error and valid JSON) and that
nothing hangs, reads without bound, or is left half-written to look finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from artifacts.embedding_set import write_embedding_set
from flows.cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(result) -> str:
    """The single ``error:`` line of a failed command (exit 1), with no traceback anywhere."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def unit_vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# --- what a command reads back from its --out folder: special files never block or stream --------------------------


@pytest.mark.parametrize("special", ["fifo", "dev-zero"])
def test_a_special_index_json_in_the_out_folder_is_one_error_line(tmp_path, special):
    emb = write_embedding_set(tmp_path / "emb", unit_vectors(200, 8), bundle_hash="a" * 64)
    out = tmp_path / "index"
    out.mkdir()
    if special == "fifo":
        os.mkfifo(out / "index.json")
    else:
        (out / "index.json").symlink_to("/dev/zero")
    line = one_error_line(CliRunner().invoke(app, ["index", str(emb), "--out", str(out)]))
    assert "is not an empty folder" in line


# --- storage errors: one line, nothing half-written that later looks done ---------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only, as CI runs): a real full or read-only disk, not a mock."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize(("options", "reason"), [(("size=1m",), "No space left on device"),
                                                  (("size=1m", "ro"), "is not writable")])  # fmt: skip
def test_index_on_a_full_or_read_only_disk_is_one_error_line_and_leaves_nothing_finished(tmp_path, options, reason):
    emb = write_embedding_set(tmp_path / "emb", unit_vectors(4000, 128), bundle_hash="a" * 64)  # 2 MB: over 1 MB
    with tmpfs(tmp_path / "disk", *options) as disk:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "index", str(emb), "--out", str(disk / "index"), "--kind", "flat"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and reason in errors[0] and "Traceback" not in result.stderr, result.stderr
        assert not list(disk.rglob("index.json")) and not (disk / "index").exists()


# --- configs nested thousands deep: one line, never a RecursionError traceback -------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.toml", "[train]\nepochs = " + "[" * 5000 + "]" * 5000 + "\n"),
        ("tables.toml", "[train]\nepochs = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n"),
        ("deep.json", '{"train": {"epochs": ' + "[" * 100_000 + "]" * 100_000 + "}}"),
    ],
)
def test_a_config_file_nested_thousands_deep_is_one_error_line(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(tmp_path / name)]
    line = one_error_line(CliRunner().invoke(app, args))
    assert "nested" in line and "levels deep" in line


def test_an_override_of_nested_lists_is_one_error_line(tmp_path):
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "fashion-mnist-cpu",
            "--set", "train.epochs=" + "[" * 5000]  # fmt: skip
    line = one_error_line(CliRunner().invoke(app, args))
    assert "override train.epochs" in line and "nested 5000 levels deep" in line


def test_brackets_inside_strings_and_comments_are_not_nesting():
    from pipeline.train.run_config import _bracket_depth

    assert _bracket_depth("a = \"[[[[\" # [[[[\nb = [[1], {c = '[['}]") == 2
    assert _bracket_depth('x = """ [[[ \\""" [[ """') == 0
    assert _bracket_depth('{"a": "\\"[[", "b": [[]]}') == 3


# --- query vectors whose scores overflow: refused one by one, JSON always valid -------------------------------------


def strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON: {line}")

    return json.loads(line, parse_constant=refuse)


def test_search_refuses_vectors_whose_scores_would_overflow_and_prints_valid_json(tmp_path, bundle):
    from artifacts.model_bundle import ModelBundle
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig

    dim = ModelBundle(bundle).dim
    emb = write_embedding_set(tmp_path / "emb", unit_vectors(300, dim), bundle_hash=ModelBundle(bundle).hash)
    build_index(emb, tmp_path / "index", IndexConfig(kind="flat", queries=20), progress=False)
    overflowing, long = np.full(dim, 1e38, np.float32), np.full(dim, 3e18, np.float32)
    queries = np.stack([overflowing, unit_vectors(1, dim, seed=1)[0], long])
    np.save(tmp_path / "queries.npy", queries)
    args = ["search", str(tmp_path / "index"), "--model", str(bundle), str(tmp_path / "queries.npy"), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    answers = [strict_json(line) for line in result.stdout.splitlines()]
    assert [("error" in answer) for answer in answers] == [True, False, True]
    assert "scores would overflow" in answers[0]["error"] and "norm" in answers[2]["error"]
    assert all(np.isfinite(hit["score"]) for hit in answers[1]["results"])


def test_search_resolves_embeds_and_searches_in_batches_with_the_same_answers(tmp_path, bundle):
    from artifacts.index_bundle import IndexBundle
    from artifacts.model_bundle import ModelBundle
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig
    from pipeline.search import search_queries

    model = ModelBundle(bundle)
    emb = write_embedding_set(tmp_path / "emb", unit_vectors(300, model.dim), bundle_hash=model.hash)
    build_index(emb, tmp_path / "index", IndexConfig(kind="flat", queries=20), progress=False)
    index = IndexBundle(tmp_path / "index")
    np.save(tmp_path / "queries.npy", unit_vectors(7, model.dim, seed=2))
    from PIL import Image

    specs = []
    for number in range(10):
        Image.fromarray(np.full((28, 28), number * 20, np.uint8)).save(tmp_path / f"{number}.png")
        specs.append(str(tmp_path / f"{number}.png"))
    specs[3:3] = [str(tmp_path / "queries.npy"), "key:v5", "key:nope"]
    sizes: list[int] = []

    def embed(images: np.ndarray) -> np.ndarray:
        sizes.append(len(images))
        return model.embed(images)

    batched = list(search_queries(specs, index, embed, model.size, 5, batch=4))
    whole = list(search_queries(specs, index, model.embed, model.size, 5, batch=len(specs)))
    assert max(sizes) <= 4 and sum(sizes) == 10  # never more images at once than the batch
    assert [query.name for query, _ in batched] == [query.name for query, _ in whole]
    assert len(batched) == 10 + 7 + 2
    for (_, hits), (_, expected) in zip(batched, whole, strict=True):
        assert (hits is None) == (expected is None)
        if hits is not None:
            assert [hit.key for hit in hits] == [hit.key for hit in expected]


def test_training_on_a_full_disk_is_one_error_line_and_no_checkpoint_looks_finished(tmp_path, fashion_shards):
    from test_train import TINY

    overrides = (*TINY, "train.max_steps=2", "train.checkpoint_every=1")
    sets = [item for override in overrides for item in ("--set", override)]
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "train", "--data", str(fashion_shards), "--out", str(disk / "run"),
             "--config", "fashion-mnist-cpu", *sets, "--no-progress"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot write" in errors[0] and "bytes free" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not list(disk.rglob("*.pt")) and not (disk / "run" / "checkpoints" / "last.json").exists()
