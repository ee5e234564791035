"""Property-based fuzzing of the OpenAPI schema (schemathesis): no input, valid or not, gets a 5xx.

The engine is a stub that makes an 8x8 picture at once, so the fuzz exercises the HTTP layer, validation, the
queue and the store without spending seconds per example on diffusion.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import not_a_server_error

from imagesmith.api import create_app
from imagesmith.config import Settings
from imagesmith.engine import GenerationResult
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from imagesmith.schemas import GenerationMetadata, ImageReport, RefineMode


class StubEngine:
    def generate(self, request: Any, on_progress: Any = None, cancel: Any = None) -> GenerationResult:
        resolved = request.resolve() if hasattr(request, "resolve") else request
        count = resolved.num_images
        metadata = GenerationMetadata(
            request=resolved, refine_mode_ran=RefineMode.NONE, refined=False, seeds=list(range(count)), stages=[],
            total_seconds=0.0, base_model="stub", refiner_model=None, device="cpu", dtype="fp32",
            images=[ImageReport(index=i, seed=i, refined=False, width=8, height=8) for i in range(count)],
        )  # fmt: skip
        return GenerationResult(
            images=[Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(count)], metadata=metadata
        )

    def generate_batch(self, items: list[Any]) -> list[GenerationResult | BaseException]:
        return [self.generate(item.request) for item in items]

    plan = plan_hardware(DeviceInfo("cpu"), Settings())
    encode_ahead = None  # as the Engine's attribute: off

    def planned_steps(self, request: Any) -> dict[str, int]:
        return {"base": request.resolve().num_inference_steps}

    def empty_stage(self, request: Any) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "plan": "stub", "refiner": "not configured", "base_model": "stub"}


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    app = create_app(
        Settings(
            data_dir=tmp_path_factory.mktemp("fuzz"),
            queue_max=1000,
            default_width=64,
            stock_default_size="64x64",
            default_height=64,
            warmup=False,
        ),
        engine_factory=lambda _: StubEngine(),  # type: ignore[arg-type,return-value]
    )
    # schemathesis enters the app's lifespan itself (from_asgi); a second one of ours beside it would open the
    # job store twice, which its lock refuses. The client below runs no lifespan: it only waits for ready.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    client = TestClient(app)
    for _ in range(200):
        if client.get("/v1/health").status_code == 200:
            break
    yield schema


def test_no_input_gets_a_5xx(fuzz_schema: schemathesis.BaseSchema) -> None:
    # Each operation gets its own hypothesis run (schemathesis' pytest plugin predates pytest 9's node API).
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()
