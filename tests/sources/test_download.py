"""The safe downloader against the stand-in: hosts, schemes, redirects, size cap, content type, decoding."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from pexels_standin import StandIn, png_bomb
from PIL import Image

from imagesmith.sources.download import HostPolicy, ImageDownloader, fit_exact, working_bytes
from imagesmith.sources.errors import (
    DisallowedHost,
    DownloadTooLarge,
    NotAnImage,
    PexelsBadResponse,
    PexelsUnavailable,
)

pytestmark = pytest.mark.anyio


def downloader(standin: StandIn, **kwargs: object) -> ImageDownloader:
    options: dict[str, object] = {
        "max_bytes": 200_000,
        "timeout_s": 0.5,
        "max_retries": 2,
        "backoff_s": 0.001,
    }
    options.update(kwargs)
    hosts = options.pop("hosts", [standin.base_url])
    return ImageDownloader(HostPolicy(hosts), **options)  # type: ignore[arg-type]


def url(standin: StandIn, photo_id: int = 103) -> str:
    return f"{standin.base_url}/photos/{photo_id}/pexels-photo-{photo_id}.jpeg"


async def test_download_ok(standin: StandIn) -> None:
    fetcher = downloader(standin)
    got = await fetcher.fetch(url(standin) + "?fit=crop&w=120&h=80")
    await fetcher.aclose()
    assert (got.width, got.height, got.content_type) == (120, 80, "image/jpeg")


@pytest.mark.parametrize(
    ("behaviour", "error", "message"),
    [
        ("oversized", DownloadTooLarge, r"cap \(IMAGESMITH_PEXELS_MAX_DOWNLOAD_BYTES\); download stopped"),
        (
            "oversized_declared",
            DownloadTooLarge,
            r"50000000 bytes; the cap is \d+ \(IMAGESMITH_PEXELS_MAX_DOWNLOAD",
        ),
        ("not_image", NotAnImage, "text/html"),
        # Pillow's own words name its buffer object ("<_io.BytesIO object at 0x...>"), which reached users.
        ("garbage", NotAnImage, r"does not decode as an image: no image format recognised in its bytes$"),
        ("redirect_offsite", DisallowedHost, "evil.example.com"),
    ],
)
async def test_unsafe_downloads_are_refused(
    standin: StandIn, behaviour: str, error: type, message: str
) -> None:
    standin.image_default = behaviour
    fetcher = downloader(standin)
    with pytest.raises(error, match=message):
        await fetcher.fetch(url(standin))
    await fetcher.aclose()
    assert standin.image_calls == 1  # safety refusals are never retried


async def test_pixel_cap_is_checked_before_decoding(standin: StandIn) -> None:
    fetcher = downloader(standin, max_pixels=100 * 100)
    with pytest.raises(DownloadTooLarge, match=r"pixels \(IMAGESMITH_PEXELS_MAX_IMAGE_PIXELS\)"):
        await fetcher.fetch(url(standin))
    await fetcher.aclose()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at 89 MP
async def test_the_decoded_size_is_checked_before_decoding(standin: StandIn) -> None:
    """Under the pixel cap is not enough: the 0.78 MB PNG decodes to 400 MB. Refused as too large, not
    retried, its message naming the setting to raise."""
    png_bomb()  # built first (seconds), so the stand-in answers within the download timeout
    standin.image_default = "bomb"
    fetcher = downloader(standin, max_bytes=1_000_000)  # and the default caps: 100 MP, 256 MiB decoded
    with pytest.raises(
        DownloadTooLarge, match=r"900000000 bytes to decode and fit; the cap is 268435456 bytes"
    ):
        await fetcher.fetch(url(standin))
    await fetcher.aclose()
    assert standin.image_calls == 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
async def test_a_grey_photo_is_charged_for_its_conversion_to_rgb(standin: StandIn) -> None:
    """A 16-bit grey PNG of 0.2 MB at 100 MP counted 200 MB decoded, under the 256 MiB cap, and took over 1.1 GB
    to fit (its 32-bit copies, then RGB): what it takes on the way to RGB is charged."""
    png_bomb(grey=True)
    standin.image_default = "grey_bomb"
    fetcher = downloader(standin, max_bytes=1_000_000)
    with pytest.raises(DownloadTooLarge, match=r"I;16, 1000000000 bytes to decode and fit"):
        await fetcher.fetch(url(standin))
    await fetcher.aclose()


@pytest.mark.parametrize(
    ("mode", "per_pixel"),
    [
        ("RGB", 4 + 1),
        ("RGBA", 4 + 4 + 1),
        ("L", 1 + 4),
        ("P", 1 + 4),
        ("1", 1 + 4),
        ("LA", 4 + 4),
        ("CMYK", 4 + 4),
        ("I;16", 2 + 8),
        ("I", 4 + 8),
    ],
)
def test_working_bytes_count_the_copy_fitting_makes(mode: str, per_pixel: int) -> None:
    """The copies fit_exact makes, by mode (peaks measured with ru_maxrss: download.working_bytes); counting
    the decoded image alone charged 1 byte a pixel for grey or palette and 2 for 16-bit grey, against 5 and
    10 taken."""
    assert working_bytes(mode, 1000, 500) == 1000 * 500 * per_pixel


async def test_5xx_then_success_and_5xx_always(standin: StandIn) -> None:
    standin.image_script = ["500"]
    fetcher = downloader(standin)
    assert (await fetcher.fetch(url(standin))).width == 900
    standin.image_default = "500"
    with pytest.raises(PexelsUnavailable, match="502"):
        await fetcher.fetch(url(standin))
    await fetcher.aclose()
    assert standin.image_calls == 1 + 1 + 3


@pytest.mark.parametrize(
    ("hosts", "target"),
    [
        (["images.pexels.com"], "{base}/photos/103/x.jpeg"),  # the default: another host
        (["127.0.0.1"], "{base}/photos/103/x.jpeg"),  # a bare host means https only
        (["{base}"], "http://localhost:{port}/photos/103/x.jpeg"),  # same machine, other name
        (["{base}"], "http://127.0.0.1:1/photos/103/x.jpeg"),  # other port
        (["images.pexels.com"], "https://user:pw@images.pexels.com/photos/1/x.jpeg"),  # credentials
        (["images.pexels.com"], "ftp://images.pexels.com/photos/1/x.jpeg"),
    ],
)
async def test_host_policy_refuses(standin: StandIn, hosts: list[str], target: str) -> None:
    port = standin.base_url.rsplit(":", 1)[1]
    policy = HostPolicy([h.format(base=standin.base_url) for h in hosts])
    with pytest.raises(DisallowedHost):
        policy.check(target.format(base=standin.base_url, port=port))


def test_host_policy_allows() -> None:
    policy = HostPolicy(["images.pexels.com", "http://127.0.0.1:8080"])
    policy.check("https://images.pexels.com/photos/1/p.jpeg?w=10")
    policy.check("https://IMAGES.pexels.com:443/photos/1/p.jpeg")
    policy.check("http://127.0.0.1:8080/photos/1/p.jpeg")
    with pytest.raises(ValueError, match="http"):
        HostPolicy(["gopher://x"])


@pytest.mark.parametrize(
    ("size", "target"), [((900, 600), (300, 300)), ((300, 200), (1216, 832)), ((50, 80), (64, 64))]
)
def test_fit_exact_gives_the_exact_size(size: tuple[int, int], target: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    assert fit_exact(image, *target).size == target


def test_a_16_bit_png_keeps_its_tones() -> None:
    """convert("RGB") clips 16-bit greys: a gradient came out solid white."""
    import numpy as np

    gradient = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    encoded = io.BytesIO()
    Image.fromarray(gradient).save(encoded, "PNG")
    decoded = Image.open(io.BytesIO(encoded.getvalue()))
    assert decoded.mode.startswith("I")
    fitted = np.asarray(fit_exact(decoded, 64, 8))
    assert fitted.shape == (8, 64, 3)
    assert fitted[0, 0, 0] < 10 and fitted[-1, -1, 0] == 255  # a ramp up to white, not white throughout
    assert abs(int(fitted[4, 32, 0]) - int(gradient[4, 32]) // 256) <= 1


async def test_a_body_that_does_not_decode_is_a_bad_response(standin: StandIn) -> None:
    standin.image_default = "bad_encoding"  # Content-Encoding: gzip on a body that is not
    fetcher = downloader(standin)
    with pytest.raises(PexelsBadResponse, match="does not decode"):
        await fetcher.fetch(url(standin))
    await fetcher.aclose()
    assert standin.image_calls == 1  # the same body would come again: not retried


@pytest.mark.parametrize("failure", [struct.error("unpack"), IndexError("tile"), ZeroDivisionError()])
async def test_any_decoder_failure_is_not_an_image(
    standin: StandIn, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """Pillow's plugins raise more than OSError on malformed files; every such failure must read as 'not an
    image' (the next photo is tried), not escape as an unexpected error."""

    def broken_open(*args: object, **kwargs: object) -> Image.Image:
        raise failure

    fetcher = downloader(standin)
    monkeypatch.setattr(Image, "open", broken_open)
    with pytest.raises(NotAnImage, match="does not decode as an image"):
        await fetcher.fetch(url(standin))
    await fetcher.aclose()


async def test_a_host_that_drips_bytes_meets_a_deadline_for_the_whole_download(standin: StandIn) -> None:
    """Each piece arrives well within the per-read timeout; only a deadline on the whole attempt stops a host
    that would otherwise hold the worker for as long as it likes."""
    standin.image_default = "drip"
    standin.drip_interval_s = 0.1
    fetcher = downloader(standin, timeout_s=0.5, max_retries=0)
    began = time.monotonic()
    with pytest.raises(PexelsUnavailable, match=r"took over 0\.5s"):
        await fetcher.fetch(url(standin))
    assert time.monotonic() - began < 3
    await fetcher.aclose()


def test_an_image_over_pillows_own_limit_is_refused_naming_the_setting(standin: StandIn) -> None:
    """Pillow refuses over 178,956,970 pixels in Image.open, before imagesmith's cap is read; its refusal
    ("could be decompression bomb DOS attack") named no setting. The header of a 20000x20000 PNG is enough."""
    from imagesmith.config import PILLOW_PIXEL_LIMIT

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    huge = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(DownloadTooLarge) as refused:
        downloader(standin, max_pixels=PILLOW_PIXEL_LIMIT)._decoded(huge, url(standin))
    assert f"over {PILLOW_PIXEL_LIMIT} pixels" in str(refused.value)
    assert "(IMAGESMITH_PEXELS_MAX_IMAGE_PIXELS)" in str(refused.value)
