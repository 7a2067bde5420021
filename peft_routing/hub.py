"""Expert folders to and from the Hugging Face Hub, through huggingface_hub's own download and upload code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from huggingface_hub import HfApi, snapshot_download


def resolve_expert_folder(
    path_or_repo_id: str | os.PathLike,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    token: Optional[str] = None,
) -> Path:
    """A local folder for a local path or a Hub repo id (downloaded into, or found in, the HF cache).

    Uses ``snapshot_download`` restricted to the subfolder rather than PEFT's loader, which in peft 0.21.2 looks for
    ``sub/sub/adapter_model.safetensors`` when offline (peft-notes.md).
    """
    local = Path(path_or_repo_id)
    if local.is_dir():
        return local / subfolder if subfolder else local
    repo_id = str(path_or_repo_id)
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
    except Exception as error:  # huggingface_hub raises several types (offline, not found, gated, bad id)
        raise FileNotFoundError(
            f"Could not find expert {repo_id!r}: it is not a local folder, and getting it from the Hub failed "
            f"({type(error).__name__}: {error}). Check the path or repo id, the revision and your network/token."
        ) from error
    return Path(snapshot) / subfolder if subfolder else Path(snapshot)


def push_folder_to_hub(
    write_folder: Callable[[Path], None],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    path_in_repo: Optional[str] = None,
    commit_message: str = "Upload routed LoRA expert",
):
    """Create the repo if needed and upload, in one commit, the folder that ``write_folder(path)`` writes."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging) / "expert"
        write_folder(folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo,
            revision=revision,
            commit_message=commit_message,
        )
