"""The examples of the README and the docs are tests: every ``mocoplus`` and ``curl`` line runs as written.

The README and the pages of `GUIDE` are one guide: its examples are collected
from their ``bash`` blocks, page after page in `GUIDE` order and in document
order within a page, and run as one sequence in one sandbox folder, so each
page continues from the files the pages before it made (the README's tour
trains, exports, embeds and indexes once; the pages show the variations) and
no costly command runs twice because an example moved from one page to
another. The sandbox's paths are small fixtures (a real Fashion-MNIST slice
behind ``fashion-mnist:*``, generated photos under ``~/photos``, a synthetic
embedding set for ``emb/web``, query images...), and the examples run with
their documented options and nothing added: no ``--no-progress``. The
sequence runs once; each command alternates between output to a pipe and a
pseudo-terminal (`mode_of`: the first ``mocoplus train`` of the guide piped,
the second under a terminal, the third piped...), so the plain progress lines
and the live progress bar are both exercised at the commands' defaults by
every command the guide shows more than once, at half the cost of running the
whole sequence in both modes. ``mocoplus serve`` is started like any other
line, waited for until ready, and the service's ``curl`` examples run against
it — on a free port instead of the documented 8000 (`as_sandbox_command`), so
two of these tests, or Prefect's temporary API server (which picks from
8000–8999) in a test beside them under ``make test``'s two workers, never
collide.

Only the examples in `SKIPPED` are not run, each for the reason given there;
a new example is run by default, and one whose absolute paths have no fixture
fails here until `ABSOLUTE_PATHS` maps them. A page of ``docs/`` with examples
is either in `GUIDE` (after the pages whose files its examples use) or has a
test of its own (`OWN_TESTS`). Failures name the page and line of the example.
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
from processes import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GUIDE = (  # run as one sequence, in this order: a page's examples may use the files of the pages before it
    "README.md",
    "docs/command-line.md",
    "docs/data.md",
    "docs/training.md",
    "docs/export.md",
    "docs/search.md",
    "docs/service.md",
    "docs/flows.md",
    "docs/results.md",
)
OWN_TESTS = {"docs/own-images.md": "test_the_own_images_page_runs_as_written"}  # pages run from a sandbox of their own
RUNNABLE = ("mocoplus ", "curl ", "torchrun ")
SKIPPED = {
    "mocoplus demo": "runs for its whole --minutes budget (10 minutes); tests/test_demo.py runs it with --minutes 1",
    "mocoplus flows serve": "serves Prefect deployments until stopped; tests/test_deploy.py runs it against a real "
    "`prefect server start`",
    "torchrun": "GPU-sized presets and two machines; tests/test_train.py trains under torchrun with 2 gloo processes",
}
ABSOLUTE_PATHS = {"/shared/": "shared/"}  # absolute paths in examples → sandbox paths
SERVICE_PORT = 8000  # the port the pages show; the sandbox serves on a free one
COMMAND_SECONDS = 600


@dataclass(frozen=True)
class Example:
    source: str  # the page, relative to the repository: "README.md", "docs/data.md"
    line: int
    command: str

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"

    @property
    def skip_reason(self) -> str | None:
        return next((reason for prefix, reason in SKIPPED.items() if self.command.startswith(prefix)), None)

    @property
    def is_server(self) -> bool:
        return self.command.startswith("mocoplus serve ")


def readme_examples(text: str, source: str = "README.md") -> list[Example]:
    """Runnable lines of the ``bash`` blocks of one page (continuations joined, comments and a trailing ``&``
    dropped)."""
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
            examples.append(Example(source, start, " ".join(command.split())))
    return examples


def guide_examples() -> list[Example]:
    """The runnable lines of the README and the pages of `GUIDE`, as one sequence."""
    return [example for page in GUIDE for example in readme_examples((ROOT / page).read_text(), page)]


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
    examples = readme_examples(text, "docs/x.md")
    assert [e.command for e in examples] == [
        "mocoplus verify shards/x",
        "curl -s -H 'a: b' http://h/p",
        "mocoplus flows serve --cron '0 3 * * *'",
    ]
    assert [e.line for e in examples] == [2, 3, 5]
    assert [e.where for e in examples][:1] == ["docs/x.md line 2"]


def test_every_absolute_path_of_an_example_has_a_fixture():
    for example in guide_examples():
        if example.skip_reason:
            continue
        for word in shlex.split(example.command):
            path = word.split("=", 1)[-1].split("@", 1)[-1]
            if path.startswith("/"):
                assert any(path.startswith(prefix) for prefix in ABSOLUTE_PATHS), (
                    f"{example.where}: {path} needs an entry in ABSOLUTE_PATHS"
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


def as_sandbox_command(command: str, port: int) -> str:
    """The example with the sandbox's paths and its service on ``port`` (``mocoplus serve`` given ``--port``
    where the page leaves the default, the ``curl`` lines pointed at it)."""
    for absolute, relative in ABSOLUTE_PATHS.items():
        command = command.replace(absolute, relative)
    command = command.replace(f"127.0.0.1:{SERVICE_PORT}", f"127.0.0.1:{port}")
    if command.startswith("mocoplus serve ") and "--port" not in command.split():
        command += f" --port {port}"
    return command


def test_the_sandbox_serves_and_calls_the_service_on_its_own_port():
    assert as_sandbox_command("mocoplus serve --model models/fmnist --index indexes/fmnist", 41234) == (
        "mocoplus serve --model models/fmnist --index indexes/fmnist --port 41234"
    )
    assert (
        as_sandbox_command("curl -s http://127.0.0.1:8000/healthz", 41234) == "curl -s http://127.0.0.1:41234/healthz"
    )
    assert as_sandbox_command("mocoplus embed models/fmnist --out /shared/emb", 41234) == (
        "mocoplus embed models/fmnist --out shared/emb"
    )


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


def wait_ready(server: subprocess.Popen, port: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mocoplus serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
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
    examples = [Example("README.md", line, command) for line, command in enumerate(
        ["mocoplus train a", "mocoplus train b", "curl x", "mocoplus train c", "mocoplus index d", "curl y"]
    )]  # fmt: skip
    seen: dict[str, int] = {}
    assert [mode_of(example, seen) for example in examples] == [
        "piped", "terminal", "piped", "piped", "piped", "terminal"
    ]  # fmt: skip


def check_output(example: Example, code: int, output: str, mode: str, server_log: str = "") -> None:
    where = f"{example.where} ({mode}): {example.command}\n{output[-3000:]}"
    if server_log:
        where += f"\nthe server's log:\n{server_log[-3000:]}"
    assert code == 0, f"exit {code}: {where}"
    assert "Traceback" not in output, where
    if example.command.startswith("curl "):
        assert '"error"' not in output and '"detail"' not in output, where


def run_examples(examples: list[Example], root: Path, env: dict[str, str]) -> tuple[list[Example], dict[str, set]]:
    """Run ``examples`` in order in ``root`` (servers started and left running until the end, their output in
    ``root/server-N.log``; skipped ones skipped); returns the examples run and the modes each command ran in."""
    runners = {"piped": run_piped, "terminal": run_in_terminal}
    servers: dict[str, subprocess.Popen] = {}
    port = free_port()
    ran, seen, modes = [], {}, {}
    try:
        for example in examples:
            if example.skip_reason:
                continue
            prepare(example, root)
            command = as_sandbox_command(example.command, port)
            if example.is_server:
                if command not in servers:
                    with open(root / f"server-{len(servers)}.log", "wb") as log:
                        servers[command] = subprocess.Popen(
                            ["bash", "-c", f"exec {command}"], cwd=root, env=env, stdout=log, stderr=log
                        )
                    wait_ready(servers[command], port)
                ran.append(example)
                continue
            mode = mode_of(example, seen)
            code, output = runners[mode](command, root, env)
            logs = sorted(root.glob("server-*.log")) if example.command.startswith("curl ") else []
            check_output(example, code, output, mode, "".join(log.read_text(errors="replace") for log in logs))
            ran.append(example)
            modes.setdefault(example.command.split()[1], set()).add(mode)
    finally:
        for server in servers.values():
            stop(server)
    return ran, modes


@pytest.mark.slow
def test_every_example_of_the_readme_and_the_guide_runs_as_written(fashion_mnist_slice, tmp_path):
    root = tmp_path / "sandbox"
    env = make_sandbox(root, fashion_mnist_slice)
    examples = guide_examples()
    ran, modes = run_examples(examples, root, env)
    skipped = [example for example in examples if example not in ran]
    commands = {example.command.split()[1] for example in ran if example.command.startswith("mocoplus ")}
    assert {"ingest", "verify", "train", "evaluate", "export", "embed", "index", "search", "serve"} <= commands
    assert sum(example.command.startswith("curl ") for example in ran) >= 5
    assert all(example.skip_reason for example in skipped)
    stages = ("ingest", "verify", "train", "evaluate", "export", "embed", "index", "search")
    assert all(modes[stage] == set(MODES) for stage in stages), modes  # each stage under a pipe and a terminal


def test_every_docs_page_with_examples_is_run_here():
    """A page of docs/ with bash examples is in the guide or has its own test below: none is left unrun."""
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md") if readme_examples(page.read_text())}
    assert pages <= set(GUIDE) | set(OWN_TESTS), sorted(pages - set(GUIDE) - set(OWN_TESTS))
    assert all((ROOT / page).is_file() for page in GUIDE) and not set(GUIDE) & set(OWN_TESTS)
    assert all(name in globals() for name in OWN_TESTS.values())


def test_the_guide_trains_and_exports_each_model_once():
    """The costly examples are not repeated across the guide: a page continues from the README's run and model
    (``mocoplus train --resume``, other ``--out`` folders) instead of showing the same command again."""
    commands = [e.command for e in guide_examples() if e.command.startswith(("mocoplus train ", "mocoplus export "))]
    assert len(commands) == len(set(commands)), sorted(c for c in commands if commands.count(c) > 1)


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
    examples = readme_examples((DOCS / "own-images.md").read_text(), "docs/own-images.md")
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
        "--set", "train.time_budget=0",  # exactly 400 steps: on a busy machine the preset's budget would re-plan fewer
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
