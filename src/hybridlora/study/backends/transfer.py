"""Folders as bytes: how a job's inputs reach a worker and its artifacts come back, with no shared file system.

A folder travels as an uncompressed tar (adapters and checkpoints do not compress; tar keeps it simple and
streamable) held in Ray's object store. Unpacking is atomic: into a temporary sibling, then renamed into place,
so a reader (or a driver killed halfway) never sees half a folder.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Callable


def pack(folder: Path, *, keep: Callable[[Path], bool] | None = None) -> bytes:
    """The folder's files (relative paths) as tar bytes; ``keep(relative_path)`` filters files and folders."""
    folder = Path(folder)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if keep is not None and not keep(rel):
                continue
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(rel), recursive=False)
    return buffer.getvalue()


def unpack(blob: bytes, folder: Path) -> None:
    """Extract tar bytes into ``folder`` (created; existing files are overwritten)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        if hasattr(tarfile, "data_filter"):  # no absolute paths, no links out of the folder
            tar.extractall(folder, filter="data")
        else:  # pragma: no cover — Pythons before the filter; our own tars hold plain relative files only
            tar.extractall(folder)


def replace_with(blob: bytes, final: Path) -> None:
    """Make ``final`` hold exactly the tar's contents, atomically (unpack beside it, swap, drop the old)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.incoming.", dir=final.parent))
    try:
        unpack(blob, tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """The unpacked files are on disk before the database can say the job is complete."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
