"""Names of the models shipped with hybridlora: ``builtin:demo-sequential`` and ``builtin:demo-parallel``, the
embedded demo's pretrained lab hybrids (made by ``hybridlora lab demo-models``, :mod:`hybridlora.lab.demo_models`).

A leaf module (standard library only): resolving a MODEL argument must not import the lab's training code.
"""
from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"
PACKAGED = Path(__file__).parent / "lab" / "pretrained"
MODELS = {"demo-sequential": "sequential", "demo-parallel": "parallel"}  # name -> variant of the demo-gdn spec


def builtin_model_dir(spec: str) -> Path | None:
    """The shipped directory a ``builtin:NAME`` model argument names, or None for any other argument."""
    if not spec.startswith(BUILTIN_PREFIX):
        return None
    name = spec[len(BUILTIN_PREFIX):]
    if name not in MODELS:
        raise ValueError(f"unknown built-in model {spec!r}; known: " + ", ".join(BUILTIN_PREFIX + n for n in MODELS))
    return PACKAGED / name
