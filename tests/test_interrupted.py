"""A `dvc repro` killed with SIGKILL (its whole process group: dvc and the stage) at any moment, a checkpoint
or output file half written included, is finished by the next `dvc repro`, which ends with exactly the
results of a run never interrupted: the tiny ViT in full mode on the small tree, in fp32 on the CPU."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from stages.finetune import is_complete
from tests.conftest import ROOT
from tests.test_pipeline import ALWAYS, STAGES, assert_same_weights, dvc, make_repo, ran_stages, run

pytestmark = pytest.mark.slow  # real dvc runs: `make test`, not `make test-fast`

# 54 train images in batches of 8: 7 steps an epoch, checkpoint-7 ... checkpoint-28
PARAMS = {
    "fraction": 1.0, "data__test_fraction": 1.0, "train__epochs": 4, "train__batch_size": 8, "train__lr": 1e-3,
    "train__precision": "fp32", "export__check_images": 18,
}
RESULTS = ("metrics/finetune.json", "metrics/finetune_epochs.csv", "metrics/eval.json")  # not the *_speed.json timings


def repro_killed(repo: Path, stage: str, target: str, call: int, then: str, *args: str) -> str:
    """`dvc repro *args` in a session of its own, whose process group gets SIGKILL when `stage` makes its
    `call`-th call of `target`, `then` "before" or "after" that call, or "half": after it, with the
    file it wrote cut to its first half (tests/killer/sitecustomize.py)."""
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "killer"), os.environ.get("PYTHONPATH")])),
        "KILL_AT": json.dumps({"stage": stage, "target": target, "call": call, "then": then}),
    }
    return run([sys.executable, "-m", "dvc", "repro", *args], repo, env, status=-signal.SIGKILL, start_new_session=True)


def resumed_from(output: str) -> str:
    [line] = [line for line in output.splitlines() if line.startswith("finetune: ") and "resuming" in line]
    return line


@pytest.fixture(scope="module")
def reference(small_tree, tiny_vit, dvc_cache, tmp_path_factory) -> Path:
    """An uninterrupted finetune, evaluate and export, after a `dvc repro` killed while download wrote its files."""
    repo = make_repo(tmp_path_factory.mktemp("reference"), dvc_cache, data__source=str(small_tree), model__name=str(tiny_vit), **PARAMS)
    # --no-run-cache: other tests' repos share the cache, and download must run here, not be restored
    repro_killed(repo, "download", "datasets:Dataset.to_parquet", 2, "half", "--no-run-cache")  # train.parquet written, test.parquet half
    assert (repo / "data/raw/test.parquet").exists() and not (repo / "data/raw/classes.json").exists()
    assert ran_stages(dvc(repo, "repro", "--no-run-cache")) == STAGES
    return repo


def test_a_killed_finetune_resumes_from_its_newest_complete_checkpoint(reference, small_tree, tiny_vit, dvc_cache, tmp_path):
    repo = make_repo(tmp_path / "repo", dvc_cache, data__source=str(small_tree), model__name=str(tiny_vit), **PARAMS)
    checkpoints = repo / "models/checkpoints"
    dvc(repo, "repro", "preprocess")  # from the run-cache: the reference made them

    # during epoch 2 (its 3rd training step), with checkpoint-7 written
    repro_killed(repo, "finetune", "torch:Tensor.backward", 10, "before")
    # between epochs: right after checkpoint-14 was saved
    output = repro_killed(repo, "finetune", "transformers.trainer_callback:CallbackHandler.on_save", 1, "after")
    assert resumed_from(output) == "finetune: resuming from models/checkpoints/checkpoint-7"
    # while checkpoint-21 was written: its optimizer.pt half written (the 2nd torch.save of a checkpoint)
    output = repro_killed(repo, "finetune", "torch:save", 2, "half")
    assert resumed_from(output) == "finetune: resuming from models/checkpoints/checkpoint-14"
    assert (checkpoints / "checkpoint-21/model.safetensors").exists() and not (checkpoints / "checkpoint-21/trainer_state.json").exists()
    # ... and its weights half written
    output = repro_killed(repo, "finetune", "safetensors.torch:save_file", 1, "half")
    assert resumed_from(output) == (
        "finetune: checkpoint-21 is incomplete (killed while it was written or deleted), resuming from models/checkpoints/checkpoint-14"
    )
    # while the Trainer's rotation deleted checkpoint-7 or -14, whichever is not the best (the 1st rmtree removed
    # the incomplete checkpoint-21): checkpoint-21 is complete, though no on_save came after it
    output = repro_killed(repo, "finetune", "shutil:rmtree", 2, "one-file")
    assert "checkpoint-21 is incomplete" in resumed_from(output)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-14", "checkpoint-21", "checkpoint-7"]
    assert [is_complete(checkpoints / f"checkpoint-{step}") for step in (7, 14, 21)].count(False) == 1

    # the next run resumes from checkpoint-21 and finishes; killed in export while it wrote the exported weights
    output = repro_killed(repo, "export", "safetensors.torch:save_file", 1, "half", "--no-run-cache")
    assert resumed_from(output) == "finetune: resuming from models/checkpoints/checkpoint-21"
    assert all(is_complete(checkpoint) for checkpoint in checkpoints.glob("checkpoint-*"))
    # the Trainer's best checkpoint survived every kill, and is the one kept (then calibrated)
    state = json.loads((checkpoints / "checkpoint-28/trainer_state.json").read_text())
    assert_same_weights(repo / "models/finetuned", repo / state["best_model_checkpoint"], unfold_temperature=True)

    assert ran_stages(dvc(repo, "repro", "--no-run-cache")) == ALWAYS | {"export"}
    for name in RESULTS:
        assert (repo / name).read_bytes() == (reference / name).read_bytes(), name
    assert_same_weights(repo / "models/finetuned", reference / "models/finetuned")
    assert_same_weights(repo / "models/export", reference / "models/export")
