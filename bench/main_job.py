"""The offline main job as a user meets it, stage by stage: `dvc repro` in a fresh clone, after install.

`python -m bench.main_job` -> bench/results/main_job.md. Clones this repository's HEAD into a
temporary folder (nothing else beside it), runs `dvc repro` with the default params.yaml, and reads
what each stage recorded of itself (metrics/stages/<stage>.json: from process start to the first line
of its work, its wall time, its peak memory); DVC's own share is the rest of the wall time. Then an
unchanged `dvc repro`, `--repeats` times (the median). Run it with the project's environment active.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from stages.hardware import cpu_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "main_job.md"
ORDER = ("download", "preprocess", "features_train", "features_val", "features_test", "finetune", "evaluate", "export", "track")


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        clone = Path(scratch) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        wall, output = timed(["dvc", "repro"], clone)
        costs = {stage: json.loads((clone / "metrics/stages" / f"{stage}.json").read_text()) for stage in ORDER}
        unchanged = statistics.median(timed(["dvc", "repro"], clone)[0] for _ in range(args.repeats))
        accuracy = json.loads((clone / "metrics/eval.json").read_text())["accuracy"]
    noise = [line for line in output.splitlines() if "WARNING" in line or "warning" in line]
    startup, total = (sum(c[key] for c in costs.values()) for key in ("startup_seconds", "seconds"))
    rows = [
        f"| `{stage}` | {c['startup_seconds']:.1f} | {c['seconds'] - c['startup_seconds']:.1f} | {c['seconds']:.1f} | {c['peak_memory_mib']:.0f} |"
        for stage, c in costs.items()
    ]
    lines = [
        "# The offline main job, stage by stage",
        "",
        f"`dvc repro` in a fresh clone of HEAD, default params.yaml (EfficientNet-Lite0, head mode, fraction 0.01, 1,000 test images),",
        f"the project's environment installed; {os.cpu_count()} cores ({cpu_model()}). Made by `python -m bench.main_job`.",
        "",
        f"- **`dvc repro`: {wall:.1f} s wall**, test accuracy {accuracy:.4f}. The stages' processes: {total:.1f} s, of which start-up",
        f"  (process start to the first line of work: interpreter and imports) {startup:.1f} s; the rest, {wall - total:.1f} s, is DVC",
        "  itself and the `inputs` stage (which records no costs: it runs on every `dvc repro`).",
        f"- **Unchanged `dvc repro`: {unchanged:.2f} s** (median of {args.repeats}; only `inputs` runs: it records no costs).",
        f"- Warnings printed: {len(noise)}" + "".join(f"\n  - `{line.strip()}`" for line in noise),
        "",
        "| stage | start-up (s) | work (s) | wall (s) | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        f"| **sum** | {startup:.1f} | {total - startup:.1f} | {total:.1f} | |",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
