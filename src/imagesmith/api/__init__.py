"""The HTTP service: `create_app(settings)`; `imagesmith serve` runs it under uvicorn."""

from imagesmith.api.app import create_app

__all__ = ["create_app"]
