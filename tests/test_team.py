"""Working as a team: the pipeline's data and models shared through a DVC remote on a real S3-compatible
server. moto's server mode (the `team` extra) is started by the tests on a free loopback port; it keeps
its objects in memory and accepts any credentials, but some must be given, as with real S3."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests

from scripts.compare_runs import free_port
from tests.test_pipeline import ALWAYS, commit, dvc, make_repo, ran_stages, run, status_stages

pytestmark = pytest.mark.slow  # real dvc repro, push and pull: `make test`, not `make test-fast`

BUCKET = "team-storage"
REMOTE = f"s3://{BUCKET}/dvcstore"
KEY_ID, SECRET = "team-test-key", "team-test-secret"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
# Every output DVC caches in head mode (the cheapest run that exercises every stage).
CACHED = ("data/raw", "data/processed", "data/features", "models/finetuned", "models/checkpoints", "models/export")


class S3Server:
    """`moto_server` on 127.0.0.1 in a session of its own, so that stop() ends it with anything it started."""

    def __init__(self):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(self.url, timeout=1)
                break
            except requests.ConnectionError:
                assert self.process.poll() is None, "moto_server exited at start"
                assert time.monotonic() < deadline, f"moto_server did not answer at {self.url} within 30 s"
                time.sleep(0.2)

    def create_bucket(self, name: str) -> None:
        s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
        s3.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextlib.contextmanager
def s3_server():
    server = S3Server()
    try:
        yield server
    finally:  # also when a test fails
        server.stop()


def digests(repo: Path, paths=CACHED) -> dict[str, str]:
    """sha256 of every file under `paths` (but git's .gitignore), by path relative to the repo."""
    files = (f for p in paths for f in sorted((repo / p).rglob("*")) if f.is_file() and f.name != ".gitignore")
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def clone(origin: Path, path: Path) -> Path:
    """A teammate's fresh clone: its own empty DVC cache, the storage credentials in .dvc/config.local."""
    run(["git", "clone", "-q", str(origin), str(path)], path.parent)
    run(["git", "config", "user.name", "Team Test"], path)
    run(["git", "config", "user.email", "team-test@example.com"], path)
    # make_repo committed the session's shared cache.dir: the clone must not see the first repo's objects
    dvc(path, "cache", "dir", "--local", str(path.parent / f"{path.name}-cache"))
    dvc(path, "remote", "modify", "--local", "storage", "access_key_id", KEY_ID)
    dvc(path, "remote", "modify", "--local", "storage", "secret_access_key", SECRET)
    return path


def failing(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """The output of a dvc command that must fail."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=clean | (env or {}), capture_output=True, text=True)
    assert done.returncode != 0, f"dvc {' '.join(args)} succeeded:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def team(small_tree, tiny_vit, dvc_cache, tmp_path_factory):
    """The first teammate's project: the tiny pipeline run and pushed to the S3 remote, its git history
    pushed to a bare repo (`origin`) that the other teammates clone."""
    base = tmp_path_factory.mktemp("team")
    with s3_server() as server, pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("AWS_") and k != "AWS_CA_BUNDLE"]:
            env.delenv(key)  # credentials reach DVC only as each test gives them
        repo = make_repo(
            base / "first", dvc_cache, data__source=str(small_tree), model__name=str(tiny_vit), fraction=1.0, data__test_fraction=1.0,
            train__mode="head", train__epochs=2, train__lr=1e-3, train__precision="fp32", export__check_images=18,
        )
        dvc(repo, "remote", "add", "-d", "storage", REMOTE)
        dvc(repo, "remote", "modify", "storage", "endpointurl", server.url)
        server.create_bucket(BUCKET)
        dvc(repo, "repro")
        outputs = digests(repo)
        assert "pushed" in dvc(repo, "push", env=CREDENTIALS)
        commit(repo, "pipeline run, outputs pushed")
        origin = base / "origin.git"
        run(["git", "init", "-q", "--bare", str(origin)], base)
        run(["git", "remote", "add", "origin", str(origin)], repo)
        run(["git", "push", "-q", "origin", "HEAD"], repo)
        yield {"repo": repo, "origin": origin, "outputs": outputs, "server": server, "cache": dvc_cache}


def test_a_fresh_clone_pulls_every_output_byte_identical_and_has_nothing_to_run(team, tmp_path):
    second = clone(team["origin"], tmp_path / "second")
    assert digests(second) == {}
    dvc(second, "pull")
    assert digests(second) == team["outputs"]
    assert status_stages(second) == ALWAYS  # inputs is always_changed: it looks at data.source and model.name
    assert ran_stages(dvc(second, "repro")) == ALWAYS
    # the credentials stayed in the git-ignored .dvc/config.local: nothing to commit
    assert run(["git", "status", "--porcelain"], second) == ""
    assert KEY_ID not in (second / ".dvc/config").read_text() and KEY_ID in (second / ".dvc/config.local").read_text()


def test_an_experiment_is_shared_with_its_metrics_and_outputs(team, tmp_path):
    repo = team["repo"]
    assert ran_stages(dvc(repo, "exp", "run", "--name", "shared-lr", "-S", "train.lr=0.01")) == ALWAYS | {"finetune", "evaluate", "export"}
    outputs = digests(repo)
    assert outputs["models/finetuned/model.safetensors"] != team["outputs"]["models/finetuned/model.safetensors"]
    accuracy = json.loads((repo / "metrics/eval.json").read_text())["accuracy"]
    dvc(repo, "exp", "push", "origin", "shared-lr", env=CREDENTIALS)  # git refs to origin, cached outputs to the S3 remote

    second = clone(team["origin"], tmp_path / "second")
    dvc(second, "exp", "pull", "origin", "shared-lr")
    shown = json.loads(dvc(second, "exp", "show", "--json"))
    [experiment] = [exp for row in shown for exp in (row.get("experiments") or []) if exp.get("name") == "shared-lr"]
    [rev] = experiment["revs"]
    assert rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.01
    assert rev["data"]["metrics"]["metrics/eval.json"]["data"]["accuracy"] == accuracy
    dvc(second, "exp", "apply", "shared-lr")
    assert digests(second) == outputs


def test_a_stopped_server_fails_with_dvcs_error_lines_and_keeps_the_cache(team, tmp_path):
    repo = team["repo"]
    second = clone(team["origin"], tmp_path / "second")
    dvc(second, "pull", "data/raw")  # from the running server: the clone's cache holds the raw data
    with s3_server() as stopped:
        stopped.create_bucket(BUCKET)
    before = digests(team["cache"], ["."]), digests(second.parent / "second-cache", ["."])
    for project in (repo, second):  # --local: for this test only, the committed endpoint is left as it was
        dvc(project, "remote", "modify", "--local", "storage", "endpointurl", stopped.url)
    try:
        # one target for pull: DVC retries each missing directory output for about 10 s (the whole
        # pipeline's took 90-110 s to fail here)
        for project, command in ((repo, ["push"]), (second, ["pull", "models/export"])):
            output = failing(project, *command, env=CREDENTIALS if project == repo else None)
            # DVC's own words, no traceback: push says it in one ERROR line; pull adds a second
            # ("failed to pull data from the cloud - N files failed to download")
            errors = [line for line in output.splitlines() if line.startswith("ERROR")]
            assert 1 <= len(errors) <= 2 and "Traceback" not in output, output
            assert "Could not connect to the endpoint URL" in errors[0] and stopped.url in errors[0], output
    finally:
        for project in (repo, second):
            dvc(project, "remote", "modify", "--local", "--unset", "storage", "endpointurl")
    after = digests(team["cache"], ["."]), digests(second.parent / "second-cache", ["."])
    assert after == before
    assert digests(second, ["data/raw"]) == {k: v for k, v in team["outputs"].items() if k.startswith("data/raw/")}
