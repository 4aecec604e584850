"""What every benchmark shares: the machine it ran on, medians of repeated timings, result files."""
from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from stages.dataformat import TensorSplit, raw_groups, raw_labels, read_classes, read_raw_group
from stages.decoding import decode_pixels
from stages.hardware import cpu_model

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "data" / "cifar10-jpg.tgz"  # CIFAR-10, committed (data/README.md)
RESULTS = ROOT / "bench" / "results"
REPEATS = 3
SAMPLE_S = 0.02  # how often run_stage samples the memory of a stage's processes


def run_stage(name: str, params: dict, work: Path, *args: str) -> tuple[float, float]:
    """Run one pipeline stage in `work` with `params` (and command-line `args`, as `features train`): (wall
    seconds, peak RSS in MiB). The peak is of the
    stage's process and its decoding workers together, sampled every SAMPLE_S: each worker's shared
    libraries count once per process, so it errs high."""
    import psutil

    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    stage = subprocess.Popen([sys.executable, "-m", f"stages.{name}", *args], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process, peak = psutil.Process(stage.pid), 0
    while stage.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
        except psutil.NoSuchProcess:  # a worker (or the stage) ended between listing and reading it
            pass
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - started
    output = stage.stdout.read().decode()
    if stage.returncode:
        raise RuntimeError(f"stages.{name} exited {stage.returncode}:\n{output[-3000:]}")
    return seconds, peak / 2**20


def project_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = str(ARCHIVE)
    return params


def cifar_work_dir() -> Path:
    """A scratch project directory whose data/raw holds all of CIFAR-10 (the download stage, run once)."""
    work = Path(tempfile.gettempdir()) / "bench-cifar10"
    if not (work / "data/raw/classes.json").exists():
        work.mkdir(exist_ok=True)
        run_stage("download", project_params(), work)
    return work


def cifar_images(n: int, split: str = "train") -> TensorSplit:
    """The first `n` images of a CIFAR-10 split, as the pipeline stores them (uint8, native size)."""
    raw = cifar_work_dir() / "data/raw"
    images = [image for task in raw_groups(split, np.arange(n), n, raw) for image in read_raw_group(task)]
    width, height = Image.open(io.BytesIO(images[0][1])).size
    pixels = np.frombuffer(decode_pixels(images, (width, height), None), np.uint8).reshape(n, 3, height, width)
    arrays = (pixels.copy(), raw_labels(split, raw)[:n], np.arange(n))
    return TensorSplit(*(torch.from_numpy(a) for a in arrays), read_classes(raw))


def machine() -> str:
    """The hardware, and how busy it was: other jobs on the same cores slow the seed's small batches
    more than ours, so a ratio measured under load overstates the speed-up."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    return f"{cpu_model()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}; load average {load:.1f} when written"


def median_seconds(work: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of `work()` over `repeats` runs, after one untimed warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_result(name: str, title: str, rows: list[dict], notes: list[str]) -> None:
    """bench/results/<name>.md: a table of `rows` under the machine line, printed too."""
    header = list(rows[0])
    lines = [f"# {title}", "", f"Machine: {machine()}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    lines += ["", *notes, ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
