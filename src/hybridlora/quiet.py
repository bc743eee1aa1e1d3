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
    # Hub / transformers bars ("Writing model shards" for a one-shard save) sit between hybridlora's own progress
    # lines; read when huggingface_hub is first imported, which the CLI does after this.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)

