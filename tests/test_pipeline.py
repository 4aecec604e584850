"""End to end: the real `dvc repro` / `dvc exp run` in a temporary git repo on real CIFAR-10 images,
tracked on a real `mlflow server` and looked at in a real browser."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
import yaml

from scripts.compare_runs import CHROMIUM, screenshot_comparison
from scripts.servers import free_port, mlflow_server
from tests.conftest import ROOT, require_debian_package, set_params

pytestmark = pytest.mark.slow  # each test runs the pipeline: `make test`, not `make test-fast`

FEATURES = {"features@train", "features@val", "features@test"}
ALWAYS = {"inputs"}  # runs on every `dvc repro`: it looks at what data.source and model.name name
TRAINED = {"finetune", "evaluate", "export", "track"}  # what re-runs after a training parameter changed
STAGES = {*ALWAYS, "download", "preprocess", *FEATURES, *TRAINED}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


SECRET = "hf_not-a-real-token-0123456789"  # set in the pipeline's environment: must not reach MLflow


def run(cmd: list[str], repo: Path, env: dict[str, str] | None = None, status: int = 0, **popen) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    done = subprocess.run(cmd, cwd=repo, env=clean | (env or {}), capture_output=True, text=True, check=False, **popen)
    output = done.stdout + done.stderr
    assert done.returncode == status, f"{' '.join(cmd)} exited {done.returncode}:\n{output[-4000:]}"
    return output


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@]+)'", output))


def make_repo(path: Path, dvc_cache: Path, **values) -> Path:
    """A new git repo holding the project's tracked files (its DVC set-up included), with `values` set."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, path / name)
    set_params(path, **values)
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.name", "Pipeline Test"], path)
    run(["git", "config", "user.email", "pipeline-test@example.com"], path)
    run([sys.executable, "-m", "dvc", "config", "cache.dir", str(dvc_cache)], path)
    commit(path, "project")
    return path


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", message], repo)


def dvc(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return run([sys.executable, "-m", "dvc", *args], repo, env)


def mlflow_runs(repo: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("cifar10-transfer")
    return mlflow.search_runs([experiment.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])


def wait_for_queue(repo: Path, timeout_s: int = 900) -> str:
    """`dvc queue status` once no experiment is queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = dvc(repo, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout_s} s:\n{status}"
        time.sleep(5)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def a_test_image(repo: Path, tmp_path: Path) -> tuple[Path, str]:
    """The most confidently evaluated test image, written back out as its original JPEG file."""
    from stages.dataformat import read_raw

    predictions = pd.read_csv(repo / "metrics/test_predictions.csv")
    first = predictions.loc[predictions["confidence"].idxmax()]
    raw = read_raw("test", repo / "data/raw")
    path = tmp_path / "image.jpg"
    path.write_bytes(raw["image"].iloc[int(first["index"])])
    return path, first["predicted"]


def assert_same_weights(left: Path, right: Path, unfold_temperature: bool = False) -> None:
    """Equal weights; with `unfold_temperature`, `left` is `right` calibrated: its classifier divided by the temperature it records."""
    from transformers import AutoModelForImageClassification

    from stages.calibration import CONFIG_KEY

    models = [AutoModelForImageClassification.from_pretrained(p) for p in (left, right)]
    a, b = (model.state_dict() for model in models)
    assert a.keys() == b.keys()
    if unfold_temperature:
        temperature = getattr(models[0].config, CONFIG_KEY)  # 1 where finetune's gate kept the fitted one out
        for k in [k for k in a if k.startswith("classifier.")]:
            torch.testing.assert_close(a.pop(k) * temperature, b.pop(k), rtol=1e-6, atol=0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def classify_in_fresh_python(repo: Path, image: Path, preamble: str) -> str:
    """The label transformers.pipeline gives `image` with models/export, in a new interpreter."""
    code = f"{preamble}\nfrom transformers import pipeline\nprint('label=' + pipeline('image-classification', model='models/export')('{image}')[0]['label'])"
    return re.search(r"^label=(.*)$", run([sys.executable, "-c", code], repo), re.MULTILINE).group(1)


class Rest:
    """The tracking server's REST API, as any client sees it."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        answer = requests.get(f"{self.url}/api/2.0/mlflow/{path}", params=params, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def runs(self, experiment: str = "cifar10-transfer") -> list[dict]:
        experiment_id = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        answer = requests.post(
            f"{self.url}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [experiment_id], "order_by": ["attributes.start_time ASC"]}, timeout=30,
        )
        answer.raise_for_status()
        return answer.json().get("runs", [])


def as_dict(entries: list[dict]) -> dict[str, str]:
    return {entry["key"]: entry["value"] for entry in entries}


def processed_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    [out] = [o for o in lock["stages"]["preprocess"]["outs"] if o["path"] == "data/processed"]
    return out["md5"]


def git_head(repo: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], repo).strip()


def check_tracked_run(rest: Rest, run: dict, repo: Path, stages_run: set[str]) -> None:
    """One execution's run holds its params, curves, each stage's costs, tags, dataset and artifacts, and no secret."""
    run_id = run["info"]["run_id"]
    params, metrics, tags = (as_dict(run["data"].get(k, [])) for k in ("params", "metrics", "tags"))
    assert params["model.name"] and params["train.lr"]
    evaluation, finetune = read_json(repo / "metrics/eval.json"), read_json(repo / "metrics/finetune.json")
    assert metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert metrics["train_images_per_second"] > 0 and metrics["test_eval_images_per_second"] > 0
    for stage in stages_run - ALWAYS - {"track"}:  # each stage's own record of this execution (features@test: features_test)
        costs = read_json(repo / "metrics/stages" / f"{stage.replace('@', '_')}.json")
        assert {f"{stage.replace('@', '_')}_{key}": value for key, value in costs.items()}.items() <= metrics.items(), stage
        assert costs["peak_memory_mib"] > 10 and costs["seconds"] >= costs["startup_seconds"] > 0, stage
    history = rest.get("metrics/get-history", run_id=run_id, metric_key="val_accuracy")["metrics"]
    assert [m["step"] for m in history] == [1, 2]
    assert tags["hardware.device"] == DEVICE and tags["hardware.precision"] == "fp32"
    assert (finetune["device"], finetune["precision"]) == (DEVICE, "fp32") and "precision" not in evaluation  # inference is fp32
    assert tags["hardware.cpu"] and int(tags["hardware.cpu_cores"]) >= 1 and float(tags["hardware.ram_gb"]) > 0
    assert tags["version.torch"] and tags["version.dvc"] and tags["version.mlflow"]
    assert tags["git.commit"] == git_head(repo) and tags["model.name"] == params["model.name"]
    assert tags["data.processed_md5"] == processed_md5(repo)
    inputs = {i["dataset"]["name"]: i for i in run["inputs"]["dataset_inputs"]}
    sizes = {name: json.loads(i["dataset"]["profile"])["num_rows"] for name, i in inputs.items()}
    assert sizes == {"processed-train": finetune["train_images"], "processed-val": finetune["val_images"], "processed-test": evaluation["test_images"]}
    assert {i["dataset"]["digest"] for i in inputs.values()} == {processed_md5(repo).removesuffix(".dir")}
    artifacts = {f["path"]: f for f in rest.get("artifacts/list", run_id=run_id)["files"]}
    for name in ("learning_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert int(artifacts[name]["file_size"]) > 10_000, name
    assert int(artifacts["eval_per_class.csv"]["file_size"]) == (repo / "metrics/eval_per_class.csv").stat().st_size
    assert SECRET not in json.dumps(run)


def test_tiny_vit_pipeline_tracked_on_a_server(cifar_archive, tiny_vit, dvc_cache, tmp_path):
    repo = make_repo(
        tmp_path / "repo", dvc_cache,
        data__source=str(cifar_archive), model__name=str(tiny_vit), train__mode="full", train__epochs=2, train__lr=1e-3, data__test_fraction=0.02,
        train__precision="fp32",  # pinned: `auto` is bf16 on a GPU or a CPU with native bf16
    )
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts") as url:
        rest, env = Rest(url), {"MLFLOW_TRACKING_URI": url, "HF_TOKEN": SECRET}

        # 1. the whole pipeline
        output = dvc(repo, "repro", env=env)
        assert ran_stages(output) == STAGES
        evaluation = read_json(repo / "metrics/eval.json")
        assert evaluation["test_images"] == 200
        assert 0 <= evaluation["accuracy_ci95_low"] <= evaluation["accuracy"] <= evaluation["accuracy_ci95_high"] <= 1
        finetune = read_json(repo / "metrics/finetune.json")
        assert (finetune["train_images"], finetune["val_images"]) == (450, 50)
        epochs = pd.read_csv(repo / "metrics/finetune_epochs.csv")
        # train.keep_epoch auto on 50 validation images: the last epoch
        assert list(epochs["epoch"]) == [1, 2] and finetune["keep_epoch"] == "last" and finetune["kept_epoch"] == 2
        assert finetune["kept_val_loss"] == epochs["val_loss"].iloc[-1]
        per_class = pd.read_csv(repo / "metrics/eval_per_class.csv")
        assert len(per_class) == 10 and per_class["support"].sum() == 200
        assert (repo / "metrics/confusion_matrix.png").stat().st_size > 10_000
        assert (repo / "metrics/misclassified.png").stat().st_size > 10_000
        export_check = read_json(repo / "metrics/export.json")
        assert export_check["check_images"] == 200 and export_check["agreement"] >= 0.95
        assert abs(export_check["pipeline_accuracy"] - export_check["evaluated_accuracy"]) <= 0.02
        config = read_json(repo / "models/export/config.json")
        assert config["id2label"]["3"] == "cat" and (repo / "models/export/model.safetensors").exists()

        # 2. one run for the execution on the server, made by track, everything in it; the model registered @candidate
        [first] = rest.runs()
        check_tracked_run(rest, first, repo, ran_stages(output))
        assert as_dict(first["data"]["params"])["fraction"] == "0.01"
        alias = rest.get("registered-models/alias", name="cifar10-classifier", alias="candidate")["model_version"]
        assert alias["version"] == "1" and alias["run_id"] == first["info"]["run_id"]
        image, evaluated_label = a_test_image(repo, tmp_path)
        mlflow.set_tracking_uri(url)
        registered = mlflow.pyfunc.load_model("models:/cifar10-classifier@candidate")
        assert registered.predict([str(image)]).iloc[0]["label"] == evaluated_label

        plots = json.loads(dvc(repo, "plots", "show", "--json"))
        assert not plots.get("errors")
        named = {"Loss per epoch", "Validation accuracy per epoch", "Test confusion matrix", "metrics/confusion_matrix.png", "metrics/misclassified.png", "metrics/reliability.png"}
        assert set(plots["data"]) == named and all(plots["data"][name] for name in named)

        # 3. nothing changed: nothing runs but the look at the inputs, no new run
        assert ran_stages(dvc(repo, "repro", env=env)) == ALWAYS
        assert len(rest.runs()) == 1
        commit(repo, "baseline")

        # 4. a learning-rate change re-runs finetune, evaluate, export and nothing before them
        assert ran_stages(dvc(repo, "exp", "run", "-S", "train.lr=0.002", env=env)) == ALWAYS | TRAINED
        # 5. a fraction change re-runs from preprocess on, but the test split is the same
        output = dvc(repo, "exp", "run", "-S", "fraction=0.02", env=env)
        assert ran_stages(output) == ALWAYS | {"preprocess", "features@train", "features@val"} | TRAINED
        assert read_json(repo / "metrics/finetune.json")["train_images"] == 900
        runs = rest.runs()
        assert len(runs) == 3
        for later in runs[1:]:
            tags = as_dict(later["data"]["tags"])
            assert later["info"]["run_name"] == tags["dvc.exp_name"]  # named after the DVC experiment
        check_tracked_run(rest, runs[2], repo, ran_stages(output))
        assert as_dict(runs[2]["data"]["params"])["fraction"] == "0.02"
        alias = rest.get("registered-models/alias", name="cifar10-classifier", alias="candidate")["model_version"]
        assert alias["version"] == "3" and alias["run_id"] == runs[2]["info"]["run_id"]  # the newest version

        # 6. the comparison of the two fractions in the MLflow UI, in headless Chromium (without it, the
        # test goes on and skips at its end, once everything else has passed)
        browser = Path(CHROMIUM).is_file()
        if browser:
            page = screenshot_comparison(url, runs[0]["info"]["experiment_id"], [runs[0]["info"]["run_id"], runs[2]["info"]["run_id"]], tmp_path / "compare.png")
            assert "0.01" in page and "0.02" in page and as_dict(first["data"]["tags"])["hardware.cpu"] in page
            assert f"{evaluation['accuracy']:.3f}".rstrip("0").rstrip(".") in page  # the UI shows 3 decimals at most
            assert (tmp_path / "compare.png").stat().st_size > 50_000

    # 7. the server is gone: the pipeline still completes, and track's one warning says what was not logged
    closed = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    output = dvc(repo, "exp", "run", "-S", "evaluate.batch_size=32", env=closed)
    assert ran_stages(output) == ALWAYS | FEATURES | {"evaluate", "export", "track"}  # the features stages batch by it too
    [warning] = [line for line in output.splitlines() if line.startswith("warning: MLflow tracking")]
    assert "was not logged to MLflow" in warning and "dvc repro -f track" in warning and "tracking.required: true" in warning
    assert read_json(repo / "metrics/eval.json")["test_images"] == 200
    # ... and with tracking.required the stage fails, in one line naming the problem and the fix
    set_params(repo, tracking__required=True)
    failed = run([sys.executable, "-m", "stages.track"], repo, closed, status=2)
    assert failed.strip().splitlines()[-1].startswith(f"error: MLflow tracking at {closed['MLFLOW_TRACKING_URI']} failed (ConnectionError")
    assert "set tracking.required: false" in failed
    set_params(repo, tracking__required=False)

    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    experiments = [exp for row in shown for exp in (row.get("experiments") or [])]
    fractions = {
        run["data"]["params"]["params.yaml"]["data"]["fraction"] for exp in experiments for run in exp["revs"]
    }
    assert {0.02} <= fractions
    lr_exp, fraction_exp = (r["info"]["run_name"] for r in runs[1:])  # DVC's names, as MLflow shows them
    diff = json.loads(dvc(repo, "plots", "diff", lr_exp, fraction_exp, "--json"))
    assert not diff.get("errors")
    for curve in ("Loss per epoch", "Validation accuracy per epoch"):
        [rendered] = diff["data"][curve]
        assert set(rendered["revisions"]) == {lr_exp, fraction_exp}

    # 8. a queued experiment, run by `dvc queue start` in a copy under .dvc/tmp/exps, logs to the project's mlflow.db
    dvc(repo, "exp", "run", "--queue", "--name", "queued-frac", "-S", "fraction=0.015")
    dvc(repo, "queue", "start")
    assert "Success" in wait_for_queue(repo)
    assert (repo / "mlruns").is_dir()  # its artifacts too, beside mlflow.db
    [queued] = mlflow_runs(repo)
    assert queued.info.run_name == queued.data.tags["dvc.exp_name"] == "queued-frac"
    assert queued.data.params["fraction"] == "0.015" and queued.data.metrics["test_accuracy"] >= 0
    assert queued.data.tags["git.commit"] == git_head(repo) and queued.data.tags["data.processed_md5"].endswith(".dir")
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(queued.info.run_id)} >= {"misclassified.png", "learning_curves.png"}

    # 9. the exported ViT needs nothing but transformers; the CLI classifies image files
    image, evaluated_label = a_test_image(repo, tmp_path)
    assert classify_in_fresh_python(repo, image, "") == evaluated_label
    assert f"{image}\t{evaluated_label}\t" in run([sys.executable, "-m", "stages.predict", str(image)], repo)
    require_debian_package("chromium", installed=browser)


def test_efficientnet_lite_pipeline_offline(cifar_archive, dvc_cache, tmp_path):
    repo = make_repo(
        tmp_path / "repo", dvc_cache,
        data__source=str(cifar_archive), model__name="efficientnet-lite0", model__image_size=64,
        fraction=0.004, train__mode="full", train__epochs=2, train__lr=1e-3, data__test_fraction=0.01,
    )
    dvc(repo, "repro")
    evaluation = read_json(repo / "metrics/eval.json")
    assert evaluation["test_images"] == 100
    assert evaluation["accuracy"] > 0.2  # ImageNet features beat chance (0.1) after 180 images
    [tracked] = mlflow_runs(repo)
    assert tracked.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert tracked.info.status == "FINISHED"  # made by track, once every other stage has run
    assert ran_stages(dvc(repo, "repro")) == ALWAYS

    # the export loads through the Auto classes once the package is imported, no trust_remote_code
    image, evaluated_label = a_test_image(repo, tmp_path)
    assert classify_in_fresh_python(repo, image, "import stages.efficientnet_lite") == evaluated_label
    # registered in the project's own store, as a pyfunc MLflow loads without knowing the class
    version = mlflow.MlflowClient().get_model_version_by_alias("cifar10-classifier", "candidate")
    assert version.run_id == tracked.info.run_id and version.status == "READY"
    registered = mlflow.pyfunc.load_model("models:/cifar10-classifier@candidate")
    assert registered.predict([str(image)]).iloc[0]["label"] == evaluated_label
    assert read_json(repo / "models/export/preprocessor_config.json")["size"] == {"height": 64, "width": 64}


def test_head_mode_trains_on_cached_features(cifar_archive, tiny_vit, dvc_cache, tmp_path, monkeypatch):
    repo = make_repo(
        tmp_path / "repo", dvc_cache,
        data__source=str(cifar_archive), model__name=str(tiny_vit), train__mode="head", train__epochs=4, train__lr=3e-3,
        data__test_fraction=0.02, train__precision="fp32",  # the cached-features head and the whole model compared below
    )
    # (download and preprocess may come from the shared DVC cache's run-cache: the other tests made them)
    assert FEATURES | {"finetune", "evaluate", "export"} <= ran_stages(dvc(repo, "repro"))
    assert list(pd.read_csv(repo / "metrics/finetune_epochs.csv")["epoch"]) == [1, 2, 3, 4]

    # the backbone is the pretrained one, untouched; only the fresh 10-way head was trained
    from transformers import AutoModelForImageClassification

    pretrained = AutoModelForImageClassification.from_pretrained(tiny_vit).state_dict()
    tuned = AutoModelForImageClassification.from_pretrained(repo / "models/finetuned").state_dict()
    assert all(torch.equal(tuned[k], pretrained[k]) for k in tuned if not k.startswith("classifier."))
    assert tuned["classifier.weight"].shape == (10, 48)

    # evaluate applied the head to cached features: the whole model on the test pixels agrees
    from stages.dataformat import load_split
    from stages.evaluate import logits_on
    from stages.params import load_params

    monkeypatch.chdir(repo)  # the stages read params.yaml and data/ relative to the project
    params = dataclasses.replace(load_params(), train=dataclasses.replace(load_params().train, mode="full"))
    whole_model = logits_on(load_split("test"), params).argmax(-1)
    evaluated = pd.read_csv(repo / "metrics/test_predictions.csv")["predicted"]
    assert [load_split("test").classes[i] for i in whole_model.tolist()] == list(evaluated)

    # a learning-rate change re-trains the head only: the cached features are reused
    commit(repo, "head mode")
    output = dvc(repo, "exp", "run", "-S", "train.lr=0.01")
    assert ran_stages(output) == ALWAYS | TRAINED
    # a new share recomputes train/val features; the unchanged test split's are kept
    ran = ran_stages(dvc(repo, "exp", "run", "-S", "fraction=0.02"))
    assert {"features@train", "features@val", *TRAINED} <= ran and "features@test" not in ran
    assert read_json(repo / "metrics/finetune.json")["train_images"] == 900

    # the data-efficiency curve reads the experiments run by hand, and runs only the share not run yet
    output = run([sys.executable, "scripts/data_efficiency.py", "--fractions", "0.02", "0.03", "--seeds", "42"], repo)
    assert "fraction=0.02 seed=42 already run with these parameters" in output
    assert "running 1 queued experiment(s)" in output  # fraction 0.03 only
    rows = [line.split(" | ") for line in (repo / "reports/data_efficiency.md").read_text().splitlines() if "tiny-vit, head" in line]
    shares = {(row[0].rsplit("train.lr=", 1)[1], row[1], row[2]) for row in rows}  # (lr, fraction, train images)
    assert shares == {("0.003", "0.01", "450"), ("0.01", "0.01", "450"), ("0.01", "0.02", "900"), ("0.01", "0.03", "1,350")}
    assert (repo / "reports/data_efficiency.png").stat().st_size > 10_000
    [report] = [r for r in mlflow_runs(repo) if r.info.run_name == "data-efficiency"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(report.info.run_id)}
    assert logged == {"data_efficiency.png", "data_efficiency.md"}


def status_stages(repo: Path) -> set[str]:
    """The stages `dvc status` says have changed."""
    return set(json.loads(dvc(repo, "status", "--json")))


def test_changed_code_data_or_model_reruns_exactly_what_depends_on_it(small_tree, tiny_vit, dvc_cache, tmp_path):
    from transformers import AutoModelForImageClassification

    from tests.test_dependencies import stage_code

    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(small_tree, data)
    shutil.copytree(tiny_vit, model)
    repo = make_repo(
        tmp_path / "repo", dvc_cache, data__source=str(data), model__name=str(model), fraction=1.0, data__test_fraction=1.0,
        train__mode="full", train__epochs=2, train__lr=1e-3, train__precision="fp32",
    )
    assert ran_stages(dvc(repo, "repro")) == STAGES
    assert status_stages(repo) == ALWAYS

    # editing a module: `dvc status` names every stage whose code imports it, and no other
    for module in ("stages/hardware.py", "stages/dataformat.py"):
        original = (repo / module).read_text()
        (repo / module).write_text(original + "# edited\n")
        importers = {name for name, (needed, _) in stage_code().items() if module in needed}
        features = {f"features@{split}" for split in ("train", "val", "test")}
        expected = {stage for stage in importers if stage != "features"} | (features if "features" in importers else set())
        assert status_stages(repo) == ALWAYS | expected, module
        (repo / module).write_text(original)
    assert status_stages(repo) == ALWAYS

    # new contents under the same data.source: seen once the inputs stage has looked, and re-run
    removed = sorted((data / "train" / "ship").glob("*.jpg"))[0]
    removed.unlink()
    dvc(repo, "repro", "inputs")
    assert status_stages(repo) == ALWAYS | {"download", "export"}  # export: the model card cites the data's digest
    assert {"download", "preprocess", *TRAINED} <= ran_stages(dvc(repo, "repro"))
    assert read_json(repo / "metrics/finetune.json")["train_images"] + read_json(repo / "metrics/finetune.json")["val_images"] == 59

    # other weights in the same model folder: the pretrained model's stages re-run (preprocess too, which
    # stores mixed-size images at the model's input size; same-size CIFAR comes out identical), and finetune starts over
    before = AutoModelForImageClassification.from_pretrained(repo / "models/finetuned").state_dict()
    saved = AutoModelForImageClassification.from_pretrained(model)
    torch.manual_seed(7)
    saved.vit.embeddings.patch_embeddings.projection.weight.data.normal_()
    saved.save_pretrained(model)
    output = dvc(repo, "repro")
    assert ran_stages(output) == ALWAYS | {"preprocess"} | FEATURES | TRAINED
    assert "resuming" not in output
    after = AutoModelForImageClassification.from_pretrained(repo / "models/finetuned").state_dict()
    assert not torch.equal(before["vit.embeddings.patch_embeddings.projection.weight"], after["vit.embeddings.patch_embeddings.projection.weight"])


DETERMINISTIC = (
    "metrics/finetune.json", "metrics/finetune_epochs.csv", "metrics/eval.json", "metrics/test_predictions.csv",
    "metrics/export.json", "models/finetuned/model.safetensors", "models/export/model.safetensors",
)


@pytest.mark.parametrize("mode", ["head", "full"])
def test_the_same_parameters_give_byte_identical_results(mode, small_tree, tiny_vit, dvc_cache, tmp_path):
    """On CPU in fp32: every result file and the exported weights, byte for byte (throughput lives in *_speed.json)."""
    repo = make_repo(
        tmp_path / "repo", dvc_cache, data__source=str(small_tree), model__name=str(tiny_vit), fraction=1.0, data__test_fraction=1.0,
        train__mode=mode, train__epochs=2, train__lr=1e-3, train__precision="fp32", export__check_images=18,
    )
    dvc(repo, "repro")
    first = {name: (repo / name).read_bytes() for name in DETERMINISTIC}
    dvc(repo, "repro", "--force")
    assert {name: (repo / name).read_bytes() for name in DETERMINISTIC} == first
