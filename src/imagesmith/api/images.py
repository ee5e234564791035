"""Stored images at stable, content-addressed URLs: the bytes never change, so caches may keep them forever.
Their names are SHA-256 hashes, unguessable, so they need no key unless IMAGESMITH_IMAGE_URLS_NEED_KEY says so
(deps.require_api_key_for_images)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from imagesmith.api.deps import FilesDep, ImagesAuthorized
from imagesmith.api.errors import ApiError
from imagesmith.storage.files import MEDIA_TYPES, parse_image_name

router = APIRouter(tags=["images"], dependencies=[ImagesAuthorized])

CACHE_FOREVER = "public, max-age=31536000, immutable"


@router.get("/v1/images/{name}", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
async def get_image(name: str, request: Request, files: FilesDep) -> Response:
    parsed = parse_image_name(name)
    if parsed is None:
        raise ApiError(404, "not_found", "no such image; names are <sha256>.<png|jpg|webp>", "name")
    path = files.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no image named {name}", "name")
    etag = f'"{parsed[0]}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_FOREVER})
    return FileResponse(
        path, media_type=MEDIA_TYPES[parsed[1]], headers={"ETag": etag, "Cache-Control": CACHE_FOREVER}
    )
