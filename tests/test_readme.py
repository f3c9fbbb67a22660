"""The README's command-line examples are tests: every ``mocoplus`` and ``curl`` line runs as written.

The examples are collected from the README's ``bash`` blocks in document
order and run in a sandbox folder whose paths are small fixtures (a real
Fashion-MNIST slice behind ``fashion-mnist:*``, generated photos under
``~/photos``, a synthetic embedding set for ``emb/web``, query images...),
with their documented options and nothing added: no ``--no-progress``. The
sequence runs once; each command alternates between output to a pipe and a
pseudo-terminal (`mode_of`: the first ``mocoplus train`` piped, the second
under a terminal, the third piped...), so the plain progress lines and the live
progress bar are both exercised at the commands' defaults by every command the
README shows more than once, at half the cost of running the whole sequence
in both modes. ``mocoplus serve`` is started like
any other line, waited for until ready, and the service's ``curl`` examples run
against it.

Only the examples in `SKIPPED` are not run, each for the reason given there;
a new README example is run by default, and one whose absolute paths have no
fixture fails here until `ABSOLUTE_PATHS` maps them.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from datasets import write_fashion_mnist_slice, write_image
from processes import stop

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = ("mocoplus ", "curl ", "torchrun ")
SKIPPED = {
    "mocoplus demo": "runs for its whole --minutes budget (10 minutes); tests/test_demo.py runs it with --minutes 1",
    "mocoplus flows serve": "serves Prefect deployments until stopped; tests/test_deploy.py runs it against a real "
    "`prefect server start`",
    "torchrun": "GPU-sized presets and two machines; tests/test_train.py trains under torchrun with 2 gloo processes",
}
ABSOLUTE_PATHS = {"/shared/": "shared/"}  # absolute paths in examples → sandbox paths
SERVICE = "http://127.0.0.1:8000"
COMMAND_SECONDS = 600


@dataclass(frozen=True)
class Example:
    line: int
    command: str

    @property
    def skip_reason(self) -> str | None:
        return next((reason for prefix, reason in SKIPPED.items() if self.command.startswith(prefix)), None)

    @property
    def is_server(self) -> bool:
        return self.command.startswith("mocoplus serve ")


def readme_examples(text: str) -> list[Example]:
    """Runnable lines of the ``bash`` blocks (continuations joined, comments and a trailing ``&`` dropped)."""
    examples, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        pending += line.rstrip().removesuffix("\\") + (" " if line.rstrip().endswith("\\") else "")
        if line.rstrip().endswith("\\"):
            continue
        command, pending = _strip_comment(pending).strip().removesuffix("&").strip(), ""
        if command.startswith(RUNNABLE):
            examples.append(Example(start, " ".join(command.split())))
    return examples


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` that is outside quotes (a ``#`` inside quotes, e.g. cron, stays)."""
    quote = None
    for index, char in enumerate(line):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def test_the_collector_reads_blocks_continuations_and_comments():
    text = (
        "```bash\nmocoplus verify shards/x   # a comment\ncurl -s -H 'a: b' \\\n     http://h/p\n"
        "mocoplus flows serve --cron '0 3 * * *' &\nexport A=1\n```\n```text\nmocoplus not-bash\n```\n"
    )
    examples = readme_examples(text)
    assert [e.command for e in examples] == [
        "mocoplus verify shards/x",
        "curl -s -H 'a: b' http://h/p",
        "mocoplus flows serve --cron '0 3 * * *'",
    ]
    assert [e.line for e in examples] == [2, 3, 5]


def test_every_absolute_path_of_an_example_has_a_fixture():
    for example in readme_examples(README.read_text()):
        if example.skip_reason:
            continue
        for word in shlex.split(example.command):
            path = word.split("=", 1)[-1].split("@", 1)[-1]
            if path.startswith("/"):
                assert any(path.startswith(prefix) for prefix in ABSOLUTE_PATHS), (
                    f"README line {example.line}: {path} needs an entry in ABSOLUTE_PATHS"
                )


# --- the sandbox ---------------------------------------------------------------------------------


README_SLICE = {"train": 320, "test": 100}  # images: every example runs on them, the costly ones (train,
# evaluate, export's whitening fit, embed) in time proportional to them


def make_sandbox(root: Path, fashion_mnist_slice: Path) -> dict[str, str]:
    """The files the examples name, and the environment they run in."""
    from PIL import Image

    from artifacts.embedding_set import write_embedding_set
    from pipeline.data.fashion_mnist import ENV_VAR, load_split

    root.mkdir(parents=True)
    fashion_mnist_slice = write_fashion_mnist_slice(fashion_mnist_slice, root / "fashion-mnist", **README_SLICE)
    home = root / "home"
    for index in range(6):  # ~/photos: two labelled folders of photo-sized JPEGs
        write_image(home / "photos" / ("cats", "dogs")[index % 2] / f"img{index}.jpg", size=(96, 72), seed=index)
    images = load_split(fashion_mnist_slice, "test").images
    for name, index in (("shirt.png", 0), ("boot.png", 1), ("boot.jpg", 1)):
        Image.fromarray(images[index]).save(root / name)
    (root / "listed").mkdir()
    lines = ["path,label"]
    for index in range(4):
        Image.fromarray(images[10 + index]).save(root / "listed" / f"{index}.png")
        lines.append(f"listed/{index}.png,{'ab'[index % 2]}")
    (root / "images.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    web = rng.normal(size=(3000, 32)).astype(np.float32)
    write_embedding_set(root / "emb" / "web", web / np.linalg.norm(web, axis=1, keepdims=True), bundle_hash="web")
    env = {
        **os.environ,
        ENV_VAR: str(fashion_mnist_slice),
        "HOME": str(home),
        "PREFECT_HOME": str(root / "prefect"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MOCOPLUS_PROGRESS_SECONDS": "2",
        "COLUMNS": "120",
        "TERM": "xterm-256color",
    }
    env.pop("NO_COLOR", None)
    return env


def prepare(example: Example, root: Path) -> None:
    """Inputs that only exist once earlier examples have run (shards/big, queries.npy)."""
    if "shards/big" in example.command and not (root / "shards" / "big").exists():
        subprocess.run(["cp", "-r", str(root / "shards" / "fmnist-train"), str(root / "shards" / "big")], check=True)
    if "queries.npy" in example.command and not (root / "queries.npy").exists():
        vectors = np.load(next((root / "emb" / "fmnist-train").glob("part-*.npy")))
        np.save(root / "queries.npy", vectors[:3])
    if example.command.startswith("mocoplus ingest ~/photos") and "--update" in example.command:
        photos = root / "home" / "photos"  # "day 2": a new photo, a removed one, a re-shot one
        write_image(photos / "cats" / "img-new.jpg", size=(96, 72), seed=100)
        (photos / "dogs" / "img1.jpg").unlink(missing_ok=True)
        write_image(photos / "cats" / "img2.jpg", size=(96, 72), seed=101)


def as_sandbox_command(command: str) -> str:
    for absolute, relative in ABSOLUTE_PATHS.items():
        command = command.replace(absolute, relative)
    return command


def run_piped(command: str, root: Path, env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=COMMAND_SECONDS
    )
    return done.returncode, done.stdout + done.stderr


def run_in_terminal(command: str, root: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run under a pseudo-terminal (stdin, stdout and stderr all a tty), as in an interactive shell."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        ["bash", "-c", command], cwd=root, env=env, stdin=follower, stdout=follower, stderr=follower, close_fds=True
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + COMMAND_SECONDS
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal closed, the command is done
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    try:
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        stop(process)
        code = -1
    return code, b"".join(chunks).decode(errors="replace")


def wait_ready(server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mocoplus serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{SERVICE}/readyz", timeout=2) as answer:
                if json.load(answer).get("ready"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("mocoplus serve did not become ready")


MODES = ("piped", "terminal")


def mode_of(example: Example, seen: dict[str, int]) -> str:
    """The mode an example runs in: its command's (``mocoplus train``, ``curl``) earlier examples alternate them."""
    command = " ".join(example.command.split()[:2]) if example.command.startswith("mocoplus ") else "curl"
    count = seen.get(command, 0)
    seen[command] = count + 1
    return MODES[count % len(MODES)]


def test_each_command_alternates_between_a_pipe_and_a_terminal():
    examples = [Example(line, command) for line, command in enumerate(
        ["mocoplus train a", "mocoplus train b", "curl x", "mocoplus train c", "mocoplus index d", "curl y"]
    )]  # fmt: skip
    seen: dict[str, int] = {}
    assert [mode_of(example, seen) for example in examples] == [
        "piped", "terminal", "piped", "piped", "piped", "terminal"
    ]  # fmt: skip


def check_output(example: Example, code: int, output: str, mode: str) -> None:
    where = f"README line {example.line} ({mode}): {example.command}\n{output[-3000:]}"
    assert code == 0, f"exit {code}: {where}"
    assert "Traceback" not in output, where
    if example.command.startswith("curl "):
        assert '"error"' not in output and '"detail"' not in output, where


def run_examples(examples: list[Example], root: Path, env: dict[str, str]) -> tuple[list[Example], dict[str, set]]:
    """Run ``examples`` in order in ``root`` (servers started and left running until the end, skipped ones
    skipped); returns the examples run and the modes each command ran in."""
    runners = {"piped": run_piped, "terminal": run_in_terminal}
    servers: dict[str, subprocess.Popen] = {}
    ran, seen, modes = [], {}, {}
    try:
        for example in examples:
            if example.skip_reason:
                continue
            prepare(example, root)
            command = as_sandbox_command(example.command)
            if example.is_server:
                if command not in servers:
                    servers[command] = subprocess.Popen(
                        ["bash", "-c", f"exec {command}"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    wait_ready(servers[command])
                ran.append(example)
                continue
            mode = mode_of(example, seen)
            code, output = runners[mode](command, root, env)
            check_output(example, code, output, mode)
            ran.append(example)
            modes.setdefault(example.command.split()[1], set()).add(mode)
    finally:
        for server in servers.values():
            stop(server)
    return ran, modes


@pytest.mark.slow
def test_every_readme_example_runs_as_written(fashion_mnist_slice, tmp_path):
    root = tmp_path / "sandbox"
    env = make_sandbox(root, fashion_mnist_slice)
    examples = readme_examples(README.read_text())
    ran, modes = run_examples(examples, root, env)
    skipped = [example for example in examples if example not in ran]
    commands = {example.command.split()[1] for example in ran if example.command.startswith("mocoplus ")}
    assert {"ingest", "verify", "train", "evaluate", "export", "embed", "index", "search", "serve"} <= commands
    assert sum(example.command.startswith("curl ") for example in ran) >= 5
    assert all(example.skip_reason for example in skipped)
    stages = ("ingest", "verify", "train", "evaluate", "export", "embed", "index", "search")
    assert all(modes[stage] == set(MODES) for stage in stages), modes  # each stage under a pipe and a terminal


DOCS = README.parent / "docs"


def test_every_docs_page_with_examples_is_run_here():
    """A page of docs/ with bash examples needs its own test below: none is left unrun."""
    pages = {page.name for page in DOCS.glob("*.md") if readme_examples(page.read_text())}
    assert pages == {"own-images.md"}


@pytest.mark.slow
def test_the_own_images_page_runs_as_written(tmp_path):
    """docs/own-images.md from an empty home: sample photos made, ingested, trained, scored without labels,
    exported, embedded, indexed, searched and served."""
    root = tmp_path / "sandbox"
    (root / "home").mkdir(parents=True)
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "PREFECT_HOME": str(root / "prefect"),
        "MOCOPLUS_CACHE": str(root / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MOCOPLUS_PROGRESS_SECONDS": "2",
        "COLUMNS": "120",
        "TERM": "xterm-256color",
    }
    examples = readme_examples((DOCS / "own-images.md").read_text())
    ran, _modes = run_examples(examples, root, env)
    assert ran == examples
    commands = [example.command.split()[1] for example in ran if example.command.startswith("mocoplus ")]
    assert commands.count("evaluate") == 2 and "serve" in commands and "search" in commands
    assert (root / "runs" / "pictures" / "train.json").is_file()


@pytest.mark.slow
def test_piped_training_prints_progress_lines_spread_over_the_run(fashion_shards, tmp_path):
    """With stderr a pipe, a long training run reports step, loss and images/s as it goes, not only at the end."""
    env = {**os.environ, "MOCOPLUS_PROGRESS_SECONDS": "1"}
    command = [
        sys.executable, "-m", "flows.cli", "train", "--data", str(fashion_shards), "--out", str(tmp_path / "run"),
        "--config", "fashion-mnist-cpu", "--set", "train.max_steps=400", "--set", "model.width=0.0625",
        "--set", "train.global_batch=16", "--set", "model.queue_size=256", "--set", "model.num_negatives=64",
        "--set", "train.checkpoint_every=0", "--set", "train.epochs=100",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    arrivals = []
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("pretraining:"):
            arrivals.append((time.monotonic(), line.strip()))
    assert process.wait(timeout=600) == 0
    progress = [line for _, line in arrivals]
    assert len(progress) >= 3, progress
    steps = [int(re.match(r"pretraining: ([\d,]+)/400", line).group(1).replace(",", "")) for line in progress]
    assert steps == sorted(steps) and steps[0] < 400 and steps[-1] == 400
    assert all(re.search(r"loss \d+\.\d+ [\d,]+ img/s", line) for line in progress[:-1]), progress
    assert re.search(r"steps/s", progress[0]) and "ETA" in progress[0]
    assert arrivals[-1][0] - arrivals[0][0] > 1.0  # lines arrived while it ran, not all at the end
