"""Errors and exit codes shared by every command line module.

Kept apart from ``cli.py`` so that sub-command modules (study, train, eval, report, ablate, lab, …) can raise a
``CliError`` without importing the top-level CLI that imports them.
"""
from __future__ import annotations

EXIT_USAGE = 2
EXIT_FAILED_CHECK = 1


class CliError(Exception):
    """A user-facing error: printed as one line (``error: …``), exit status 2."""
