"""`mocoplus ingest` and `mocoplus verify` from the command line: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import write_image
from typer.testing import CliRunner, Result

from artifacts.shard_set import MANIFEST_NAME, read_manifest
from flows.cli.main import app

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--workers", "1"]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_error(result: Result, *, code: int = 1) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr, no traceback; the line."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    [line] = error_lines(result)
    return line


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Seven images in class folders cat (3) and dog (4)."""
    root = tmp_path / "images"
    for index in range(7):
        write_image(root / ("cat" if index < 3 else "dog") / f"{index}.png", seed=index)
    return root


@pytest.fixture
def hostile(tmp_path: Path, images: Path) -> Path:
    """One good image among a fake png, an empty jpg, a truncated png and a text file."""
    root = tmp_path / "hostile"
    root.mkdir()
    good = (images / "cat" / "0.png").read_bytes()
    (root / "good.png").write_bytes(good)
    (root / "text.png").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.png").write_bytes(good[:200])
    (root / "notes.txt").write_text("hello")
    return root


# --- ingest, then verify ----------------------------------------------------------------------------


def test_ingest_then_verify(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"

    ingested = run("ingest", images, "--out", out, "--shard-size", "3", *FAST)

    assert ingested.exit_code == 0, ingested.output
    assert "7 inputs → 7 samples in 3 shards" in ingested.stdout
    assert "0 skipped" in ingested.stdout
    assert str(out / MANIFEST_NAME) in ingested.stdout
    manifest = read_manifest(out)
    assert (manifest.written, len(manifest.shards), manifest.class_names) == (7, 3, ("cat", "dog"))
    assert error_lines(ingested) == []

    verified = run("verify", out, "--no-progress")

    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("ok: 3 shards, 7 samples: hashes, counts and 7 decoded images")
    assert verified.stderr == ""

    quick = run("verify", out, "--quick", "--no-progress")

    assert quick.exit_code == 0, quick.output
    assert quick.stdout.startswith("ok: 3 shards, 7 samples: hashes and counts")


def test_hostile_folder_writes_the_good_image_and_lists_the_rest(hostile: Path, tmp_path: Path) -> None:
    result = run("ingest", hostile, "--out", tmp_path / "out", *FAST)

    assert result.exit_code == 0, result.output
    assert "skipped inputs (4; all listed in manifest.json)" in result.stdout
    for name, reason in [
        ("text.png", "not a recognised image format"),
        ("empty.jpg", "empty file (0 bytes)"),
        ("truncated.png", "truncated"),
        ("notes.txt", "not an image file name"),
    ]:
        [row] = [line for line in result.stdout.splitlines() if f" {name} " in line]
        assert reason in row
    assert "5 inputs → 1 samples in 1 shards" in result.stdout
    assert "4 skipped" in result.stdout
    manifest = read_manifest(tmp_path / "out")
    assert sorted(item.input for item in manifest.skipped) == ["empty.jpg", "notes.txt", "text.png", "truncated.png"]


def test_only_broken_files_is_an_error(hostile: Path, tmp_path: Path) -> None:
    (hostile / "good.png").unlink()

    result = run("ingest", hostile, "--out", tmp_path / "out", *FAST)

    line = assert_one_error(result)
    assert line == "error: nothing usable was written: all 4 inputs were skipped"
    assert "skipped inputs (4" in result.stdout  # the reasons are still shown


# --- bad arguments: one clear line, never a traceback -------------------------------------------


def test_missing_source_is_one_error_line(tmp_path: Path) -> None:
    result = run("ingest", tmp_path / "no-such-folder", "--out", tmp_path / "out", *FAST)

    line = assert_one_error(result)
    assert "no-such-folder" in line and "no such file or folder" in line
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_one_error_line(images: Path, tmp_path: Path) -> None:
    result = run("ingest", images, "--out", tmp_path / "out", "--format", "gif", *FAST)

    line = assert_one_error(result)
    assert "format must be one of png, jpg, webp, keep" in line and "'gif'" in line


@pytest.mark.parametrize("size", ["nonsense", "0", "-5", ""])
def test_bad_shard_bytes_is_a_usage_error(images: Path, tmp_path: Path, size: str) -> None:
    result = run("ingest", images, "--out", tmp_path / "out", "--shard-bytes", size, *FAST)

    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert f"'{size}'" in result.output
    assert "not a size such as 512M" in result.output or "must be at least one byte" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["inf", "1e400", "nan"])
def test_non_finite_shard_bytes_is_a_clear_error(images: Path, tmp_path: Path, size: str) -> None:
    result = run("ingest", images, "--out", tmp_path / "out", "--shard-bytes", size, *FAST)

    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"'{size}'" in result.output


@pytest.mark.parametrize("size", ["64k", "1M", "1MiB", "2g", "1.5K", "4096"])
def test_shard_bytes_accepts_sizes(images: Path, tmp_path: Path, size: str) -> None:
    result = run("ingest", images, "--out", tmp_path / "out", "--shard-bytes", size, *FAST)

    assert result.exit_code == 0, result.output


def test_out_that_is_a_file_is_one_error_line(images: Path, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")

    result = run("ingest", images, "--out", target, *FAST)

    line = assert_one_error(result)
    assert str(target) in line and "not a folder" in line
    assert target.read_text() == "keep me"


# --- reruns --------------------------------------------------------------------------------------


def test_rerun_is_up_to_date_and_other_input_needs_overwrite(images: Path, hostile: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("ingest", images, "--out", out, "--shard-size", "3", *FAST).exit_code == 0
    before = (out / MANIFEST_NAME).read_bytes()

    again = run("ingest", images, "--out", out, "--shard-size", "3", *FAST)

    assert again.exit_code == 0, again.output
    assert "already up to date" in again.stdout
    assert (out / MANIFEST_NAME).read_bytes() == before

    other = run("ingest", hostile, "--out", out, "--shard-size", "3", *FAST)

    line = assert_one_error(other)
    assert "--overwrite" in line
    assert (out / MANIFEST_NAME).read_bytes() == before

    replaced = run("ingest", hostile, "--out", out, "--shard-size", "3", "--overwrite", *FAST)

    assert replaced.exit_code == 0, replaced.output
    assert "5 inputs → 1 samples in 1 shards" in replaced.stdout
    manifest = read_manifest(out)
    assert manifest.written == 1
    assert sorted(path.name for path in out.glob("*.tar")) == ["shard-000000.tar"]  # the old set's shards are gone
    assert run("verify", out, "--no-progress").exit_code == 0


def test_changed_options_need_overwrite(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("ingest", images, "--out", out, *FAST).exit_code == 0

    result = run("ingest", images, "--out", out, "--shard-size", "2", *FAST)

    assert "--overwrite" in assert_one_error(result)


# --- verify on damage ----------------------------------------------------------------------------


def test_verify_corrupted_set_lists_each_problem(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("ingest", images, "--out", out, "--shard-size", "3", *FAST).exit_code == 0
    (out / "shard-000001.tar").unlink()
    last = out / "shard-000002.tar"
    last.write_bytes(last.read_bytes()[:-1024])

    result = run("verify", out, "--no-progress")

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    bad = [line for line in result.stderr.splitlines() if line.startswith("bad: ")]
    assert bad[0] == "bad: shard-000001.tar: missing"
    assert bad[1].startswith("bad: shard-000002.tar: size ")
    assert all(line.startswith(("bad: shard-000001.tar", "bad: shard-000002.tar")) for line in bad)
    [line] = error_lines(result)
    assert line.startswith("error: 3 shards, ")
    assert line.endswith(f"; {len(bad)} problems")
    assert "ok:" not in result.stdout


def test_verify_undecodable_sample_names_it(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("ingest", images, "--out", out, *FAST).exit_code == 0
    manifest_path = out / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["class_names"] = ["cat"]  # dog labels (1) are now out of range
    manifest_path.write_text(json.dumps(manifest))

    result = run("verify", out, "--quick", "--no-progress")

    assert result.exit_code == 1
    bad = [line for line in result.stderr.splitlines() if line.startswith("bad: ")]
    assert bad == [f"bad: shard-000000.tar: sample dog/{i}: label 1 is not one of the 1 classes" for i in range(3, 7)]
    assert error_lines(result) == ["error: 1 shards, 7 samples: hashes and counts; 4 problems"]


def test_verify_folder_without_manifest_is_one_error_line(tmp_path: Path) -> None:
    result = run("verify", tmp_path, "--no-progress")

    assert "ingest did not finish" in assert_one_error(result)


def test_verify_manifest_that_is_not_json_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{oops")

    line = assert_one_error(run("verify", tmp_path, "--no-progress"))

    assert MANIFEST_NAME in line and "not valid JSON" in line


# --- Fashion-MNIST, and the real process ---------------------------------------------------------


def test_fashion_mnist_test_split(fashion_mnist_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "fmnist"

    result = run("ingest", "fashion-mnist:test", "--out", out, "--shard-size", "64", *FAST)

    assert result.exit_code == 0, result.output
    assert "200 inputs → 200 samples in 4 shards" in result.stdout
    manifest = read_manifest(out)
    assert manifest.written == 200
    assert manifest.class_names is not None and len(manifest.class_names) == 10
    assert [shard.count for shard in manifest.shards] == [64, 64, 64, 8]
    assert run("verify", out, "--no-progress").exit_code == 0


def test_real_process_exit_codes(images: Path, tmp_path: Path) -> None:
    """The module run as a program: 0 on success, 1 and one stderr line on an expected failure."""
    command = [sys.executable, "-m", "flows.cli"]
    out = tmp_path / "out"

    good = subprocess.run(
        [*command, "ingest", str(images), "--out", str(out), *FAST], cwd=REPO, capture_output=True, text=True
    )
    bad = subprocess.run(
        [*command, "verify", str(tmp_path / "missing"), "--no-progress"], cwd=REPO, capture_output=True, text=True
    )

    assert good.returncode == 0, good.stderr
    assert "7 inputs → 7 samples in 1 shards" in good.stdout
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr
