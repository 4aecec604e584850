import itertools
import json
import time

import datasets
import pytest

from stages.dataformat import decode_rgb, read_classes, read_raw
from stages.download import records_from_datasets, resolve_source, write_raw
from stages.errors import PipelineError
from tests.conftest import SMALL_CLASSES, jpeg_bytes


def by_split(dataset) -> dict[str, list]:
    """The records the dataset streams, per split."""
    records = {split: [] for split in dataset.counts}
    for record in dataset.records():
        records[record[0]].append(record)
    return records


def summary(dataset):
    """Class names, and per split the sorted (class, file name, bytes) triples."""
    return dataset.classes, {split: sorted((r[1], r[2].rsplit("/", 1)[-1], r[3]) for r in rows) for split, rows in by_split(dataset).items()}


def test_folder_gives_classes_from_the_data(small_tree):
    dataset = resolve_source(str(small_tree))
    assert dataset.classes == sorted(SMALL_CLASSES)  # a 3-class folder gives 3 classes
    assert dataset.counts == {s: len(r) for s, r in by_split(dataset).items()} == {"train": 60, "test": 18}
    assert decode_rgb(by_split(dataset)["train"][0][3], "x").size == (32, 32)
    assert dataset.revision is None


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_archives_read_the_same_as_the_folder(small_tree, small_archives, kind):
    assert summary(resolve_source(str(small_archives[kind]))) == summary(resolve_source(str(small_tree)))


def test_hub_schema_dataset_is_converted(small_tree, tmp_path):
    """A local dataset laid out as uoft-cs/cifar10 on the Hub: parquet shards, `img` and `label` columns."""
    local = resolve_source(str(small_tree))
    classes, records = local.classes, by_split(local)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    for split, rows in records.items():
        table = datasets.Dataset.from_dict(
            {"img": [{"bytes": r[3], "path": None} for r in rows], "label": [classes.index(r[1]) for r in rows]}, features=features
        )
        table.to_parquet(str(tmp_path / "plain_text" / f"{split}-00000-of-00001.parquet"))
    hub = records_from_datasets(datasets.load_dataset(str(tmp_path)), "local/cifar-like")
    assert hub.classes == classes
    assert hub.counts == local.counts
    assert sorted((r[1], r[3]) for r in by_split(hub)["test"]) == sorted((r[1], r[3]) for r in records["test"])


def test_raw_format_round_trip(small_tree, tmp_path):
    dataset = resolve_source(str(small_tree))
    write_raw(dataset, str(small_tree), tmp_path)
    assert read_classes(tmp_path) == dataset.classes
    train = read_raw("train", tmp_path)
    assert len(train) == 60 and set(train["label"]) == {0, 1, 2}
    assert list(train["image"]) == [r[3] for r in by_split(dataset)["train"]]  # in the folder's sorted order
    assert json.loads((tmp_path / "source.json").read_text()) == {"data.source": str(small_tree), "revision": None}


def test_corrupt_image_is_named_before_anything_is_written(small_tree, tmp_path):
    dataset = resolve_source(str(small_tree))
    records = dataset.records
    dataset.records = lambda: itertools.chain(records(), [("train", "cat", "train/cat/broken.jpg", jpeg_bytes((1, 2, 3))[:100])])
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    with pytest.raises(PipelineError, match="train/cat/broken.jpg cannot be decoded"):
        write_raw(dataset, str(small_tree), out)
    assert (out / "keep.txt").exists() and not (tmp_path / "raw.partial").exists()  # nothing was lost, nothing left over


def test_every_core_decodes_to_the_same_files_and_names_a_corrupt_image(small_tree, tmp_path, monkeypatch):
    """The worker processes' path (below PARALLEL_MIN_IMAGES images the stage decodes in its own process)."""
    from stages import decoding

    dataset = resolve_source(str(small_tree))
    write_raw(dataset, str(small_tree), tmp_path / "one")
    monkeypatch.setattr(decoding, "PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(decoding, "cores", lambda: 2)
    write_raw(dataset, str(small_tree), tmp_path / "two")
    for name in ("train.parquet", "test.parquet", "classes.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

    records = dataset.records
    dataset.records = lambda: itertools.chain(records(), [("test", "cat", "test/cat/broken.jpg", b"not a jpeg")])
    with pytest.raises(PipelineError, match="^image test/cat/broken.jpg cannot be decoded"):
        write_raw(dataset, str(small_tree), tmp_path / "two")
    assert (tmp_path / "two" / "train.parquet").exists()


def test_bad_local_sources_are_explained(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        resolve_source(str(tmp_path / "missing.tgz"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PipelineError, match="not a .tgz/.tar.gz/.zip archive"):
        resolve_source(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.tgz").write_bytes(b"not gzip")
    with pytest.raises(PipelineError, match="not a readable archive"):
        resolve_source(str(tmp_path / "broken.tgz"))
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    (tmp_path / "flat" / "cat" / "a.jpg").write_bytes(jpeg_bytes((0, 0, 0)))
    with pytest.raises(PipelineError, match="no images under train/<class>/"):
        resolve_source(str(tmp_path / "flat"))


def test_unreachable_hub_fails_fast_and_says_how_to_run_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(PipelineError) as err:
        resolve_source("uoft-cs/cifar10")
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "data.source='uoft-cs/cifar10'" in message
    assert "cannot reach the Hugging Face Hub" in message and "data.source=path/to/cifar10-jpg.tgz" in message


def test_a_dataset_of_one_class_stops_before_anything_is_written(tmp_path, monkeypatch):
    for split in ("train", "test"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        (tmp_path / "one" / split / "cat" / "a.jpg").write_bytes(jpeg_bytes((9, 9, 9)))
    with pytest.raises(PipelineError, match=r"^data.source='.*one' has only class 'cat'; classification needs at least two") as failed:
        resolve_source(str(tmp_path / "one"))
    assert "\n" not in str(failed.value)
    # the whole stage: nothing under data/raw
    import yaml

    from stages import download
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = str(tmp_path / "one")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path / "project")
    with pytest.raises(PipelineError, match="has only class 'cat'"):
        download.main()
    assert not (tmp_path / "project" / "data").exists()


def test_a_hub_style_dataset_of_one_class_is_refused(small_tree):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat"])})
    split = datasets.Dataset.from_dict({"img": [{"bytes": jpeg_bytes((1, 1, 1)), "path": None}], "label": [0]}, features=features)
    with pytest.raises(PipelineError, match="data.source='some/one-class' has only class 'cat'"):
        records_from_datasets(datasets.DatasetDict({"train": split, "test": split}), "some/one-class")
