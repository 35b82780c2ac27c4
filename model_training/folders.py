"""Atomic folder replacement: the one way this project puts a finished folder where a reader looks for it.

A folder (a checkpoint, an export, a LoRA run's base model) is written under another name beside its final
place, on the same filesystem, and renamed into place when it is whole. rename() cannot replace a non-empty
folder, so an existing one is first renamed aside and deleted once the new one stands. A crash at any point
leaves the old folder or the new one under the final name (or, for one instant, nothing there and the old one
aside), never a mix of both; what it leaves aside or half-written is a sibling its writer recognises and clears.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def hidden_sibling(folder: Path, purpose: str) -> Path:
    """A fresh, unique, not yet existing path next to ``folder``: ``.<name>.<purpose>-<12 hex digits>``."""
    return folder.parent / f".{folder.name}.{purpose}-{uuid.uuid4().hex[:12]}"


def replace_folder(staged: Path, final: Path, aside: Path, durable: bool = False) -> None:
    """Rename the finished ``staged`` folder to ``final``; an existing ``final`` is renamed to ``aside`` first
    and deleted after. ``durable``: fsync the staged tree and the parent folder, so that the new folder
    survives a power cut once this returns (a checkpoint must; an export can be made again)."""
    if durable:
        for directory in sorted((p for p in staged.rglob("*") if p.is_dir()), reverse=True):
            fsync_folder(directory)
        fsync_folder(staged)
    replaced = False
    if final.exists():
        remove_folder(aside)
        os.rename(final, aside)
        replaced = True
    os.rename(staged, final)
    if durable:
        fsync_folder(final.parent)
    if replaced:
        shutil.rmtree(aside)


def discard_folder(path: Path, aside: Path) -> None:
    """Delete ``path``: renamed to ``aside`` first, so a crash during the slow delete never leaves a
    half-deleted folder under a name a reader trusts."""
    remove_folder(aside)
    os.rename(path, aside)
    shutil.rmtree(aside)


def remove_folder(path: Path) -> None:
    """Delete ``path`` if it exists (a leftover of a crashed writer)."""
    if path.exists():
        shutil.rmtree(path)


def fsync_folder(path: Path) -> None:
    """Make the entries of ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
