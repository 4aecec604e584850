"""Telling a local path from a Hugging Face Hub id, and failing fast when the Hub is out of reach."""
from __future__ import annotations

import os
import re
from pathlib import Path

from stages.errors import PipelineError

HUB_TIMEOUT_S = 10  # a reachable Hub answers in well under a second
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".zip")  # what data.source may name besides a folder; never a Hub repo


def project_root() -> Path:
    """DVC sets DVC_ROOT for every stage, to the real project even in a queued or --temp experiment's copy."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def local_path(name: str) -> Path:
    """Where a parameter naming a file or folder points: relative to the project root, so that
    `dvc exp run --temp -S data.source=../x` reads the same `../x` as `dvc repro` does."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else project_root() / path


def looks_like_path(name: str) -> bool:
    """Spelled as a path (`./x`, `~/x`, `/x`, `a/b/c`, `x.tgz`), or under a folder that exists here (`mydata/x`)."""
    first = Path(name).parts[0] if Path(name).parts else ""
    return (
        name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name
        or name.lower().endswith(ARCHIVE_SUFFIXES) or ("/" in name and local_path(first).is_dir())
    )


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`, and neither something on disk nor spelled like a path."""
    return bool(_HUB_ID.match(name)) and not local_path(name).exists() and not looks_like_path(name)


def not_an_archive(name: str) -> PipelineError:
    return PipelineError(f"data.source={name!r} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} archive; give a folder or an archive")


def missing_path(key: str, name: str, what: str) -> PipelineError:
    return PipelineError(f"{key}={name!r}: no such {what} ({local_path(name)}); give an existing path (relative to the project root {project_root()}) or a Hub id")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def check_on_hub(repo_id: str, repo_type: str, key: str, offline_hint: str) -> str | None:
    """Ask the Hub about `repo_id` once, with a short timeout, before any download starts; its
    current revision (commit hash), which the caller then downloads, so that is what it records.

    With HF_HUB_OFFLINE=1 nothing is asked (None): the copy in the local Hugging Face cache is used.
    """
    if offline():
        return None
    from huggingface_hub import HfApi  # 0.35 s to import: only when the Hub is asked
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_S).sha
    except RepositoryNotFoundError:
        raise PipelineError(
            f"{key}={repo_id!r}: no such {repo_type} on the Hugging Face Hub (or it is private), nor a local path ({local_path(repo_id)}); "
            f"check the id or the path, or {offline_hint}"
        ) from None
    except HfHubHTTPError as err:
        raise PipelineError(f"{key}={repo_id!r}: the Hugging Face Hub refused it ({str(err).splitlines()[0]}); {offline_hint}") from None
    except Exception as err:  # DNS, refused connection, timeout, proxy: all mean "unreachable"
        raise PipelineError(
            f"{key}={repo_id!r}: cannot reach the Hugging Face Hub ({type(err).__name__}: {err}), and it is no local path either "
            f"({local_path(repo_id)} does not exist); "
            f"to work offline, {offline_hint}, or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"
        ) from None
