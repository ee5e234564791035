"""The banded PNG encoder writes valid files: Pillow reads back the exact pixels and the parameters text, zlib
accepts the joined stream (its Adler-32 included), every filter type decodes, and the files are Pillow's size."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imagesmith.engine import png
from imagesmith.engine.output import encode_image, read_parameters
from imagesmith.engine.png import encode_png
from imagesmith.schemas import OutputFormat


def photo_like(side: int = 512, seed: int = 1) -> Image.Image:
    """Smooth shapes with a little grain: compresses like a photograph, unlike noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (side // 4, side // 4, 3), dtype=np.uint8))
    blurred = np.asarray(
        coarse.resize((side, side), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    )
    grain = rng.normal(0, 2, blurred.shape)
    return Image.fromarray((blurred + grain).clip(0, 255).astype(np.uint8))


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == png.SIGNATURE
    found, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        found.append((kind, body))
        at += 12 + length
    return found


def scanlines(data: bytes) -> bytes:
    """The file's filtered scanlines: zlib checks the joined stream's Adler-32 (a reader may not)."""
    return zlib.decompress(b"".join(body for kind, body in chunks(data) if kind == b"IDAT"))


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize(
    ("image", "bands"),
    [
        (photo_like(), None),
        (photo_like(), 1),
        (photo_like(), 7),
        (noise(300, 200), None),
        (noise(1, 1), 4),  # more bands than rows: one band
        (noise(5, 3), 5),  # one row a band
        (noise(67, 130), 3),
    ],
)
def test_pixels_come_back_exactly(image: Image.Image, bands: int | None) -> None:
    data = encode_png(image, {"parameters": "a lighthouse"}, bands=bands)
    assert np.array_equal(decoded(data), np.asarray(image))
    assert len(scanlines(data)) == image.height * (image.width * 3 + 1)
    if bands is not None:  # one IDAT chunk a band; never more bands than rows
        assert [kind for kind, _ in chunks(data)].count(b"IDAT") == min(bands, image.height)


@pytest.mark.parametrize("kind", png.FILTERS)
def test_every_filter_type_decodes(kind: int) -> None:
    image = photo_like(96, seed=kind)
    data = encode_png(image, {}, bands=3, filters=(kind,))
    lines = np.frombuffer(scanlines(data), dtype=np.uint8).reshape(96, -1)
    assert set(lines[:, 0]) == {kind}
    assert np.array_equal(decoded(data), np.asarray(image))


def test_rows_pick_the_filter_that_suits_them() -> None:
    """A flat top half (Sub wins: zeros after the first pixel), a vertical-stripe bottom half (Up wins)."""
    pixels = np.zeros((64, 48, 3), dtype=np.uint8)
    pixels[:32] = 200
    pixels[32:] = (np.arange(48) * 37 % 256).astype(np.uint8)[None, :, None]
    data = encode_png(Image.fromarray(pixels), {}, bands=2)
    kinds = np.frombuffer(scanlines(data), dtype=np.uint8).reshape(64, -1)[:, 0]
    assert set(kinds[1:32]) <= {1, 2, 4} and 2 in set(kinds[33:])
    assert len(set(kinds)) > 1
    assert np.array_equal(decoded(data), pixels)


def test_text_is_read_back_latin1_or_not() -> None:
    for text, kind in (
        ("a cat on a mat\nSteps: 4, Seed: 1", b"tEXt"),
        ("ein Kätzchen", b"tEXt"),  # Latin-1
        ("a cat 😺 in Tōkyō", b"iTXt"),  # not Latin-1: UTF-8 in iTXt
    ):
        data = encode_png(noise(8, 8), {"parameters": text})
        assert [found for found, _ in chunks(data)][:2] == [b"IHDR", kind]
        assert read_parameters(data) == text


def test_the_file_is_pillows_size() -> None:
    image = photo_like(1024)
    ours = encode_png(image, {"parameters": "x"})
    pillows = io.BytesIO()
    image.save(pillows, format="PNG")
    assert abs(len(ours) - len(pillows.getvalue())) / len(pillows.getvalue()) < 0.005


def test_bands_run_on_the_band_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = png._deflate_band

    def recording(*args: Any) -> tuple[bytes, bytes]:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(png, "_deflate_band", recording)
    encode_png(noise(256, 64), {}, bands=4)
    assert len(threads) == 4 and all(name.startswith("imagesmith-png") for name in threads)


def test_encode_image_uses_it_for_rgb_and_pillow_for_other_modes() -> None:
    rgb = encode_image(noise(70, 70), OutputFormat.PNG, "rgb one")
    assert [kind for kind, _ in chunks(rgb)].count(b"IDAT") == 1 and read_parameters(rgb) == "rgb one"
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 20, 4), dtype=np.uint8))
    data = encode_image(rgba, OutputFormat.PNG, "rgba one")
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == "RGBA" and np.array_equal(np.asarray(back), np.asarray(rgba))
    assert read_parameters(data) == "rgba one"
    with pytest.raises(ValueError, match="RGB images, not RGBA"):
        encode_png(rgba, {})
