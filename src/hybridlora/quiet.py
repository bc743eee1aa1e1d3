"""Library noise kept off the user's terminal, in every process that runs hybridlora's work.

The command line applies it before any work; so must every process that runs jobs without passing through it
(the runner processes of ``--workers-per-gpu``, Ray workers), or their deprecation notices from transformers land
between the progress lines.
"""
from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    # transformers' own fallback-kernel notices go to the log; hybridlora reports kernels itself.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
