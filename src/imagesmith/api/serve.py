"""`imagesmith serve`: the FastAPI app under uvicorn, owning one GPU worker.

cli.py wires it in with add_serve_parser(subparsers) and run_serve(args); `python -m imagesmith.api.serve`
runs it directly.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sqlite3
import sys
from types import FrameType
from typing import Any

from pydantic import ValidationError

from imagesmith.config import ENV_PREFIX, Settings, prepared_data_dir, setting_error_line
from imagesmith.jobs.store import DATABASE_NAME, JobStore, StoreDamaged
from imagesmith.jobs.store_lock import StoreInUse

log = logging.getLogger(__name__)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run the HTTP service", description="Run the HTTP service (settings: IMAGESMITH_* env)."
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_serve)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (IMAGESMITH_HOST; 127.0.0.1 unless API keys are set)")
    parser.add_argument("--port", type=int, help="port (IMAGESMITH_PORT, default 8000)")
    parser.add_argument("--model", choices=["sdxl", "tiny"], help="IMAGESMITH_MODEL")
    parser.add_argument("--device", help="IMAGESMITH_DEVICE: auto, cpu, mps, cuda, cuda:N")
    # A string, made a Path by the settings: argparse's Path('') is '.', which their empty-value check cannot see.
    parser.add_argument("--data-dir", help="IMAGESMITH_DATA_DIR: jobs database and images")
    parser.add_argument("--log-format", choices=["text", "json"], help="IMAGESMITH_LOG_FORMAT")


# The settings serve's options set, by option.
OPTION_SETTINGS = {
    "--host": "host",
    "--port": "port",
    "--model": "model",
    "--device": "device",
    "--data-dir": "data_dir",
    "--log-format": "log_format",
}


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        setting: getattr(args, setting)
        for setting in OPTION_SETTINGS.values()
        if getattr(args, setting) is not None
    }
    return Settings(**overrides)


def option_errors(invalid: ValidationError, args: argparse.Namespace) -> list[str]:
    """The errors of settings an option set, said as that option (`--port 99999` was blamed on
    IMAGESMITH_PORT, which the user never set); empty when the fault is in the environment."""
    option_for = {
        setting: option for option, setting in OPTION_SETTINGS.items() if getattr(args, setting) is not None
    }
    return [
        setting_error_line(item, option_for[str(item["loc"][0])])
        for item in invalid.errors()
        if item["loc"] and str(item["loc"][0]) in option_for
    ]


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, naming the setting to change and how, or None. Bound the
    way uvicorn binds (SO_REUSEADDR), then let go. A host that does not resolve, or is no address of this
    machine, is the host's fault: it was said as the port's, with "choose another port" as the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = error.strerror or str(error)
            if isinstance(error, socket.gaierror):  # a name that does not resolve (a typo, or DNS down)
                return (
                    f"host: {host} cannot be resolved to an address ({reason}); give an address of this "
                    "machine, or 0.0.0.0 for all of them (--host or IMAGESMITH_HOST)"
                )
            if error.errno == errno.EADDRNOTAVAIL:
                return (
                    f"host: {host} is not an address of this machine ({reason}); give one of its addresses, or "
                    "0.0.0.0 for all of them (--host or IMAGESMITH_HOST)"
                )
            return f"port: {host}:{port} cannot be listened on ({reason}); choose another (--port or IMAGESMITH_PORT)"
    return None


def device_problem(device: str, said_as: str) -> str | None:
    """Why the device asked for cannot be used on this machine, named as the user set it, or None. Found
    before the start: the server came up, failed its engine's start with a traceback in the log, and stayed
    running in health 'failed', for a setting no restart could fix."""
    from imagesmith.engine.hardware import probe_device  # imports torch: after the settings' own checks

    try:
        probe_device(device, said_as)
    except (RuntimeError, ValueError) as error:
        return f"{said_as}: {error}"
    return None


def bind_host(settings: Settings) -> str:
    """Without API keys the service is open, so it listens on loopback only, whatever was asked."""
    if settings.api_key_list():
        return settings.host
    if settings.host not in ("127.0.0.1", "localhost"):
        log.warning(
            "no API keys set (IMAGESMITH_API_KEYS): binding to 127.0.0.1 instead of %s", settings.host
        )
    else:
        log.warning("no API keys set (IMAGESMITH_API_KEYS): the API is open, so it listens on 127.0.0.1 only")
    return "127.0.0.1"


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from imagesmith.api.app import begin_shutdown, create_app
    from imagesmith.engine.tiny import TinyModelUnbuildable, ensure_tiny_sdxl
    from imagesmith.logs import setup_logging

    try:
        settings = settings_from_args(args)
    except ValidationError as invalid:
        said_as_options = option_errors(invalid, args)
        if not said_as_options:
            raise  # the environment's: said as settings by the CLI
        for line in said_as_options:
            print(f"imagesmith serve: error: {line}", file=sys.stderr)
        return 2
    setup_logging(settings.log_format)
    unusable = device_problem(settings.device, "--device" if args.device else f"{ENV_PREFIX}DEVICE")
    if unusable:
        print(f"imagesmith serve: error: {unusable}", file=sys.stderr)
        return 2
    host = bind_host(settings)
    # Made before the tiny model, the job store and the port are taken; named as the user set it.
    data_dir_said_as = "--data-dir" if args.data_dir is not None else f"{ENV_PREFIX}DATA_DIR"
    prepared_data_dir(settings.data_dir, data_dir_said_as)
    try:  # its lock and integrity check, said in one line now rather than as a failed startup's traceback
        store = JobStore(settings.data_dir / DATABASE_NAME)  # handed to the app: opened (and checked) once
    except (StoreInUse, StoreDamaged) as error:  # their messages name the file and the fix
        print(f"imagesmith serve: cannot open the job store: {error}", file=sys.stderr)
        # A data dir another server holds is a settings conflict found before any work, as a port in use is
        # (exit 2); a damaged store is a failure (exit 1).
        return 2 if isinstance(error, StoreInUse) else 1
    except sqlite3.DatabaseError as error:
        # A full or failing disk: its "disk I/O error" alone named no file and no fix.
        print(
            f"imagesmith serve: cannot open the job store {settings.data_dir / DATABASE_NAME}: {error}; free "
            f"space on its disk or check the disk, or set {data_dir_said_as} to another folder",
            file=sys.stderr,
        )
        return 1
    # Before the start-up: uvicorn binds after it, and a busy port ended a model load in a traceback.
    problem = listen_problem(host, settings.port)
    if problem:
        print(f"imagesmith serve: error: {problem}", file=sys.stderr)
        store.close()
        return 2
    if settings.model.value == "tiny":
        try:
            ensure_tiny_sdxl(settings.tiny_model_dir())
        except TinyModelUnbuildable as error:
            print(f"imagesmith serve: {error}", file=sys.stderr)
            store.close()
            return 1
    app = create_app(settings, store=store)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn then waits up to the grace period for open requests, and cuts the rest. Requests
            # waiting for an image are answered now instead (503 with their job id); the job is kept.
            begin_shutdown(app)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=settings.port,
        log_config=None,
        access_log=True,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    log.info("listening on http://%s:%d", host, settings.port)
    Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m imagesmith.api.serve` is `imagesmith serve`: the same options, errors and exit codes."""
    from imagesmith.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
