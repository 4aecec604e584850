"""Stage 1: bring the whole dataset from `data.source` into data/raw/ in one local format.

Three kinds of source, never substituted for one another:
- a Hub dataset id (`uoft-cs/cifar10`), loaded with `datasets`;
- a local folder laid out `<split>/<class>/<image>`;
- a `.tgz`/`.tar.gz`/`.zip` archive of such a folder, read without unpacking it to disk.
Every image is decoded once here, so a corrupt file is named before any training starts.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from stages.dataformat import RAW_DIR, SPLITS, decode_rgb, raw_path
from stages.errors import PipelineError
from stages.hub import ARCHIVE_SUFFIXES, check_on_hub, local_path, looks_like_hub_id, missing_path, not_an_archive
from stages.params import load_params
from stages import tracking

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
OFFLINE_HINT = "point data.source at a local folder or archive laid out <split>/<class>/<image> (dvc exp run -S data.source=path/to/cifar10-jpg.tgz)"

# (split, class name, where it came from, encoded bytes)
Record = tuple[str, str, str, bytes]


@dataclass
class Dataset:
    classes: list[str]
    records: dict[str, list[Record]]  # split -> its images
    revision: str | None = None  # the Hub commit downloaded; None for a local source or offline


def check_classes(classes: list[str], source: str) -> None:
    """A classifier needs two classes at least: say so before any image is decoded or written."""
    if len(classes) < 2:
        found = f"only class {classes[0]!r}" if classes else "no class"
        raise PipelineError(f"data.source={source!r} has {found}; classification needs at least two: give it one folder (or label) per class, two or more")


def _split_and_class(member: str) -> tuple[str, str] | None:
    """`[prefix/]<split>/<class>/<file>` with an image suffix -> (split, class); anything else is skipped."""
    parts = Path(member).parts
    if len(parts) < 3 or Path(member).suffix.lower() not in IMAGE_SUFFIXES or parts[-3] not in SPLITS:
        return None
    if any(p.startswith((".", "__MACOSX")) for p in parts):
        return None
    return parts[-3], parts[-2]


def records_from_folder(root: Path) -> Iterator[Record]:
    for path in sorted(root.rglob("*")):
        found = _split_and_class(str(path.relative_to(root)))
        if found and path.is_file():
            yield (*found, str(path.relative_to(root)), path.read_bytes())


def records_from_archive(path: Path) -> Iterator[Record]:
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                for name in sorted(archive.namelist()):
                    found = _split_and_class(name)
                    if found:
                        yield (*found, name, archive.read(name))
        else:
            with tarfile.open(path, "r:gz") as archive:
                for member in archive:  # streamed in archive order: no extraction to disk
                    found = _split_and_class(member.name)
                    if found and member.isfile():
                        yield (*found, member.name, archive.extractfile(member).read())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise PipelineError(f"data.source={str(path)!r} is not a readable archive ({err}); re-create it as .tgz or .zip") from None


def load_hub(repo_id: str) -> Dataset:
    import datasets

    revision = check_on_hub(repo_id, "dataset", "data.source", OFFLINE_HINT)
    loaded = records_from_datasets(datasets.load_dataset(repo_id, revision=revision), repo_id)
    loaded.revision = revision
    return loaded


def records_from_datasets(dsets, name: str) -> Dataset:
    """A DatasetDict with 'train' and 'test' splits, one Image column and one ClassLabel column
    (`img`/`label` in uoft-cs/cifar10); class names come from the ClassLabel."""
    import datasets

    missing = [s for s in SPLITS if s not in dsets]
    if missing:
        raise PipelineError(f"data.source={name!r} has no {missing[0]!r} split (it has {sorted(dsets)}); use a dataset with train and test splits")
    features = dsets["train"].features
    image_cols = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    label_cols = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not image_cols or not label_cols:
        raise PipelineError(f"data.source={name!r} needs an Image column and a ClassLabel column; it has {dict(features)}")
    image_col, label_col = image_cols[0], label_cols[0]
    classes = features[label_col].names
    check_classes(classes, name)
    records = {}
    for split in SPLITS:
        table = dsets[split].cast_column(image_col, datasets.Image(decode=False))
        records[split] = [
            (split, classes[row[label_col]], row[image_col]["path"] or f"{name}/{split}/{i}", row[image_col]["bytes"])
            for i, row in enumerate(tqdm(table, desc=f"reading {split}", unit="img"))
        ]
    return Dataset(classes, records)


def load_local(path: Path) -> Dataset:
    records: dict[str, list[Record]] = {s: [] for s in SPLITS}
    source = records_from_folder(path) if path.is_dir() else records_from_archive(path)
    for record in tqdm(source, desc=f"reading {path.name}", unit="img"):
        records[record[0]].append(record)
    for split in SPLITS:
        if not records[split]:
            raise PipelineError(f"data.source={str(path)!r} holds no images under {split}/<class>/; lay it out as <split>/<class>/<image> with splits {', '.join(SPLITS)}")
    classes = sorted({r[1] for r in records["train"]})  # alphabetical, as imagefolder loaders do
    check_classes(classes, str(path))
    extra = sorted({r[1] for r in records["test"]} - set(classes))
    if extra:
        raise PipelineError(f"data.source={str(path)!r}: test class {extra[0]!r} has no train images; every test class needs a train folder")
    return Dataset(classes, records)


def resolve_source(source: str) -> Dataset:
    path = local_path(source)
    if path.is_dir() or (path.is_file() and source.endswith(ARCHIVE_SUFFIXES)):
        return load_local(path)
    if path.is_file():
        raise not_an_archive(source)
    if looks_like_hub_id(source):
        return load_hub(source)
    raise missing_path("data.source", source, "file or folder")


def write_raw(dataset: Dataset, source: str, out: Path = RAW_DIR) -> None:
    """Decode-check every image, then write one parquet file per split (a few files hash fast in DVC),
    the class names, and where the data came from (with the Hub revision, pinned by dvc.lock)."""
    import datasets

    classes, records = dataset.classes, dataset.records

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    label_of = {name: i for i, name in enumerate(classes)}
    tables = {}
    for split, rows in records.items():
        for _, _, name, data in tqdm(rows, desc=f"checking {split} images", unit="img"):
            decode_rgb(data, name)
        tables[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": r[3], "path": r[2]} for r in rows], "label": [label_of[r[1]] for r in rows]}, features=features
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for split, table in tables.items():
        table.to_parquet(str(raw_path(split, out)))
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    (out / "source.json").write_text(json.dumps({"data.source": source, "revision": dataset.revision}, indent=2) + "\n")


def main() -> None:
    params = load_params()
    dataset = resolve_source(params.data.source)
    write_raw(dataset, params.data.source)
    counts = {split: len(rows) for split, rows in dataset.records.items()}
    print(f"download: {len(dataset.classes)} classes, " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" images -> {RAW_DIR}/")
    tracking.log_metrics({f"data.{split}_images_total": n for split, n in counts.items()} | {"data.classes": len(dataset.classes)})


if __name__ == "__main__":
    tracking.run_tracked_stage("download", main)
