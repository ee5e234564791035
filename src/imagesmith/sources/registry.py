"""The configured sources by name, and the one place that finds the stock source if it is installed."""

from __future__ import annotations

import importlib
import logging

from imagesmith.config import Settings
from imagesmith.sources.base import ImageSource, SourceName, SourceState, SourceStatus
from imagesmith.sources.generate import EngineFactory, GenerateSource

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


def load_stock_source(settings: Settings) -> ImageSource | None:
    """The stock source, if its module exists and it is configured.

    stock.py is written separately; it plugs in by exposing `create_stock_source(settings) -> ImageSource | None`
    (None when it has no API key). Until it lands, stock search is simply "not configured".
    """
    try:
        module = importlib.import_module("imagesmith.sources.stock")
    except ModuleNotFoundError as error:
        if error.name != "imagesmith.sources.stock":
            raise
        return None
    factory = getattr(module, "create_stock_source", None)
    if factory is None:
        log.warning("imagesmith.sources.stock has no create_stock_source(settings); stock search disabled")
        return None
    source: ImageSource | None = factory(settings)
    return source


def build_sources(
    settings: Settings, engine_factory: EngineFactory | None = None
) -> tuple[SourceRegistry, GenerateSource]:
    generate = GenerateSource(settings, engine_factory) if engine_factory else GenerateSource(settings)
    sources: list[ImageSource] = [generate]
    stock = load_stock_source(settings)
    if stock is not None:
        sources.append(stock)
    return SourceRegistry(sources), generate
