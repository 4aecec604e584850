"""One MLflow run per pipeline execution, shared by the stages that execution runs.

DVC starts each stage as its own process, so the stages find their common run by a tag: the
`dvc` process (`dvc repro`, `dvc exp run`, a queue worker's `dvc exp exec-run`) they all descend
from. A stage started by hand has no such ancestor and gets a run of its own. Each stage runs inside
the run (`run_tracked_stage`), which records its wall time, and for finetune and evaluate MLflow's
system metrics (CPU, memory, GPU where present) every second.

The store defaults to `mlflow.db` (SQLite) in the project root, also for queued and `--temp`
experiments, which DVC runs in a copy under .dvc/tmp/exps/ and deletes; MLFLOW_TRACKING_URI overrides
it. Nothing may land in that copy: a relative SQLite path is taken from the project root, and a new
experiment's artifacts go to mlruns/ beside a SQLite file (see artifact_location). Parallel queue
workers may open a new SQLite store at once: its creation is serialised by a file lock beside it.
If the store cannot be reached, or fails mid-stage (connection, HTTP or database errors), the stage
still completes (its results are in DVC's files) and prints one warning; with `tracking.required:
true` it fails instead. Any other error in a logging call is a bug here and raises.

The run reads RUNNING while the execution's stages run, FINISHED once its last stage (export) ends,
FAILED as soon as a stage fails. A stage run by hand has a run of its own, FINISHED when it ends. A run
left RUNNING by an execution whose `dvc` process is gone is ended by the next execution on the host:
KILLED if it died inside a stage (kill -9), FINISHED if it stopped between stages (`dvc repro finetune`).
MLflow's INFO lines are not shown (MLFLOW_LOGGING_LEVEL=WARNING unless set otherwise).
"""
from __future__ import annotations

import base64
import fcntl
import functools
import io
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Before MLflow configures its loggers on import: its INFO lines (database set-up, system metrics
# monitor start and stop) are not the stage's; warnings still show.
_QUIET = "MLFLOW_LOGGING_LEVEL" not in os.environ
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import mlflow  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import sqlalchemy.exc  # noqa: E402  (MLflow's database stores run on SQLAlchemy)
from mlflow.exceptions import MlflowException, RestException  # noqa: E402
from mlflow.protos import databricks_pb2  # noqa: E402

if _QUIET:  # also when something imported MLflow before this module
    logging.getLogger("mlflow").setLevel(logging.WARNING)

from stages import hardware
from stages.hub import project_root
from stages.errors import PipelineError, run_stage
from stages.params import Params, flatten, load_params

EXECUTION_TAG = "pipeline.execution"
STAGE_TAG = "pipeline.stage"  # the stage the execution started last
DATA_TAG = "data.processed_md5"  # the md5 DVC records for data/processed in dvc.lock
MODEL_ALIAS = "candidate"
SYSTEM_METRICS_STAGES = ("finetune", "evaluate")
LAST_STAGE = "export"  # the run is FINISHED when it ends; before, it reads RUNNING between stages
SYSTEM_METRICS_INTERVAL_S = 1  # a two-minute stage gets a curve of ~120 points
# Stages that run after preprocess, on data/processed as it is now (download runs before it).
DATA_STAGES = ("preprocess", "finetune", "evaluate", "export")
REACH_TIMEOUT_S = 10  # a server busy with other clients may take seconds; a closed port fails at once
# MLflow retries a failed HTTP request 7 times with backoff (minutes); once is enough to know.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else mlflow.db in the project root. A relative SQLite path is taken from the
    project root too, not from the current directory: a queued experiment's copy, deleted after it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{project_root()}/{uri.removeprefix('sqlite:///')}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:////abs/path` URI (what tracking_uri() gives for SQLite); else None."""
    return Path(urlsplit(uri).path[1:]) if uri.startswith("sqlite:////") else None


def artifact_location() -> str | None:
    """Where a new experiment keeps its artifacts, so that they outlast a queued experiment's copy: MLflow's
    default for a database store is ./mlruns in the current directory, which is that copy. A SQLite store
    keeps them in mlruns/ beside its file (the default store: the project root's), another database in the
    project root's mlruns/; a file store keeps them inside itself, and a server decides for itself (None)."""
    uri = tracking_uri()
    if database := sqlite_path(uri):
        return (database.parent / "mlruns").as_uri()
    if urlsplit(uri).scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        return (project_root() / "mlruns").as_uri()
    return None


def dvc_ancestor() -> psutil.Process | None:
    """The nearest `dvc` ancestor process (`dvc repro`, `dvc exp run`, a queue worker), if any."""
    for ancestor in psutil.Process().parents():
        try:
            cmdline = ancestor.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(Path(arg).name == "dvc" for arg in cmdline[:3]):
            return ancestor
    return None


def execution_id() -> str:
    """host:pid:start-time of the nearest `dvc` ancestor process, else of this process."""
    proc = dvc_ancestor() or psutil.Process()
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"


# MLflow error codes that say the store itself failed or refused: overloaded, gone, or not letting us in.
_STORE_ERROR_CODES = {
    databricks_pb2.ErrorCode.Name(code)
    for code in (
        databricks_pb2.TEMPORARILY_UNAVAILABLE,
        databricks_pb2.REQUEST_LIMIT_EXCEEDED,
        databricks_pb2.ENDPOINT_NOT_FOUND,
        databricks_pb2.UNAUTHENTICATED,
        databricks_pb2.PERMISSION_DENIED,
        databricks_pb2.CUSTOMER_UNAUTHORIZED,
    )
}
# What a store's transport raises: the network (requests, and the OS's connection errors) and databases.
_TRANSPORT_ERRORS = (requests.exceptions.RequestException, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, ConnectionError, TimeoutError)


def is_store_failure(err: BaseException) -> bool:
    """True for a failure of the tracking store (connection, HTTP, database), not of the code calling it.

    MLflow wraps transport errors in MlflowException ("API request to ... failed", a database error),
    keeping the original as its cause or context; a server's own error answer is an HTTP 5xx. A
    rejected value (INVALID_PARAMETER_VALUE, a 4xx) or any other exception is a bug in the caller.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _TRANSPORT_ERRORS):
            return True
        if isinstance(current, MlflowException):
            if current.error_code in _STORE_ERROR_CODES:
                return True
            from_server = isinstance(current, RestException) or current.message.startswith("API request to")
            if from_server and current.get_http_status_code() >= 500:
                return True
        current = current.__cause__ or current.__context__
    return False


def git_commit() -> str:
    """The commit the experiment is based on (DVC says so for experiments), else HEAD."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "none"


def without_credentials(value: object) -> object:
    """A URL's user:password@ part removed: a parameter may name a source that carries a token."""
    if not isinstance(value, str) or "@" not in value or "://" not in value:
        return value
    parts = urlsplit(value)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def data_digest(path: Path) -> str:
    """The md5 DVC records for a directory output (dvc.lock's `md5: ....dir`), computed as DVC does."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5")
    return obj.hash_info.value


@dataclass
class _Session:
    """The run a stage logs to; `run_id` is None once tracking has failed, and the stage carries on untracked."""

    uri: str
    artifact_location: str | None  # read before mlflow.set_tracking_uri, which sets MLFLOW_TRACKING_URI
    stage: str
    required: bool
    run_id: str | None = None
    last: bool = False  # this stage ends the execution: the run is FINISHED after it, else left RUNNING
    failed: bool = False  # an earlier stage of the execution failed

    def fail(self, what: str, err: Exception) -> None:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}"
        self.run_id = None  # nothing more is sent: one failure, one message
        if self.required:
            raise PipelineError(
                f"MLflow tracking at {self.uri} failed ({reason}) while logging {what}; start the tracking server "
                "or fix MLFLOW_TRACKING_URI, or set tracking.required: false to run without tracking"
            )
        print(
            f"warning: MLflow tracking at {self.uri} failed ({reason}): nothing more from the {self.stage} stage was logged "
            f"to MLflow, starting with its {what}; the results are in DVC's files (metrics/, dvc exp show). "
            "Set tracking.required: true to make this an error.",
            file=sys.stderr,
        )


_session: _Session | None = None


def _tracked(what: str) -> Callable:
    """Log only inside a stage's run, and turn a failure of the store into the session's one warning;
    any other exception (a bug in the logging code) propagates and fails the stage."""

    def wrap(log: Callable) -> Callable:
        @functools.wraps(log)
        def guarded(*args, **kwargs):
            if _session is None or _session.run_id is None:
                return None
            try:
                return log(*args, **kwargs)
            except Exception as err:
                if not is_store_failure(err):
                    raise
                _session.fail(what, err)  # results stay in DVC's files
                return None

        return guarded

    return wrap


def _check_reachable(uri: str) -> None:
    """Ask an HTTP server once, briefly, rather than through MLflow's retries."""
    if uri.startswith(("http://", "https://")):
        requests.get(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S).raise_for_status()


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while MLflow opens it: the first process creates its
    tables (and the experiment), and two queue workers doing so at once break each other's migration."""
    database = sqlite_path(uri)
    if database is None or not database.parent.is_dir():  # (no folder: MLflow's own error says so)
        yield
        return
    with open(f"{database}.lock", "a") as lock:  # closing it releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _experiment_id(name: str, location: str | None) -> str:
    with _store_lock(mlflow.get_tracking_uri()):  # the first call on the store creates it
        experiment = mlflow.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            # On a tracking server no lock is held: two teammates' first executions may both create it.
            if err.error_code != databricks_pb2.ErrorCode.Name(databricks_pb2.RESOURCE_ALREADY_EXISTS):
                raise
            return mlflow.get_experiment_by_name(name).experiment_id


def use_experiment(name: str) -> str:
    """Point MLflow at the project's store; the id of experiment `name`, created there as the stages create it."""
    mlflow.set_tracking_uri(tracking_uri())
    return _experiment_id(name, artifact_location())


def _find_run(experiment_id: str, execution: str) -> mlflow.entities.Run | None:
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{execution}'", max_results=1, output_format="list"
    )
    return runs[0] if runs else None


def _alive(pid: int, started: str) -> bool:
    try:
        return f"{psutil.Process(pid).create_time():.3f}" == started
    except psutil.NoSuchProcess:
        return False


def _close_dead_runs(experiment_id: str) -> None:
    """End the runs that executions on this host left RUNNING and whose `dvc` process is gone: nothing
    else would. KILLED when it died inside a stage (kill -9: that stage's wall time was never logged),
    FINISHED when it ended between stages (`dvc repro finetune`); the end time stays the last stage's."""
    host = socket.gethostname()
    running = f"attributes.status = 'RUNNING' and tags.`{EXECUTION_TAG}` LIKE '{host}:%'"
    for run in mlflow.search_runs([experiment_id], filter_string=running, output_format="list"):
        tagged_host, pid, started = run.data.tags[EXECUTION_TAG].rsplit(":", 2)
        if tagged_host == host and not _alive(int(pid), started):
            ended = f"{run.data.tags.get(STAGE_TAG)}_seconds" in run.data.metrics
            mlflow.MlflowClient().set_terminated(run.info.run_id, "FINISHED" if ended else "KILLED", run.info.end_time)


def _start(params: Params, stage: str) -> mlflow.ActiveRun:
    """Re-open this execution's run, or open it: the first stage logs params and the identifying tags,
    and ends the runs of dead executions."""
    _check_reachable(mlflow.get_tracking_uri())
    experiment_id = _experiment_id(params.tracking.experiment, _session.artifact_location)
    execution = execution_id()
    _session.last = stage == LAST_STAGE or dvc_ancestor() is None  # by hand: a run of its own
    system_metrics = stage in SYSTEM_METRICS_STAGES
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    found = _find_run(experiment_id, execution)
    if found:
        # With `dvc repro --keep-going` stages run on after one failed: the run stays FAILED.
        _session.failed = found.info.status == "FAILED"
        run = mlflow.start_run(run_id=found.info.run_id, log_system_metrics=system_metrics)
        mlflow.set_tag(STAGE_TAG, stage)
        return run
    _close_dead_runs(experiment_id)
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {EXECUTION_TAG: execution, STAGE_TAG: stage, "git.commit": git_commit(), "model.name": str(without_credentials(params.model.name))}
    tags |= hardware.describe()
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    run = mlflow.start_run(experiment_id=experiment_id, run_name=exp_name, tags=tags, log_system_metrics=system_metrics)
    mlflow.log_params({key: without_credentials(value) for key, value in flatten(params).items()})
    return run


@contextmanager
def pipeline_run(params: Params, stage: str) -> Iterator[None]:
    """This execution's run, open while `stage` runs; its wall time is logged as `<stage>_seconds`."""
    global _session
    _session = _Session(tracking_uri(), artifact_location(), stage, params.tracking.required)
    mlflow.set_tracking_uri(_session.uri)
    try:
        _session.run_id = _start(params, stage).info.run_id
    except Exception as err:
        if not is_store_failure(err):  # unreachable server, locked database: the stage runs untracked
            raise
        _session.fail("params, metrics and artifacts", err)
    started = time.perf_counter()
    status = "FAILED"
    try:
        yield
        log_metrics({f"{stage}_seconds": round(time.perf_counter() - started, 2)})
        if stage in DATA_STAGES:
            _log_data(params)
        status = "FAILED" if _session.failed else "FINISHED" if _session.last else "RUNNING"
    finally:
        try:
            _end(status)
        finally:
            _session = None


@_tracked("end of run")
def _end(status: str) -> None:
    """Close this process's hold on the run. RUNNING leaves it open for the execution's next stage
    (MLflow records the stage's end time as the run's end time so far); its last stage finishes it."""
    mlflow.end_run(status)


@_tracked("data digest and dataset")
def _log_data(params: Params) -> None:
    """Tag the processed data's DVC md5 and record its splits as the run's inputs, once per run."""
    import pandas as pd

    from stages.dataformat import PROCESSED_DIR, PROCESSED_SPLITS, load_labels

    if not PROCESSED_DIR.is_dir() or DATA_TAG in mlflow.get_run(_session.run_id).data.tags:
        return  # (a stage run by hand where no data was processed has none to record)
    digest = data_digest(PROCESSED_DIR)
    mlflow.set_tag(DATA_TAG, digest)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        for name in PROCESSED_SPLITS:
            indices, classes = load_labels(name)
            labels = pd.DataFrame({"label": [classes[i] for i in indices.tolist()]})
            source = str(without_credentials(params.data.source))
            dataset = mlflow.data.from_pandas(labels, source=source, targets="label", name=f"processed-{name}", digest=digest.removesuffix(".dir"))
            mlflow.log_input(dataset, context=name)


def run_tracked_stage(stage: str, main: Callable[[], None]) -> None:
    """run_stage(main) inside this execution's MLflow run."""

    def tracked() -> None:
        with pipeline_run(load_params(), stage):
            main()

    run_stage(tracked)


@_tracked("metrics")
def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


@_tracked("tags")
def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


@_tracked("artifacts")
def log_artifact(path: Path) -> None:
    mlflow.log_artifact(str(path))


@_tracked("figures")
def log_figure(figure, name: str) -> None:
    mlflow.log_figure(figure, name)


@_tracked("the model")
def log_model(model_dir: Path, registered_name: str, example_image: bytes, base_model: str, alias: bool = True) -> None:
    """Log an image-classification model directory with the transformers flavour (a class MLflow cannot rebuild:
    as `stages.pyfuncmodel`'s pyfunc), register it, and alias the new version `candidate` when `alias`
    (the export stage's sanity bar passed)."""
    import transformers
    from huggingface_hub import ModelCard
    from PIL import Image

    from stages import pyfuncmodel

    # An absolute path: MLflow looks the model's license up on the Hub by the name it was loaded
    # from, and a relative `models/export` is a valid Hub id (a minute of retries offline); an
    # absolute path is not one, so the look-up ends at once without asking the Hub.
    classify = transformers.pipeline("image-classification", model=str(model_dir.resolve()))
    [top] = classify(Image.open(io.BytesIO(example_image)).convert("RGB"), top_k=1)
    example = [base64.b64encode(example_image).decode()]  # what MLflow's image pipelines take: base64 of an image file
    card = ModelCard(f"---\nbase_model: {without_credentials(base_model)}\npipeline_tag: image-classification\n---\nFine-tuned by the DVC pipeline.\n")
    # MLflow's default list for image models names torchvision, which the pipeline does not use.
    logged = dict(
        name="model",
        input_example=example,
        signature=mlflow.models.infer_signature(example, [top]),  # {label, score} per image
        pip_requirements=[f"{p}=={version(p)}" for p in ("torch", "transformers", "pillow")],
        registered_model_name=registered_name,
    )
    if hasattr(transformers, type(classify.model).__name__):
        info = mlflow.transformers.log_model(classify, task="image-classification", model_card=card, model_config={"top_k": 1}, **logged)
    else:  # a class MLflow's transformers loader cannot rebuild: the same model as a pyfunc around pipeline()
        logged["pip_requirements"] += [f"{p}=={version(p)}" for p in ("pandas", "efficientnet-lite-pytorch")]
        del logged["signature"]  # MLflow takes it from predict's type hint (a list of strings in)
        info = mlflow.pyfunc.log_model(
            python_model=pyfuncmodel.__file__, artifacts={pyfuncmodel.MODEL_ARTIFACT: str(model_dir)}, code_paths=[str(Path(__file__).parent)], **logged
        )
    if not alias:
        print(f"tracking: registered {registered_name} version {info.registered_model_version}, not aliased @{MODEL_ALIAS}")
        return
    client, number = mlflow.MlflowClient(), int(info.registered_model_version)
    holder = aliased_version(client, registered_name)
    if holder > number:  # an execution running at the same time registered after this one and passed the bar too
        print(f"tracking: registered {registered_name} version {number}; @{MODEL_ALIAS} stays on the newer version {holder}")
        return
    client.set_registered_model_alias(registered_name, MODEL_ALIAS, str(number))
    print(f"tracking: registered {registered_name} version {number} as @{MODEL_ALIAS}")


def aliased_version(client: mlflow.MlflowClient, registered_name: str) -> int:
    """The version that holds the alias `candidate`, 0 for none."""
    try:
        return int(client.get_model_version_by_alias(registered_name, MODEL_ALIAS).version)
    except MlflowException as err:  # no such alias: MLflow answers INVALID_PARAMETER_VALUE ("... not found")
        if err.error_code not in {databricks_pb2.ErrorCode.Name(c) for c in (databricks_pb2.INVALID_PARAMETER_VALUE, databricks_pb2.RESOURCE_DOES_NOT_EXIST)}:
            raise
        return 0
