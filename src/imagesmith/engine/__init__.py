"""The generation engine: a request in, images and a record of what ran out. No HTTP, no job store."""

from imagesmith.engine.engine import Engine, GenerationError, GenerationResult
from imagesmith.engine.models import ModelLoadError
from imagesmith.engine.progress import CancelToken, GenerationCanceled, ProgressCallback, ProgressEvent

__all__ = [
    "CancelToken",
    "Engine",
    "GenerationCanceled",
    "GenerationError",
    "GenerationResult",
    "ModelLoadError",
    "ProgressCallback",
    "ProgressEvent",
]
