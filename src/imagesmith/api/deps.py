"""Dependencies: the app's settings and services, and the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from imagesmith.api.errors import ApiError
from imagesmith.config import Settings
from imagesmith.jobs.service import JobService
from imagesmith.storage.files import ImageFiles


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def job_service(request: Request) -> JobService:
    service: JobService = request.app.state.service
    return service


def image_files(request: Request) -> ImageFiles:
    files: ImageFiles = request.app.state.files
    return files


SettingsDep = Annotated[Settings, Depends(app_settings)]
ServiceDep = Annotated[JobService, Depends(job_service)]
FilesDep = Annotated[ImageFiles, Depends(image_files)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With keys configured, demand `Authorization: Bearer <key>`; compare in constant time against each."""
    keys = settings.api_key_list()
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    # Compare against every key, without stopping early, so timing tells nothing about which keys exist.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if scheme.lower() != "bearer" or not given or not matched:
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            "Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = Depends(require_api_key)


def require_api_key_for_images(request: Request, settings: SettingsDep) -> None:
    """Image URLs are content-addressed (a SHA-256 no one can guess), so by default they work as capability
    URLs: fetchable without a key, as clients of OpenAI's API download its image URLs. An operator who wants
    them behind the key too sets IMAGESMITH_IMAGE_URLS_NEED_KEY."""
    if settings.image_urls_need_key:
        require_api_key(request, settings)


ImagesAuthorized = Depends(require_api_key_for_images)


def holds_api_key(request: Request, settings: Settings) -> bool:
    """Whether the caller may see what only key holders see (no keys configured: everyone may)."""
    try:
        require_api_key(request, settings)
    except ApiError:
        return False
    return True
