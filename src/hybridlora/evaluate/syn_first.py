"""Synthetic benchmark ``syn_first`` (task and why it is in the set: :mod:`hybridlora.synthetic`; role: domain).

Protocol and scoring: :mod:`.synthetic_bench` (zero-shot, generated test items, greedy answer, exact match).
"""
from __future__ import annotations

from . import synthetic_bench as _common
from .synthetic_bench import KIND, MAX_NEW_TOKENS, NUM_FEWSHOT, PROTOCOL, STOP, prompt_parts, score  # noqa: F401

NAME = "syn_first"
DEFAULT_N = _common.DEFAULT_N


def load(data_dir=None) -> tuple[list[dict], list]:
    """The generated test items (``data_dir`` is not needed: the items are the same everywhere)."""
    return _common.load(NAME)
