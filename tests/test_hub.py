"""The online path, over HTTP: the reference job's ids (google/vit-base-patch16-224, uoft-cs/cifar10)
served by a Hugging Face Hub look-alike on 127.0.0.1 (tests/hub_server.py), holding the tiny ViT and a
few real CIFAR images of 3 classes in the Hub's parquet layout."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.hub_server import HubRepo, hub_server, parquet_dataset
from tests.test_pipeline import STAGES, dvc, make_repo, ran_stages, read_json, run

pytestmark = pytest.mark.slow  # runs the pipeline: `make test`, not `make test-fast`

MODEL_ID, DATASET_ID = "google/vit-base-patch16-224", "uoft-cs/cifar10"


@pytest.fixture(scope="module")
def hub_repos(small_tree, tiny_vit, tmp_path_factory) -> dict[tuple[str, str], HubRepo]:
    classes = sorted(p.name for p in (small_tree / "train").iterdir())
    images = {split: [(c, p.read_bytes()) for c in classes for p in sorted((small_tree / split / c).iterdir())] for split in ("train", "test")}
    dataset = parquet_dataset(images, classes, tmp_path_factory.mktemp("hub-dataset"))
    return {("model", MODEL_ID): HubRepo.from_folder(tiny_vit), ("dataset", DATASET_ID): dataset}


def dataset_classes(dataset: HubRepo) -> list[str]:
    """The ClassLabel names, in label order, as the dataset card gives them."""
    return re.findall(r"'\d+': (\S+)", dataset.files["README.md"].decode())


def hub_env(hf_home: Path, endpoint: str) -> dict[str, str]:
    """What a user online sets, or has: HF_ENDPOINT is read when huggingface_hub is imported, so it
    reaches the stages through their environment. No token, no Xet transfers (the look-alike serves
    plain HTTP), a Hugging Face cache of the test's own."""
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}


def stage_error(repo: Path, stage: str, env: dict[str, str], **values: str) -> str:
    """The one line a stage prints when it refuses `values`, run as DVC runs it."""
    from tests.conftest import set_params

    original = (repo / "params.yaml").read_text()
    try:
        set_params(repo, **values)
        output = run([sys.executable, "-m", f"stages.{stage}"], repo, env, status=2)
    finally:
        (repo / "params.yaml").write_text(original)
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_the_reference_job_runs_from_the_hub_and_then_offline_from_the_cache(hub_repos, tmp_path):
    model, dataset = hub_repos[("model", MODEL_ID)], hub_repos[("dataset", DATASET_ID)]
    repo = make_repo(
        tmp_path / "repo", tmp_path / "dvc-cache",  # a cache of its own: nothing restored from another test's run
        model__name=MODEL_ID, data__source=DATASET_ID, fraction=1.0, data__test_fraction=1.0,
        train__mode="full", train__epochs=2, train__lr=1e-3, train__precision="fp32", export__check_images=18,
    )
    hf_home = tmp_path / "hf-home"
    with hub_server(hub_repos) as hub:
        env = hub_env(hf_home, hub.url)
        assert ran_stages(dvc(repo, "exp", "run", env=env)) == STAGES
        assert f"GET /api/datasets/{DATASET_ID}" in hub.requests and f"GET /{MODEL_ID}/resolve/{model.sha}/model.safetensors" in hub.requests
        # the commits downloaded are what the stages' outputs record
        assert read_json(repo / "data/raw/source.json") == {"data.source": DATASET_ID, "revision": dataset.sha}
        assert read_json(repo / "metrics/finetune.json")["base_model_revision"] == model.sha
        online = read_json(repo / "metrics/eval.json")
        assert online["test_images"] == 18 and read_json(repo / "data/raw/classes.json") == dataset_classes(dataset)

        # an id the Hub does not know: the first stage that loads it says so in one line, before any work
        unknown_model = stage_error(repo, "finetune", env, model__name="google/no-such-model")
        assert "model.name='google/no-such-model': no such model on the Hugging Face Hub" in unknown_model
        unknown_dataset = stage_error(repo, "download", env, data__source="uoft-cs/no-such-dataset")
        assert "data.source='uoft-cs/no-such-dataset': no such dataset on the Hugging Face Hub" in unknown_dataset

    # the server is gone: an id not in the cache cannot be reached, in one line that says how to go offline
    gone = stage_error(repo, "download", hub_env(hf_home, hub.url), data__source="uoft-cs/cifar100")
    assert "cannot reach the Hugging Face Hub" in gone and "HF_HUB_OFFLINE=1" in gone

    # offline, every stage re-runs from the Hugging Face cache and gives the same results and commits
    offline = hub_env(hf_home, hub.url) | {"HF_HUB_OFFLINE": "1"}
    assert ran_stages(dvc(repo, "exp", "run", "--force", env=offline)) == STAGES
    assert read_json(repo / "data/raw/source.json") == {"data.source": DATASET_ID, "revision": dataset.sha}
    assert read_json(repo / "metrics/finetune.json")["base_model_revision"] == model.sha
    assert read_json(repo / "metrics/eval.json") == online
