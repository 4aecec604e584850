"""A `dvc repro` or `dvc exp run` killed with SIGKILL (its whole process group: dvc and the stage) at any
moment, a checkpoint or output file half written included, is finished by the next run of the same
command, which ends with exactly the results of a run never interrupted: the tiny ViT in full mode on the
small tree, in fp32 on the CPU."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from stages.checkpoints import CHECKPOINTS_DIR, is_complete
from tests.conftest import ROOT
from tests.test_pipeline import ALWAYS, STAGES, assert_same_weights, dvc, make_repo, ran_stages, run

pytestmark = pytest.mark.slow  # real dvc runs: `make test`, not `make test-fast`

# 54 train images in batches of 8: 7 steps an epoch, checkpoint-7 ... checkpoint-28
PARAMS = {
    "fraction": 1.0, "data__test_fraction": 1.0, "train__mode": "full", "train__epochs": 4, "train__batch_size": 8, "train__lr": 1e-3,
    "train__precision": "fp32", "export__check_images": 18,
    "train__keep_epoch": "val_loss",  # the best checkpoint, not the last, is what must survive the kills
}
RESULTS = ("metrics/finetune.json", "metrics/finetune_epochs.csv", "metrics/eval.json")  # not the *_speed.json timings


def killer_env(stage: str, target: str, call: int, then: str) -> dict[str, str]:
    """The environment in which `stage` is killed when it makes its `call`-th call of `target`, `then`
    "before" or "after" that call, or "half": after it, with the file it wrote cut to its first half
    (tests/killer/sitecustomize.py). Its whole process group when it runs in a session of its own."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "killer"), os.environ.get("PYTHONPATH")])),
        "KILL_AT": json.dumps({"stage": stage, "target": target, "call": call, "then": then}),
    }


def killed(repo: Path, command: list[str], stage: str, target: str, call: int, then: str) -> str:
    """`dvc *command` in a session of its own, whose process group gets SIGKILL as killer_env says."""
    env = killer_env(stage, target, call, then)
    return run([sys.executable, "-m", "dvc", *command], repo, env, status=-signal.SIGKILL, start_new_session=True)


def repro_killed(repo: Path, stage: str, target: str, call: int, then: str, *args: str) -> str:
    return killed(repo, ["repro", *args], stage, target, call, then)


def resumed_from(output: str) -> str:
    """The checkpoint a finetune resumed from, as models/checkpoints/<its folder>/checkpoint-N, and why."""
    [line] = [line for line in output.splitlines() if line.startswith("finetune: ") and "resuming" in line]
    return line


def checkpoint_folder(repo: Path) -> Path:
    [folder] = (repo / CHECKPOINTS_DIR).iterdir()  # one execution's
    return folder


@pytest.fixture(scope="module")
def reference(small_tree, tiny_vit, dvc_cache, tmp_path_factory) -> Path:
    """An uninterrupted finetune, evaluate and export, after a `dvc repro` killed while download wrote its files."""
    repo = make_repo(tmp_path_factory.mktemp("reference"), dvc_cache, data__source=str(small_tree), model__name=str(tiny_vit), **PARAMS)
    # --no-run-cache: other tests' repos share the cache, and download must run here, not be restored
    repro_killed(repo, "download", "pyarrow.parquet:ParquetWriter.close", 1, "after", "--no-run-cache")  # train.parquet written, test.parquet not
    assert (repo / "data/raw.partial/train.parquet").exists() and not (repo / "data/raw").exists()
    assert ran_stages(dvc(repo, "repro", "--no-run-cache")) == STAGES
    return repo


def test_a_killed_finetune_resumes_from_its_newest_complete_checkpoint(reference, small_tree, tiny_vit, dvc_cache, tmp_path):
    repo = make_repo(tmp_path / "repo", dvc_cache, data__source=str(small_tree), model__name=str(tiny_vit), **PARAMS)
    dvc(repo, "repro", "preprocess")  # from the run-cache: the reference made them

    # during epoch 2 (its 3rd training step), with checkpoint-7 written
    repro_killed(repo, "finetune", "torch:Tensor.backward", 10, "before")
    checkpoints = checkpoint_folder(repo)
    shown = checkpoints.relative_to(repo)
    # between epochs: right after checkpoint-14 was saved
    output = repro_killed(repo, "finetune", "transformers.trainer_callback:CallbackHandler.on_save", 1, "after")
    assert resumed_from(output) == f"finetune: resuming from {shown}/checkpoint-7"
    # while checkpoint-21 was written: its optimizer.pt half written (the 2nd torch.save of a checkpoint)
    output = repro_killed(repo, "finetune", "torch:save", 2, "half")
    assert resumed_from(output) == f"finetune: resuming from {shown}/checkpoint-14"
    assert (checkpoints / "checkpoint-21/model.safetensors").exists() and not (checkpoints / "checkpoint-21/trainer_state.json").exists()
    # ... and its weights half written
    output = repro_killed(repo, "finetune", "safetensors.torch:save_file", 1, "half")
    assert resumed_from(output) == (
        f"finetune: checkpoint-21 is incomplete (killed while it was written or deleted), resuming from {shown}/checkpoint-14"
    )
    # while the Trainer's rotation deleted checkpoint-7 or -14, whichever is not the best (the 1st rmtree removed
    # the incomplete checkpoint-21): checkpoint-21 is complete, though no on_save came after it
    output = repro_killed(repo, "finetune", "shutil:rmtree", 2, "one-file")
    assert "checkpoint-21 is incomplete" in resumed_from(output)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-14", "checkpoint-21", "checkpoint-7"]
    assert [is_complete(checkpoints / f"checkpoint-{step}") for step in (7, 14, 21)].count(False) == 1

    # the next run resumes from checkpoint-21 and trains to its end; killed just before it removes its checkpoints
    output = repro_killed(repo, "finetune", "stages.checkpoints:remove_finished", 1, "before")
    assert resumed_from(output) == f"finetune: resuming from {shown}/checkpoint-21"
    assert all(is_complete(checkpoint) for checkpoint in checkpoints.glob("checkpoint-*"))
    # the Trainer's best checkpoint survived every kill, and is the one kept (whole: transformers 5 renames ViT
    # weights on load), then calibrated
    state = json.loads((checkpoints / "checkpoint-28/trainer_state.json").read_text())
    assert state["best_metric"] == json.loads((repo / "metrics/finetune.json").read_text())["kept_val_loss"]
    assert_same_weights(repo / "models/finetuned", Path(state["best_model_checkpoint"]), unfold_temperature=True)

    # the next resumes from the last checkpoint (nothing left to train) and finishes, removing the checkpoints;
    # killed in export while it copied the model's files to models/export (the first, cut in half)
    output = repro_killed(repo, "export", "shutil:copyfile", 1, "half", "--no-run-cache")
    assert resumed_from(output) == f"finetune: resuming from {shown}/checkpoint-28"
    assert f"finetune: finished, removed its checkpoints {shown}" in output and not checkpoints.exists()

    assert ran_stages(dvc(repo, "repro", "--no-run-cache")) == ALWAYS | {"export", "track"}
    assert_same_results(repo, reference)


def assert_same_results(repo: Path, reference: Path) -> None:
    for name in RESULTS:
        assert (repo / name).read_bytes() == (reference / name).read_bytes(), name
    assert_same_weights(repo / "models/finetuned", reference / "models/finetuned")
    assert_same_weights(repo / "models/export", reference / "models/export")


def test_a_killed_dvc_exp_run_resumes_in_the_workspace_or_a_temporary_copy(reference, small_tree, tiny_vit, dvc_cache, tmp_path):
    """`dvc exp run` checks every output out as dvc.lock recorded it, and a queued or --temp experiment
    runs in a copy of the project: neither loses the checkpoints, which live apart (stages/checkpoints.py)."""
    repo = make_repo(tmp_path / "repo", dvc_cache, data__source=str(small_tree), model__name=str(tiny_vit), **PARAMS | {"train__epochs": 3})
    dvc(repo, "repro")  # a finished run of other parameters: dvc.lock records its outputs
    experiment = ["exp", "run", "-S", "train.epochs=4"]  # the reference's parameters

    # in a temporary copy of the project, as the queue runs experiments: killed right after checkpoint-14
    killed(repo, [*experiment[:2], "--temp", *experiment[2:]], "finetune", "transformers.trainer_callback:CallbackHandler.on_save", 2, "after")
    shown = checkpoint_folder(repo).relative_to(repo)
    # the same experiment in the workspace resumes from it; killed right after checkpoint-21
    output = killed(repo, experiment, "finetune", "transformers.trainer_callback:CallbackHandler.on_save", 1, "after")
    assert resumed_from(output) == f"finetune: resuming from {shown}/checkpoint-14"
    output = dvc(repo, *experiment)
    assert resumed_from(output) == f"finetune: resuming from {shown}/checkpoint-21"
    assert not (repo / CHECKPOINTS_DIR / shown.name).exists()
    assert_same_results(repo, reference)
