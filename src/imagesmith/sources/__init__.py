"""Where a picture comes from: Pexels stock photos (stock.py) or generation (the engine).

The service needs four names: StockPhotoSource and StockRequest (fetch a photo), serve_with_fallback (which
source serves, and why), and PexelsStatus (health and metrics). Errors live in errors.py.
"""

from imagesmith.sources.attribution import Attribution, read_attribution
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
from imagesmith.sources.fallback import (
    FallbackReason,
    SourceAttempt,
    SourceName,
    SourceOutcome,
    SourcesExhausted,
    serve_with_fallback,
)
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
    "SourceAttempt",
    "SourceName",
    "SourceOutcome",
    "SourcesExhausted",
    "StockPhoto",
    "StockPhotoSource",
    "StockRequest",
    "read_attribution",
    "serve_with_fallback",
]
