"""Stored images at stable, content-addressed URLs: the bytes never change, so caches may keep them forever.
Their names are SHA-256 hashes, unguessable, so they need no key unless IMAGESMITH_IMAGE_URLS_NEED_KEY says so
(deps.require_api_key_for_images)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from imagesmith.api.deps import FilesDep, ImagesAuthorized
from imagesmith.api.errors import OPENAI_IMAGE_ROUTES, ApiError
from imagesmith.storage.files import MEDIA_TYPES, parse_image_name

router = APIRouter(tags=["images"], dependencies=[ImagesAuthorized])

CACHE_FOREVER = "public, max-age=31536000, immutable"


class ImageFileResponse(FileResponse):
    """A stored image. A Range header it cannot parse is ignored and the whole file sent, as RFC 9110 lets a
    server do; Starlette answered it with a plain-text 400, the one error of this API that was not JSON."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []  # no range: the whole file


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match holds `etag`: '*', or a comma-separated list, each strong or weak (W/"..."); weak
    comparison, as RFC 9110 asks for this header."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get("/v1/images/{name}", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
@router.head("/v1/images/{name}", include_in_schema=False)  # the same, headers only (FileResponse sees HEAD)
async def get_image(name: str, request: Request, files: FilesDep) -> Response:
    if name in OPENAI_IMAGE_ROUTES:  # POST-only routes of the OpenAI Images API under the same prefix
        raise ApiError(405, "method_not_allowed", f"/v1/images/{name} takes POST", headers={"Allow": "POST"})
    parsed = parse_image_name(name)
    if parsed is None:
        raise ApiError(404, "not_found", "no such image; names are <sha256>.<png|jpg|webp>", "name")
    path = files.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no image named {name}", "name")
    etag = f'"{parsed[0]}"'
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_FOREVER})
    wanted = request.headers.get("range")
    if wanted is not None:
        size = path.stat().st_size
        try:  # said here, in JSON like every other error, rather than as Starlette's empty text/plain 416
            ImageFileResponse._parse_range_header(wanted, size)
        except RangeNotSatisfiable:
            raise ApiError(
                416,
                "range_not_satisfiable",
                f"the image is {size} bytes; ask for a range that starts below that",
                "Range",
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
    return ImageFileResponse(
        path, media_type=MEDIA_TYPES[parsed[1]], headers={"ETag": etag, "Cache-Control": CACHE_FOREVER}
    )
