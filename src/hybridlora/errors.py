"""Errors and exit codes shared by every command line module.

Kept apart from ``cli.py`` so that sub-command modules (study, train, eval, report, ablate, lab, …) can raise a
``CliError`` without importing the top-level CLI that imports them.
"""
from __future__ import annotations

import os
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED_CHECK = 1
MAX_SEED = 2**32 - 1  # numpy's seeding accepts no more; torch and random take any seed numpy takes


class CliError(Exception):
    """A user-facing error: printed as one line (``error: …``), exit status 2."""


def check_output_folder(path: str | Path, option: str) -> None:
    """Fail before any work when ``path`` cannot become a folder to write into (a file, or no write access)."""
    folder = Path(path)
    existing = folder
    while not existing.exists():  # the folder that would hold the new one
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        raise CliError(f"{option} {path}: exists and is not a folder; give a folder path")
    if not existing.is_dir():
        raise CliError(f"{option} {path}: {existing} is a file, not a folder; give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path}: {existing} is not writable; choose a folder you can write to")


def check_seed(seed: int, option: str = "--seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise CliError(f"{option} {seed}: out of range; use an integer from 0 to {MAX_SEED:,}")
    return seed
