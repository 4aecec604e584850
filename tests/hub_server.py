"""A Hugging Face Hub look-alike on 127.0.0.1, for the tests of the online path (HF_ENDPOINT).

It answers the calls huggingface_hub, datasets and transformers make to load a model and a dataset:
- GET /api/{models|datasets}/{id}[/revision/{rev}]: the repo's id, commit (`sha`) and files (`siblings`);
- GET /api/{models|datasets}/{id}/tree/{rev}[/{dir}]: the files and folders under a folder;
- POST /api/{models|datasets}/{id}/paths-info/{rev}: what each asked path is;
- HEAD/GET /{[datasets/]id}/resolve/{rev}/{file}: a file, with the headers hf_hub_download needs
  (X-Repo-Commit and ETag, else it reports "couldn't connect"), and byte ranges (HfFileSystem reads).
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound): huggingface_hub
turns those into its typed errors, which the project turns into its one-line messages.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

KINDS = {"models": "model", "datasets": "dataset"}


@dataclass
class HubRepo:
    files: dict[str, bytes]
    sha: str = ""  # the commit: a digest of the files, so other contents give another commit

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        self.sha = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path) -> HubRepo:
        return cls({p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()})

    def folders(self) -> set[str]:
        return {"/".join(name.split("/")[:i]) for name in self.files for i in range(1, name.count("/") + 1)}


@dataclass
class Hub:
    repos: dict[tuple[str, str], HubRepo]  # (model|dataset, id)
    requests: list[str] = field(default_factory=list)  # "METHOD path", in the order they came
    url: str = ""


class _Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args) -> None:  # the test's output stays the pipeline's
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_POST(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append(f"{self.command} {path}")
        api = re.fullmatch(r"/api/(models|datasets)/(.+?)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?", path)
        resolve = re.fullmatch(r"/(datasets/)?(.+?)/resolve/([^/]+)/(.+)", path)
        if api:
            kind, repo_id, call, revision, rest = api.groups()
            repo = self._repo(KINDS[kind], repo_id, revision or "main")
            if repo is None:
                return
            if call == "tree":
                self._tree(repo, rest or "", "recursive" in parse_qs(url.query))
            elif call == "paths-info":
                self._paths_info(repo)
            else:
                siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())]
                self._json({"id": repo_id, "sha": repo.sha, "siblings": siblings, "private": False, "disabled": False, "gated": False})
        elif resolve:
            dataset, repo_id, revision, name = resolve.groups()
            repo = self._repo("dataset" if dataset else "model", repo_id, revision)
            if repo is not None:
                self._file(repo, name, body)
        else:
            self._error(404, "RepoNotFound", "no such route")

    def _repo(self, kind: str, repo_id: str, revision: str) -> HubRepo | None:
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        elif revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            repo = None
        return repo

    def _tree(self, repo: HubRepo, folder: str, recursive: bool) -> None:
        folder = folder.strip("/")
        if folder and folder not in repo.folders():
            return self._error(404, "EntryNotFound", f"{folder} does not exist")
        prefix = f"{folder}/" if folder else ""

        def listed(name: str) -> bool:
            return name.startswith(prefix) and (recursive or "/" not in name[len(prefix):])

        entries = [self._entry(repo, name) for name in sorted(repo.folders() | set(repo.files)) if listed(name)]
        self._json(entries)

    def _paths_info(self, repo: HubRepo) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = self.rfile.read(length).decode()
        asked = json.loads(form).get("paths", []) if form.startswith("{") else parse_qs(form).get("paths", [])
        known = repo.folders() | set(repo.files)
        self._json([self._entry(repo, name) for name in asked if name in known])

    @staticmethod
    def _entry(repo: HubRepo, name: str) -> dict:
        if name in repo.files:
            data = repo.files[name]
            return {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        return {"type": "directory", "path": name, "oid": hashlib.sha1(name.encode()).hexdigest()}

    def _file(self, repo: HubRepo, name: str, body: bool) -> None:
        data = repo.files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist")
        status, headers = 200, {}
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged[1] or 0)
            end = min(int(ranged[2]) if ranged[2] else len(data) - 1, len(data) - 1)
            status, headers = 206, {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            data = data[start : end + 1]
        headers |= {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(repo.files[name]).hexdigest()}"', "Accept-Ranges": "bytes"}
        self._send(status, data, "application/octet-stream", headers, body)

    def _json(self, value: object) -> None:
        self._send(200, json.dumps(value).encode(), "application/json", {}, self.command != "HEAD")

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, "application/json", {"X-Error-Code": code, "X-Error-Message": message}, self.command != "HEAD")

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@contextmanager
def hub_server(repos: dict[tuple[str, str], HubRepo]) -> Iterator[Hub]:
    """Serve `repos` on a free port of 127.0.0.1 from a thread of this process, until the block ends."""
    hub = Hub(repos)
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dataset_card(classes: list[str], splits: dict[str, tuple[int, int]]) -> str:
    """uoft-cs/cifar10's README.md front matter: the parquet config, the ClassLabel names, and each
    split's (images, bytes)."""
    names = "".join(f"          '{i}': {name}\n" for i, name in enumerate(classes))
    split_entries = "".join(f"  - name: {split}\n    num_bytes: {size}\n    num_examples: {n}\n" for split, (n, size) in splits.items())
    files = "".join(f"  - split: {split}\n    path: plain_text/{split}-*\n" for split in splits)
    return (
        "---\ndataset_info:\n  config_name: plain_text\n  features:\n  - name: img\n    dtype: image\n  - name: label\n"
        f"    dtype:\n      class_label:\n        names:\n{names}  splits:\n{split_entries}"
        f"configs:\n- config_name: plain_text\n  data_files:\n{files}  default: true\n---\n# A few CIFAR-10 images, laid out as uoft-cs/cifar10\n"
    )


def parquet_dataset(images: dict[str, list[tuple[str, bytes]]], classes: list[str], folder: Path) -> HubRepo:
    """A Hub dataset repo in uoft-cs/cifar10's layout from (class, JPEG bytes) per split:
    plain_text/<split>-00000-of-00001.parquet with columns img {bytes, path} and label."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    splits = {}
    for split, rows in images.items():
        table = datasets.Dataset.from_dict(
            {"img": [{"bytes": data, "path": None} for _, data in rows], "label": [classes.index(label) for label, _ in rows]}, features=features
        )
        shard = folder / "plain_text" / f"{split}-00000-of-00001.parquet"
        table.to_parquet(str(shard))
        splits[split] = (len(rows), shard.stat().st_size)
    (folder / "README.md").write_text(dataset_card(classes, splits))
    return HubRepo.from_folder(folder)
