"""Multi-kernel graphs loaded from inductor's cache: give each cached Triton kernel back the lock it was saved without.

`IMAGESMITH_TIMED_REDUCTIONS` turns on inductor's multi-kernel. With it, every graph that comes from the compile
cache failed to load (run 95, H100, torch 2.11; the code is the same in torch 2.13):

    MultiKernelCall.__init__ -> load_cache -> cache_file_path -> JITFunction.cache_key -> `with self._hash_lock:`
    TypeError: 'NoneType' object does not support the context manager protocol

Inductor saves a compiled kernel for the cache with `prepare_for_pickle()`, which sets the Triton function's
`_hash_lock` to None because a lock does not pickle. The path that loads it back from the cache,
`StaticAutotunerFuture.result()`, never calls `restore_after_unpickle()`, which would give it a new lock. Nothing
reads the lock except multi-kernel, which hashes its kernels to find its own choice on disk, so only multi-kernel
graphs broke: the service's second start (the compile cache kept) and any second compile of one graph in a
process. The fix is the missing call, made before inductor's own `result()` runs; a kernel that has its lock
keeps it.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_imagesmith_restores_hash_lock"


def restore_locks_of_cached_kernels() -> bool:
    """Make inductor's cache path restore each kernel's lock before use; True when the fix is in place.

    Idempotent. A torch without the class (older, or reorganised) is left alone with a log line: its multi-kernel
    graphs may still fail to load from the cache, and the engine's warm-up would say so."""
    try:
        from torch._inductor.codecache import StaticAutotunerFuture
    except ImportError:
        log.info("timed reductions: this torch has no StaticAutotunerFuture; its cache path is left as it is")
        return False
    original = StaticAutotunerFuture.result
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def result_with_lock(self: Any, *args: Any, **kwargs: Any) -> Any:
        give_back_hash_lock(self.static_autotuner)
        return original(self, *args, **kwargs)

    setattr(result_with_lock, _MARK, True)
    StaticAutotunerFuture.result = result_with_lock  # type: ignore[method-assign]
    return True


def give_back_hash_lock(autotuner: Any) -> None:
    """The lock `prepare_for_pickle()` took from the kernel's Triton function, back as a new one. Only when it is
    missing: `restore_after_unpickle(None)` would also drop the launcher a loaded kernel already has."""
    triton_function = getattr(autotuner, "fn", None)
    if triton_function is None or getattr(triton_function, "_hash_lock", True) is not None:
        return
    restore = getattr(autotuner, "restore_after_unpickle", None)
    if restore is not None:
        restore(None)
    else:
        triton_function._hash_lock = threading.RLock()
