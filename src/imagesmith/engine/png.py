"""PNG files made on several threads: the rows are cut into bands, each band is filtered and deflated on its own
thread, and the pieces are joined into the one zlib stream a PNG holds (what pigz does for gzip).

Why: Pillow encodes a PNG on one thread. For a 1024x1024 image that took 0.20-0.26 s on the H200 host (run 34,
docs/benchmarks.md), 14 % of a one-image request, and the client waits for it: the response names the file by its
sha256. Bands are independent because PNG's filters look only at the row above, which every band can read from
the image, and deflate pieces can be joined: every piece but the last ends with a sync flush (byte-aligned, no
final-block bit), the first gets the zlib header, the last the Adler-32 of all the filtered bytes.

The file matches Pillow's choices, so it is the same size within a fraction of a percent: the adaptive filter
per row (the one with the smallest sum of absolute values, bytes read as signed), zlib level 6 with the
Z_FILTERED strategy and memLevel 9. Each band restarts deflate's 32 KiB window, which costs a few hundred bytes.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZLIB_HEADER = b"\x78\x9c"  # deflate, 32 KiB window, default level: what zlib.compress(..., 6) writes
LEVEL, MEM_LEVEL = 6, 9
MIN_BAND_ROWS = 64  # below this a band's thread costs more than its share of the work
FILTERS = (0, 1, 2, 3, 4)  # None, Sub, Up, Average, Paeth

# Its own pool: encode_in_parallel runs whole images on the encoding threads, and an image waiting there for its
# bands must not wait for a thread of the same pool (with every thread waiting, none would be left to run them).
_BAND_THREADS = min(8, os.cpu_count() or 1)
_BANDS = ThreadPoolExecutor(max_workers=_BAND_THREADS, thread_name_prefix="imagesmith-png")


def encode_png(
    image: Image.Image, text: Mapping[str, str], bands: int | None = None, filters: Sequence[int] = FILTERS
) -> bytes:
    """An 8-bit RGB image as PNG file bytes, with `text` as tEXt chunks (iTXt where a value is not Latin-1, as
    Pillow does). `bands`: how many pieces (default: one per band thread, each at least MIN_BAND_ROWS rows);
    `filters`: the filter types a row may use (tests force each one)."""
    if image.mode != "RGB":
        raise ValueError(f"encode_png takes RGB images, not {image.mode}")
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    count = bands or min(_BAND_THREADS, max(1, height // MIN_BAND_ROWS))
    count = max(1, min(count, height))
    edges = [height * index // count for index in range(count + 1)]

    def piece(index: int) -> tuple[bytes, bytes]:
        return _deflate_band(pixels, edges[index], edges[index + 1], index == count - 1, filters)

    pieces = [piece(0)] if count == 1 else list(_BANDS.map(piece, range(count)))
    adler = 1
    for filtered, _ in pieces:
        adler = zlib.adler32(filtered, adler)
    chunks = [SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    chunks += [_text_chunk(key, value) for key, value in text.items()]
    for index, (_, deflated) in enumerate(pieces):
        head = ZLIB_HEADER if index == 0 else b""
        tail = struct.pack(">I", adler) if index == count - 1 else b""
        chunks.append(_chunk(b"IDAT", head + deflated + tail))
    chunks.append(_chunk(b"IEND", b""))
    return b"".join(chunks)


def _deflate_band(
    pixels: np.ndarray, start: int, stop: int, last: bool, filters: Sequence[int]
) -> tuple[bytes, bytes]:
    """Rows start..stop filtered (each with its filter-type byte) and deflated as one piece of the stream."""
    filtered = filter_rows(pixels, start, stop, filters)
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -15, MEM_LEVEL, zlib.Z_FILTERED)  # -15: no header
    deflated = compressor.compress(filtered) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return filtered, deflated


def filter_rows(pixels: np.ndarray, start: int, stop: int, filters: Sequence[int] = FILTERS) -> bytes:
    """PNG's filtered scanlines for rows start..stop of an (h, w, 3) uint8 image, each row with the allowed
    filter whose bytes, read as signed, have the smallest sum of absolute values (libpng's and Pillow's rule).

    Byte arithmetic wraps modulo 256 as PNG's filters do, so all but Paeth's distances stay in uint8."""
    rows = stop - start
    raw = np.ascontiguousarray(pixels[start:stop]).reshape(rows, -1)
    above = np.zeros_like(raw)  # the row above; zeros above the image's first row
    above[1:] = raw[:-1]
    if start > 0:
        above[0] = pixels[start - 1].reshape(-1)
    left = np.zeros_like(raw)  # the same channel of the pixel to the left (3 bytes back)
    left[:, 3:] = raw[:, :-3]
    above_left = np.zeros_like(raw)
    above_left[:, 3:] = above[:, :-3]
    candidates = np.empty((len(filters), rows, raw.shape[1]), dtype=np.uint8)
    for slot, kind in enumerate(filters):
        np.subtract(raw, _predictor(kind, left, above, above_left), out=candidates[slot])
    if len(filters) == 1:
        chosen = np.zeros(rows, dtype=np.intp)
    else:
        # |byte as int8| as uint8: abs(-128) stays 0x80 in int8, which is 128 read as uint8.
        magnitude = np.abs(candidates.view(np.int8)).view(np.uint8)
        chosen = magnitude.sum(axis=2, dtype=np.uint32).argmin(axis=0)
    out = np.empty((rows, raw.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = np.asarray(filters, dtype=np.uint8)[chosen]
    for row, slot in enumerate(chosen.tolist()):  # a row at a time: cheaper than a gather over all of them
        out[row, 1:] = candidates[slot, row]
    return out.tobytes()


def _predictor(kind: int, left: np.ndarray, above: np.ndarray, above_left: np.ndarray) -> np.ndarray:
    if kind == 0:
        return np.zeros((), dtype=np.uint8)
    if kind == 1:
        return left
    if kind == 2:
        return above
    if kind == 3:  # floor((left + above) / 2) without a 9-bit sum
        return (left >> 1) + (above >> 1) + (left & above & 1)
    if kind == 4:  # Paeth: whichever neighbour is closest to left + above - above_left, ties in this order
        a, b, c = left.astype(np.int16), above.astype(np.int16), above_left.astype(np.int16)
        to_left = np.abs(b - c)
        to_above = np.abs(a - c)
        to_corner = a + b
        to_corner -= c
        to_corner -= c
        np.abs(to_corner, out=to_corner)
        predicted = np.where(to_above <= to_corner, above, above_left)
        np.copyto(predicted, left, where=(to_left <= to_above) & (to_left <= to_corner))
        return predicted
    raise ValueError(f"no PNG filter type {kind}")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, no compression, no language tag or translated keyword, UTF-8
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))
