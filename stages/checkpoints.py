"""Where finetune's checkpoints live, and which one a re-run resumes from.

An execution's checkpoints go to models/checkpoints/<key>/ in the project root, <key> being a digest of
everything they depend on (inputs_fingerprint). They are not a DVC output: `dvc exp run` checks every
output out as dvc.lock last recorded it, which deleted an interrupted run's checkpoints, and a queued or
`--temp` experiment runs in a copy of the project that goes away with them. Found from DVC_ROOT, the same
inputs find the same folder from `dvc repro`, `dvc exp run` and such a copy alike.

A folder is removed once its execution has finished (its model is a DVC output by then). An interrupted
execution's stays, for a re-run with the same inputs to resume from, until KEEP_DAYS have passed without
one. An execution locks its folder while it trains, so that two with the same inputs never share it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from safetensors import SafetensorError, safe_open

from stages.dataformat import MODEL_INPUT, PROCESSED_SPLITS, processed_path, read_json
from stages.errors import PipelineError
from stages.hub import project_root
from stages.params import Params

CHECKPOINTS_DIR = Path("models/checkpoints")  # in the project root
KEEP_DAYS = 7  # an interrupted execution's checkpoints, unused for this long, are removed
FINGERPRINT_NAME = "inputs.json"
LOCK_NAME = "lock"

# Every file the Trainer writes into a checkpoint (bf16 and fp32 need no scaler.pt). A kill -9 while it
# wrote one, or while its rotation deleted an old checkpoint, leaves some of them missing or cut short.
CHECKPOINT_FILES = (
    "config.json", "model.safetensors", "preprocessor_config.json", "training_args.bin",
    "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
)


@dataclass(frozen=True)
class Checkpoints:
    folder: Path  # where the Trainer writes this execution's checkpoints
    resume: str | None  # the checkpoint to resume from, or None to start over


def inputs_fingerprint(params: Params, device: str, precision: str) -> dict:
    """What the checkpoints depend on: resuming is only safe when all of it is unchanged. The code of
    every project module counts (more than finetune imports: a needless restart is safe, a stale resume not)."""
    data = {name: hashlib.sha256(processed_path(name).read_bytes()).hexdigest() for name in PROCESSED_SPLITS}
    code = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(Path(__file__).parent.glob("*.py"))}
    return {
        "seed": params.seed, "model": vars(params.model), "train": vars(params.train), "data": data,
        "pretrained": json.loads(MODEL_INPUT.read_text()) if MODEL_INPUT.exists() else None,  # a local model's contents
        "code": code, "versions": {p: version(p) for p in ("torch", "transformers")}, "device": device, "precision": precision,
    }


def shown(path: Path) -> str:
    """A path as a line shows it: from the project root."""
    return str(path.relative_to(project_root())) if path.is_relative_to(project_root()) else str(path)


def checkpoint_files(processes: int) -> tuple[str, ...]:
    """CHECKPOINT_FILES of a run with `processes` data-parallel processes: each saves its own rng_state_<rank>.pth."""
    if processes == 1:
        return CHECKPOINT_FILES
    return tuple(name for name in CHECKPOINT_FILES if name != "rng_state.pth") + tuple(f"rng_state_{rank}.pth" for rank in range(processes))


def is_complete(checkpoint: Path, processes: int = 1) -> bool:
    """Every file is there and readable to its end. The files themselves are checked rather than a marker
    written last (a callback's on_save): the Trainer's rotation runs before on_save, so a kill while it deletes an
    old checkpoint would leave the newest, complete one unmarked and the half-deleted one still marked."""
    try:
        for name in checkpoint_files(processes):
            path = checkpoint / name
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt"):  # fails unless the file is as long as its header says
                    pass
            else:
                zipfile.ZipFile(path).close()  # torch.save writes a zip archive, whose directory comes last
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError):
        return False
    return True


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def resumable_checkpoint(folder: Path, processes: int = 1) -> str | None:
    """The newest complete checkpoint whose best checkpoint is complete too, or None. Incomplete ones and any
    newer than it are removed, so that the Trainer's rotation and best_model_checkpoint never count them."""
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()), key=checkpoint_step, reverse=True)
    complete = {p.name for p in checkpoints if is_complete(p, processes)}
    passed = []  # why each newer checkpoint cannot be resumed from
    for checkpoint in checkpoints:
        if checkpoint.name not in complete:
            passed.append(f"{checkpoint.name} is incomplete (killed while it was written or deleted)")
            continue
        best = read_json(checkpoint / "trainer_state.json").get("best_model_checkpoint")
        if best and Path(best).name not in complete:
            # The Trainer would drop a missing best checkpoint but keep its best_metric: no later epoch could replace it.
            passed.append(f"{checkpoint.name}'s best checkpoint {Path(best).name} is missing or incomplete")
            continue
        for other in checkpoints:
            if other.name not in complete or checkpoint_step(other) > checkpoint_step(checkpoint):
                shutil.rmtree(other)
        print(f"finetune: {''.join(reason + ', ' for reason in passed)}resuming from {shown(checkpoint)}")
        return str(checkpoint)
    if passed:
        print(f"finetune: {', '.join(passed)}, starting over")
    return None


def prepare(folder: Path, fingerprint: dict, processes: int) -> str | None:
    """The checkpoint in `folder` to resume from, or None after clearing it for a start from scratch."""
    fingerprint_file = folder / FINGERPRINT_NAME
    if read_json(fingerprint_file) == fingerprint:  # not so when a kill cut it short
        resume = resumable_checkpoint(folder, processes)
        if resume:
            return resume
    for old in folder.glob("checkpoint-*"):
        shutil.rmtree(old)
    fingerprint_file.write_text(json.dumps(fingerprint, indent=2))
    return None


def try_lock(folder: Path):
    """An open lock file holding the folder's lock, or None while another execution holds it."""
    lock = open(folder / LOCK_NAME, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes, also by a kill
    except BlockingIOError:
        lock.close()
        return None
    return lock


def remove_unused(keep: Path) -> None:
    """Other executions' folders not in use and unused for KEEP_DAYS go; say what the others hold."""
    kept, size = 0, 0
    for folder in sorted(p for p in keep.parent.iterdir() if p.is_dir() and p != keep):
        lock = try_lock(folder)
        if lock and time.time() - folder.stat().st_mtime > KEEP_DAYS * 86400:
            shutil.rmtree(folder)
            print(f"finetune: removed {shown(folder)}, an interrupted execution's checkpoints unused for {KEEP_DAYS} days")
        else:
            kept += 1
            size += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if lock:
            lock.close()
    if kept:
        print(
            f"finetune: {shown(keep.parent)} also holds {kept} other execution(s)' checkpoints ({size / 1e9:.2f} GB): "
            f"re-running one resumes it; unused for {KEEP_DAYS} days, they are removed"
        )


@contextmanager
def checkpoints_for(fingerprint: dict, processes: int) -> Iterator[Checkpoints]:
    """This execution's checkpoint folder, locked, with the checkpoint to resume from; the folder is removed
    when the block ends without an error (the execution finished), and kept for a re-run otherwise."""
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    folder = project_root() / CHECKPOINTS_DIR / key
    folder.mkdir(parents=True, exist_ok=True)
    lock = try_lock(folder)
    if lock is None:
        raise PipelineError(
            f"another execution with the same inputs is training into {shown(folder)} now; "
            "let it finish, then re-run this one: DVC restores its results from the run-cache"
        )
    with lock:
        remove_unused(keep=folder)
        yield Checkpoints(folder, prepare(folder, fingerprint, processes))
        remove_finished(folder)


def remove_finished(folder: Path) -> None:
    shutil.rmtree(folder)
    print(f"finetune: finished, removed its checkpoints {shown(folder)}")
