"""Which cuDNN plan each cuDNN graph shape runs (engine/cudnn_graphs.py: the fp8 convolutions'), remembered across
restarts.

Why: choosing a shape's plan builds up to 11 of them and times each (~2.4 s a shape, run 56); at the MLPerf setting
that made the first call 135 s longer (run 52: 50 graphs, 25 shapes at two UNet batches). The choice depends only
on the shape, the GPU and the cuDNN version, so it is kept in a small JSON file beside the compile cache, and a
restart builds the one plan each shape needs and times none. A missing, unreadable or unwritable file only means
choosing again. (The file keeps the name it had when only the fp8 convolutions used it, so no choice is lost.)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "fp8-conv-plans.json"


def plan_key(device_name: str, cudnn_version: int, shape: tuple[object, ...]) -> str:
    """One line per (GPU model, cuDNN version, graph shape): a plan index means nothing across them."""
    return f"{device_name} | cudnn {cudnn_version} | " + " ".join(str(part) for part in shape)


class PlanChoices:
    """Plan indices by plan_key, read from `path` at creation and written back on every new choice."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._choices: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            log.warning("cuDNN plans in %s not read (%s); choosing again", self.path, error)
            return {}
        if not isinstance(data, dict):
            return {}
        return {key: value for key, value in data.items() if isinstance(value, int) and value >= 0}

    def get(self, key: str) -> int | None:
        return self._choices.get(key)

    def remember(self, key: str, plan: int) -> None:
        self._choices[key] = plan
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".tmp")
            partial.write_text(json.dumps(self._choices, indent=1, sort_keys=True))
            os.replace(partial, self.path)  # whole or not at all: a crash mid-write leaves the old file
        except OSError as error:
            log.warning("cuDNN plans not saved to %s (%s): the next start chooses again", self.path, error)
