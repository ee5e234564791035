"""Helpers for service tests: a real uvicorn server in its own process (so tests can kill -9 it), and jobs put
straight into a store for tests that drive the worker themselves."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

SRC = Path(__file__).resolve().parents[2] / "src"

# Small and fast on CPU: requests without a size get 64x64 (the seed's curl example gives none).
SERVER_ENV = {
    "IMAGESMITH_MODEL": "tiny",
    "IMAGESMITH_DEVICE": "cpu",
    "IMAGESMITH_DEFAULT_WIDTH": "64",
    "IMAGESMITH_STOCK_DEFAULT_SIZE": "",
    "IMAGESMITH_DEFAULT_HEIGHT": "64",
    "IMAGESMITH_PREVIEW_EVERY": "5",
    "IMAGESMITH_WARMUP": "false",
    # One torch thread: on a small, shared CI box, spinning OpenMP threads oversubscribe the cores and make the
    # tiny model dozens of times slower.
    "OMP_NUM_THREADS": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _sigint_at_its_default() -> None:
    """In the server's process before it starts: SIGINT as a terminal's Ctrl-C finds it. A background job (CI,
    `cmd &` in a script) starts with SIGINT ignored, and the server inherits that: uvicorn still stops on SIGINT,
    but its re-raise after the graceful shutdown is then ignored and the process exits 0, not 130."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServerProcess:
    """`python -m imagesmith.api.serve` on 127.0.0.1 with a free port and its own data dir."""

    def __init__(self, data_dir: Path, tiny_model_home: Path, **env: str) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        link = data_dir / "tiny-model"
        if not link.exists():  # share the session's tiny model rather than build one per server
            link.symlink_to(tiny_model_home / "tiny-model")
        self.env = {**SERVER_ENV, **{key.upper(): value for key, value in env.items()}}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServerProcess:
        env = {
            **os.environ,
            **self.env,
            "IMAGESMITH_DATA_DIR": str(self.data_dir),
            "PYTHONPATH": str(SRC),
        }
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imagesmith.api.serve", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_sigint_at_its_default,
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing; what a crash looks like."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def submit_generation(store: Any, **generation: Any) -> str:
    """Queue a generation-only job in a JobStore, as the service would; returns its id."""
    from imagesmith.schemas import GenerationRequest
    from imagesmith.sources.base import ImageRequest, SourceName

    request = ImageRequest(sources=[SourceName.GENERATE], generation=GenerationRequest(**generation))
    body = request.model_dump(mode="json")
    job, _ = store.submit(body, hashlib.sha256(repr(body).encode()).hexdigest(), None, queue_max=100)
    return str(job.id)


def sse(
    client: httpx.Client, path: str, **headers: str | bytes
) -> Iterator[tuple[str, dict[str, Any], int | str | None]]:
    """(event type, data, id) for each server-sent event; the final event's id is 'end'."""
    with client.stream("GET", path, timeout=120, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind, data, ident = "message", "", None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line.startswith("id: "):
                ident = int(line[4:]) if line[4:].isdigit() else line[4:]
            elif line == "" and data:
                yield kind, json.loads(data), ident
                kind, data, ident = "message", "", None


def held_start(engine: Any) -> tuple[Callable[[Any], Any], threading.Event]:
    """An engine factory for an in-process app that keeps the service "starting" until the event is set (30 s
    at most), then hands it `engine`: for what a client sees while the models load."""
    release = threading.Event()

    def start(_: Any) -> Any:
        release.wait(30)
        return engine

    return start, release
