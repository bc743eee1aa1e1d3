"""Replacing a finished directory in one step, so that readers see the old one or the new one, never a mix.

Reports, adapters and model directories are written into a temporary sibling first; this moves the old directory
aside, renames the new one into place, and only then removes the old one (restoring it if the rename fails).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Rename the finished directory ``tmp`` to ``final`` (same file system), replacing any ``final``."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
