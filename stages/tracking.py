"""One MLflow run per pipeline execution, shared by the stages that execution runs.

DVC starts each stage as its own process, so the stages find their common run by a tag: the
`dvc` process (`dvc repro`, `dvc exp run`, a queue worker) they all descend from. A stage started
by hand has no such ancestor and gets a run of its own.
The store defaults to `mlflow.db` (SQLite) in the project; MLFLOW_TRACKING_URI overrides it.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import psutil

from stages import hardware
from stages.params import Params, flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXECUTION_TAG = "pipeline.execution"


def execution_id() -> str:
    """host:pid:start-time of the nearest `dvc` ancestor process, else of this process."""
    proc = psutil.Process()
    for ancestor in proc.parents():
        try:
            cmdline = ancestor.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(Path(arg).name == "dvc" for arg in cmdline[:3]):
            proc = ancestor
            break
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"


def _find_run(experiment_id: str, execution: str) -> str | None:
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{execution}'", max_results=1, output_format="list"
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def pipeline_run(params: Params) -> Iterator[mlflow.ActiveRun]:
    """Open (or re-open) this execution's run; the first stage to open it logs params and hardware."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    experiment = mlflow.set_experiment(params.tracking.experiment)
    execution = execution_id()
    run_id = _find_run(experiment.experiment_id, execution)
    if run_id:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {EXECUTION_TAG: execution, **hardware.describe()}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    with mlflow.start_run(run_name=exp_name, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_artifact(path: Path) -> None:
    mlflow.log_artifact(str(path))
