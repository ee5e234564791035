"""The generation source: the engine behind the source protocol, loaded in the background."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from imagesmith import STARTED_AT, exit_guard
from imagesmith.config import CompileChoice, Settings
from imagesmith.engine import BatchItem, Engine, GenerationResult
from imagesmith.engine.progress import CancelToken, GenerationCanceled, ProgressCallback
from imagesmith.sources.base import (
    ImageRequest,
    SourceImage,
    SourceName,
    SourceResult,
    SourceState,
    SourceStatus,
    SourceUnavailable,
)

log = logging.getLogger(__name__)


EngineFactory = Callable[[Settings], Engine]


class GenerateSource:
    name = SourceName.GENERATE

    def __init__(self, settings: Settings, factory: EngineFactory = Engine.start) -> None:
        self._settings = settings
        self._factory = factory
        self._engine: Engine | None = None
        self._error: str | None = None
        # What start-up is doing now, for health: a first compiled start takes minutes (docs/benchmarks.md).
        self._phase = "models loading"
        self._loader: threading.Thread | None = None
        self._stop_loading = CancelToken()  # set by close(): a server told to stop while it starts

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def start_loading(self) -> threading.Thread:
        """Load the models on a background thread, so the server answers (health, 503s) at once."""
        thread = threading.Thread(target=self._load, name="imagesmith-engine-load", daemon=True)
        self._loader = thread
        exit_guard.register(self)  # a process exiting mid-start-up waits for this thread (it runs torch)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            began = time.monotonic()
            engine = self._factory(self._settings)
            loaded = time.monotonic()
            if self._stop_loading.canceled:
                log.info("start-up stopped after the models loaded, before warm-up")
                return
            if self._settings.warmup:
                # Compile and autotune now, while health says "starting", rather than on a client's request.
                from imagesmith.engine.fast import warm_up_or_fall_back_to_eager

                sizes = self._settings.warmup_size_list()
                self._set_phase("warming up")
                took = warm_up_or_fall_back_to_eager(
                    engine,
                    sizes,
                    warm_up_batches(self._settings),
                    self._set_phase,
                    self._stop_loading,
                    any_size=self._settings.warms_up_any_size(),
                )
                log.info("warm-up done in %.1fs", took)
                if not self._settings.compile_on_request:
                    from imagesmith.engine.fast import stop_compiling_on_requests

                    stop_compiling_on_requests(engine)
            ready = time.monotonic()
            engine.startup = {
                "load_s": round(loaded - began, 2),
                "warmup_s": round(ready - loaded, 2),
                "ready_after_process_start_s": round(ready - STARTED_AT, 2),
            }
            log.info(
                "ready %.1fs after start (models %.1fs, warm-up %.1fs)",
                ready - STARTED_AT,
                loaded - began,
                ready - loaded,
            )
            self._engine = engine
        except GenerationCanceled:
            log.info("start-up stopped during warm-up")
        except Exception as error:  # any load failure is reported by health, not raised into the server
            if self._stop_loading.canceled:
                # The stop cut a compile or a load short (Ctrl-C during the warm-up): its error is the stop's
                # doing, not a broken model, and the process is on its way out.
                first_line = next(iter(str(error).strip().splitlines()), "")
                log.info(
                    "start-up stopped during %s (%s: %s)", self._phase, type(error).__name__, first_line[:200]
                )
                return
            self._error = f"{type(error).__name__}: {error}"[:1000]
            log.exception("model loading failed")

    def _set_phase(self, phase: str) -> None:
        self._phase = phase

    def status(self) -> SourceStatus:
        if self._engine is not None:
            return SourceStatus(SourceState.READY, "models loaded")
        if self._error is not None:
            return SourceStatus(SourceState.FAILED, self._error)
        since = time.monotonic() - STARTED_AT  # the clock health's startup figures use
        return SourceStatus(SourceState.STARTING, f"{self._phase} ({since:.0f}s after process start)")

    def close(self) -> None:
        """Stop a start-up still under way: a warm-up stops within a step and the engine is never served (the
        engine itself lives as long as the process). No wait here: a SIGTERM ends the process right after the
        lifespan without the interpreter's shutdown, and a normal exit waits in exit_guard."""
        if self._loader is not None and self._loader.is_alive() and not self._stop_loading.canceled:
            log.info("stopping start-up (%s)", self._phase)
        self._stop_loading.cancel()

    def stop_for_exit(self) -> threading.Thread | None:
        self.close()
        return self._loader if self._loader is not None and self._loader.is_alive() else None

    def fetch(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> SourceResult:
        outcome = self.fetch_batch([BatchItem(request.generation, on_progress, cancel)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def fetch_batch(self, items: list[BatchItem]) -> list[SourceResult | BaseException]:
        """Several compatible generations (equal engine.batch_key) in one pipeline pass; one outcome each.

        The images' files are not made here: each SourceImage encodes its file when first read. The worker
        reads them all at once on the encoding threads, after the pass and off the GPU's path
        (jobs/finishing.py), so the next pass need not wait for this one's encoding."""
        engine = self._engine
        if engine is None:
            raise SourceUnavailable(f"generation is not available: {self.status().detail}")
        return [
            outcome if isinstance(outcome, BaseException) else self._as_source_result(outcome)
            for outcome in engine.generate_batch(items)
        ]

    def max_batch_images(self) -> int:
        """Images one pass may hold: the setting when weights are resident, 1 when offloading (memory is tight)."""
        engine = self._engine
        if engine is None or engine.plan.offload != "none":
            return 1
        return self._settings.batch_max_images

    def _as_source_result(self, result: GenerationResult) -> SourceResult:
        media_type = result.metadata.request.output_format.media_type
        images = [
            SourceImage(functools.partial(result.encoded, index), media_type, image.width, image.height)
            for index, image in enumerate(result.images)
        ]
        return SourceResult(source=self.name, images=images, metadata=result.metadata.model_dump(mode="json"))


def warm_up_batches(settings: Settings) -> list[int]:
    """Batch sizes (images per pass) the warm-up compiles: 1, and when compiled the largest pass the worker can
    run. A compiled graph is specialised to its batch size until dynamo sees a second one and marks the batch
    dimension dynamic, covering the sizes between. The largest pass is batch_max_images, or one request's
    num_images when that is more (a request that fills the budget alone runs alone, whatever its size)."""
    largest = max(settings.batch_max_images, settings.max_images_per_request)
    if settings.compile is CompileChoice.OFF or largest == 1:
        return [1]
    return [1, largest]
