"""Attribution that travels with a stock photo: in the API response, the job result and the file itself.

Pexels asks for a credit such as "Photo by NAME on Pexels", linking the photographer and the photo page.

In the file:
- JPEG and WebP: EXIF Artist (photographer), Copyright (the credit line and page URL) and ImageDescription
  (alt text), which every photo tool shows; EXIF holds ASCII only, so names are folded there ("Jérôme" ->
  "Jerome"). The exact record, as JSON, is in EXIF UserComment (UTF-16, like the generated images'
  parameters) and an XMP packet carries dc:creator / dc:rights / dc:description / dc:source in full Unicode.
- PNG: iTXt chunks Author, Copyright, Description, Source and "attribution" (the JSON record).
`read_attribution()` gets the record back from any of the three.
"""

from __future__ import annotations

import html
import io
import json
import unicodedata
from typing import BinaryIO, Literal
from urllib.parse import urlsplit
from xml.sax.saxutils import escape as xml_escape

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, ValidationError

from imagesmith.image_metadata import read_user_comment, set_user_comment
from imagesmith.schemas import OutputFormat
from imagesmith.sources.pexels_client import PexelsPhoto

TIFF_IMAGE_DESCRIPTION = 0x010E
TIFF_ARTIST = 0x013B
TIFF_COPYRIGHT = 0x8298
PEXELS_HOME = "https://www.pexels.com"
PEXELS_LICENSE_URL = "https://www.pexels.com/license/"


class Attribution(BaseModel):
    """Who made the photo and how to credit them."""

    model_config = ConfigDict(frozen=True)

    source: Literal["pexels"] = "pexels"
    photo_id: int
    photo_url: str  # the photo's page on pexels.com
    photographer: str
    photographer_url: str
    photographer_id: int | None = None
    alt: str = ""
    avg_color: str | None = None
    credit_text: str
    credit_html: str
    license_url: str = PEXELS_LICENSE_URL

    @classmethod
    def from_photo(cls, photo: PexelsPhoto) -> Attribution:
        name = photo.photographer.strip() or "an unknown photographer"
        page = web_link(photo.url) or PEXELS_HOME
        # Only http(s) links go into the HTML a blog pastes into its pages: a `javascript:` URL from a hostile
        # upstream (or a tampered answer) passed through, escaped but live.
        photographer_link = web_link(photo.photographer_url)
        by = (
            f'<a href="{html.escape(photographer_link, quote=True)}">{html.escape(name)}</a>'
            if photographer_link
            else html.escape(name)
        )
        credit_html = f'Photo by {by} on <a href="{html.escape(page, quote=True)}">Pexels</a>'
        return cls(
            photo_id=photo.id,
            photo_url=page,
            photographer=name,
            # The same filtered link as the credit's: a CMS that builds its own credit from this field must
            # not get a `javascript:` URL either.
            photographer_url=photographer_link or "",
            photographer_id=photo.photographer_id,
            alt=(photo.alt or "").strip(),
            avg_color=photo.avg_color,
            credit_text=f"Photo by {name} on Pexels",
            credit_html=credit_html,
        )


# Latin letters that Unicode does not decompose into a base letter and an accent.
_NO_DECOMPOSITION = str.maketrans(
    {
        "Ø": "O",
        "ø": "o",
        "Ł": "L",
        "ł": "l",
        "Đ": "D",
        "đ": "d",
        "ß": "ss",
        "Æ": "AE",
        "æ": "ae",
        "Œ": "OE",
        "œ": "oe",
    }
)


def _ascii(text: str) -> str:
    """Fold to ASCII for EXIF's ASCII fields: accents dropped ("Jérôme" -> "Jerome"), other letters '?'."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_NO_DECOMPOSITION))
    kept = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return kept.encode("ascii", "replace").decode("ascii")


def _xmp_packet(attribution: Attribution) -> bytes:
    def alt(value: str) -> str:
        return f'<rdf:Alt><rdf:li xml:lang="x-default">{xml_escape(value)}</rdf:li></rdf:Alt>'

    rights = f"{attribution.credit_text} ({attribution.photo_url})"
    body = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/">'
        f"<dc:creator><rdf:Seq><rdf:li>{xml_escape(attribution.photographer)}</rdf:li></rdf:Seq></dc:creator>"
        f"<dc:rights>{alt(rights)}</dc:rights>"
        f"<dc:description>{alt(attribution.alt)}</dc:description>"
        f"<dc:source>{xml_escape(attribution.photo_url)}</dc:source>"
        f"<photoshop:Credit>{xml_escape(attribution.credit_text)}</photoshop:Credit>"
        f"<xmpRights:WebStatement>{xml_escape(attribution.license_url)}</xmpRights:WebStatement>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    return f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>{body}<?xpacket end="w"?>'.encode()


def encode_with_attribution(
    image: Image.Image, output_format: OutputFormat, attribution: Attribution
) -> bytes:
    """The file's bytes with the attribution embedded. JPEG at quality 90 and WebP at 88: good for the web."""
    buffer = io.BytesIO()
    record = attribution.model_dump_json()
    if output_format is OutputFormat.PNG:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("Author", attribution.photographer)
        info.add_itxt("Copyright", f"{attribution.credit_text} ({attribution.photo_url})")
        info.add_itxt("Description", attribution.alt)
        info.add_itxt("Source", attribution.photo_url)
        info.add_itxt("attribution", record)
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
    exif = Image.Exif()
    exif[TIFF_ARTIST] = _ascii(attribution.photographer)
    exif[TIFF_COPYRIGHT] = _ascii(f"{attribution.credit_text} ({attribution.photo_url})")
    if attribution.alt:
        exif[TIFF_IMAGE_DESCRIPTION] = _ascii(attribution.alt)
    set_user_comment(exif, record)
    rgb = image.convert("RGB")
    if output_format is OutputFormat.JPEG:
        rgb.save(buffer, format="JPEG", quality=90, exif=exif.tobytes(), xmp=_xmp_packet(attribution))
    else:
        rgb.save(buffer, format="WEBP", quality=88, exif=exif.tobytes(), xmp=_xmp_packet(attribution))
    return buffer.getvalue()


def read_attribution(source: bytes | BinaryIO) -> Attribution | None:
    """The attribution embedded by encode_with_attribution, or None when the file has none."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        text = image.info.get("attribution")
        if text is None:
            text = read_user_comment(image)
    if not text:
        return None
    try:
        return Attribution.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return None


def read_exif_credit(source: bytes) -> dict[str, str]:
    """The plain EXIF fields (Artist, Copyright, ImageDescription) as generic photo tools see them."""
    with Image.open(io.BytesIO(source)) as image:
        exif = image.getexif()
        names = {
            TIFF_ARTIST: "Artist",
            TIFF_COPYRIGHT: "Copyright",
            TIFF_IMAGE_DESCRIPTION: "ImageDescription",
        }
        return {name: str(exif[tag]) for tag, name in names.items() if tag in exif}


def web_link(url: str | None) -> str | None:
    """`url` if it is an http(s) link, else None."""
    if not url:
        return None
    scheme = urlsplit(url.strip()).scheme.lower()
    return url.strip() if scheme in ("http", "https") else None
