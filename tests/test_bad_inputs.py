"""Every bad input a user can give: the stage DVC runs first that can tell refuses it in seconds,
exit status 2, one line on stderr naming the key or file, and every earlier output left as it was.

One finished project (tiny ViT, head mode, the 3-class folder) is made once; each case changes
params.yaml or writes a bad input beside it, runs the stage as DVC runs it, and puts params.yaml back.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import set_params
from tests.test_pipeline import dvc, make_repo, status_stages

RESULTS = ("data", "models", "metrics")
MAX_CPU_SECONDS = 10  # the stage's processes together: CPU time, which other jobs on the cores do not inflate as they do wall time


@dataclass(frozen=True)
class Case:
    id: str
    stage: str  # the command DVC runs first that must refuse it: python -m stages.<stage>
    says: str  # part of the one line: the key or file it names, and what is wrong
    params: dict = field(default_factory=dict)  # set_params keys (train__lr=...)
    make: Callable[[Path], dict] | None = None  # writes a bad input under the project; returns params to set
    params_text: str | None = None  # params.yaml replaced by this text
    env: dict = field(default_factory=dict)


def clean_source(project: Path) -> Path:
    """The finished project's data: the 3-class folder."""
    return Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["source"])


def tree(project: Path, name: str) -> Path:
    """A copy of the 3-class folder under the project, to be spoilt by a case."""
    path = project / "bad" / name
    shutil.copytree(clean_source(project), path)
    return path


def a_train_image(root: Path) -> Path:
    return sorted((root / "train" / "cat").iterdir())[0]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` pixels: what a decompression bomb looks like to a decoder."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def source(make_tree: Callable[[Path], Path]) -> Callable[[Path], dict]:
    return lambda project: {"data__source": str(make_tree(project))}


def model(make_folder: Callable[[Path], Path]) -> Callable[[Path], dict]:
    return lambda project: {"model__name": str(make_folder(project))}


def model_folder(project: Path, name: str, config: dict | None, weights: bool) -> Path:
    path = project / "bad" / name
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def spoilt(name: str, spoil: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(project: Path) -> Path:
        path = tree(project, name)
        spoil(path)
        return path

    return make


def truncated_archive(project: Path) -> Path:
    path = project / "bad" / "truncated.tgz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        archive.add(clean_source(project), arcname="data")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def a_file(project: Path, name: str, text: str) -> Path:
    path = project / "bad" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def under_an_existing_folder(project: Path) -> str:
    (project / "mydata").mkdir(exist_ok=True)
    return "mydata/cifar"  # mydata/ exists: a path, not the Hub id `mydata/cifar`


BERT = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522}
VIT = {"model_type": "vit", "architectures": ["ViTForImageClassification"]}

CASES = [
    # params.yaml: every value is checked by the inputs stage, before DVC removes any later output
    Case("fraction-zero", "inputs", "fraction=0", {"fraction": 0}),
    Case("fraction-above-one", "inputs", "fraction=1.5", {"fraction": 1.5}),
    Case("seed-negative", "inputs", "seed=-1", {"seed": -1}),
    Case("val-fraction-one", "inputs", "data.val_fraction=1", {"data__val_fraction": 1}),
    Case("test-fraction-zero", "inputs", "data.test_fraction=0", {"data__test_fraction": 0}),
    Case("storage-size-tiny", "inputs", "data.storage_size=4", {"data__storage_size": 4}),
    Case("image-size-tiny", "inputs", "model.image_size=16", {"model__image_size": 16}),
    Case("epochs-zero", "inputs", "train.epochs=0", {"train__epochs": 0}),
    Case("lr-negative", "inputs", "train.lr=-0.1", {"train__lr": -0.1}),
    Case("lr-a-word", "inputs", "train.lr", {"train__lr": "fast"}),
    Case("batch-size-zero", "inputs", "train.batch_size=0", {"train__batch_size": 0}),
    Case("mode-unknown", "inputs", "train.mode='partial'", {"train__mode": "partial"}),
    Case("precision-fp16", "inputs", "train.precision='fp16'", {"train__precision": "fp16"}),
    Case("processes-zero", "inputs", "train.processes=0", {"train__processes": 0}),
    Case("batch-not-split-evenly-over-processes", "inputs", "train.batch_size=30 is invalid; allowed: a multiple of train.processes (4)",
         {"train__mode": "full", "train__processes": 4, "train__batch_size": 30}),
    Case("warmup-one", "inputs", "train.warmup_ratio=1", {"train__warmup_ratio": 1}),
    Case("check-images-zero", "inputs", "export.check_images=0", {"export__check_images": 0}),
    Case("probability-bar-above-one", "inputs", "export.max_mean_probability_diff=2", {"export__max_mean_probability_diff": 2}),
    Case("unknown-key", "inputs", "train.learning_rate", {"train__learning_rate": 0.1}),
    Case("params-not-a-mapping", "inputs", "params.yaml", params_text="- fraction\n- seed\n"),
    Case("params-broken-yaml", "inputs", "params.yaml", params_text="train: [lr: 0.1\n"),
    Case("params-missing-section", "inputs", "missing key data", params_text="seed: 42\nfraction: 0.01\n"),
    # data.source
    Case("source-missing", "inputs", "data.source='./nowhere'", {"data__source": "./nowhere"}),
    Case("source-path-under-existing-folder", "inputs", "data.source='mydata/cifar': no such file or folder",
         make=lambda p: {"data__source": under_an_existing_folder(p)}),
    Case("source-not-an-archive", "inputs", "is a file but not a", make=source(lambda p: a_file(p, "notes.txt", "hello"))),
    Case("source-truncated-archive", "download", "is not a readable archive", make=source(truncated_archive)),
    Case("source-one-class", "download", "has only class 'cat'",
         make=source(spoilt("one-class", lambda t: [shutil.rmtree(t / s / c) for s in ("train", "test") for c in ("dog", "ship")]))),
    Case("source-test-class-without-train", "download", "test class 'bird' has no train images",
         make=source(spoilt("extra-test-class", lambda t: shutil.copytree(t / "test" / "cat", t / "test" / "bird")))),
    Case("source-no-images", "download", "holds no images under train/", make=source(lambda p: a_file(p, "empty/README.md", "no images").parent)),
    Case("source-text-named-jpg", "download", "cannot be decoded",
         make=source(spoilt("text-jpg", lambda t: a_train_image(t).write_text("not a JPEG")))),
    Case("source-decompression-bomb", "download", "cannot be decoded (DecompressionBombError",
         make=source(spoilt("bomb", lambda t: (t / "train" / "cat" / "bomb.png").write_bytes(png_claiming(30_000, 30_000))))),
    # shares too small for the data: the first stage that has counted the images
    Case("fraction-too-small-for-the-data", "preprocess", "fraction=1e-09 leaves class", {"fraction": 1e-9}),
    Case("test-fraction-too-small-for-the-data", "preprocess", "data.test_fraction=0.01 leaves class", {"data__test_fraction": 0.01}),
    Case("val-fraction-too-small-for-the-data", "preprocess", "data.val_fraction=0.01", {"data__val_fraction": 0.01}),
    # model.name
    Case("model-missing", "inputs", "model.name='./models-elsewhere/vit': no such", {"model__name": "./models-elsewhere/vit"}),
    Case("model-a-file", "inputs", "is a file", make=model(lambda p: a_file(p, "model.bin", "weights?"))),
    Case("model-folder-without-config", "inputs", "without config.json", make=model(lambda p: model_folder(p, "no-config", None, True))),
    Case("model-a-text-model", "inputs", "not an image-classification model (model_type bert)", make=model(lambda p: model_folder(p, "bert", BERT, True))),
    Case("model-without-weights", "inputs", "config.json but no weights", make=model(lambda p: model_folder(p, "no-weights", VIT, False))),
    # tracking: a closed server when tracking is required stops track, the one stage that logs to MLflow
    Case("tracking-server-closed", "track", "MLflow", {"tracking__required": True}, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
]


def stage_env(project: Path, extra: dict | None = None) -> dict[str, str]:
    """The environment DVC gives a stage, without progress bars (not error output) or this shell's MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | {"TQDM_DISABLE": "1", "DVC_ROOT": str(project)} | (extra or {})


def digests(project: Path) -> dict[str, str]:
    return {
        str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
        for top in RESULTS for path in sorted((project / top).rglob("*")) if path.is_file()
    }


@pytest.fixture(scope="module")
def finished(small_tree, tiny_vit, dvc_cache, tmp_path_factory) -> Path:
    """A project whose pipeline ran to the end: every case must leave its outputs as they are."""
    project = make_repo(
        tmp_path_factory.mktemp("bad-inputs") / "project", dvc_cache,
        data__source=str(small_tree), model__name=str(tiny_vit), fraction=1.0, data__test_fraction=1.0,
        train__mode="head", train__epochs=2, train__lr=1e-3, train__precision="fp32", export__check_images=18,
    )
    dvc(project, "repro")
    return project


def children_cpu_seconds() -> float:
    """User and system CPU time of every finished child process of this one (and theirs)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_and_costs_nothing(case: Case, finished: Path):
    project, params_file = finished, finished / "params.yaml"
    before, params_text = digests(project), params_file.read_text()
    try:
        if case.params_text is not None:
            params_file.write_text(case.params_text)
        values = case.params | (case.make(project) if case.make else {})
        if values:
            set_params(project, **values)
        started, cpu_before = time.monotonic(), children_cpu_seconds()
        done = subprocess.run([sys.executable, "-m", f"stages.{case.stage}"], cwd=project, env=stage_env(project, case.env), capture_output=True, text=True)
        seconds, cpu_seconds = time.monotonic() - started, children_cpu_seconds() - cpu_before
    finally:
        params_file.write_text(params_text)
        shutil.rmtree(project / "bad", ignore_errors=True)
    lines = done.stderr.strip().splitlines()
    print(f"{case.id}: exit {done.returncode}, {seconds:.1f} s ({cpu_seconds:.1f} s CPU): {done.stderr.strip()}")  # the closing note's table
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and case.says in lines[0], done.stderr
    assert cpu_seconds < MAX_CPU_SECONDS
    assert digests(project) == before


@pytest.mark.parametrize("values", [{"train__epochs": 0}, {"model__name": "bad/bert"}], ids=["bad-parameter", "text-model"])
def test_dvc_repro_with_a_bad_input_keeps_every_result(values: dict, finished: Path):
    """Through DVC, which removes a stage's outputs before running it: the inputs stage refuses first."""
    project, params_text = finished, (finished / "params.yaml").read_text()
    before = digests(project)
    try:
        model_folder(project, "bert", BERT, True)
        set_params(project, **values)
        done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=stage_env(project), capture_output=True, text=True)
    finally:
        (project / "params.yaml").write_text(params_text)
        shutil.rmtree(project / "bad", ignore_errors=True)
    assert done.returncode != 0 and "failed to reproduce 'inputs'" in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")], done.stderr
    assert digests(project) == before
    assert status_stages(project) == {"inputs"}  # always changed: it runs on every `dvc repro`; nothing else is


def test_a_relative_path_is_read_from_the_project_root_in_an_experiments_copy(finished: Path, small_tree: Path, tmp_path: Path):
    """`dvc exp run --temp`/`--queue` run stages in a copy under .dvc/tmp/exps; DVC_ROOT names the real project."""
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(small_tree, finished / "bad" / "tree")
    try:
        (copy / "params.yaml").write_text((finished / "params.yaml").read_text())
        set_params(copy, data__source="bad/tree")  # there in the project, not in the copy
        done = subprocess.run([sys.executable, "-m", "stages.inputs"], cwd=copy, env=stage_env(finished), capture_output=True, text=True)
    finally:
        shutil.rmtree(finished / "bad")
    assert done.returncode == 0, done.stderr
    recorded = json.loads((copy / "data/inputs/source.json").read_text())
    assert recorded["data.source"] == "bad/tree" and recorded["kind"] == "local"
