"""Telling a local path from a Hugging Face Hub id, and failing fast when the Hub is out of reach."""
from __future__ import annotations

import os
import re
from pathlib import Path

from stages.errors import PipelineError

HUB_TIMEOUT_S = 10  # a reachable Hub answers in well under a second
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`, and not something that exists on disk or is spelled like a path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not name.startswith((".", "~"))


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
        raise PipelineError(f"{key}={repo_id!r}: no such {repo_type} on the Hugging Face Hub (or it is private); check the id, or {offline_hint}") from None
    except HfHubHTTPError as err:
        raise PipelineError(f"{key}={repo_id!r}: the Hugging Face Hub refused it ({str(err).splitlines()[0]}); {offline_hint}") from None
    except Exception as err:  # DNS, refused connection, timeout, proxy: all mean "unreachable"
        raise PipelineError(
            f"{key}={repo_id!r}: cannot reach the Hugging Face Hub ({type(err).__name__}: {err}); "
            f"to work offline, {offline_hint}, or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"
        ) from None
