"""What each stage costs before its first line of work: a fresh Python importing the stage's module.

`python -m bench.startup` -> bench/results/startup.md. Each stage module is imported in a new
process (as DVC starts it), `--repeats` times; the table gives the median wall time, and the
packages whose modules take longest to import (`python -X importtime`, each module's own time). The baseline row is
a bare interpreter.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_modules() -> list[str]:
    """The modules dvc.yaml's commands run, in pipeline order."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = [(s.get("do") or s)["cmd"] for s in stages.values()]
    return [re.search(r"python -m (stages\.\w+)", cmd)[1] for cmd in commands]


def import_seconds(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - started


def heaviest(module: str) -> str:
    """Import time by top-level package (each module's own time, summed, so nothing counts twice), largest first."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, check=True)
    own = Counter()
    for line in done.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)$", line)
        if found:
            own[found[2].split(".")[0]] += int(found[1])
    return ", ".join(f"{name} {us / 1e6:.1f} s" for name, us in own.most_common() if us >= 100_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [("(bare python)", statistics.median(import_seconds("pass") for _ in range(args.repeats)), "")]
    for module in stage_modules():
        seconds = statistics.median(import_seconds(f"import {module}") for _ in range(args.repeats))
        rows.append((module, seconds, heaviest(module)))
        print(f"{module}: {seconds:.2f} s", flush=True)
    lines = [
        "# Stage start-up: importing each stage's module in a fresh process",
        "",
        f"Median of {args.repeats} runs, wall seconds, on this machine; made by `python -m bench.startup`.",
        "The heaviest packages: each module's own import time from one `python -X importtime` run, summed by top-level package (those ≥ 0.1 s).",
        "",
        "| module | import (s) | heaviest imports |",
        "| --- | --- | --- |",
        *(f"| `{module}` | {seconds:.2f} | {libraries} |" for module, seconds, libraries in rows),
    ]
    out = ROOT / "bench" / "results" / "startup.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
