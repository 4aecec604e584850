"""finetune stops on a diverged (non-finite) loss with one line naming train.lr and the epoch, before
any model is written: the tiny ViT on the small tree, in head mode and in full mode."""
from __future__ import annotations

import shutil
import sys

import pytest
import yaml

from stages import features, finetune, preprocess
from stages.dataformat import FINETUNED_DIR
from stages.download import resolve_source, write_raw
from stages.errors import PipelineError
from tests.conftest import ROOT, set_params


@pytest.fixture(scope="module")
def processed(small_tree, tiny_vit, tmp_path_factory):
    """A project with the small tree downloaded and preprocessed (half of it: 27 train, 3 val, 9 test)."""
    from bench.export_check import working_directory

    project = tmp_path_factory.mktemp("finetune") / "project"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(
        project,
        **{"fraction": 0.5, "data__source": str(small_tree), "data__test_fraction": 0.5, "model__name": str(tiny_vit),
           "train__epochs": 2, "train__batch_size": 8, "train__precision": "fp32"},
    )
    with working_directory(project):
        write_raw(resolve_source(str(small_tree)), str(small_tree))
        preprocess.main()
    return project


@pytest.mark.parametrize("mode", ["head", "full"])
def test_a_diverging_loss_stops_finetune_in_one_line_naming_train_lr(processed, tmp_path, monkeypatch, mode):
    project = tmp_path / "project"
    shutil.copytree(processed, project)
    set_params(project, train__mode=mode, train__lr=1e10)
    monkeypatch.chdir(project)
    if mode == "head":
        for split in ("train", "val"):
            monkeypatch.setattr(sys, "argv", ["features", split])
            features.main()
    with pytest.raises(PipelineError, match=r"^train\.lr=1e\+10: the (training|validation) loss became (nan|inf|-inf) in epoch [12] of 2") as failed:
        finetune.main()
    assert "\n" not in str(failed.value) and "lower train.lr" in str(failed.value)
    assert not FINETUNED_DIR.exists() and not finetune.METRICS_FILE.exists()


def test_a_finite_loss_trains_as_before(processed, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(processed, project)
    set_params(project, train__mode="head", train__lr=1e-3)
    monkeypatch.chdir(project)
    for split in ("train", "val"):
        monkeypatch.setattr(sys, "argv", ["features", split])
        features.main()
    finetune.main()
    assert (FINETUNED_DIR / "config.json").exists() and yaml.safe_load(finetune.METRICS_FILE.read_text())["best_epoch"] in (1, 2)
