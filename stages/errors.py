"""The one kind of failure a user can fix, and how a stage reports it: its error, or its cost."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

STAGE_COSTS_DIR = Path("metrics/stages")  # <stage>.json per stage: what `track` logs as its wall time and memory


class PipelineError(Exception):
    """Bad input: a parameter, a path, an image, an unreachable hub. The message names the fix."""


def process_seconds() -> float:
    """Seconds since this process started (its imports included): what the user waits for."""
    import psutil

    return time.time() - psutil.Process().create_time()


def peak_memory_mib() -> float:
    """The largest resident set of this process or of any child it waited for (decoding workers, torchrun's)."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return peak * unit / 2**20


def run_stage(main: Callable[[], None], name: str | None = None) -> None:
    """Run a stage's main(); a PipelineError becomes one line on stderr and exit status 2. With `name`,
    a stage that succeeds records its start-up (process start to main), wall time and peak memory in
    metrics/stages/<name>.json, apart from its results: they differ from run to run."""
    startup = process_seconds()
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if name:
        costs = {"startup_seconds": round(startup, 2), "seconds": round(process_seconds(), 2), "peak_memory_mib": round(peak_memory_mib(), 1)}
        STAGE_COSTS_DIR.mkdir(parents=True, exist_ok=True)
        (STAGE_COSTS_DIR / f"{name}.json").write_text(json.dumps(costs, indent=2) + "\n")
