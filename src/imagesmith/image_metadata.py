"""Text in EXIF UserComment, the one place JPEG and WebP files carry our records (generation parameters, a
stock photo's attribution). Torch-free, so the stock path (sources/) and the engine's output both use it.

UserComment starts with an 8-byte character-code prefix; "UNICODE\\0" then UTF-16 (big-endian, as Pillow
writes the rest of the EXIF block) is what A1111-compatible readers and exiftool decode.
"""

from __future__ import annotations

from PIL import Image

EXIF_USER_COMMENT = 0x9286
EXIF_IFD = 0x8769
UNICODE_PREFIX = b"UNICODE\x00"


def set_user_comment(exif: Image.Exif, text: str) -> Image.Exif:
    """Put text in the EXIF sub-IFD's UserComment of exif (other tags kept); returns exif."""
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = UNICODE_PREFIX + text.encode("utf-16-be")
    return exif


def read_user_comment(image: Image.Image) -> str | None:
    """The UserComment text of an open image, or None. Other character codes are read as UTF-8."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if not raw:
        return None
    if isinstance(raw, str):  # Pillow decodes some files' comments itself
        return raw
    if raw.startswith(UNICODE_PREFIX):
        return bytes(raw[len(UNICODE_PREFIX) :]).decode("utf-16-be")
    return bytes(raw[8:]).decode("utf-8", errors="replace")
