"""The deployments against a real Prefect server on 127.0.0.1 (its own PREFECT_HOME, stopped by pid)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from processes import free_port, stop


def poll(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def prefect_server(tmp_path):
    """``prefect server start`` on a free port; yields (API URL, environment for clients)."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    prefect = Path(sys.executable).parent / "prefect"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        poll(lambda: httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=5).status_code == 200, 120, "the server")
        yield env["PREFECT_API_URL"], env
    finally:
        stop(server)
        log.close()


@pytest.mark.slow
def test_cron_deployment_is_scheduled_and_an_on_demand_run_completes(
    prefect_server, bundle, fashion_test_shards, tmp_path
):
    api, env = prefect_server
    served = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "flows", "serve", "--out", str(tmp_path / "out"), "--cron", "0 3 * * *"],
        env=env, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = httpx.Client(base_url=api, timeout=30)

        def deployment(name: str) -> dict | None:
            answer = client.get(f"/deployments/name/{name}")
            return answer.json() if answer.status_code == 200 else None

        pretrain = poll(lambda: deployment("pretrain/pretrain"), 120, "the pretrain deployment")
        assert [entry["schedule"]["cron"] for entry in pretrain["schedules"]] == ["0 3 * * *"]
        index = poll(lambda: deployment("index-corpus/index-corpus"), 60, "the index-corpus deployment")
        assert poll(lambda: deployment("end-to-end/end-to-end"), 60, "the end-to-end deployment")
        refresh = poll(lambda: deployment("refresh-corpus/refresh-corpus"), 60, "the refresh-corpus deployment")
        assert [entry["schedule"]["cron"] for entry in refresh["schedules"]] == ["0 * * * *"]

        parameters = {
            "model": str(bundle),
            "data": str(fashion_test_shards),
            "out": str(tmp_path / "corpus"),
            "shares": 1,
        }
        answers: list[str] = []

        def create_run() -> dict | None:
            """POST a run; a busy server (5xx) or a deployment re-applied under our feet (404/409) is asked again."""
            current = deployment("index-corpus/index-corpus") or index
            answer = client.post(f"/deployments/{current['id']}/create_flow_run", json={"parameters": parameters})
            if answer.status_code == 201:
                return answer.json()
            answers.append(f"{answer.status_code} {answer.text[:300]}")
            assert answer.status_code in {404, 409} or answer.status_code >= 500, answers[-1]
            return None

        try:
            run = poll(create_run, 60, "a created flow run")
        except AssertionError as error:
            raise AssertionError(f"{error}; the server answered: {answers[-3:]}") from None

        def finished() -> dict | None:
            answer = client.get(f"/flow_runs/{run['id']}")
            if answer.status_code != 200:  # a busy server; the run is asked about again
                return None
            state = answer.json()["state"]
            return state if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        state = poll(finished, 240, "the triggered run")
        assert state["type"] == "COMPLETED", state
        assert (tmp_path / "corpus" / "index" / "current" / "index.json").is_file()
    finally:
        stop(served)
