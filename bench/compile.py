"""torch.compile benchmark: full-mode training with the inductor backend (CPU) against eager, compile time included.

What is trained is exactly what `stages.finetune.train_full` trains for `train.mode: full`: the real
preprocess stage draws 1% of CIFAR-10 (seed 42), then train_full itself runs in a fresh process on
that share (the model loaded with a fresh head, channels-last, Collate/PixelDataset, its own
TrainingArguments: the full-mode auto recipe, lr 5e-4, 5 epochs, batch 32, warm-up and cosine,
evaluation and a checkpoint every epoch). train_full has no compile switch, and none is added to it:
for the compiled runs this script swaps the name `TrainingArguments` in stages.finetune for one that
adds `torch_compile=True, torch_compile_backend="inductor"` to the very same arguments, so the
Trainer (through accelerate) compiles the model; everything else is train_full's own code. The name
`RegularisedTrainer` there is likewise swapped for a subclass that only times: the wall of trainer.train() (the
5 epochs, compilation, every epoch's evaluation and checkpoint included), each optimizer step, and
each evaluation.

Per run: the total wall of trainer.train(), the first step (where the training graph is compiled), the
median step after step 3, images/s over the whole run (train_full's own figure) and in steady steps,
the first and later evaluations (the compiled model compiles again for eval mode), and the final and
best validation accuracy (compiled training must learn the same). Runs go eager, compiled, eager
(ABA), each in a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so that load
from other jobs on these cores shows as a gap between the two eager runs; the load average is
recorded before and after. A run that fails (no compiler, an inductor error) is recorded with its error.
Run: python -m bench.compile [--precisions auto,fp32] [--epochs 5]   -> bench/results/compile.md
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, cifar_work_dir, project_params, run_stage, write_result

RESULT_PREFIX = "compile-result: "
FIRST_STEADY_STEP = 4  # "after step 3": the compiled model's first steps compile, and warm-up settles


def work_dir() -> Path:
    """A scratch project of this benchmark's own (others may be using bench/common's at the same time),
    whose data/raw is a copy of the one cifar_work_dir holds."""
    work = Path(tempfile.gettempdir()) / "bench-compile"
    if not (work / "data/raw/classes.json").exists():
        shutil.copytree(cifar_work_dir() / "data/raw", work / "data/raw")
    return work


def bench_params(epochs: int, precision: str) -> dict:
    params = project_params()
    params.update(fraction=0.01, seed=42)
    params["model"].update(name="efficientnet-lite0", image_size=None)  # its own 224 px
    params["train"].update(mode="full", lr="auto", epochs=epochs, batch_size=32, precision=precision, processes=1)
    return params


def load_average() -> str:
    return "{:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def one_run(compiled: bool) -> dict:
    """In this process (the work directory is the cwd): train_full as the finetune stage calls it; its timings."""
    import torch
    from transformers import TrainerCallback, TrainingArguments, set_seed

    from stages import finetune
    from stages.checkpoints import Checkpoints
    from stages.dataformat import load_split
    from stages.hardware import pick_device_and_precision
    from stages.modeling import quiet_transformers
    from stages.params import load_params

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.began)

    timer = StepTimes()
    walls: dict[str, list[float]] = {"train": [], "evaluate": []}

    class TimedTrainer(finetune.RegularisedTrainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), timer], **kwargs)

        def train(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().train(*args, **kwargs)
            finally:
                walls["train"].append(time.perf_counter() - started)

        def evaluate(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                walls["evaluate"].append(time.perf_counter() - started)

    finetune.RegularisedTrainer = TimedTrainer
    if compiled:
        finetune.TrainingArguments = functools.partial(TrainingArguments, torch_compile=True, torch_compile_backend="inductor")

    params = load_params()
    quiet_transformers()
    device, precision = pick_device_and_precision(params.train.precision)
    train, val = load_split("train"), load_split("val")
    set_seed(params.seed)  # as train_and_save does before train_full: the new head's initial weights
    checkpoints = Checkpoints(Path(tempfile.mkdtemp(prefix="bench-compile-checkpoints-")), None)
    try:
        trained = finetune.train_full(params, train, val, device, precision, checkpoints)
    finally:
        shutil.rmtree(checkpoints.folder, ignore_errors=True)
    steps, epochs = timer.steps, trained.epochs
    dynamo = torch._dynamo.utils.counters
    return {
        "device": device, "precision": precision, "lr": params.train.lr, "epochs": params.train.epochs,
        "train_images": len(train), "val_images": len(val), "batch_size": params.train.batch_size,
        "train_wall_s": walls["train"][0], "steps": len(steps), "first_step_s": steps[0], "step_times_s": steps,
        "median_step_after_3_s": statistics.median(steps[FIRST_STEADY_STEP - 1:]),
        "evaluate_s": walls["evaluate"], "images_per_second": trained.images_per_second,
        "final_val_accuracy": float(epochs["val_accuracy"].iloc[-1]), "best_val_accuracy": float(epochs["val_accuracy"].max()),
        "final_train_loss": float(epochs["train_loss"].iloc[-1]),
        "dynamo_unique_graphs": dynamo["stats"].get("unique_graphs", 0), "dynamo_graph_breaks": sum(dynamo["graph_break"].values()),
    }


def run_in_process(work: Path, compiled: bool, log: Path) -> dict:
    """One run in a fresh Python process, with an inductor cache of its own (empty: compile time from cold)."""
    cache = Path(tempfile.mkdtemp(prefix="bench-compile-inductor-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "bench.compile", "--one", "compiled" if compiled else "eager"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process_s = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    with log.open("a") as out:
        out.write(f"===== {' '.join(cmd)} (exit {done.returncode}, {process_s:.1f} s)\n{done.stdout}\n")
    found = [line[len(RESULT_PREFIX):] for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not found:
        lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "no output")
        return {"error": error.strip(), "exit": done.returncode, "process_s": process_s}
    return json.loads(found[-1]) | {"process_s": process_s}


def row(label: str, result: dict) -> dict:
    if "error" in result:
        return {"run": label, "train() wall s": f"failed (exit {result['exit']}): `{result['error'][:300]}`"} | {
            k: "" for k in ("first step s", "median step after 3 s", "img/s (whole run)", "img/s (steady steps)", "slowest later step s", "evaluations s", "val acc final / best", "load before / after")
        }
    evals = result["evaluate_s"]
    return {
        "run": label,
        "train() wall s": f"{result['train_wall_s']:.1f}",
        "first step s": f"{result['first_step_s']:.1f}",
        "median step after 3 s": f"{result['median_step_after_3_s']:.2f}",
        "img/s (whole run)": f"{result['images_per_second']:.1f}",
        "img/s (steady steps)": f"{result['batch_size'] / result['median_step_after_3_s']:.1f}",
        "slowest later step s": f"{max(result['step_times_s'][1:]):.1f}",
        "evaluations s": f"{statistics.median(evals):.1f}",
        "val acc final / best": f"{result['final_val_accuracy']:.3f} / {result['best_val_accuracy']:.3f}",
        "load before / after": f"{result['load_before']} / {result['load_after']}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precisions", default="auto", help="comma-separated train.precision values, each run ABA")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--one", choices=("eager", "compiled"), help=argparse.SUPPRESS)  # internal: one run, in the work dir
    args = parser.parse_args()
    if args.one:
        print(RESULT_PREFIX + json.dumps(one_run(args.one == "compiled")), flush=True)
        return

    started_at, load_start = time.strftime("%Y-%m-%d %H:%M"), subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    work = work_dir()
    log = work / "compile-runs.log"
    log.write_text("")
    rows, results = [], []
    precisions = args.precisions.split(",")
    planned = 3 * len(precisions)
    for precision in precisions:
        run_stage("preprocess", bench_params(args.epochs, precision), work)  # the same draw for every precision
        for i, compiled in enumerate((False, True, False)):
            before = load_average()
            result = run_in_process(work, compiled, log) | {"load_before": before, "load_after": load_average()}
            label = f"{result.get('precision', precision)} {'compiled (inductor)' if compiled else 'eager'}" + (" (again)" if i == 2 else "")
            results.append({"run": label, **result})
            rows.append(row(label, result))
            print(rows[-1], flush=True)
            (work / "compile-results.json").write_text(json.dumps(results, indent=2))
            write(rows, results, args.epochs, started_at, load_start, planned)  # after every run: an interrupted benchmark keeps what it measured


def write(rows: list[dict], results: list[dict], epochs: int, started_at: str, load_start: str, planned: int) -> None:
    load_now = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    first = next((r for r in results if "error" not in r), {})
    notes = [
        f"EfficientNet-Lite0 at 224 px, train.mode full through stages.finetune.train_full: {first.get('train_images', '?')} train / "
        f"{first.get('val_images', '?')} validation images (fraction 0.01, seed 42), lr {first.get('lr', '?')}, {first.get('epochs', epochs)} epochs "
        f"of batch {first.get('batch_size', 32)} ({first.get('steps', '?')} steps, the last of each epoch a partial batch), an evaluation and a "
        "checkpoint every epoch. Compiled: the same TrainingArguments plus `torch_compile=True, torch_compile_backend=\"inductor\"`, each run "
        "in a fresh process with an empty inductor cache, so its compile time is all there.",
        "train() wall: trainer.train() from start to end, compilation, evaluations and checkpoints included. First step: the first "
        f"optimizer step (the compiled run compiles the training graph there). Median step: steps {FIRST_STEADY_STEP} to the last. "
        "Slowest later step: the slowest after the first (compiled: the first partial batch, which compiles a second, dynamic-shape "
        "graph). img/s (whole run): train_full's own figure, images trained / train() wall; img/s (steady steps): batch / median step. "
        "Evaluations: median per epoch, eager in both runs (the Trainer evaluates its uncompiled model). Load: 1-minute load average "
        "before / after each run.",
        f"Started {started_at}; `uptime` at start: `{load_start}`; {'at end' if len(rows) == planned else f'after {len(rows)} of {planned} runs'}: `{load_now}`.",
    ]
    write_result("compile", "torch.compile (inductor, CPU) versus eager: full-mode training on 1% of CIFAR-10", rows, notes)


if __name__ == "__main__":
    main()
