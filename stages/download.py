"""Stage 1: bring the whole dataset from `data.source` into data/raw/ in one local format.

Three kinds of source, never substituted for one another:
- a Hub dataset id (`uoft-cs/cifar10`), loaded with `datasets`;
- a local folder laid out `<split>/<class>/<image>`;
- a `.tgz`/`.tar.gz`/`.zip` archive of such a folder, read without unpacking it to disk.
A first pass lists the images (their classes, so the labels are known); the second streams them, a
chunk at a time, through a decoding check on every core (a corrupt file is named before any training
starts) into parquet row groups: memory does not grow with the number of images. The files are written
beside data/raw/ and replace it only when all is done, so a refused input loses nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from stages.dataformat import RAW_DIR, SPLITS, raw_path
from stages.decoding import CHUNK_IMAGES, check_decodes, chunked, ordered_map, worker_pool
from stages.errors import PipelineError, run_stage
from stages.hub import ARCHIVE_SUFFIXES, check_on_hub, local_path, looks_like_hub_id, missing_path, not_an_archive
from stages.params import load_params

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
OFFLINE_HINT = "point data.source at a local folder or archive laid out <split>/<class>/<image> (dvc exp run -S data.source=path/to/cifar10-jpg.tgz)"
ROW_GROUP_IMAGES, ROW_GROUP_BYTES = 1_000, 64 << 20  # a parquet row group ends at whichever comes first

# (split, class name, where it came from, encoded bytes)
Record = tuple[str, str, str, bytes]


@dataclass
class Dataset:
    classes: list[str]
    counts: dict[str, int]  # split -> images
    records: Callable[[], Iterator[Record]]  # every image, each split in a fixed order; read as it is streamed
    revision: str | None = None  # the Hub commit downloaded (or, offline, the cached copy read); None for a local source


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


def sorted_files(folder: Path) -> Iterator[Path]:
    """Every file under `folder`, in sorted-path order, holding one folder's listing at a time."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            yield from sorted_files(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def images_in_folder(root: Path) -> Iterator[tuple[str, str, Path]]:
    for path in sorted_files(root):
        name = str(path.relative_to(root))
        found = _split_and_class(name)
        if found:
            yield (*found, path)


def records_from_folder(root: Path) -> Iterator[Record]:
    for split, label, file in images_in_folder(root):
        yield (split, label, str(file.relative_to(root)), file.read_bytes())


def images_in_tar(archive: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """Streamed in archive order: no extraction to disk."""
    for member in archive:
        archive.members = []  # tarfile keeps every member read: memory would grow with the archive
        found = _split_and_class(member.name)
        if found and member.isfile():
            yield (*found, member)


def archive_error(path: Path, err: Exception) -> PipelineError:
    return PipelineError(f"data.source={str(path)!r} is not a readable archive ({err}); re-create it as .tgz or .zip")


def list_archive(path: Path) -> Iterator[tuple[str, str]]:
    """(split, class) of every image in the archive, read through once."""
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                yield from filter(None, map(_split_and_class, archive.namelist()))
        else:
            with tarfile.open(path, "r:gz") as archive:
                yield from ((split, label) for split, label, _ in images_in_tar(archive))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise archive_error(path, err) from None


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
                for split, label, member in images_in_tar(archive):
                    yield (split, label, member.name, archive.extractfile(member).read())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise archive_error(path, err) from None


def load_hub(repo_id: str) -> Dataset:
    import datasets

    revision = check_on_hub(repo_id, "dataset", "data.source", OFFLINE_HINT)
    dsets = datasets.load_dataset(repo_id, revision=revision)
    if revision is None:  # offline: datasets read its newest cached copy, kept in a folder named for its commit
        folder = Path(dsets["train"].cache_files[0]["filename"]).parent.name
        revision = folder if re.fullmatch(r"[0-9a-f]{40}", folder) else None
    loaded = records_from_datasets(dsets, repo_id)
    loaded.revision = revision
    return loaded


def records_from_datasets(dsets, name: str) -> Dataset:
    """A DatasetDict with 'train' and 'test' splits, one Image column and one ClassLabel column
    (`img`/`label` in uoft-cs/cifar10); class names come from the ClassLabel. Read in batches from
    the memory-mapped Arrow files that `datasets` keeps."""
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

    def records() -> Iterator[Record]:
        for split in SPLITS:
            table = dsets[split].cast_column(image_col, datasets.Image(decode=False))
            for start, batch in enumerate(table.iter(batch_size=CHUNK_IMAGES)):
                for i, (image, label) in enumerate(zip(batch[image_col], batch[label_col])):
                    yield (split, classes[label], image["path"] or f"{name}/{split}/{start * CHUNK_IMAGES + i}", image["bytes"])

    return Dataset(classes, {split: len(dsets[split]) for split in SPLITS}, records)


def load_local(path: Path) -> Dataset:
    """Listed first (names only), so the classes are known and checked before any image is read."""
    if path.is_dir():
        listed, records = ((split, label) for split, label, _ in images_in_folder(path)), partial(records_from_folder, path)
    else:
        listed, records = list_archive(path), partial(records_from_archive, path)

    per_split = {split: Counter() for split in SPLITS}
    for split, label in tqdm(listed, desc=f"listing {path.name}", unit="img", mininterval=1):
        per_split[split][label] += 1
    for split in SPLITS:
        if not per_split[split]:
            raise PipelineError(f"data.source={str(path)!r} holds no images under {split}/<class>/; lay it out as <split>/<class>/<image> with splits {', '.join(SPLITS)}")
    classes = sorted(per_split["train"])  # alphabetical, as imagefolder loaders do
    check_classes(classes, str(path))
    extra = sorted(set(per_split["test"]) - set(classes))
    if extra:
        raise PipelineError(f"data.source={str(path)!r}: test class {extra[0]!r} has no train images; every test class needs a train folder")
    return Dataset(classes, {split: per_split[split].total() for split in SPLITS}, records)


def resolve_source(source: str) -> Dataset:
    path = local_path(source)
    if path.is_dir() or (path.is_file() and source.endswith(ARCHIVE_SUFFIXES)):
        return load_local(path)
    if path.is_file():
        raise not_an_archive(source)
    if looks_like_hub_id(source):
        return load_hub(source)
    raise missing_path("data.source", source, "file or folder")


class RawWriter:
    """One split's parquet file, written a row group at a time (Hugging Face's schema: Image, ClassLabel)."""

    def __init__(self, path: Path, classes: list[str]):
        import datasets
        import pyarrow.parquet as pq

        self.schema = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}).arrow_schema
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.label_of = {name: i for i, name in enumerate(classes)}
        self.rows: list[Record] = []
        self.bytes = 0

    def add(self, record: Record) -> None:
        self.rows.append(record)
        self.bytes += len(record[3])
        if len(self.rows) >= ROW_GROUP_IMAGES or self.bytes >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            columns = {"image": [{"bytes": r[3], "path": r[2]} for r in self.rows], "label": [self.label_of[r[1]] for r in self.rows]}
            self.writer.write_table(pa.Table.from_pydict(columns, schema=self.schema))
        self.rows, self.bytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def write_raw(dataset: Dataset, source: str, out: Path = RAW_DIR) -> None:
    """Decode-check every image (on every core) and write one parquet file per split (a few files hash
    fast in DVC), the class names, and where the data came from (with the Hub revision, pinned by
    dvc.lock). Written beside `out`, which they replace only once every image has passed."""
    partial = out.with_name(f"{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        writers = {split: RawWriter(raw_path(split, partial), dataset.classes) for split in SPLITS}
        images = sum(dataset.counts.values())
        with worker_pool(images) as pool, tqdm(total=images, desc="checking images", unit="img", mininterval=1) as progress:
            for chunk, _ in ordered_map(check_decodes, chunked(dataset.records()), pool):
                for record in chunk:
                    writers[record[0]].add(record)
                progress.update(len(chunk))
        for writer in writers.values():
            writer.close()
    except BaseException:
        shutil.rmtree(partial)
        raise
    (partial / "classes.json").write_text(json.dumps(dataset.classes, indent=2) + "\n")
    (partial / "source.json").write_text(json.dumps({"data.source": source, "revision": dataset.revision}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def main() -> None:
    params = load_params()
    dataset = resolve_source(params.data.source)
    write_raw(dataset, params.data.source)
    counts = dataset.counts
    print(f"download: {len(dataset.classes)} classes, " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" images -> {RAW_DIR}/")


if __name__ == "__main__":
    run_stage(main, "download")
