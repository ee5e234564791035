"""The compile cache survives a restart (issue 5: "the compile cache persists across restarts so the second start
is quick"): two processes, one after the other, warm up the compiled tiny engine on one cache folder; the second
compiles nothing, every graph comes from the first one's cache. In separate processes because inductor also
keeps what it compiled in memory, which would hide a cache on disk that does not work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

WARM_UP = """
import json, sys
from pathlib import Path
from torch._dynamo.utils import counters
from imagesmith.config import CompileChoice, ModelPreset, Settings
from imagesmith.engine import Engine
from imagesmith.engine.fast import warm_up

settings = Settings(model=ModelPreset.TINY, data_dir=Path(sys.argv[1]), device="cpu",
                    compile=CompileChoice.DEFAULT, compile_cache_dir=Path(sys.argv[2]))
seconds = warm_up(Engine.start(settings), [(64, 64)], [1])
print(json.dumps({"seconds": seconds, "inductor": dict(counters["inductor"])}))
"""


def start_and_warm_up(home: Path, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", WARM_UP, str(home), str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_a_restart_takes_every_compiled_graph_from_the_cache(tiny_model_home: Path, tmp_path: Path) -> None:
    cache = tmp_path / "compile-cache"
    first = start_and_warm_up(tiny_model_home, cache)
    compiled = first["inductor"].get("fxgraph_cache_miss", 0)
    # Both UNets and the VAE decoder, each compiled and written to the cache.
    assert compiled >= 3 and first["inductor"].get("fxgraph_cache_hit", 0) == 0, first
    # Inductor's own graph cache, under the configured folder (not torch's default under /tmp).
    assert any(path.is_dir() for path in cache.glob("*/fxgraph")), sorted(cache.rglob("*"))[:20]
    second = start_and_warm_up(tiny_model_home, cache)
    assert second["inductor"].get("fxgraph_cache_hit", 0) == compiled, (first, second)
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, (first, second)
