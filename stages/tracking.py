"""The MLflow store the track stage logs to, and what counts as its failure.

The store defaults to `mlflow.db` (SQLite) in the project root, also for queued and `--temp`
experiments, which DVC runs in a copy under .dvc/tmp/exps/ and deletes; MLFLOW_TRACKING_URI overrides
it. Nothing may land in that copy: a relative SQLite path is taken from the project root, and a new
experiment's artifacts go to mlruns/ beside a SQLite file (see artifact_location). Parallel queue
workers may open a new SQLite store at once: its creation is serialised by a file lock beside it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

# Before MLflow configures its loggers on import: its INFO lines (database set-up) are not the stage's.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model it reads back to check
# MLflow retries a failed HTTP request 7 times with backoff (minutes); once is enough to know.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow  # noqa: E402
import requests  # noqa: E402
import sqlalchemy.exc  # noqa: E402  (MLflow's database stores run on SQLAlchemy)
from mlflow.exceptions import MlflowException, RestException  # noqa: E402
from mlflow.protos import databricks_pb2 as codes  # noqa: E402

from stages.errors import PipelineError  # noqa: E402
from stages.hub import project_root  # noqa: E402

logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])  # also when MLflow was imported before
REACH_TIMEOUT_S = 10  # a server busy with other clients may take seconds; a closed port fails at once


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
    keeps them in mlruns/ beside its file, another database in the project root's mlruns/; a server decides (None)."""
    uri = tracking_uri()
    if database := sqlite_path(uri):
        return (database.parent / "mlruns").as_uri()
    if urlsplit(uri).scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        return (project_root() / "mlruns").as_uri()
    return None


# MLflow error codes that say the store itself failed or refused: overloaded, gone, or not letting us in.
_STORE_ERROR_CODES = {
    codes.ErrorCode.Name(code)
    for code in (codes.TEMPORARILY_UNAVAILABLE, codes.REQUEST_LIMIT_EXCEEDED, codes.ENDPOINT_NOT_FOUND, codes.UNAUTHENTICATED, codes.PERMISSION_DENIED, codes.CUSTOMER_UNAUTHORIZED)
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


def report_outage(uri: str, err: BaseException, required: bool) -> None:
    """The store failed: with `tracking.required` a one-line error, else a one-line warning."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
    reason = f"{type(err).__name__}: {detail}"
    if required:
        raise PipelineError(
            f"MLflow tracking at {uri} failed ({reason}); start the tracking server or fix MLFLOW_TRACKING_URI, "
            "or set tracking.required: false to run without tracking"
        )
    print(
        f"warning: MLflow tracking at {uri} failed ({reason}): this execution was not logged to MLflow; its results are in "
        "DVC's files (metrics/, dvc exp show): log them with `dvc repro -f track` once the store is back. "
        "Set tracking.required: true to make this an error.",
        file=sys.stderr,
    )


def check_reachable(uri: str) -> None:
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


def experiment_id(name: str, location: str | None) -> str:
    """The id of experiment `name` in the current store, created there (artifacts at `location`) if new."""
    with _store_lock(mlflow.get_tracking_uri()):  # the first call on the store creates it
        experiment = mlflow.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            # On a tracking server no lock is held: two teammates' first executions may both create it.
            if err.error_code != codes.ErrorCode.Name(codes.RESOURCE_ALREADY_EXISTS):
                raise
            return mlflow.get_experiment_by_name(name).experiment_id


def use_experiment(name: str) -> str:
    """Point MLflow at the project's store (reached once, briefly); the id of experiment `name` there."""
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return experiment_id(name, artifact_location())
