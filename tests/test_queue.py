"""End to end: two queued experiments run in parallel (`dvc queue start -j 2`), each in its own copy under
.dvc/tmp/exps that DVC deletes afterwards, logging to a SQLite store the user names by MLFLOW_TRACKING_URI."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tests.test_pipeline import dvc, make_repo, wait_for_queue

pytestmark = pytest.mark.slow


def test_parallel_queued_experiments_keep_their_runs_artifacts_and_models(small_tree, tiny_vit, tmp_path):
    repo = make_repo(
        tmp_path / "repo", tmp_path / "dvc-cache",  # a cache of its own: no run-cache hit skips the download stages
        data__source=str(small_tree), model__name=str(tiny_vit), fraction=1.0, data__test_fraction=1.0,
        train__mode="head", train__epochs=2, train__lr=1e-3, train__precision="fp32",
    )
    store = tmp_path / "store" / "mlflow.db"  # outside the project, and new: both workers create it
    store.parent.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    for lr in ("0.001", "0.003"):
        dvc(repo, "exp", "run", "--queue", "-S", f"train.lr={lr}", env=env)
    dvc(repo, "queue", "start", "-j", "2", env=env)
    assert wait_for_queue(repo).count("Success") == 2
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*"))  # the experiments' copies are gone
    assert not (repo / "mlruns").exists()  # the artifacts are beside the store, not in the project

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("cifar10-transfer")
    assert experiment.artifact_location == (store.parent / "mlruns").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:  # nothing lost by either worker, from the first stage that opened the store on
        assert {"download_seconds", "data.classes", "test_accuracy", "export_seconds"} <= set(run.data.metrics)
        assert run.data.tags["data.processed_md5"].endswith(".dir")
        saved = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="eval_per_class.csv", dst_path=str(tmp_path / run.info.run_id))
        assert Path(saved).stat().st_size > 0
    versions = client.search_model_versions("name='cifar10-classifier'")
    assert {version.run_id for version in versions} == {run.info.run_id for run in runs}  # each in its execution's run
    for version in versions:
        model = mlflow.artifacts.download_artifacts(f"models:/cifar10-classifier/{version.version}", dst_path=str(tmp_path / f"v{version.version}"))
        assert (Path(model) / "MLmodel").is_file()
