"""The source protocol: what the job worker asks of any place a picture can come from.

A source turns an ImageRequest into image bytes plus a metadata record. It does not store files or know about
jobs; the worker tries a request's sources in its order of preference and stores what the first one returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from imagesmith.engine.progress import CancelToken, ProgressCallback
from imagesmith.schemas import GenerationRequest


class SourceName(StrEnum):
    GENERATE = "generate"  # SDXL on this server's GPU
    STOCK = "stock"  # a stock photo search (Pexels), when configured


class SourceState(StrEnum):
    STARTING = "starting"  # still loading (models)
    READY = "ready"
    FAILED = "failed"  # tried to start and could not
    NOT_CONFIGURED = "not_configured"  # no credentials or disabled by settings


@dataclass(frozen=True)
class SourceStatus:
    state: SourceState
    detail: str = ""

    @property
    def ready(self) -> bool:
        return self.state is SourceState.READY


class ImageRequest(BaseModel):
    """What one job asks for: the sources to try, in order, and what each needs to know."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SourceName] = Field(..., min_length=1)
    generation: GenerationRequest
    title: str | None = None
    keywords: list[str] = Field(default_factory=list)


@dataclass
class SourceImage:
    data: bytes
    media_type: str  # "image/png", "image/jpeg", "image/webp"
    width: int
    height: int


@dataclass
class SourceResult:
    source: SourceName
    images: list[SourceImage]
    metadata: dict[str, Any] = field(default_factory=dict)  # the source's own record (engine metadata, ...)


class SourceUnavailable(Exception):
    """The source cannot serve now (not configured, still loading, failed to load): try the next one."""


class NoMatch(Exception):
    """The source ran but has nothing for this request (a stock search with no hits): try the next one."""


class ImageSource(Protocol):
    name: SourceName

    def status(self) -> SourceStatus: ...

    def fetch(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> SourceResult:
        """Blocking; runs on the worker thread. Raises SourceUnavailable or NoMatch to pass to the next source,
        GenerationCanceled when canceled, anything else to fail the job."""
        ...
