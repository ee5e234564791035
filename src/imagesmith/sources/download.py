"""Download a photo safely, and fit it to the exact size asked for.

Safety, in the order it is checked:
1. the URL's scheme and host are allowed (`pexels_allowed_hosts`: a bare host means https only, an origin
   such as "http://127.0.0.1:8080" allows exactly that origin); redirects are followed by hand, each hop
   checked the same way, so a redirect cannot take the download elsewhere;
2. the answer says it is an image (Content-Type image/jpeg, image/png or image/webp);
3. the body is streamed and cut off past `max_bytes` (a lying or missing Content-Length does not help);
4. Pillow reads its header, and its pixel count is under `max_pixels` and the bytes its pixels take to decode
   and fit (`working_bytes`) under `max_image_bytes` before any pixel is loaded; then it is decoded.
5xx answers, timeouts and network errors are retried with backoff; safety refusals never are, nor is a body
that does not decode (a broken Content-Encoding) or a request that cannot be sent: those are this photo's
problem (PexelsBadResponse), and the stock source moves on to the next candidate.
This client sends no Authorization header: the API key is for api.pexels.com only.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from imagesmith.config import PILLOW_PIXEL_LIMIT
from imagesmith.sources.allowed_hosts import DEFAULT_PORTS, parse_allowed_hosts
from imagesmith.sources.errors import (
    DisallowedHost,
    DownloadTooLarge,
    NotAnImage,
    PexelsBadResponse,
)
from imagesmith.sources.retry import (
    Retryable,
    is_retryable_status,
    read_at_most,
    with_retries,
    within_deadline,
)

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
PILLOW_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "MPO"})  # MPO: multi-picture JPEGs from some cameras
MAX_REDIRECTS = 3


class HostPolicy:
    """Which URLs a photo may come from."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.origins = parse_allowed_hosts(list(entries))

    def check(self, url: str) -> None:
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        if parts.username or parts.password:
            raise DisallowedHost(f"download URL carries credentials; refused: {scheme}://{host}")
        try:
            port = parts.port or DEFAULT_PORTS.get(scheme, -1)
        except ValueError:
            raise DisallowedHost(f"download URL has an invalid port: {url!r}") from None
        if not any(origin.allows(scheme, host, port) for origin in self.origins):
            allowed = ", ".join(
                f"{o.scheme}://{o.host}" + (f":{o.port}" if o.port else "") for o in self.origins
            )
            raise DisallowedHost(
                f"download from {scheme}://{host}:{port} refused: "
                f"not in pexels_allowed_hosts ({allowed or 'none'})"
            )


@dataclass(frozen=True)
class DownloadedImage:
    data: bytes
    content_type: str
    url: str  # the final URL, after redirects
    width: int
    height: int
    # Decoded once, while checking that it decodes; callers use it rather than decode again.
    image: Image.Image


class ImageDownloader:
    def __init__(
        self,
        policy: HostPolicy,
        *,
        max_bytes: int,
        max_pixels: int = 100_000_000,
        max_image_bytes: int = 256 * 1024 * 1024,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        http: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_image_bytes = max_image_bytes
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self.timeout_s = timeout_s
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def fetch(self, url: str) -> DownloadedImage:
        async def once() -> DownloadedImage:
            try:
                return await within_deadline(
                    lambda: self._fetch_once(url), self.timeout_s, f"downloading {_safe(url)}"
                )
            except _RetryableStatus as error:
                raise Retryable(f"image host answered {error.status} for {_safe(url)}") from None
            except httpx.DecodingError:
                raise PexelsBadResponse(f"{_safe(url)} sent a body that does not decode") from None
            except httpx.TransportError as error:  # a URL that cannot be requested, a proxy error: no retry
                raise PexelsBadResponse(f"{type(error).__name__} downloading {_safe(url)}") from None

        return await with_retries(
            once, max_retries=self.max_retries, backoff_s=self.backoff_s, sleep=self._sleep
        )

    async def _fetch_once(self, url: str) -> DownloadedImage:
        for _hop in range(MAX_REDIRECTS + 1):
            self.policy.check(url)
            async with self._http.stream(
                "GET", url, headers={"Accept": "image/jpeg,image/png,image/webp"}
            ) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if is_retryable_status(response.status_code):
                    raise _RetryableStatus(response.status_code)
                if response.status_code != 200:
                    raise PexelsBadResponse(f"image host answered {response.status_code} for {_safe(url)}")
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if content_type not in IMAGE_TYPES:
                    raise NotAnImage(
                        f"{_safe(url)} is {content_type or 'untyped'}, not a JPEG, PNG or WebP image"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise DownloadTooLarge(
                        f"{_safe(url)} is {int(declared)} bytes; the cap is {self.max_bytes} "
                        "(IMAGESMITH_PEXELS_MAX_DOWNLOAD_BYTES)"
                    )
                data = await self._read_capped(response, url)
            image = self._decoded(data, url)
            return DownloadedImage(data, content_type, url, image.width, image.height, image)
        raise PexelsBadResponse(f"more than {MAX_REDIRECTS} redirects downloading a photo")

    async def _read_capped(self, response: httpx.Response, url: str) -> bytes:
        data = await read_at_most(response, self.max_bytes)
        if data is None:
            raise DownloadTooLarge(
                f"{_safe(url)} exceeds the {self.max_bytes}-byte cap (IMAGESMITH_PEXELS_MAX_DOWNLOAD_BYTES); "
                "download stopped"
            )
        return data

    def _decoded(self, data: bytes, url: str) -> Image.Image:
        """The image, fully decoded (so a truncated or corrupt file fails here), after the size and format
        checks that must come before decoding."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                # The size comes from the header: check it before decoding, so a small file cannot
                # expand into gigabytes of pixels.
                width, height = image.size
                if width * height > self.max_pixels:
                    raise DownloadTooLarge(
                        f"{_safe(url)} is {width}x{height}; the cap is {self.max_pixels} pixels "
                        "(IMAGESMITH_PEXELS_MAX_IMAGE_PIXELS)"
                    )
                # The pixel cap alone lets a 10000x10000 RGBA PNG of under 1 MB through: 400 MB decoded, and
                # 1.2 GB at the peak of fitting it. Its mode is in the header too, so bound the bytes as well.
                needed = working_bytes(image.mode, width, height)
                if needed > self.max_image_bytes:
                    raise DownloadTooLarge(
                        f"{_safe(url)} is {width}x{height} {image.mode}, {needed} bytes to decode and fit; "
                        f"the cap is {self.max_image_bytes} bytes: raise "
                        "IMAGESMITH_PEXELS_MAX_IMAGE_BYTES to accept photos this large"
                    )
                if image.format not in PILLOW_FORMATS:
                    raise NotAnImage(f"{_safe(url)} decodes as {image.format}, not JPEG, PNG or WebP")
                image.load()
        except (DownloadTooLarge, NotAnImage):
            raise
        except Image.DecompressionBombError:  # Pillow's own pixel cap, before ours could look
            # Over PILLOW_PIXEL_LIMIT, which bounds the setting: ours would have refused it too.
            raise DownloadTooLarge(
                f"{_safe(url)} is over {PILLOW_PIXEL_LIMIT} pixels; the cap is {self.max_pixels} pixels "
                "(IMAGESMITH_PEXELS_MAX_IMAGE_PIXELS)"
            ) from None
        except Exception as error:
            # Pillow answers malformed files with many kinds of error (OSError, SyntaxError, but also
            # struct.error, IndexError, ZeroDivisionError from its plugins): any of them means "not an image",
            # so the next candidate photo is tried.
            # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" names our buffer, not the file.
            why = (
                "no image format recognised in its bytes"
                if isinstance(error, UnidentifiedImageError)
                else f"{type(error).__name__}: {error}"
            )
            raise NotAnImage(f"{_safe(url)} does not decode as an image: {why}") from None
        return image


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """The memory Pillow takes for the pixels of an image of this mode and size: bands x bytes per sample,
    except that it keeps a pixel of several 8-bit bands in 4 bytes (a 50 MP RGB image takes 200 MB, measured,
    not 150). So 1 byte a pixel for grey or palette, 2 for 16-bit grey, 4 for RGB, RGBA, CMYK or 32-bit."""
    spec = ImageMode.getmode(mode)
    per_sample = int(spec.typestr[2:])  # a numpy typestr such as "|u1" or "<u2": the digits are bytes
    per_pixel = per_sample if len(spec.bands) == 1 else max(4, len(spec.bands) * per_sample)
    return width * height * per_pixel


_SIXTEEN_BIT_GREYS = ("I;16", "I;16B", "I;16L", "I")  # fit_exact scales these down through 32-bit copies


def working_bytes(mode: str, width: int, height: int) -> int:
    """The memory a photo's pixels take from decoding to fitting (fit_exact), by the copies it makes: the
    decoded image; for any mode but RGB(A), a 4-byte RGB copy beside it (16-bit greys two 32-bit copies
    first); for RGB(A), which fit_exact resizes as they are, the resize's intermediate (about a byte a source
    pixel) and, for RGBA, Pillow's premultiplied copy. Peaks measured with ru_maxrss, fitting 5000x4000 to
    1216x832, in bytes a pixel: RGB 5.06, RGBA 9.06, L/P/1 5.2, LA 8.0, CMYK 8.0, I;16 10.0. Counting the
    decoded image alone let a 10000x10000 16-bit grey PNG of 0.2 MB through as 200 MB when fitting it took over
    1 GB, and charged a grey photo a fifth of a colour one that needs as much."""
    pixels = width * height
    decoded = decoded_bytes(mode, width, height)
    if mode == "RGB":
        return decoded + pixels
    if mode == "RGBA":
        return decoded + pixels * (4 + 1)
    if mode in _SIXTEEN_BIT_GREYS:
        return decoded + pixels * (4 + 4)  # convert("I"), then point() beside it; the RGB copy comes after
    return decoded + pixels * 4


class _RetryableStatus(Exception):
    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(status)


def _safe(url: str) -> str:
    """The URL without its query, for messages: short, and nothing private rides along."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def fit_exact(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height, then crop the centre: the exact size, no bars, aspect kept."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in _SIXTEEN_BIT_GREYS:
        # 16-bit greys: scaled to 8 bits first, since convert("RGB") clips them (a 16-bit PNG came out white).
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
