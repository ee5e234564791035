"""Where a picture comes from: a small protocol (base.py), generation (generate.py), stock photos (stock.py)."""

from imagesmith.sources.base import (
    ImageRequest,
    ImageSource,
    NoMatch,
    SourceImage,
    SourceName,
    SourceResult,
    SourceState,
    SourceStatus,
    SourceUnavailable,
)

__all__ = [
    "ImageRequest",
    "ImageSource",
    "NoMatch",
    "SourceImage",
    "SourceName",
    "SourceResult",
    "SourceState",
    "SourceStatus",
    "SourceUnavailable",
]
