"""The generation engine: a request in, images and a record of what ran out. No HTTP, no job store."""

from imagesmith.engine.engine import BatchItem, Engine, GenerationError, GenerationResult
from imagesmith.engine.models import ModelLoadError
from imagesmith.engine.pipeline import batch_key
from imagesmith.engine.progress import CancelToken, GenerationCanceled, ProgressCallback, ProgressEvent

__all__ = [
    "BatchItem",
    "CancelToken",
    "Engine",
    "GenerationCanceled",
    "GenerationError",
    "GenerationResult",
    "ModelLoadError",
    "ProgressCallback",
    "ProgressEvent",
    "batch_key",
]
