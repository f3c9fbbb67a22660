"""The serving commands: ``mocoplus serve`` (the HTTP service) and ``mocoplus flows serve`` (Prefect deployments)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from artifacts.model_bundle import Provider
from flows.cli.config_options import FromConfig, config_options, field_names
from flows.cli.errors import one_line_errors
from flows.cli.options import choice
from serving.batcher import BatcherConfig
from serving.limits import ConnectionLimits, Limits

commands = typer.Typer()
CONNECTION_FLAGS = {  # seconds, as the service's other timeouts are spelt on the command line
    "head_timeout_s": "--head-timeout",
    "keep_alive_s": "--keep-alive",
    "write_timeout_s": "--write-timeout",
}
flows_commands = typer.Typer(
    name="flows",
    help="Prefect deployments: pretrain and refresh-corpus on cron schedules, index-corpus and end-to-end on demand.",
    no_args_is_help=True,
)


@commands.command(
    "serve",
    help=(
        "Serve the embedding and search API (FastAPI on uvicorn, ONNX Runtime, FAISS; no torch).\n\n"
        "Requests from many clients are micro-batched into one ONNX Runtime call (up to --max-batch images or\n"
        "--max-wait-ms); a full queue answers 503 with Retry-After. The model and index are loaded and\n"
        "cross-checked before the server listens; /readyz turns 200 after a warm-up batch. Every request is held\n"
        "to budgets (body bytes and time, request head size and time, decoded image size, search work,\n"
        'decodes and searches at once); past one it gets a JSON error (docs/service.md, "Limits").\n\n'
        "Examples:\n\n"
        "  mocoplus serve --model models/fmnist --index indexes/fmnist\n\n"
        "  mocoplus serve --model models/fmnist --host 0.0.0.0 --port 9000 --max-batch 128 --max-wait-ms 10\n\n"
        "  curl -F images=@shirt.png http://127.0.0.1:8000/v1/embed"
    ),
)
@one_line_errors
@config_options(
    FromConfig(BatcherConfig, "batcher", ("max_batch", "max_wait_ms", "max_queue")),
    FromConfig(Limits, "limits", field_names(Limits), flags={"body_timeout_s": "--body-timeout"}),
    FromConfig(ConnectionLimits, "connection", field_names(ConnectionLimits), flags=CONNECTION_FLAGS),
)
def serve_command(
    *,  # keyword-only: the configs built from options (`config_options`) need no default here
    model: Annotated[Path, typer.Option(help="The model bundle (from mocoplus export).")],
    index: Annotated[Path | None, typer.Option(help="An index bundle built with this model (enables search).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    provider: Annotated[
        Provider,
        typer.Option(parser=choice(Provider, "provider"), help="cpu or cuda (a hard error if CUDA would fall back)."),
    ] = "cpu",
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads (0: its default).")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Server processes, each with its own model and batcher.")] = 1,
    watch: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Reload when the bundles change (a symlink switched, a bundle rebuilt), polled every so many "
            "seconds; SIGHUP reloads at any time.",
        ),
    ] = None,
    batcher: BatcherConfig,
    limits: Limits,
    connection: ConnectionLimits,
    pid_file: Annotated[
        Path | None,
        typer.Option(
            help="Write the server's process id here while it runs: what a refresh-corpus deployment sends "
            "SIGHUP to after an update."
        ),
    ] = None,
) -> None:
    """Serve the embedding and search API."""
    import uvicorn

    from serving.app import CONFIG_ENV, config_to_json, create_app
    from serving.gpus import SLOTS_ENV, make_slots
    from serving.protocol import protocol_factory
    from serving.service import Service, ServiceConfig

    config = ServiceConfig(
        model=model, index=index, provider=provider, threads=threads, batcher=batcher, limits=limits, watch_s=watch
    )
    service = Service(config)
    service.load()
    options = {
        "host": host,
        "port": port,
        "timeout_graceful_shutdown": 30,
        "log_level": "info",
        "http": protocol_factory(connection),  # head size, count and time limits; JSON refusals
        "timeout_keep_alive": connection.keep_alive_s,
    }
    with process_id_file(pid_file):
        if workers == 1:
            uvicorn.run(create_app(config, service), **options)
            return
        os.environ[CONFIG_ENV] = config_to_json(config)  # checked above; each worker process loads its own copy
        del service  # the check's session (on GPU 0 with cuda) is not kept beside the workers' own
        with tempfile.TemporaryDirectory(prefix="mocoplus-serve-") as slots:
            os.environ[SLOTS_ENV] = str(make_slots(Path(slots), workers))  # worker i takes GPU i mod count
            uvicorn.run("serving.app:app_from_env", factory=True, workers=workers, **options)


@contextmanager
def process_id_file(path: Path | None) -> Iterator[None]:
    """This process's id in ``path`` while the block runs (removed after, if still ours); a live server's
    pid file is an error, never overwritten."""
    if path is None:
        yield
        return
    from artifacts.atomic import write_text_atomic
    from serving.pid_file import read_pid

    running = read_pid(path, missing_ok=True)
    if running is not None:
        raise FileExistsError(f"{path}: another server (pid {running}) is running; stop it or choose another file")
    write_text_atomic(path, f"{os.getpid()}\n")
    try:
        yield
    finally:
        if read_pid(path, missing_ok=True, alive_only=False) == os.getpid():
            path.unlink(missing_ok=True)


@flows_commands.command(
    "serve",
    help=(
        "Register the deployments with the Prefect API ($PREFECT_API_URL) and run their flow runs here.\n\n"
        "Schedules fire only against a Prefect server (prefect server start); trigger on-demand runs with\n"
        "prefect deployment run 'index-corpus/index-corpus'.\n\n"
        "Examples:\n\n"
        "  prefect server start &   # then: prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api\n\n"
        "  mocoplus flows serve --out /data/mocoplus --cron '0 3 * * *'\n\n"
        "  mocoplus flows serve --out /data/mocoplus --source ~/photos --refresh-cron '0 * * * *' "
        "--pid-file serve.pid"
    ),
)
def flows_serve_command(
    out: Annotated[Path, typer.Option(help="Where shards/, run/, model/ and corpus/ live.")],
    cron: Annotated[str, typer.Option(help="The pretrain schedule (cron, UTC).")] = "0 3 * * *",
    config: Annotated[str, typer.Option(help="Training preset or TOML/JSON file.")] = "fashion-mnist-cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Training overrides (repeatable).")] = None,
    nproc: Annotated[int, typer.Option(min=1, help="Training processes (torchrun --nproc_per_node).")] = 1,
    source: Annotated[
        str, typer.Option(help="The corpus: an image folder, a .txt/.csv list, or fashion-mnist:train.")
    ] = "fashion-mnist:train",
    refresh_cron: Annotated[
        str, typer.Option(help="The refresh-corpus schedule (cron, UTC): ingest --update, embed, index --update.")
    ] = "0 * * * *",
    pid_file: Annotated[
        Path | None, typer.Option(help="The service to send SIGHUP after a refresh (mocoplus serve --pid-file).")
    ] = None,
) -> None:
    """Serve the Prefect deployments."""
    from flows.deploy import DeploymentConfig, serve_deployments

    serve_deployments(
        DeploymentConfig(
            out=out,
            cron=cron,
            config=config,
            overrides=overrides or [],
            nproc=nproc,
            source=source,
            refresh_cron=refresh_cron,
            pid_file=pid_file,
        )
    )
