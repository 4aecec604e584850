"""The one kind of failure a user can fix, and how a stage reports it."""
from __future__ import annotations

import sys
from typing import Callable


class PipelineError(Exception):
    """Bad input: a parameter, a path, an image, an unreachable hub. The message names the fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError becomes one line on stderr and exit status 2."""
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
