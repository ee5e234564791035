"""One thread for all of an engine's GPU work: warm-up and every generation.

Why: torch.compile's `reduce-overhead` mode records CUDA graphs into a *per-thread* tree
(torch/_inductor/cudagraph_trees.py keeps its tree managers in a threading.local). The service warms up on its
loading thread and generates on its worker thread, so with a batched (dynamic-shape) graph the worker's first
request had to record a graph on a thread whose tree torch 2.11 never set up, and every request failed with
`AssertionError` in `cudagraph_trees.get_obj` (seen on an H200, runs 25-26 in docs/benchmarks.md; torch issue
#123177). Newer torch sets the tree up lazily, but per thread: the worker would then record its own copy of
every graph (a second memory pool, and a request paying the recording the warm-up was meant to pay). Running
every pass on the thread that warmed up keeps one tree, recorded once, before the service says ready.
"""

from __future__ import annotations

import contextvars
import queue
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from imagesmith import exit_guard

T = TypeVar("T")
_Call = tuple[Callable[[], object], Future[object]]


def ensure_cudagraph_tree_state() -> None:
    """Give this thread torch's CUDA-graph tree state when inductor's module was first imported on another
    thread (torch 2.11 sets it up for the importing thread only, and asserts elsewhere). A no-op before that
    module is imported (its import then happens here, at the first compile) and once the state exists."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None or hasattr(trees.local, "tree_manager_containers"):
        return
    import torch

    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    # What the module does for its importing thread (torch 2.11 and 2.13 alike).
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def drop_cudagraph_tree_state() -> None:
    """Take back what ensure_cudagraph_tree_state (or inductor's import) stashed in this thread's C++ storage,
    while the thread can still take the GIL. Left there, torch frees it in a thread-exit destructor that takes
    the GIL, and a thread ending during interpreter finalization then aborts the process (exit_guard.py says
    more; thread.join() returns before those destructors run)."""
    if "torch._inductor.cudagraph_trees" not in sys.modules:
        return
    import torch

    remove = getattr(torch._C, "_remove_obj_from_tls", None)  # a private API: if a torch lacks it, the exit
    if remove is None:  # guard's wait for the OS thread covers it
        return
    for key in ("tree_manager_containers", "tree_manager_locks"):
        if torch._C._is_key_in_tls(key):
            remove(key)


def _take_waiting(calls: queue.SimpleQueue[_Call | None]) -> list[_Call]:
    """Empty the queue; the calls that were waiting in it, in order (end markers dropped)."""
    taken: list[_Call] = []
    while True:
        try:
            item = calls.get_nowait()
        except queue.Empty:
            return taken
        if item is not None:
            taken.append(item)


class GpuThread:
    """Runs callables one at a time on a single daemon thread, started on first use; the caller waits for the
    result or the exception. The caller's context variables (the job id in log lines) go with each call."""

    def __init__(self, name: str = "imagesmith-gpu") -> None:
        self._name = name
        # A (call, future) pair per call; None (from close) ends the thread after the calls queued before it.
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Reentrant: a garbage-collection pass inside a locked section can run a dropped engine's
        # weakref.finalize, which calls close() on this thread (a plain lock deadlocked there).
        self._start_lock = threading.RLock()
        self._closed = False
        # Set on this object's threads (all of them, after replace_thread too): the nested-pass check.
        self._mine = threading.local()
        exit_guard.register(self)

    @property
    def thread(self) -> threading.Thread | None:
        """The thread serving calls now (None before the first call, or right after a replacement)."""
        return self._thread

    @property
    def closed(self) -> bool:
        """Whether close() (or stop_for_exit, at the process's exit) has run: no later call is taken."""
        return self._closed

    @property
    def ident(self) -> int | None:
        return None if self._thread is None else self._thread.ident

    def run(self, call: Callable[[], T], on_interrupt: Callable[[], None] | None = None) -> T:
        """call() on the GPU thread. If the wait is interrupted (Ctrl-C in the CLI), on_interrupt() asks the
        call to stop, and the caller waits for it before the interrupt goes on: a process must not exit
        while the GPU thread is inside torch (it aborted, 'terminate called without an active exception')."""
        if getattr(self._mine, "serving", False):
            # A pass that starts a pass (a progress callback generating, say) would swap the pipelines'
            # schedulers under the outer pass; queueing it would wait on itself for ever.
            raise RuntimeError("an engine pass cannot start another pass from its own GPU thread")
        context = contextvars.copy_context()
        done: Future[object] = Future()
        with self._start_lock:  # the queue and its thread change together (replace_thread)
            if self._closed:  # checked under the lock: a call queued behind close()'s marker would hang
                raise RuntimeError("this engine's GPU thread is closed")
            if self._thread is None:
                self._start_thread(previous=None)
            self._calls.put((lambda: context.run(call), done))
        try:
            return done.result()  # type: ignore[return-value]
        except BaseException:
            if done.done() or on_interrupt is None:
                raise  # the call's own outcome (or nothing to stop it with)
            # Wait for the pass to end (within a step), however often the user presses Ctrl-C meanwhile.
            while True:
                on_interrupt()
                try:
                    done.exception()
                    break
                except BaseException:
                    continue
            raise

    def close(self) -> None:
        """End the thread once the calls already queued are done (an engine that is dropped calls this)."""
        with self._start_lock:
            self._closed = True
            if self._thread is not None:
                self._calls.put(None)

    def stop_for_exit(self) -> threading.Thread | None:
        """At interpreter exit (imagesmith/exit_guard.py): run nothing more, and return the thread to wait for.

        The calls still queued never run and their futures stay unresolved: their callers are ending with the
        process, and a job whose pass never ran stays "running" in the store, so the next start puts it back in
        the queue (a cancel would have ended it failed)."""
        with self._start_lock:
            _take_waiting(self._calls)
            self.close()
            return self._thread

    def replace_thread(self) -> None:
        """Serve the calls waiting and every later one from a new thread, once the current one has finished
        the call it may be running (never two passes at once).

        For state torch keeps per thread that a failure can leave broken: a CUDA-graph capture that fails
        leaves its thread allocating into the graph's memory pool ("beginAllocateToPool: already recording"
        on every later capture, seen on an H200). A new thread starts clean."""
        with self._start_lock:
            if self._thread is None or self._closed:
                return
            old_calls, previous = self._calls, self._thread
            self._calls = queue.SimpleQueue()
            for waiting in _take_waiting(old_calls):  # the waiting calls move over, in order
                self._calls.put(waiting)
            old_calls.put(None)
            self._start_thread(previous)

    def _start_thread(self, previous: threading.Thread | None) -> None:
        # A daemon: a generation stuck in a driver call must not keep the process from exiting.
        self._thread = threading.Thread(
            target=self._loop, args=(self._calls, previous), name=self._name, daemon=True
        )
        self._thread.start()

    def _loop(self, calls: queue.SimpleQueue[_Call | None], previous: threading.Thread | None) -> None:
        self._mine.serving = True
        if previous is not None:
            previous.join()  # it may still be inside the call it took before the replacement
        try:
            while True:
                item = calls.get()
                if item is None:
                    return
                call, done = item
                self._run_one(call, done)
                # Holding the last call (its engine) while idle would keep a dropped engine's models in memory.
                del item, call, done
        finally:
            drop_cudagraph_tree_state()

    @staticmethod
    def _run_one(call: Callable[[], object], done: Future[object]) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            ensure_cudagraph_tree_state()
            done.set_result(call())
        except BaseException as error:  # handed to the caller, who decides
            done.set_exception(error)
        finally:
            # The exception's traceback holds this frame: without this, frame -> call -> engine and
            # frame -> done -> exception -> traceback -> frame would keep an engine alive until a gc pass.
            del call, done
