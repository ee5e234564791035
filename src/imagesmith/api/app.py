"""The app factory: `create_app(settings)`. Everything stateful is built in the lifespan, nothing at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from imagesmith import __version__
from imagesmith.api import a1111, health, images, jobs, media, metrics, openai_images, openai_models
from imagesmith.api.errors import install_error_handlers
from imagesmith.api.limits import BodySizeLimit
from imagesmith.api.trailing_slash import IgnoreTrailingSlash
from imagesmith.config import Settings, get_settings, prepared_data_dir
from imagesmith.jobs.events import EventHub
from imagesmith.jobs.metrics import Metrics
from imagesmith.jobs.service import JobService
from imagesmith.jobs.store import DATABASE_NAME, JobStore
from imagesmith.jobs.worker import Worker
from imagesmith.sources.base import SourceName
from imagesmith.sources.generate import EngineFactory
from imagesmith.sources.registry import build_sources
from imagesmith.storage.files import ImageFiles

log = logging.getLogger(__name__)


def begin_shutdown(app: FastAPI) -> None:
    """Called when the server is told to stop, from any thread: waiting requests answer now (see
    JobService.begin_shutdown). A no-op before the app has started."""
    loop = getattr(app.state, "loop", None)
    service = getattr(app.state, "service", None)
    if loop is not None and service is not None:
        loop.call_soon_threadsafe(service.begin_shutdown)


def create_app(
    settings: Settings | None = None,
    engine_factory: EngineFactory | None = None,
    store: JobStore | None = None,
) -> FastAPI:
    """The service. `engine_factory` replaces Engine.start (tests pass a shared tiny engine). `store`: the job
    store, already open (serve opens it before the port, to say a lock or a damaged file in one line); the app
    then owns it and closes it at shutdown. Without one, the start-up opens it."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        data_dir = prepared_data_dir(settings.data_dir)
        job_store = store if store is not None else JobStore(data_dir / DATABASE_NAME)
        try:  # a start that fails below must not keep the store (and its lock) open
            recovered = job_store.recover(settings.max_attempts)
            if any(recovered):
                log.warning(
                    "recovered after an unclean stop: %d job(s) back in the queue, %d canceled as asked before "
                    "the stop, %d given up (attempts used): %s",
                    len(recovered.requeued),
                    len(recovered.canceled),
                    len(recovered.given_up),
                    ", ".join([*recovered.requeued, *recovered.canceled, *recovered.given_up]),
                )
            files = ImageFiles(data_dir / "images")
            # Safe here: this process holds the store's lock (store_lock.py), so no other put() is writing.
            removed = files.remove_partial_writes()
            if removed:
                log.warning("removed %d image file(s) a crash left half-written", removed)
            sources, generate = build_sources(settings, engine_factory)
            hub = EventHub()
            metrics_ = Metrics(job_store.counts, lambda: sources.status(SourceName.STOCK))
            worker = Worker(settings, job_store, files, sources, hub, metrics_)
            app.state.settings, app.state.store, app.state.files = settings, job_store, files
            app.state.sources, app.state.generate, app.state.hub = sources, generate, hub
            app.state.metrics, app.state.worker = metrics_, worker
            app.state.service = JobService(settings, job_store, sources, hub, worker)
            app.state.loop = asyncio.get_running_loop()  # for begin_shutdown, called from a signal handler
            app.state.a1111_jobs = a1111.A1111Jobs()
            # Models load in the background: health answers "starting" and generation requests get 503 meanwhile.
            generate.start_loading()
            worker.start()
        except BaseException:
            job_store.close()
            raise
        log.info(
            "imagesmith %s: data in %s, queue bound %d, auth %s",
            __version__,
            data_dir,
            settings.queue_max,
            "on" if settings.api_key_list() else "off",
        )
        try:
            yield
        finally:
            worker.stop()
            sources.close()
            job_store.close()

    app = FastAPI(
        title="imagesmith",
        version=__version__,
        summary="Featured images: SDXL generation (base + refiner) and stock photos, as jobs with live progress.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(IgnoreTrailingSlash)  # added last: it runs first, so every route sees the plain path
    # openai_images before images: POST /v1/images/generations next to GET /v1/images/{name}.
    for module in (media, jobs, health, openai_images, openai_models, images, metrics, a1111):
        app.include_router(module.router)
    return app
