"""On a CUDA GPU: a stage's end does not wait for the GPU, and its time, read after the pass, is the GPU's own:
from where the stage was queued (or the stage before it ended) to where its last kernel ended."""

from __future__ import annotations

import pytest
import torch

from imagesmith.engine.stage_clock import StageClock, stage_start

pytestmark = pytest.mark.gpu

CYCLES_PER_STAGE = (
    200_000_000  # torch.cuda._sleep's spin: ~0.1 s at an H100's 1.98 GHz, more on slower clocks
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stages_end_without_waiting_and_are_timed_on_the_gpu() -> None:
    torch.cuda.synchronize()
    clock = StageClock()
    first = stage_start("cuda")
    torch.cuda._sleep(CYCLES_PER_STAGE)
    clock.finish("base", first, 1)
    second = stage_start("cuda")  # queued behind the first stage's spin: fires when it ends
    torch.cuda._sleep(CYCLES_PER_STAGE)
    clock.finish("refine", second, 1)
    assert not second.event.query(), "the first stage's end waited for the GPU"
    assert clock.reports == []
    reports = clock.settle()
    assert [report.name for report in reports] == ["base", "refine"]
    first_s, second_s = (report.seconds for report in reports)
    # Each stage is one spin, not the two that a start event taken at queueing time would span.
    assert 0.03 < first_s < 1.0 and 0.03 < second_s < 1.0
    assert abs(first_s - second_s) < 0.5 * max(first_s, second_s)
