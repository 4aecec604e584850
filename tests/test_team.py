"""Working as a team: the pipeline's data and models shared through a DVC remote on a real S3-compatible
server, and tracked on the team's MLflow server (PostgreSQL, artifacts in that object store). moto's
server mode (the `team` extra) is started by the tests on a free loopback port; it keeps its objects in
memory and accepts any credentials (some must be given, as with real S3), except where a test makes it
check them."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import mlflow

import pytest

from scripts.servers import create_bucket, find_postgres_bin, s3_client, s3_server
from scripts.team_server import BUCKET as SERVER_BUCKET
from scripts.team_server import team_server
from tests.conftest import require_debian_package
from tests.test_pipeline import (
    ALWAYS, SECRET, TRAINED, Rest, a_test_image, as_dict, check_tracked_run, commit, dvc, make_repo, ran_stages, read_json, run, status_stages,
)

pytestmark = pytest.mark.slow  # real dvc repro, push and pull: `make test`, not `make test-fast`

BUCKET = "team-storage"
REMOTE = f"s3://{BUCKET}/dvcstore"
KEY_ID, SECRET = "team-test-key", "team-test-secret"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
# Every output DVC caches in head mode (the cheapest run that exercises every stage).
CACHED = ("data/raw", "data/processed", "data/features", "models/finetuned", "models/export")


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
        dvc(repo, "remote", "modify", "storage", "endpointurl", server)
        create_bucket(server, BUCKET)
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
    assert ran_stages(dvc(repo, "exp", "run", "--name", "shared-lr", "-S", "train.lr=0.01")) == ALWAYS | TRAINED
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
        create_bucket(stopped, BUCKET)
    before = digests(team["cache"], ["."]), digests(second.parent / "second-cache", ["."])
    for project in (repo, second):  # --local: for this test only, the committed endpoint is left as it was
        dvc(project, "remote", "modify", "--local", "storage", "endpointurl", stopped)
    try:
        # one target for pull: DVC retries each missing directory output for about 10 s (the whole
        # pipeline's took 90-110 s to fail here)
        for project, command in ((repo, ["push"]), (second, ["pull", "models/export"])):
            output = failing(project, *command, env=CREDENTIALS if project == repo else None)
            # DVC's own words, no traceback: push says it in one ERROR line; pull adds a second
            # ("failed to pull data from the cloud - N files failed to download")
            errors = [line for line in output.splitlines() if line.startswith("ERROR")]
            assert 1 <= len(errors) <= 2 and "Traceback" not in output, output
            assert "Could not connect to the endpoint URL" in errors[0] and stopped in errors[0], output
    finally:
        for project in (repo, second):
            dvc(project, "remote", "modify", "--local", "--unset", "storage", "endpointurl")
    after = digests(team["cache"], ["."]), digests(second.parent / "second-cache", ["."])
    assert after == before
    assert digests(second, ["data/raw"]) == {k: v for k, v in team["outputs"].items() if k.startswith("data/raw/")}


def test_a_wrong_credential_fails_with_dvcs_error_line_and_keeps_the_cache(team):
    """A server that checks credentials (moto with INITIAL_NO_AUTH_ACTION_COUNT): a wrong secret is refused
    in DVC's one ERROR line and loses nothing; the right key then pushes."""
    repo = team["repo"]
    with s3_server(unchecked_actions=10) as checking:
        setup = {"endpoint_url": checking, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam, s3 = boto3.client("iam", **setup), boto3.client("s3", **setup)
        iam.create_user(UserName="team")
        key = iam.create_access_key(UserName="team")["AccessKey"]
        allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="team", PolicyName="storage", PolicyDocument=json.dumps(allow))
        s3.create_bucket(Bucket=BUCKET)
        # moto counts its unchecked requests from its start, the readiness probe's too: spend the rest
        for _ in range(10):
            try:
                s3.list_buckets()
            except s3.exceptions.ClientError:
                break
        else:
            pytest.fail("moto never started checking credentials")
        right = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        dvc(repo, "remote", "modify", "--local", "storage", "endpointurl", checking)
        try:
            before = digests(team["cache"], ["."])
            output = failing(repo, "push", env=right | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
            errors = [line for line in output.splitlines() if line.startswith("ERROR")]
            assert len(errors) == 1 and "Traceback" not in output, output
            assert "An error occurred (403)" in errors[0] and "Forbidden" in errors[0], output
            assert digests(team["cache"], ["."]) == before
            assert "pushed" in dvc(repo, "push", env=right)  # the same push with the right secret: only the credential was wrong
        finally:
            dvc(repo, "remote", "modify", "--local", "--unset", "storage", "endpointurl")


def test_two_clones_at_once_on_the_team_server_land_as_two_runs(small_tree, tiny_vit, tmp_path):
    """scripts/team_server.py's server (MLflow on PostgreSQL, artifacts in the object store) tracks two
    teammates' executions running at the same time from two clones: two runs, each holding its own
    clone's params, metrics, system metrics and artifacts, and each clone's model registered."""
    require_debian_package("postgresql", installed=find_postgres_bin("postgres") is not None)
    # PostgreSQL runs as the `postgres` user under root: its folder must not be under pytest's private tmp
    server_dir = Path(tempfile.mkdtemp(prefix="team-server-"))
    server_dir.chmod(0o755)
    try:
        with team_server(server_dir) as server:
            rest, env = Rest(server.tracking_uri), {"MLFLOW_TRACKING_URI": server.tracking_uri, "HF_TOKEN": SECRET}
            repos = {
                lr: make_repo(
                    tmp_path / f"clone-lr{lr}", tmp_path / f"cache-lr{lr}", data__source=str(small_tree), model__name=str(tiny_vit),
                    fraction=1.0, data__test_fraction=1.0, train__mode="head", train__epochs=2, train__lr=lr, train__precision="fp32",
                    export__check_images=18,
                )
                for lr in (1e-3, 3e-2)
            }
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
            # Both executions start before either is waited on. Whether their MLflow runs (the track stage
            # only) overlap in time is up to the scheduler, so it is not asserted.
            started = {
                lr: subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=clean | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for lr, repo in repos.items()
            }
            outputs = {lr: process.communicate()[0] for lr, process in started.items()}
            failed = {lr: outputs[lr][-3000:] for lr, process in started.items() if process.returncode}
            assert not failed, "\n".join(f"lr {lr}:\n{tail}" for lr, tail in failed.items())

            runs = {float(as_dict(r["data"]["params"])["train.lr"]): r for r in rest.runs()}
            assert runs.keys() == repos.keys()
            repos_by_run = {runs[lr]["info"]["run_id"]: repo for lr, repo in repos.items()}
            store = s3_client(server.s3_endpoint)
            stored = [o["Key"] for o in store.list_objects_v2(Bucket=SERVER_BUCKET)["Contents"]]
            for lr, repo in repos.items():
                check_tracked_run(rest, runs[lr], repo, ran_stages(outputs[lr]))
                run_id = runs[lr]["info"]["run_id"]
                assert {f"mlflow/{runs[lr]['info']['experiment_id']}/{run_id}/artifacts/reliability.png"} <= set(stored)
                # through the server, from the object store: the clone's own files, byte for byte
                for name in ("reliability.png", "confusion_matrix.png", "eval_per_class.csv"):
                    got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, tracking_uri=server.tracking_uri, dst_path=str(tmp_path / run_id))
                    assert Path(got).read_bytes() == (repo / "metrics" / name).read_bytes(), name
            assert (repos[1e-3] / "metrics/reliability.png").read_bytes() != (repos[3e-2] / "metrics/reliability.png").read_bytes()

            # one version per execution, each loading with pyfunc from the object store and predicting as its own clone
            mlflow.set_tracking_uri(server.tracking_uri)
            versions = rest.get("model-versions/search", filter="name='cifar10-classifier'")["model_versions"]
            assert sorted(v["run_id"] for v in versions) == sorted(r["info"]["run_id"] for r in runs.values())
            for version in versions:
                image, evaluated_label = a_test_image(repos_by_run[version["run_id"]], tmp_path)
                model = mlflow.pyfunc.load_model(f"models:/cifar10-classifier/{version['version']}")
                assert model.predict([str(image)]).iloc[0]["label"] == evaluated_label
            # @candidate: the newest version above chance (a random tiny ViT on 18 test images may not be), whichever finished last
            above_chance = [int(v["version"]) for v in versions if read_json(repos_by_run[v["run_id"]] / "metrics/eval.json")["accuracy"] > 1 / 3]
            if above_chance:
                assert rest.get("registered-models/alias", name="cifar10-classifier", alias="candidate")["model_version"]["version"] == str(max(above_chance))
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)
