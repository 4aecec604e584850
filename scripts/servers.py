"""Servers started on 127.0.0.1 and a free port, each in a process group of its own that is stopped
whatever happens: `mlflow server`, an S3-compatible object store (moto's server mode, the `team`
extra) and PostgreSQL (Debian's `postgresql` package). The team server script and the tests start
them through these context managers; also `mlflow models serve` of a registered model.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

START_TIMEOUT_S = 90
# moto accepts any credentials, but boto3 and DVC insist on having some, as with real S3.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "team-key", "AWS_SECRET_ACCESS_KEY": "team-secret"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def process_group(name: str, cmd: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None) -> Iterator[None]:
    """Run `cmd` in a session of its own until `ready()`; on leaving, stop it and everything it started."""
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ready():
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{name} did not start:\n{log.read().decode(errors='replace')[-3000:]}")
                time.sleep(0.3)
            yield
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # PostgreSQL: a smart shutdown; the others: exit
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting
        return False


@contextmanager
def mlflow_server(backend_uri: str, artifacts: str | Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` over `backend_uri`, serving artifacts from `artifacts` (a folder or s3://...); yields its URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    url = f"http://127.0.0.1:{port}"
    # Without the job runner and its task consumers (GenAI evaluation jobs): a dozen fewer processes.
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | (env or {})
    with process_group(f"mlflow server on {url}", cmd, lambda: answers(f"{url}/health"), env):
        yield url


@contextmanager
def model_server(model_uri: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` in this environment (--env-manager local); yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with process_group(f"mlflow models serve on {url}", cmd, lambda: answers(f"{url}/ping"), os.environ | (env or {})):
        yield url


@contextmanager
def s3_server(unchecked_actions: int | None = None) -> Iterator[str]:
    """moto's S3-compatible server, in memory; yields its endpoint URL. It accepts any credentials, unless
    `unchecked_actions` is given: after that many requests, only the access keys of IAM users created in
    it get in (moto's INITIAL_NO_AUTH_ACTION_COUNT)."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]]
    env = None if unchecked_actions is None else os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": str(unchecked_actions)}
    with process_group(f"moto_server on {url}", cmd, lambda: answers(url), env):
        yield url


def s3_client(endpoint: str):
    """A boto3 S3 client of the object store at `endpoint`, with S3_CREDENTIALS."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{k.lower(): v for k, v in S3_CREDENTIALS.items()})


def create_bucket(endpoint: str, name: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=name)


def find_postgres_bin(program: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's packages put it (not on PATH); None without the server."""
    return shutil.which(program) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), reverse=True)), None)


def postgres_bin(program: str) -> str:
    found = find_postgres_bin(program)
    if not found:
        raise RuntimeError(f"PostgreSQL's {program} not found: install the server (apt-get install postgresql)")
    return found


@contextmanager
def postgres(folder: Path, database: str = "mlflow") -> Iterator[str]:
    """PostgreSQL with its data in `folder` (created, or reused when it holds a cluster), listening on loopback
    only, with one database and a trusted local user named after it; yields the SQLAlchemy URI MLflow takes.
    PostgreSQL refuses to run as root: as root, it runs as the `postgres` user the package creates, which
    must be able to reach `folder`."""
    import psycopg

    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder.mkdir(parents=True, exist_ok=True)
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    if not data.exists():
        init = subprocess.run(
            [*as_user, postgres_bin("initdb"), "-D", str(data), "-U", database, "--auth=trust", "-E", "UTF8"], capture_output=True, text=True, cwd=folder
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed in {data}:\n{init.stdout}{init.stderr}")
    port = free_port()
    address = f"host=127.0.0.1 port={port} user={database}"

    def ready() -> bool:
        try:
            psycopg.connect(f"{address} dbname=postgres", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    cmd = [*as_user, postgres_bin("postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1", "-p", str(port), "-k", str(folder)]
    with process_group(f"PostgreSQL on 127.0.0.1:{port}", cmd, ready):
        with psycopg.connect(f"{address} dbname=postgres", autocommit=True) as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
                admin.execute(f'CREATE DATABASE "{database}"')
        yield f"postgresql://{database}@127.0.0.1:{port}/{database}"
