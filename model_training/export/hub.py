"""Upload an exported folder to the Hugging Face Hub without ever showing the token."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi


class UploadError(RuntimeError):
    """The upload failed; the message never contains the token."""


def upload_folder(folder: Path, repo_name: str, token: str | None) -> str:
    """Create ``repo_name`` if needed and upload every file of ``folder``; return the repository's URL.

    ``token`` None lets huggingface_hub find one (the HF_TOKEN variable, a saved login).
    """
    try:
        api = HfApi(token=token)
        repo = api.create_repo(repo_name, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo.repo_id, repo_type="model",
                          commit_message="Upload model exported with export_model.py")
        return repo.url
    except Exception as exc:  # network, authentication, quota: all reported the same way, without the token
        raise UploadError(_redact(f"uploading {folder} to {repo_name!r} failed: {type(exc).__name__}: {exc}",
                                  token)) from None


def _redact(message: str, token: str | None) -> str:
    """``message`` on one line with any token it may echo (request headers, URLs) masked."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            message = message.replace(secret, "***")
    return " ".join(message.split())
