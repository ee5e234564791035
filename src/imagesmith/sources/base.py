"""The source protocol: what the job worker asks of any place a picture can come from.

A source turns an ImageRequest into image bytes plus a metadata record. It does not store files or know about
jobs; the worker tries a request's sources in its order of preference and stores what the first one returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from imagesmith.schemas import GenerationRequest

if TYPE_CHECKING:  # the engine package imports torch: keep it out of light imports
    from imagesmith.engine.progress import CancelToken, ProgressCallback


class SourceName(StrEnum):
    GENERATE = "generate"  # SDXL on this server's GPU
    STOCK = "stock"  # a stock photo search (Pexels), when configured


class SourceState(StrEnum):
    STARTING = "starting"  # still loading (models)
    READY = "ready"
    BLOCKED = "blocked"  # held back for a while (a spent quota); may still serve from a cache meanwhile
    FAILED = "failed"  # could not start, or its service refuses us (a bad key)
    NOT_CONFIGURED = "not_configured"  # no credentials or disabled by settings


@dataclass(frozen=True)
class SourceStatus:
    state: SourceState
    detail: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)  # the source's own report (quota, counters, ...)

    @property
    def ready(self) -> bool:
        return self.state is SourceState.READY


class FallbackReason(StrEnum):
    """Why a source did not serve; the value is stable for clients and metrics labels."""

    REQUESTED = "requested"  # not a failure: the source that served was the first asked for
    NO_RESULTS = "no_results"
    QUOTA_EXHAUSTED = "quota_exhausted"
    NOT_CONFIGURED = "not_configured"
    AUTH_FAILED = "auth_failed"
    UNAVAILABLE = "unavailable"
    BAD_RESPONSE = "bad_response"
    ERROR = "error"


class ImageRequest(BaseModel):
    """What one job asks for: the sources to try, in order, and what each needs to know."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SourceName] = Field(..., min_length=1)
    generation: GenerationRequest
    title: str | None = None
    keywords: list[str] = Field(default_factory=list)


class SourceImage:
    """One image a source serves: its file's bytes, media type and size.

    A generated image may be given an encoder (a thunk that makes the file) instead of bytes: the file is made
    the first time `data` is read, once. The worker reads it on its finishing thread while the GPU runs the next
    pass (jobs/finishing.py), so the encoding (~0.2 s for a 1024x1024 PNG) is off the GPU's path."""

    __slots__ = ("_data", "_encode", "_lock", "height", "media_type", "width")

    def __init__(self, data: bytes | Callable[[], bytes], media_type: str, width: int, height: int) -> None:
        self._data: bytes | None = data if isinstance(data, bytes) else None
        self._encode: Callable[[], bytes] | None = None if isinstance(data, bytes) else data
        self._lock = threading.Lock()  # two readers of a pending image encode it once
        self.media_type, self.width, self.height = media_type, width, height

    @property
    def data(self) -> bytes:
        with self._lock:
            if self._data is None:
                assert self._encode is not None
                self._data = self._encode()
                self._encode = None  # drop the decoded picture the encoder holds
            return self._data

    @property
    def pending(self) -> bool:
        """Whether the file is still to be made (reading `data` makes it)."""
        return self._data is None

    def __repr__(self) -> str:
        state = "pending" if self.pending else f"{len(self._data or b'')} bytes"
        return f"SourceImage({self.media_type}, {self.width}x{self.height}, {state})"


@dataclass
class SourceResult:
    source: SourceName
    images: list[SourceImage]
    metadata: dict[str, Any] = field(default_factory=dict)  # the source's own record (engine metadata, ...)
    attribution: dict[str, Any] | None = None  # the credit a stock photo must carry (it is in the file too)


class SourceUnavailable(Exception):
    """The source cannot serve this request now: try the next one. `reason` says why, for clients and metrics;
    `retry_at` (UTC) says when it may serve again, where that is known (a quota reset)."""

    default_reason = FallbackReason.UNAVAILABLE

    def __init__(
        self, message: str, reason: FallbackReason | None = None, retry_at: datetime | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason
        self.retry_at = retry_at


class NoMatch(SourceUnavailable):
    """The source ran but has nothing for this request (a stock search with no hits): try the next one."""

    default_reason = FallbackReason.NO_RESULTS


class ImageSource(Protocol):
    name: SourceName

    def status(self) -> SourceStatus: ...

    def close(self) -> None:
        """Release what the source holds (connections, threads); called once at shutdown."""
        ...

    def fetch(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> SourceResult:
        """Blocking; runs on the worker thread. Raises SourceUnavailable (or NoMatch) to pass to the next source,
        GenerationCanceled when canceled, anything else to fail the job."""
        ...
