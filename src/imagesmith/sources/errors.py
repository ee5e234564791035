"""One error type per failure of the stock-photo path, so the service maps each to one HTTP status and the
fallback policy to one reason. Messages never contain the API key."""

from __future__ import annotations

from datetime import UTC, datetime


class PexelsError(Exception):
    """Anything that kept a Pexels photo from being served."""


class PexelsNotConfigured(PexelsError):
    """No API key is set (IMAGESMITH_PEXELS_API_KEY)."""


class PexelsAuthError(PexelsError):
    """Pexels refused the key (401/403)."""


class PexelsQuotaExhausted(PexelsError):
    """The rate limit is spent; no call is made before `retry_at` (UTC)."""

    def __init__(self, retry_at: datetime, message: str | None = None) -> None:
        self.retry_at = retry_at
        super().__init__(message or f"Pexels quota exhausted; calls resume at {retry_at.isoformat()}")

    @classmethod
    def at_epoch(cls, epoch_s: float, message: str | None = None) -> PexelsQuotaExhausted:
        return cls(datetime.fromtimestamp(epoch_s, tz=UTC), message)


class PexelsUnavailable(PexelsError):
    """Pexels (or the image host) kept failing: 5xx, timeouts or network errors, after the retries."""


class PexelsBadResponse(PexelsError):
    """The answer was not what the API documents: malformed JSON, a missing field, an unexpected status."""


class PexelsNotFound(PexelsError):
    """No photo with that id (404)."""


class NoStockResults(PexelsError):
    """The search found no photo for the query (or none could be downloaded safely)."""

    def __init__(self, query: str, message: str | None = None) -> None:
        self.query = query
        super().__init__(message or f"Pexels has no photo for {query!r}")


class NothingToSearch(NoStockResults):
    """The request has no word to search for (a prompt of only weights and brackets, no keywords or title):
    no photo can match it, and Pexels was not asked."""


class DownloadRejected(PexelsError):
    """A photo download was refused for safety: the base of the three cases below."""


class DisallowedHost(DownloadRejected):
    """The URL's scheme or host is not in pexels_allowed_hosts."""


class DownloadTooLarge(DownloadRejected):
    """The body exceeds pexels_max_download_bytes, or the image pexels_max_image_pixels or, decoded,
    pexels_max_image_bytes."""


class NotAnImage(DownloadRejected):
    """The body is not a JPEG, PNG or WebP image that Pillow can decode."""
