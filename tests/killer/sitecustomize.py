"""Test-only: with this folder on PYTHONPATH and KILL_AT set, the stage process named in KILL_AT sends
SIGKILL to its process group (a `dvc repro` started in a session of its own, and so its stage), as
`kill -9 -PGID` would, at a chosen moment: its `call`-th call of `target` ("module:Attr.path").
`then` says when: "before" the call runs; "after" it; "half" after it, with the file it wrote (its
second argument) cut to its first half; "one-file" after deleting one file of the folder it was to delete.
Every other process (dvc itself, other stages) is left alone. No stage has a hook for this."""
import importlib
import json
import os
import signal
import sys
from pathlib import Path


def kill_group() -> None:
    if os.getpgrp() == os.getsid(0):  # only a session of its own, as the test starts it: never the shell's group
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(137)


def install(target: str, call: int, then: str) -> None:
    module, path = target.split(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real, calls = getattr(owner, name), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] < call:
            return real(*args, **kwargs)
        if then == "one-file":
            sorted(Path(args[0]).iterdir())[0].unlink()
        elif then != "before":
            real(*args, **kwargs)
        if then == "half":
            written = Path(args[1])
            written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
        kill_group()

    setattr(owner, name, dying)


if "KILL_AT" in os.environ:
    kill_at = json.loads(os.environ["KILL_AT"])
    module = f"stages.{kill_at.pop('stage')}"
    if ("-m", module) in zip(sys.orig_argv, sys.orig_argv[1:]):  # also torchrun's `python -u -m ...`
        # `python -m` puts the working directory first on sys.path only after this runs: a target in the
        # project's own code must be the stage's copy, not the one an editable install points at
        sys.path.insert(0, os.getcwd())
        install(**kill_at)
