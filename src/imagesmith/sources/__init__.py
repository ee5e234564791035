"""Where a picture comes from: Pexels stock photos (stock.py) or generation (the engine).

The job worker sees every source through one protocol (base.py: ImageSource, SourceName, SourceResult) and
one policy (fallback.py: serve_first tries the request's sources in order and says which served and why).
The stock source is StockSource (stock_source.py), which runs the async StockPhotoSource on its own loop;
generate.py wraps the engine. Pexels errors live in errors.py. This package imports no torch: stock_source.py
and generate.py (which do) are imported by the service, not here.
"""

from imagesmith.sources.attribution import Attribution, read_attribution
from imagesmith.sources.base import FallbackReason, SourceName
from imagesmith.sources.errors import (
    DisallowedHost,
    DownloadRejected,
    DownloadTooLarge,
    NoStockResults,
    NotAnImage,
    PexelsAuthError,
    PexelsBadResponse,
    PexelsError,
    PexelsNotConfigured,
    PexelsNotFound,
    PexelsQuotaExhausted,
    PexelsUnavailable,
)
from imagesmith.sources.fallback import Served, SourceAttempt, SourcesExhausted, classify, serve_first
from imagesmith.sources.stock import PexelsStatus, StockPhoto, StockPhotoSource, StockRequest

__all__ = [
    "Attribution",
    "DisallowedHost",
    "DownloadRejected",
    "DownloadTooLarge",
    "FallbackReason",
    "NoStockResults",
    "NotAnImage",
    "PexelsAuthError",
    "PexelsBadResponse",
    "PexelsError",
    "PexelsNotConfigured",
    "PexelsNotFound",
    "PexelsQuotaExhausted",
    "PexelsStatus",
    "PexelsUnavailable",
    "Served",
    "SourceAttempt",
    "SourceName",
    "SourcesExhausted",
    "StockPhoto",
    "StockPhotoSource",
    "StockRequest",
    "classify",
    "read_attribution",
    "serve_first",
]
