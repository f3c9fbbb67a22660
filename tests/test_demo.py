"""`mocoplus demo` end to end on a small real slice, through the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.demo import DemoConfig
from pipeline.fashion_mnist import DEFAULT_DIR, ENV_VAR, find_fashion_mnist

TINY = ["--train-size", "512", "--test-size", "128", "--batch-size", "64", "--steps", "3", "--no-progress"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def needs_fashion_mnist() -> None:
    try:
        find_fashion_mnist(DEFAULT_DIR)
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.mark.slow
@pytest.mark.usefixtures("needs_fashion_mnist")
def test_demo_writes_results(runner, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    out = tmp_path / "nested" / "out"
    result = runner.invoke(app, ["demo", "--out", str(out), *TINY, "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "kNN top-1" in result.stdout
    assert "random init" in result.stdout

    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]  # no temp file left behind
    report = json.loads((out / "demo.json").read_text())
    assert report["config"]["train_size"] == 512
    assert report["config"]["seed"] == 3
    assert report["steps"] == 3
    assert [epoch["steps"] for epoch in report["epochs"]] == [3]
    assert report["final_loss"] == report["epochs"][-1]["loss"] > 0
    for key in ("top1_random_init", "top1_trained"):
        assert 0.0 <= report["knn"][key] <= 1.0
    assert report["precision"] in ("bf16", "fp32")
    assert report["elapsed_s"] > 0
    assert report["train_images_per_s"] > 0
    assert set(report["versions"]) >= {"torch", "mocoplus"}


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_out_that_is_a_file_is_one_line_error(runner, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert_one_line_error(runner.invoke(app, ["demo", "--out", str(target), *TINY]), "is not a folder")


def test_missing_dataset_says_how_to_install(runner, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), *TINY])
    assert_one_line_error(result, "apt-get install -y dataset-fashion-mnist")


def test_bad_value_is_one_line_error(runner, tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--batch-size", "12", "--steps", "1"])
    assert_one_line_error(result, "multiple of 8")


def test_config_rejects_bad_values_before_any_work():
    with pytest.raises(ValueError, match="multiple of 8"):
        DemoConfig(batch_size=100)
    with pytest.raises(ValueError, match="at least batch_size"):
        DemoConfig(train_size=100, batch_size=128)
    with pytest.raises(ValueError, match="dual_view"):
        DemoConfig(dual_view="both")


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.startswith("mocoplus ")
    demo_help = runner.invoke(app, ["demo", "--help"])
    assert demo_help.exit_code == 0
    assert "mocoplus demo --out" in demo_help.stdout


def test_cli_import_does_not_load_torch():
    code = "import sys, flows.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_console_script_help_runs(tmp_path):
    script = Path(sys.executable).with_name("mocoplus")
    if not script.exists():
        pytest.skip("the mocoplus console script is not installed in this environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "demo" in result.stdout
