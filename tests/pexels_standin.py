"""A local stand-in for Pexels: a real HTTP server on 127.0.0.1 serving the API's JSON and real JPEG bytes.

Shared by tests/sources (the client and the stock source) and tests/api (the service); the `standin` fixture
in tests/conftest.py gives one server per session, reset before each test.

Behaviours are switched per test through `api_script` / `image_script` (one entry consumed per request, then
`api_default` / `image_default`), so a test reads as "first a 500, then success".
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw

from imagesmith.config import Settings

API_KEY = "test-key-5f1c2b9e8a7d"  # what the stand-in accepts; distinctive, so a leak is easy to grep

# id, width, height, alt: a spread of aspects and sizes
CATALOGUE = [
    (101, 1800, 1200, "Mountain lake at sunrise"),
    (102, 1920, 1080, "Misty forest road"),
    (103, 900, 600, "Small harbour"),
    (104, 1200, 1800, "Tall waterfall"),
    (105, 1500, 1500, "Square meadow"),
    (106, 2400, 1600, "Big valley"),
]


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A real JPEG with some structure (a gradient and a mark), so decode and crop are meaningful."""
    image = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@functools.cache  # about 3 s to compress 800 MB of zeros: once a session
def png_bomb(grey: bool = False) -> bytes:
    """A real 10000x10000 16-bit RGBA PNG of zeros: 0.78 MB, under the default pixel cap (100 MP), yet 400 MB
    once Pillow decodes it (to 8-bit RGBA), and 1.2 GB at the peak of fitting it (measured with ru_maxrss).
    `grey`: 16-bit grey instead, 0.2 MB: 200 MB decoded (I;16), over 1.1 GB at the peak of fitting it."""
    width, height = 10_000, 10_000
    samples = 1 if grey else 4

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + width * samples * 2)  # filter byte 0, then the samples of 2 bytes a pixel
    deflate = zlib.compressobj()
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    colour_type = 0 if grey else 6  # grey, or RGBA
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@dataclass
class StandIn:
    base_url: str = ""
    image_base_url: str = ""  # where src URLs point; tests may point it at another host name
    api_default: str = "ok"
    api_script: list[str] = field(default_factory=list)
    image_default: str = "ok"
    image_script: list[str] = field(default_factory=list)
    delay_s: float = 2.0
    drip_interval_s: float = 0.05  # "drip" image answers: seconds between 16-byte pieces
    limit: int = 200
    remaining: int = 199
    reset_epoch: int = field(default_factory=lambda: plausible_reset())
    api_headers: dict[str, str] = field(default_factory=dict)  # sent on every JSON answer, over the quota's
    api_calls: int = 0
    image_calls: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    catalogue: list[tuple[int, int, int, str]] = field(default_factory=lambda: list(CATALOGUE))
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Counts resets: a "slow" answer that outlives its test (its client gave up) must not spend the next
    # test's quota when it wakes, so it checks that no reset came while it slept.
    test_number: int = 0

    def reset(self) -> None:
        self.test_number += 1
        self.image_base_url = self.base_url
        self.api_default, self.image_default = "ok", "ok"
        self.api_script, self.image_script = [], []
        self.limit, self.remaining, self.reset_epoch = 200, 199, plausible_reset()
        self.api_headers = {}
        self.api_calls = self.image_calls = 0
        self.seen = []
        self.catalogue = list(CATALOGUE)

    def next_api(self) -> str:
        with self.lock:
            self.api_calls += 1
            return self.api_script.pop(0) if self.api_script else self.api_default

    def next_image(self) -> str:
        with self.lock:
            self.image_calls += 1
            return self.image_script.pop(0) if self.image_script else self.image_default

    def photo_json(self, photo_id: int, width: int, height: int, alt: str) -> dict[str, Any]:
        original = f"{self.image_base_url}/photos/{photo_id}/pexels-photo-{photo_id}.jpeg"
        sized = original + "?auto=compress&cs=tinysrgb"
        return {
            "id": photo_id,
            "width": width,
            "height": height,
            "url": f"https://www.pexels.com/photo/{alt.lower().replace(' ', '-')}-{photo_id}/",
            "photographer": "Jérôme Müller" if photo_id == 101 else f"Photographer {photo_id}",
            "photographer_url": f"https://www.pexels.com/@p{photo_id}",
            "photographer_id": photo_id * 10,
            "avg_color": "#7A8B6C",
            "src": {
                "original": original,
                "large2x": sized + "&dpr=2&h=650&w=940",
                "large": sized + "&h=650&w=940",
                "medium": sized + "&h=350",
                "small": sized + "&h=130",
                "portrait": sized + "&fit=crop&h=1200&w=800",
                "landscape": sized + "&fit=crop&h=627&w=1200",
                "tiny": sized + "&dpr=1&fit=crop&h=200&w=280",
            },
            "liked": False,
            "alt": alt,
        }


def _matches(orientation: str | None, width: int, height: int) -> bool:
    if orientation == "landscape":
        return width > height
    if orientation == "portrait":
        return height > width
    if orientation == "square":
        return width == height
    return True


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.standin.seen.append({"path": parts.path, "params": params, "headers": dict(self.headers)})
        if parts.path.startswith("/v1/"):
            self._api(parts.path, params)
        elif parts.path.startswith("/photos/"):
            self._image(parts.path, params)
        else:
            self._send(404, b"not here", "text/plain")

    # --- API ---

    def _api(self, path: str, params: dict[str, str]) -> None:
        s = self.standin
        behaviour = s.next_api()
        if behaviour == "slow":
            asked_in = s.test_number
            time.sleep(s.delay_s)
            if s.test_number != asked_in:  # abandoned by an earlier test: answer nothing, change nothing
                self.close_connection = True
                return
        if behaviour == "drip":
            body = json.dumps({"photos": [], "total_results": 0, "page": 1, "per_page": 1}).encode()
            return self._drip(body, "application/json")
        if self.headers.get("Authorization") != API_KEY or behaviour == "401":
            return self._json(401, {"error": "Invalid API key"}, quota=False)
        if behaviour == "429":
            return self._json(429, {"error": "Rate limit exceeded"}, quota=False)  # Pexels: no headers
        if behaviour == "500":
            return self._send(503 if s.api_calls % 2 else 500, b"upstream trouble", "text/plain")
        if behaviour == "malformed":
            return self._send(200, b'{"photos": [ {"id": 1, ', "application/json", quota=True)
        if behaviour == "bad_encoding":  # says gzip, is not: the client fails to decode it
            return self._send(200, b"not gzip at all", "application/json", extra={"Content-Encoding": "gzip"})
        if behaviour == "quota0":
            s.remaining = 0
        elif s.remaining > 0:
            s.remaining -= 1
        if behaviour == "bad_shape":
            return self._json(200, {"page": 1, "per_page": 15, "photos": [{"id": 5, "width": 10}]})
        if behaviour == "gzip_bomb":  # 3 MB of JSON, gzipped to a few KB
            bomb = gzip.compress(json.dumps({"photos": [], "padding": " " * 3_000_000}).encode())
            return self._send(200, bomb, "application/json", extra={"Content-Encoding": "gzip"})
        if behaviour == "no_photos":  # a proxy's error page, as JSON with a 200
            return self._json(200, {"error": "upstream said no"})
        if behaviour == "huge_width":
            photo = s.photo_json(*s.catalogue[0])
            return self._json(200, {"page": 1, "per_page": 1, "photos": [{**photo, "width": int("9" * 400)}]})
        if path.startswith("/v1/photos/"):
            wanted = int(path.rsplit("/", 1)[1])
            for entry in s.catalogue:
                if entry[0] == wanted:
                    return self._json(200, s.photo_json(*entry))
            return self._json(404, {"error": "Not found"})
        if path != "/v1/search":
            return self._json(404, {"error": "Not found"})
        query = params.get("query", "")
        per_page = int(params.get("per_page", 15))
        photos = (
            []
            if behaviour == "empty" or "nothing" in query
            else [
                s.photo_json(*entry)
                for entry in s.catalogue
                if _matches(params.get("orientation"), entry[1], entry[2])
            ]
        )
        if behaviour == "one_bad" and photos:  # the last photo with a field Pexels documents as a string
            photos[-1] = {**photos[-1], "photographer": None}
        body = {
            "total_results": len(photos),
            "page": int(params.get("page", 1)),
            "per_page": per_page,
            "photos": photos[:per_page],
        }
        if len(photos) > per_page:
            body["next_page"] = f"{s.base_url}/v1/search/?page=2&per_page={per_page}&query={query}"
        self._json(200, body)

    # --- images ---

    def _image(self, path: str, params: dict[str, str]) -> None:
        s = self.standin
        behaviour = s.next_image()
        photo_id = int(path.split("/")[2])
        entry = next((e for e in s.catalogue if e[0] == photo_id), None)
        if entry is None:
            return self._send(404, b"no such photo", "text/plain")
        if behaviour == "500":
            return self._send(502, b"bad gateway", "text/plain")
        if behaviour == "not_image":
            return self._send(200, b"<html>hello</html>", "text/html")
        if behaviour == "garbage":
            return self._send(200, b"\xff\xd8\xff" + b"not really a jpeg" * 50, "image/jpeg")
        if behaviour == "bad_encoding":
            return self._send(200, b"not gzip at all", "image/jpeg", extra={"Content-Encoding": "gzip"})
        if behaviour == "placeholder":  # a CDN's 1x1 stand-in for a photo it cannot serve
            return self._send(200, jpeg_bytes(1, 1, seed=photo_id), "image/jpeg")
        if behaviour in ("bomb", "grey_bomb"):  # small on the wire, huge decoded
            # png_bomb() as the tests call it: functools.cache keys png_bomb() and png_bomb(grey=False) apart
            return self._send(
                200, png_bomb(grey=True) if behaviour == "grey_bomb" else png_bomb(), "image/png"
            )
        if behaviour == "oversized_declared":
            return self._send(200, b"", "image/jpeg", length=50_000_000)
        if behaviour == "oversized":
            return self._stream_forever()
        if behaviour == "drip":
            return self._drip(jpeg_bytes(width=entry[1], height=entry[2], seed=photo_id))
        if behaviour == "redirect_offsite":
            self.send_response(302)
            self.send_header("Location", "https://evil.example.com/x.jpeg")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        width, height = entry[1], entry[2]
        if behaviour == "ok" and params.get("fit") == "crop" and "w" in params and "h" in params:
            width, height = int(params["w"]), int(params["h"])  # the CDN's exact crop
        self._send(200, jpeg_bytes(width, height, seed=photo_id), "image/jpeg")  # "ignore_params" too
        return None

    def _drip(self, body: bytes, content_type: str = "image/jpeg") -> None:
        """A valid answer sent a few bytes at a time: every read arrives within any per-read timeout."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 16):
                self.wfile.write(body[start : start + 16])
                self.wfile.flush()
                time.sleep(self.standin.drip_interval_s)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _stream_forever(self) -> None:
        """An image body that never ends (no Content-Length): only a streamed cap stops it."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = jpeg_bytes(64, 64)
        try:
            for _ in range(10_000):
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    # --- plumbing ---

    def _json(self, status: int, body: Any, quota: bool = True) -> None:
        self._send(
            status, json.dumps(body).encode(), "application/json", quota=quota, extra=self.standin.api_headers
        )

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        *,
        quota: bool = False,
        length: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        s = self.standin
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body) if length is None else length),
        }
        if quota:
            headers["X-Ratelimit-Limit"] = str(s.limit)
            headers["X-Ratelimit-Remaining"] = str(s.remaining)
            headers["X-Ratelimit-Reset"] = str(s.reset_epoch)
        headers.update(extra or {})
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)


class StandInServer:
    def __init__(self) -> None:
        self.standin = StandIn()
        handler = type("Handler", (_Handler,), {"standin": self.standin})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        port = self.httpd.server_address[1]
        self.standin.base_url = f"http://127.0.0.1:{port}"
        self.standin.reset()
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pexels-standin", daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self.standin

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def plausible_reset() -> int:
    """Pexels' X-Ratelimit-Reset: the UNIX second its monthly window renews, some days ahead."""
    return int(time.time()) + 20 * 86_400


class FakeClock:
    """UNIX seconds that only move when a test says so: quota resets and cache expiry without waiting."""

    def __init__(self, now: float | None = None) -> None:
        # Starts at the real time, so the stand-in's reset (like Pexels', days ahead) is plausible to it too.
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(standin: StandIn, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "pexels_api_key": API_KEY,
        "pexels_api_base_url": f"{standin.base_url}/v1",
        "pexels_allowed_hosts": [standin.base_url],
        "pexels_timeout_s": 0.5,
        "pexels_download_timeout_s": 0.5,
        "pexels_max_retries": 2,
        "pexels_retry_backoff_s": 0.001,
        "pexels_max_download_bytes": 2_000_000,
        "pexels_quota_backoff_s": 600.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)
