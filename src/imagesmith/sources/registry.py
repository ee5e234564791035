"""The configured sources by name: generation always, stock photos when a Pexels key is set."""

from __future__ import annotations

import logging

from imagesmith.config import Settings
from imagesmith.sources.base import ImageSource, SourceName, SourceState, SourceStatus
from imagesmith.sources.generate import EngineFactory, GenerateSource
from imagesmith.sources.stock_source import create_stock_source

log = logging.getLogger(__name__)


class SourceRegistry:
    def __init__(self, sources: list[ImageSource]) -> None:
        self._sources = {source.name: source for source in sources}

    def get(self, name: SourceName) -> ImageSource | None:
        return self._sources.get(name)

    def status(self, name: SourceName) -> SourceStatus:
        source = self._sources.get(name)
        if source is None:
            return SourceStatus(SourceState.NOT_CONFIGURED, f"no {name.value} source is configured")
        return source.status()

    def statuses(self) -> dict[SourceName, SourceStatus]:
        return {name: self.status(name) for name in SourceName}

    def settling(self) -> bool:
        """Whether any source is still starting (the worker waits for them before taking jobs)."""
        return any(source.status().state is SourceState.STARTING for source in self._sources.values())

    def close(self) -> None:
        """Release every source's connections and threads (the lifespan calls it after the worker stops)."""
        for source in self._sources.values():
            try:
                source.close()
            except Exception:
                log.warning("closing the %s source failed", source.name.value, exc_info=True)


def build_sources(
    settings: Settings, engine_factory: EngineFactory | None = None
) -> tuple[SourceRegistry, GenerateSource]:
    generate = GenerateSource(settings, engine_factory) if engine_factory else GenerateSource(settings)
    sources: list[ImageSource] = [generate]
    stock = create_stock_source(settings)
    if stock is not None:
        sources.append(stock)
        log.info("stock photos: Pexels at %s", settings.pexels_api_base_url)
    else:
        log.info("stock photos: not configured (set IMAGESMITH_PEXELS_API_KEY)")
    return SourceRegistry(sources), generate
