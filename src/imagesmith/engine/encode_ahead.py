"""The next passes' prompts, encoded between this pass's denoising steps (IMAGESMITH_ENCODE_AHEAD).

Why: the text encoders are eager and launch-bound. A prompt the prompt cache has not seen costs ~45 ms of the
host's time at 1024x1024 on an H200 while the GPU waits, so a queue of new prompts ran ~6 % slower than one whose
embeddings were cached (runs 38 and 40, docs/benchmarks.md). During a pass's base stage the host is about one
step ahead of the GPU (a step's UNet call is ~33 ms of GPU time at batch 1 and ~230 ms at batch 8, against a few
ms of host work), so the worker tells the engine which prompts the queued jobs will need, and the base stage's
step callback encodes them into the prompt cache with time the host would otherwise spend waiting. The next
pass then finds its embeddings there.

- The same thread as the pass (the engine's GPU thread): no second thread touches CUDA, so nothing can overlap a
  CUDA-graph capture (the UNets' captures happen inside their compiled calls; a text encoder's graph, recorded
  by its first one-row call, engine/encoder_graphs.py, may be recorded here, between two UNet calls, where no
  other capture is open).
- Row by row, through the cache's own encoding (encode_prompt's computation on one text, prompt_cache._encode):
  the embeddings are bit for bit the ones the next pass would compute itself, so an image does not depend on
  whether its prompt came early. That encoding never waits for the GPU (its token ids are copied without a
  stream sync), so the step already queued keeps the GPU busy while the host encodes.
- Bounded: after each step it encodes while the time spent in this callback is under half the last step's
  (measured from the end of one callback to the next), at least one text a step; a late text is left to its pass.
- Only with the prompt cache on and every weight resident (offload none): under offload, running the text
  encoders in the middle of a stage would move the UNet off the GPU and back.

Measured (run 41, with the encoders' graphs, which left ~2 ms an encoder call to hide): +1.6-2.1 % images/s
through the queue at batch 1, 4 and 8 with new prompts, so on by default.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from imagesmith.engine.prompt_cache import PromptEmbeddingCache
from imagesmith.schemas import GenerationRequest

# The base pipeline's role in the prompt cache: the refiner's embeddings are sliced from the base's.
ROLE = "base"


class EncodeAhead:
    def __init__(self, cache: PromptEmbeddingCache) -> None:
        self._cache = cache
        self._lock = threading.Lock()  # expect() is called from the worker's thread, the rest on the GPU's
        self._texts: list[str] = []
        self.encoded = 0  # texts encoded ahead of their pass (for tests and the benchmarks)

    def expect(self, texts: Iterable[str]) -> None:
        """The texts the next passes will need, oldest job first. Replaces what was expected before: what the
        queue holds now is what matters."""
        with self._lock:
            self._texts = list(dict.fromkeys(text for text in texts if text))

    def expect_requests(self, requests: Iterable[GenerationRequest]) -> None:
        """expect() the texts these requests' passes will encode: each one's prompt and negative prompt."""
        self.expect(text for request in requests for text in (request.prompt, request.negative_prompt))

    def expected(self) -> list[str]:
        with self._lock:
            return list(self._texts)

    def _next_text(self) -> str | None:
        with self._lock:
            return self._texts.pop(0) if self._texts else None

    def after_each_step(self) -> Callable[[Any], None]:
        """For one base stage: a function to call with the pipeline after each denoising step."""
        last_end: float | None = None  # when the last callback returned

        def after_step(pipe: Any) -> None:
            nonlocal last_end
            began = time.perf_counter()
            if last_end is not None:  # none at the first step: no step's duration to go by yet
                budget_s = (began - last_end) / 2
                while (text := self._next_text()) is not None:
                    if self._cache.encode_ahead(pipe, ROLE, text):
                        self.encoded += 1
                    if time.perf_counter() - began >= budget_s:
                        break
            last_end = time.perf_counter()

        return after_step
