"""Tracking without a pipeline: where the default store is, what is never logged, what happens when MLflow is down."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from scripts.servers import free_port
from stages import figures, tracking
from stages.errors import PipelineError
from stages.params import load_params
from tests.conftest import ROOT


def test_the_default_store_is_the_project_root_even_in_a_queued_experiments_copy(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmp1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets for a queued experiment's stages
    assert tracking.tracking_uri() == f"sqlite:///{project}/mlflow.db"
    assert tracking.artifact_location() == f"file://{project}/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_location() is None  # the server decides


def test_an_experiment_another_execution_created_meanwhile_is_used_not_an_error(tmp_path, monkeypatch):
    """Two teammates' first executions on a fresh tracking server (no lock there) both find no experiment;
    the second one's create_experiment is refused as already existing, and it takes the first one's."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = mlflow.create_experiment("shared", artifact_location=(tmp_path / "mlruns").as_uri())  # by the other execution
    real, looks = mlflow.get_experiment_by_name, []

    def not_yet_then_there(name: str):  # the first look came before the other execution created it
        looks.append(name)
        return real(name) if len(looks) > 1 else None

    monkeypatch.setattr(mlflow, "get_experiment_by_name", not_yet_then_there)
    assert tracking._experiment_id("shared", None) == created


def test_a_sqlite_store_keeps_its_artifacts_beside_it_not_in_a_queued_experiments_copy(tmp_path, monkeypatch):
    project = tmp_path / "project"
    monkeypatch.chdir(tmp_path)  # as in a queued experiment's copy: not the project root
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/mlflow.db")  # relative: to the project root
    assert tracking.tracking_uri() == f"sqlite:///{project}/stores/mlflow.db"
    assert tracking.artifact_location() == f"file://{project}/stores/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow/store.db")
    assert tracking.artifact_location() == "file:///srv/mlflow/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://db.example.org/mlflow")
    assert tracking.artifact_location() == f"file://{project}/mlruns"


def test_credentials_in_a_url_are_not_logged():
    assert tracking.without_credentials("https://user:hf_secret@example.org/data.tgz") == "https://example.org/data.tgz"
    assert tracking.without_credentials("uoft-cs/cifar10") == "uoft-cs/cifar10"
    assert tracking.without_credentials(0.01) == 0.01


def closed_server_params(monkeypatch, tmp_path, required: bool):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    params = load_params(ROOT / "params.yaml")
    return dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, required=required))


def test_an_unreachable_server_costs_one_warning_and_nothing_else(tmp_path, monkeypatch, capsys):
    params = closed_server_params(monkeypatch, tmp_path, required=False)
    (tmp_path / "report.csv").write_text("class,f1\ncat,0.5\n")
    with tracking.pipeline_run(params, "evaluate"):
        tracking.log_metrics({"test_accuracy": 0.5})
        tracking.set_tags({"hardware.device": "cpu"})
        tracking.log_artifact(tmp_path / "report.csv")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow tracking at http://127.0.0.1:")
    assert "nothing more from the evaluate stage was logged to MLflow, starting with its params, metrics and artifacts" in lines[0]
    assert "tracking.required: true" in lines[0]


def test_a_required_server_that_is_unreachable_stops_the_stage(tmp_path, monkeypatch):
    params = closed_server_params(monkeypatch, tmp_path, required=True)
    expected = r"^MLflow tracking at http://127\.0\.0\.1:\d+ failed \(ConnectionError.*tracking\.required: false"
    with pytest.raises(PipelineError, match=expected), tracking.pipeline_run(params, "finetune"):
        pytest.fail("the stage must not run untracked when tracking.required is true")


def test_the_gallery_shows_the_most_confidently_wrong_images_first():
    pixels = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    actual = ["cat", "dog", "ship", "cat"]
    predicted = ["cat", "cat", "dog", "ship"]  # image 0 is right; 1, 2 and 3 are wrong
    confidence = torch.tensor([0.99, 0.6, 0.9, 0.7])
    fig = figures.most_confidently_wrong(pixels, actual, predicted, confidence)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true: ship\npredicted: dog (90%)", "true: cat\npredicted: ship (70%)", "true: dog\npredicted: cat (60%)"]
    assert fig.texts[0].get_text() == "Most confidently wrong test images (3 of 3 wrong)"


def local_store_params(monkeypatch, tmp_path):
    """The default store (mlflow.db in the project root, here tmp_path), as a stage run by hand uses it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return load_params(ROOT / "params.yaml")


def the_run(tmp_path):
    """The newest run in the store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"])[0]


def test_a_programming_error_in_a_logging_call_raises_and_fails_the_run(tmp_path, monkeypatch, capsys):
    params = local_store_params(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="could not convert string to float"), tracking.pipeline_run(params, "evaluate"):
        tracking.log_metrics({"test_accuracy": "high"})  # a string as a metric: our bug, not an outage
    assert "MLflow tracking" not in capsys.readouterr().err
    assert the_run(tmp_path).info.status == "FAILED"


def test_a_value_mlflow_rejects_raises(tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    params = local_store_params(monkeypatch, tmp_path)
    with pytest.raises(MlflowException, match="Invalid value"), tracking.pipeline_run(params, "evaluate"):
        tracking.log_metrics({"bad name!\0": 1.0})  # INVALID_PARAMETER_VALUE: the store is fine
    assert "MLflow tracking" not in capsys.readouterr().err


def test_store_failures_are_told_from_bugs():
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException, RestException

    try:  # how MLflow's REST client reports a refused connection
        try:
            raise requests.exceptions.ConnectionError("Connection refused")
        except requests.exceptions.ConnectionError as err:
            raise MlflowException(f"API request to http://127.0.0.1:1/api failed with exception {err}")
    except MlflowException as wrapped:
        assert tracking.is_store_failure(wrapped)
    database = MlflowException("locked", error_code="TEMPORARILY_UNAVAILABLE")
    database.__cause__ = sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database is locked"))
    assert tracking.is_store_failure(database)
    assert tracking.is_store_failure(RestException({"error_code": "INTERNAL_ERROR", "message": "server error"}))
    assert not tracking.is_store_failure(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}))
    assert not tracking.is_store_failure(MlflowException("Couldn't find a loader class"))  # client-side, no transport error
    assert not tracking.is_store_failure(ValueError("could not convert string to float: 'high'"))
    assert not tracking.is_store_failure(FileNotFoundError("metrics/missing.png"))


def test_the_run_reads_running_between_stages_finished_after_export_failed_when_a_stage_fails(tmp_path, monkeypatch):
    import psutil

    from stages.dataformat import PROCESSED_SPLITS, TensorSplit, processed_path, save_split

    params = local_store_params(monkeypatch, tmp_path)
    (tmp_path / "data/processed").mkdir(parents=True)
    for name in PROCESSED_SPLITS:  # what export records as the run's datasets
        save_split(TensorSplit(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), torch.tensor([0, 1]), ["a", "b"]), processed_path(name))
    monkeypatch.setattr(tracking, "dvc_ancestor", psutil.Process)  # every stage below: one `dvc` execution
    for stage in ("download", "preprocess", "finetune"):
        with tracking.pipeline_run(params, stage):
            tracking.log_metrics({f"{stage}_value": 1.0})
        assert the_run(tmp_path).info.status == "RUNNING", stage
    with tracking.pipeline_run(params, "export"):
        pass
    run = the_run(tmp_path)
    assert run.info.status == "FINISHED" and {"download_seconds", "finetune_seconds", "export_seconds"} <= set(run.data.metrics)

    monkeypatch.setattr(tracking, "dvc_ancestor", lambda: psutil.Process().parent())  # another execution
    with tracking.pipeline_run(params, "download"):
        pass
    assert the_run(tmp_path).info.run_id != run.info.run_id
    with pytest.raises(RuntimeError), tracking.pipeline_run(params, "finetune"):
        raise RuntimeError("the stage failed")
    assert the_run(tmp_path).info.status == "FAILED"
    with tracking.pipeline_run(params, "features_test"):  # `dvc repro --keep-going` runs the stages that do not need it
        pass
    assert the_run(tmp_path).info.status == "FAILED"


def test_a_stage_run_by_hand_finishes_its_own_run(tmp_path, monkeypatch):
    params = local_store_params(monkeypatch, tmp_path)
    monkeypatch.setattr(tracking, "dvc_ancestor", lambda: None)
    with tracking.pipeline_run(params, "evaluate"):
        pass
    assert the_run(tmp_path).info.status == "FINISHED"


def test_a_model_below_the_sanity_bar_is_registered_without_the_candidate_alias(tiny_vit, tmp_path, monkeypatch, capsys):
    import mlflow

    from tests.conftest import jpeg_bytes

    params = local_store_params(monkeypatch, tmp_path)
    monkeypatch.setattr(tracking, "dvc_ancestor", lambda: None)
    for alias in (True, False):  # a sane model, then one at chance
        with tracking.pipeline_run(params, "export"):
            tracking.log_model(tiny_vit, "tiny", jpeg_bytes((50, 60, 70)), str(tiny_vit), alias=alias)
    out = capsys.readouterr().out
    assert "registered tiny version 1 as @candidate" in out and "registered tiny version 2, not aliased @candidate" in out
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("tiny", tracking.MODEL_ALIAS).version) == "1"  # the alias stays on the sane version
    assert len(client.search_model_versions("name='tiny'")) == 2


def test_the_alias_stays_on_a_newer_version_registered_by_an_execution_running_at_the_same_time(tiny_vit, tmp_path, monkeypatch, capsys):
    import mlflow

    from tests.conftest import jpeg_bytes

    params = local_store_params(monkeypatch, tmp_path)
    monkeypatch.setattr(tracking, "dvc_ancestor", lambda: None)
    log_transformers = mlflow.transformers.log_model

    def and_meanwhile_another_execution(*args, **kwargs):  # registers version 2 and aliases it, between our steps
        info = log_transformers(*args, **kwargs)
        client = mlflow.MlflowClient()
        newer = client.create_model_version("tiny", client.get_model_version("tiny", info.registered_model_version).source)
        client.set_registered_model_alias("tiny", tracking.MODEL_ALIAS, newer.version)
        return info

    monkeypatch.setattr(mlflow.transformers, "log_model", and_meanwhile_another_execution)
    with tracking.pipeline_run(params, "export"):
        tracking.log_model(tiny_vit, "tiny", jpeg_bytes((50, 60, 70)), str(tiny_vit))
    assert "registered tiny version 1; @candidate stays on the newer version 2" in capsys.readouterr().out
    assert str(mlflow.MlflowClient().get_model_version_by_alias("tiny", tracking.MODEL_ALIAS).version) == "2"


@pytest.mark.parametrize("kind", ["vit", "efficientnet-lite0"])
def test_every_registered_model_loads_with_pyfunc_and_predicts_as_its_pipeline(kind, tiny_vit, small_tree, tmp_path, monkeypatch):
    """The transformers flavour (a ViT) and the pyfunc around pipeline() (EfficientNet-Lite, a class MLflow's
    transformers loader cannot rebuild) load from the registry by alias and give the same top label and score."""
    import base64

    import mlflow
    from transformers import pipeline

    from stages import efficientnet_lite

    model_dir = tiny_vit
    if kind != "vit":
        model_dir = tmp_path / "lite"
        efficientnet_lite.from_imagenet(kind, {0: "cat", 1: "dog", 2: "ship"}).save_pretrained(model_dir)
        efficientnet_lite.image_processor(kind).save_pretrained(model_dir)
    image = next((small_tree / "test/ship").glob("*.jpg"))
    params = local_store_params(monkeypatch, tmp_path)
    monkeypatch.setattr(tracking, "dvc_ancestor", lambda: None)
    with tracking.pipeline_run(params, "export"):
        tracking.log_model(model_dir, "classifier", image.read_bytes(), str(model_dir))
    registered = mlflow.pyfunc.load_model("models:/classifier@candidate")
    [expected] = pipeline("image-classification", model=str(model_dir))(str(image), top_k=1)
    for given in (str(image), base64.b64encode(image.read_bytes()).decode()):  # a path, and what the input example holds
        [[top]] = registered.predict([given]).to_numpy()
        assert top["label"] == expected["label"] and top["score"] == pytest.approx(expected["score"], abs=1e-6)


def _stage_in_a_fresh_process(start, params) -> None:
    """A download stage run by hand, once every process is ready: they open the store at once."""
    tracking.dvc_ancestor = lambda: None
    start.wait()
    with tracking.pipeline_run(params, "download"):  # tracking.required: a store failure raises
        tracking.log_metrics({"data.classes": 3})


def test_processes_creating_one_fresh_sqlite_store_at_once_all_log(tmp_path, monkeypatch):
    import multiprocessing

    params = local_store_params(monkeypatch, tmp_path)
    params = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, required=True))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    fork = multiprocessing.get_context("fork")  # MLflow is imported already: the processes start together
    start = fork.Barrier(3)
    stages = [fork.Process(target=_stage_in_a_fresh_process, args=(start, params)) for _ in range(3)]
    for stage in stages:
        stage.start()
    for stage in stages:
        stage.join(120)
    assert [stage.exitcode for stage in stages] == [0, 0, 0]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 3 and all({"download_seconds", "data.classes"} <= set(run.data.metrics) for run in runs)


def test_the_next_execution_ends_the_runs_that_dead_executions_left_running(tmp_path, monkeypatch):
    import socket
    import subprocess

    import mlflow
    import psutil

    params = local_store_params(monkeypatch, tmp_path)
    monkeypatch.setattr(tracking, "dvc_ancestor", psutil.Process)
    with tracking.pipeline_run(params, "download"):  # creates the store and the experiment
        pass
    alive = the_run(tmp_path).info.run_id  # this execution's own, RUNNING between its stages
    def dead_execution() -> str:
        """The execution id of a process that has ended, as a killed `dvc` leaves it."""
        gone = subprocess.Popen(["sleep", "60"])
        execution = f"{socket.gethostname()}:{gone.pid}:{psutil.Process(gone.pid).create_time():.3f}"
        gone.kill()
        gone.wait()
        return execution

    client, experiment = mlflow.MlflowClient(), mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id

    def left_running(execution: str, stage: str, ended: bool) -> str:
        run = client.create_run(experiment, tags={tracking.EXECUTION_TAG: execution, tracking.STAGE_TAG: stage})
        if ended:  # the stage logged its wall time: the execution stopped between stages
            client.log_metric(run.info.run_id, f"{stage}_seconds", 1.0)
        return run.info.run_id

    killed = left_running(dead_execution(), "export", ended=False)  # `kill -9` during export
    stopped = left_running(dead_execution(), "finetune", ended=True)  # `dvc repro finetune` ended
    elsewhere = left_running(f"other-host:1:1.000", "export", ended=False)  # another host's: not ours to judge
    monkeypatch.setattr(tracking, "dvc_ancestor", lambda: psutil.Process().parent())  # the next execution
    with tracking.pipeline_run(params, "download"):
        pass
    status = {name: client.get_run(run_id).info.status for name, run_id in [("killed", killed), ("stopped", stopped), ("alive", alive), ("elsewhere", elsewhere)]}
    assert status == {"killed": "KILLED", "stopped": "FINISHED", "alive": "RUNNING", "elsewhere": "RUNNING"}
