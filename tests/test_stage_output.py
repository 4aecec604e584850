"""What a user sees: each stage, run as DVC runs it (`python -m stages.<name>`, one process a stage, all
children of one `dvc` process), prints its own lines, progress bars and real warnings, and nothing of
the libraries' chatter; and the execution's one MLflow run is made by its last stage, track, and
not at all when a stage fails.

Real CIFAR-10 JPEGs (the 3-class small tree), the embedded EfficientNet-Lite0 at 32 px, one epoch:
the whole pipeline in about a minute. Instead of DVC (which the slow tests run), a small script runs the stages.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, set_params

STAGES = ("inputs", "download", "preprocess", "finetune", "evaluate", "export", "track")
NOISE = {
    "transformers' weight bars": re.compile(r"Loading weights|Writing model shards"),
    "MLflow's artifact bars": re.compile(r"Downloading artifacts|Uploading artifacts"),
    "transformers' torchvision fallback": re.compile(r"requires torchvision|falling back to", re.I),
    "an MLflow INFO line": re.compile(r"^\S+ \S+ INFO mlflow", re.M),
    "MLflow's database set-up": re.compile(r"Creating initial MLflow database tables|Updating database tables"),
    "MLflow's failed serving check (auto_map)": re.compile(r"auto_map|Got error|Failed to validate serving input"),
    "a tracking outage warning": re.compile(r"MLflow tracking at .* failed"),
    "torch's ONNX exporter's chatter": re.compile(r"\[torch\.onnx\]|torchvision is not installed|Exporting a model while it is in training mode"),
}
OWN_LINE = {stage: re.compile(rf"^{stage}\b", re.M) for stage in STAGES}

# Runs each stage named on its command line, as DVC would, and records after each one its output,
# exit status and the number of MLflow runs; stops after a stage that fails.
FAKE_DVC = f"""\
import pathlib, sqlite3, subprocess, sys
for stage in sys.argv[1:]:
    done = subprocess.run([{sys.executable!r}, "-m", f"stages.{{stage}}"], capture_output=True, text=True)
    out = pathlib.Path("out")
    out.mkdir(exist_ok=True)
    (out / f"{{stage}}.stdout").write_text(done.stdout)
    (out / f"{{stage}}.stderr").write_text(done.stderr)
    (out / f"{{stage}}.rc").write_text(str(done.returncode))
    runs = sqlite3.connect("mlflow.db").execute("SELECT COUNT(*) FROM runs").fetchone()[0] if pathlib.Path("mlflow.db").exists() else 0
    (out / f"{{stage}}.runs").write_text(str(runs))
    if done.returncode:
        break
"""



def run_as_dvc(project: Path, *stages: str) -> None:
    shutil.rmtree(project / "out", ignore_errors=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "HF_"))}
    subprocess.run([sys.executable, str(project / "dvc"), *stages], cwd=project, env=clean, check=True, timeout=900)


def read(project: Path, stage: str, what: str) -> str:
    path = project / "out" / f"{stage}.{what}"
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def project(small_tree, tmp_path_factory) -> Path:
    """A project directory (params.yaml only: the stages come from the installed package) after one
    execution of every stage."""
    project = tmp_path_factory.mktemp("quiet") / "project"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (project / "dvc").write_text(FAKE_DVC)
    set_params(
        project,
        **{
            "fraction": 1.0, "data__source": str(small_tree), "data__test_fraction": 1.0, "model__name": "efficientnet-lite0",
            "model__image_size": 32, "train__mode": "full", "train__epochs": 1, "train__lr": 1e-3, "train__precision": "fp32",
            "export__check_images": 18, "export__max_mean_probability_diff": 0.99,  # about the output here, not the export check
        },
    )
    run_as_dvc(project, *STAGES)
    return project


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_prints_its_own_lines_and_no_library_chatter(project, stage):
    stdout, stderr = read(project, stage, "stdout"), read(project, stage, "stderr")
    assert read(project, stage, "rc") == "0", f"{stage} failed:\n{stderr[-3000:]}"
    assert OWN_LINE[stage].search(stdout), f"{stage} printed no line of its own:\n{stdout}"
    found = {what: pattern.search(stdout + stderr).group(0) for what, pattern in NOISE.items() if pattern.search(stdout + stderr)}
    assert not found, f"{stage} printed {found}:\n{stderr[-3000:]}"


def test_the_track_stage_alone_makes_the_run_with_every_stages_costs(project):
    assert {stage: read(project, stage, "runs") for stage in STAGES} == {stage: "1" if stage == "track" else "0" for stage in STAGES}
    db = sqlite3.connect(project / "mlflow.db")
    assert db.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]
    costs = dict(db.execute("SELECT key, value FROM latest_metrics WHERE key LIKE '%_seconds' OR key LIKE '%_peak_memory_mib'").fetchall())
    assert not (project / "metrics/stages/inputs.json").exists()  # it runs on every `dvc repro`: no file may change
    for stage in STAGES[1:-1]:  # each stage's own record, from process start: its imports included
        recorded = json.loads((project / "metrics/stages" / f"{stage}.json").read_text())
        assert 0 < recorded["startup_seconds"] < recorded["seconds"] and recorded["peak_memory_mib"] > 10, stage
        assert costs[f"{stage}_seconds"] == recorded["seconds"] and costs[f"{stage}_peak_memory_mib"] == recorded["peak_memory_mib"], stage
    assert db.execute("SELECT COUNT(*) FROM model_versions").fetchone()[0] == 1  # track registered the model


def test_an_execution_that_fails_makes_no_run(project):
    set_params(project, fraction=0.06)  # 3 train images for 3 classes: none left to validate with
    try:
        run_as_dvc(project, "download", "preprocess", "finetune", "evaluate", "export", "track")
        assert read(project, "preprocess", "rc") == "2"
        assert read(project, "preprocess", "stderr").strip().splitlines()[-1].startswith("error: params.yaml: fraction=0.06")
        assert read(project, "preprocess", "runs") == "1"  # the earlier execution's only
        assert not (project / "out" / "finetune.rc").exists()  # DVC stops at the failed stage, and so does the script
    finally:
        set_params(project, fraction=1.0)


def test_the_model_is_calibrated_on_validation_and_predicts_as_before(project, monkeypatch):
    """finetune folds the validation temperature into the classifier; evaluate reports the calibration with it
    and without it; undoing the fold gives back the same predicted labels and the uncalibrated ECE."""
    import numpy as np
    import pandas as pd
    import torch
    from transformers import AutoModelForImageClassification

    from stages.calibration import CONFIG_KEY, MIN_NLL_GAIN, expected_calibration_error
    from stages.dataformat import load_split
    from stages.modeling import PixelTransform
    from stages.params import load_params
    from stages.evaluate import logits_on

    evaluation = json.loads((project / "metrics/eval.json").read_text())
    temperature = json.loads((project / "metrics/finetune.json").read_text())["temperature"]
    assert evaluation["temperature"] == temperature > 0
    assert json.loads((project / "models/export/config.json").read_text())[CONFIG_KEY] == temperature
    assert 0 <= evaluation["ece"] <= 1 and evaluation["nll"] > 0 and 0 <= evaluation["brier"] <= 2
    assert (project / "metrics/reliability.png").stat().st_size > 10_000

    monkeypatch.chdir(project)
    test = load_split("test")
    folded = logits_on(test, load_params())
    model = AutoModelForImageClassification.from_pretrained("models/finetuned").eval()
    with torch.no_grad():
        model.classifier.weight.mul_(temperature)
        model.classifier.bias.mul_(temperature)
        unscaled = model(pixel_values=PixelTransform(json.loads(Path("models/finetuned/preprocessor_config.json").read_text()))(test.pixels)).logits
    torch.testing.assert_close(unscaled, folded * temperature, atol=1e-4, rtol=1e-4)
    predicted = pd.read_csv("metrics/test_predictions.csv")["predicted"]
    assert [test.classes[i] for i in unscaled.argmax(-1).tolist()] == list(predicted)
    ece = expected_calibration_error(unscaled.softmax(-1).numpy(), test.labels.numpy())
    assert ece == pytest.approx(evaluation["ece_at_temperature_1"], abs=1e-4)
    finetuned = json.loads((project / "metrics/finetune.json").read_text())
    if temperature == 1.0:  # the gate kept T = 1: the fitted one did not lower the validation NLL enough
        assert finetuned["val_nll_fitted"] > finetuned["val_nll"] * (1 - MIN_NLL_GAIN) and finetuned["fitted_temperature"] != 1.0
        assert evaluation["ece"] == pytest.approx(evaluation["ece_at_temperature_1"], abs=1e-9)
    else:
        assert finetuned["val_nll_fitted"] <= finetuned["val_nll"] * (1 - MIN_NLL_GAIN)
        assert not np.isclose(evaluation["ece"], evaluation["ece_at_temperature_1"])  # the temperature did something


@pytest.mark.parametrize("module", ["stages.download", "stages.preprocess", "stages.predict", "stages.export", "stages.pyfuncmodel", "stages.tracking"])
def test_modules_that_load_no_model_import_no_model_libraries(module):
    """Importing `stages` imports nothing; download and preprocess load no model, and export, predict and
    the served model run model.onnx: none of them pays for torch, transformers or scikit-learn."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]" and not done.stderr, done.stderr
