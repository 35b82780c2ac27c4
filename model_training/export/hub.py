"""Upload an exported folder to the Hugging Face Hub without ever showing the token."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)


class UploadError(RuntimeError):
    """The upload failed; the message never contains the token."""


def repo_folder_name(repo_name: str) -> str:
    """The name part of ``[owner/]name``, once the Hub's rules for repository names are checked (ValueError)."""
    validate_repo_id(repo_name)
    return repo_name.rsplit("/", 1)[-1]


def upload_folder(folder: Path, repo_name: str, token: str | None) -> str:
    """Create ``repo_name`` if needed and upload every file of ``folder``; return the repository's URL.

    ``token`` None lets huggingface_hub find one (the HF_TOKEN variable, a saved login).
    """
    logger.info("uploading %s to %s", folder, repo_name)
    try:
        api = HfApi(token=token)
        repo = api.create_repo(repo_name, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo.repo_id, repo_type="model",
                          commit_message="Upload model exported with export_model.py")
        return repo.url
    except Exception as exc:  # network, authentication, quota: all reported the same way, without the token
        raise UploadError(_redact(f"the upload to {repo_name!r} failed: {type(exc).__name__}: {exc}", token)) from None


def _redact(message: str, token: str | None) -> str:
    """``message`` on one line with any token it may echo (request headers, URLs) masked."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            message = message.replace(secret, "***")
    return " ".join(message.split())
