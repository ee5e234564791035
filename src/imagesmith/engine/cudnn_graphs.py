"""cuDNN graphs through NVIDIA's cuDNN frontend (`import cudnn`, the optional `nvidia-cudnn-frontend` wheel): one
graph per operation shape, its plans built and timed on first use, the fastest kept and remembered.

For the fp8 operations torch does not have: engine/fp8_conv.py (convolutions), and benchmarks/fp8_attention.py
(scaled dot-product attention, measured and ruled out: slower than bf16 on SDXL, run 54). Each subclass says
how to describe its operation as a cuDNN graph and which of its tensors feed the graph's inputs; this module does
the rest: one handle per GPU, the graphs by shape, the plan
choice (cuDNN's heuristic's first plan was up to 3x slower than its fastest on SDXL's convolutions, run 51), the
choice remembered beside the compile cache (engine/cudnn_plan_file.py) so a restart builds only that plan, and a
report of what each choice cost (run 52's first call was 135 s longer and nothing said where the time went).
Timing every plan costs ~2.4 s a shape (run 56), and a service's warm-up meets each shape at every batch size up
to batch_max; so a shape met at a batch size within REUSE_WITHIN of one already timed builds that plan, found by
its name, and times nothing.

A first call never happens inside a CUDA-graph capture: torch's CUDA-graph trees run every new shape eagerly
first, and Engine.start calibrates the fp8 scales (eager) before anything compiles. If one did, the heuristic's
first plan is used and not remembered (timing synchronises, which a capture forbids).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from imagesmith.engine.cudnn_plan_file import FILE_NAME, PlanChoices, plan_key

log = logging.getLogger(__name__)

# Plans tried per shape when choosing the fastest: cuDNN offered 11 for each SDXL convolution shape in run 51, and
# the fastest was often the 7th. Building and timing them all takes ~2.4 s a shape (run 56).
PLANS_TRIED = 12
_TIMING_REPEATS = 5
# A plan chosen by timing at one batch size is built by name, untimed, for the same shape at a batch size within
# this factor. Run 56, the base UNet's 25 fp8 convolution shapes: batch 16's choice ran 0.6 % slower than the
# fastest at batch 8 on average (8.8 % at worst), but 7.7 % (46 %) at batch 2, where a third of the shapes did not
# even offer it. A service's warm-up meets every UNet batch from 2 to 2 x batch_max; this way it times a few.
REUSE_WITHIN = 2.0


def cudnn_frontend_available() -> bool:
    """Whether `import cudnn` (nvidia-cudnn-frontend) would work; it is an optional dependency."""
    import importlib.util

    return importlib.util.find_spec("cudnn") is not None


class GraphCall(Protocol):
    """One call of an operation: where it runs, what its graph is specific to, and a buffer for its result."""

    @property
    def device(self) -> torch.device: ...

    @property
    def shape_key(self) -> tuple[object, ...]:
        """Everything the call's graph is specific to."""
        ...

    @property
    def batch(self) -> int: ...

    @property
    def family_key(self) -> tuple[object, ...]:
        """shape_key without the batch size: the graphs whose plans may serve each other."""
        ...

    def new_output(self) -> torch.Tensor: ...


@dataclass
class ShapeGraph:
    """One shape's cuDNN graph, its tensors' handles by name, the plan chosen and the workspace it needs."""

    graph: Any
    tensors: dict[str, Any]
    plan: int
    workspace_bytes: int


class CudnnGraphs:
    """Graphs of one kind of operation, one per shape; subclasses give `describe` and `pack`."""

    kind = "cuDNN graph"  # for logs and errors: "fp8 convolution", "fp8 attention"
    # The cuDNN frontend, imported on first use; shared by every kind (one import, one module object).
    _cudnn: Any = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, Any] = {}
        self._graphs: dict[tuple[object, ...], ShapeGraph] = {}
        self.choices = PlanChoices(None)
        # One entry per graph built: what choosing its plan cost and chose (benchmarks read it).
        self.reports: list[dict[str, Any]] = []
        # Per (device, family): the batch sizes whose plans were timed in this process, and the fastest's name.
        self._timed: dict[tuple[object, ...], list[tuple[int, str]]] = {}

    def describe(self, cudnn: Any, handle: Any, call: Any) -> tuple[Any, dict[str, Any]]:
        """The operation as an unvalidated cuDNN graph, and its tensors by name (the output's set as output)."""
        raise NotImplementedError

    def pack(self, tensors: dict[str, Any], call: Any, out: torch.Tensor) -> dict[Any, torch.Tensor]:
        """The graph's tensors mapped to this call's torch tensors (its variant pack)."""
        raise NotImplementedError

    @classmethod
    def module(cls) -> Any:
        if CudnnGraphs._cudnn is None:
            try:
                import cudnn  # nvidia-cudnn-frontend, optional
            except ImportError as error:
                raise RuntimeError(
                    f"{cls.kind}s need NVIDIA's cuDNN frontend: pip install 'imagesmith[fp8-convs]'"
                ) from error
            CudnnGraphs._cudnn = cudnn
        return CudnnGraphs._cudnn

    def _handle(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._handles:
            with torch.cuda.device(index):
                self._handles[index] = self.module().create_handle()
        return self._handles[index]

    def run(self, call: GraphCall) -> torch.Tensor:
        key = (call.device, *call.shape_key)
        with self._lock:
            handle = self._handle(call.device)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._build(handle, call)
        out = call.new_output()
        self._execute(handle, entry, call, out, entry.plan)
        return out

    def _execute(self, handle: Any, entry: ShapeGraph, call: GraphCall, out: torch.Tensor, plan: int) -> None:
        cudnn = self.module()
        # torch's allocator gives the workspace, so inside a CUDA-graph capture it comes from the graph's pool.
        workspace = torch.empty(max(entry.workspace_bytes, 1), device=call.device, dtype=torch.uint8)
        # The handle runs on whatever stream torch is on now (the engine's, or a capture's).
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(call.device).cuda_stream)
        entry.graph.execute_plan_at_index(self.pack(entry.tensors, call, out), workspace, plan, handle=handle)

    def _device_name(self, device: torch.device) -> str:
        return torch.cuda.get_device_name(device)

    def _capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def _build(self, handle: Any, call: GraphCall) -> ShapeGraph:
        cudnn = self.module()
        graph, tensors = self.describe(cudnn, handle, call)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        key = plan_key(self._device_name(call.device), cudnn.backend_version(), call.shape_key)
        began = time.perf_counter()
        remembered = self.choices.get(key)
        if remembered is not None:
            try:
                graph.build_plan_at_index(remembered)
                workspace = graph.get_workspace_size_plan_at_index(remembered)
                log.info("%s %s: plan %d, remembered", self.kind, key, remembered)
                self._report(graph, key, remembered, [remembered], {}, began, remembered=True)
                return ShapeGraph(graph, tensors, remembered, workspace)
            except Exception as error:  # another build of cuDNN, say: choose again
                log.warning("%s %s: remembered plan %d not built (%s)", self.kind, key, remembered, error)
        family = (call.device, *call.family_key)
        near = self._named_plan_from_a_near_batch(graph, family, call.batch)
        if near is not None:
            index, timed_at = near
            try:
                graph.build_plan_at_index(index)
                workspace = graph.get_workspace_size_plan_at_index(index)
            except Exception as error:  # not buildable for this batch after all: choose by timing
                log.info("%s %s: batch %d's plan not built here (%s)", self.kind, key, timed_at, error)
            else:
                self.choices.remember(key, index)
                log.info("%s %s: plan %d, by name from batch %d", self.kind, key, index, timed_at)
                self._report(graph, key, index, [index], {}, began, remembered=False, timed_at=timed_at)
                return ShapeGraph(graph, tensors, index, workspace)
        built: list[int] = []
        for index in range(min(graph.get_execution_plan_count(), PLANS_TRIED)):
            try:
                graph.build_plan_at_index(index)
                built.append(index)
            except Exception:  # an engine that cannot take this shape: the next one may
                continue
        if not built:
            raise RuntimeError(f"cuDNN built no {self.kind} plan for {key}")
        entry = ShapeGraph(
            graph, tensors, built[0], max(graph.get_workspace_size_plan_at_index(i) for i in built)
        )
        timings: dict[int, float] = {}
        if not self._capturing():  # timing synchronises: never inside a capture
            if len(built) > 1:
                timings = self._time_plans(handle, entry, built, call)
                entry.plan = min(timings, key=timings.__getitem__)
            self.choices.remember(key, entry.plan)
            self._timed.setdefault(family, []).append(
                (call.batch, str(graph.get_plan_name_at_index(entry.plan)))
            )
        log.info("%s %s: plan %d, the fastest of %d built", self.kind, key, entry.plan, len(built))
        self._report(graph, key, entry.plan, built, timings, began, remembered=False)
        return entry

    def _named_plan_from_a_near_batch(
        self, graph: Any, family: tuple[object, ...], batch: int
    ) -> tuple[int, int] | None:
        """The index in this graph of a plan timed fastest at a batch size within REUSE_WITHIN of `batch`, and that
        batch size: the nearest such batch whose plan this graph offers (between two as near, the larger: its
        choice is the one measured to serve, run 56). None when there is none."""
        near = sorted(
            (max(batch, other) / min(batch, other), -other, name)
            for other, name in self._timed.get(family, [])
            if max(batch, other) <= REUSE_WITHIN * min(batch, other)
        )
        if not near:
            return None
        try:
            names = [str(graph.get_plan_name_at_index(i)) for i in range(graph.get_execution_plan_count())]
        except Exception:  # names unknown before a build on this cuDNN: choose by timing
            return None
        for _, negated, name in near:
            if name in names:
                return names.index(name), -negated
        return None

    def _report(
        self,
        graph: Any,
        key: str,
        plan: int,
        built: list[int],
        timings: dict[int, float],
        began: float,
        remembered: bool,
        timed_at: int | None = None,
    ) -> None:
        # Plan names (engine and knobs) carry across batch sizes, where indices cannot.
        names = {index: str(graph.get_plan_name_at_index(index)) for index in built}
        self.reports.append(
            {
                "key": key,
                "plan": plan,
                "name": names[plan],
                "remembered": remembered,
                "by_name_from_batch": timed_at,
                "seconds": round(time.perf_counter() - began, 3),
                "plans_ms": {names[index]: round(ms / _TIMING_REPEATS, 4) for index, ms in timings.items()},
            }
        )

    def _time_plans(
        self, handle: Any, entry: ShapeGraph, plans: list[int], call: GraphCall
    ) -> dict[int, float]:
        """Each plan's time on this call's own operands in ms for _TIMING_REPEATS calls (CUDA events; one warm-up
        call each)."""
        out = call.new_output()
        timings = {}
        for plan in plans:
            self._execute(handle, entry, call, out, plan)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(_TIMING_REPEATS):
                self._execute(handle, entry, call, out, plan)
            end.record()
            end.synchronize()
            timings[plan] = start.elapsed_time(end)
        return timings


_Graphs = TypeVar("_Graphs", bound=CudnnGraphs)
# The process's graphs of each kind (each fp8 module's own), in creation order.
_SHARED: list[CudnnGraphs] = []


def shared(graphs: _Graphs) -> _Graphs:
    """Register a module's process-wide graphs, so that plan memory and reports cover every kind."""
    _SHARED.append(graphs)
    return graphs


def remember_plans_in(folder: Path) -> None:
    """Keep every kind's chosen cuDNN plans in `folder` (the compile cache's root) from now on: one file, one
    PlanChoices shared by all kinds (two objects on one file would overwrite each other's choices)."""
    path = folder / FILE_NAME
    if any(graphs.choices.path != path for graphs in _SHARED):
        choices = PlanChoices(path)
        for graphs in _SHARED:
            graphs.choices = choices


def plan_reports() -> list[dict[str, Any]]:
    """Every cuDNN graph built in this process so far, every kind: its key, the plan it runs, what choosing it
    cost."""
    return [report for graphs in _SHARED for report in graphs.reports]
