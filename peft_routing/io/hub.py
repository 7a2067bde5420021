"""Expert folders to and from the Hugging Face Hub, through huggingface_hub's own download and upload code."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from .safe_files import UnsafeFileError, checked_relative, confined_file


def resolve_expert_folder(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
) -> Path:
    """A local folder for a local path or a Hub repo id (downloaded into, or found in, the HF cache).

    Uses ``snapshot_download`` restricted to the subfolder rather than PEFT's loader, which in peft 0.21 looks for
    ``sub/sub/adapter_model.safetensors`` when offline.

    Args:
        path_or_repo_id: a local expert folder, or a Hub model repo id.
        revision: the Hub revision (branch, tag or commit); ignored for a local folder.
        subfolder: the expert's folder inside the repo or local folder.
        token: a Hub token for private or gated repos.
    """
    subfolder = checked_relative(subfolder, "subfolder")
    local = Path(path_or_repo_id)
    if local.is_dir():
        return _inside(local, subfolder)
    repo_id = str(path_or_repo_id)
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
    except Exception as error:  # huggingface_hub raises several types (offline, not found, gated, bad id)
        raise FileNotFoundError(
            f"Could not find expert {repo_id!r}: it is not a local folder, and getting it from the Hub failed "
            f"({type(error).__name__}: {error}). Check the path or repo id, the revision and your network/token."
        ) from error
    return _inside(Path(snapshot), subfolder)


def _inside(folder: Path, subfolder: str | None) -> Path:
    """``folder/subfolder``, refused when a symlink on the way leads outside ``folder``."""
    if not subfolder:
        return folder
    path = folder / subfolder
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UnsafeFileError(f"subfolder {subfolder!r} of {folder} leads outside it (through a symlink).")
    return path


def fetch_file(path_or_repo_id: str | os.PathLike, filename: str, subfolder: str | None = None,
               **hub_kwargs) -> Path:
    """One file of a local folder or a Hub repo (downloaded into, or found in, the HF cache).

    Args:
        path_or_repo_id: a local folder, or a Hub model repo id.
        filename: the file's name inside it (no folders: a name from a config cannot point elsewhere).
        subfolder: the folder inside the repo or local folder.
        **hub_kwargs: ``revision``, ``token``, ``cache_dir`` ... for ``hf_hub_download``.
    """
    if Path(filename).name != filename:
        raise ValueError(f"{filename!r} is not a plain file name.")
    subfolder = checked_relative(subfolder, "subfolder")
    local = Path(path_or_repo_id)
    if local.is_dir():
        return confined_file(_inside(local, subfolder), filename)
    try:
        path = Path(hf_hub_download(str(path_or_repo_id), filename, subfolder=subfolder or None, **hub_kwargs))
    except Exception as error:  # huggingface_hub raises several types (offline, not found, gated, bad id)
        raise FileNotFoundError(f"Could not get {filename} of {path_or_repo_id!r} ({type(error).__name__}: "
                                f"{error}).") from error
    return confined_file(path.parent, path.name)


def push_folder_to_hub(
    write_folder: Callable[[Path], None],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    path_in_repo: str | None = None,
    commit_message: str = "Upload routed LoRA expert",
):
    """Create the repo if needed and upload, in one commit, the folder that ``write_folder(path)`` writes.

    Args:
        write_folder: writes the folder to upload at the path it is given (a temporary folder).
        repo_id: the Hub model repo, created if it does not exist.
        private: visibility of a newly created repo (None: the Hub's default).
        token: a Hub token with write access (default: the huggingface_hub login).
        revision: the branch to commit to.
        path_in_repo: upload into this folder of the repo instead of its root.
        commit_message: the commit's message.
    """
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
