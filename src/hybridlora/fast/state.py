"""What :mod:`hybridlora.fast` has bound, and the two small facts both the binding and the loss need.

Kept apart from :mod:`.kernels` (which writes the state) and :mod:`.loss` (which reads the binding mode and
unwraps PEFT models), so that neither imports the other.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from torch import nn

# mode: None (transformers' own import-time choice), "fast", "reference" or kernels.REFERENCE;
# bound: {"module.attribute": what is bound}; originals: what transformers had bound before the first use()
STATE: dict[str, Any] = {"mode": None, "bound": {}, "originals": {}, "notes": []}


@contextlib.contextmanager
def static_decode_step() -> Iterator[None]:
    """Marks a step of the project's own static-cache decode loop (:mod:`.decode`). There the recurrent states a
    mixer hands its kernel are the cache's buffers, which the model overwrites with the kernel's result at once,
    and nothing else holds them (no history is recorded for rollback, as transformers' assisted decoding does):
    only there may a kernel write a state in place (:func:`.ops.make_gdn_recurrent`)."""
    previous = STATE.get("static_decode_step", False)
    STATE["static_decode_step"] = True
    try:
        yield
    finally:
        STATE["static_decode_step"] = previous


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def use_ce_kernel() -> bool:
    """The Triton cross-entropy runs where it can, unless ``fast.use("reference")`` is in force or
    $HYBRIDLORA_TORCH_CE=1 asks for the torch ops (for side-by-side timing and checks)."""
    from . import ce_kernel

    return (os.environ.get("HYBRIDLORA_TORCH_CE") != "1" and STATE["mode"] != "reference"
            and ce_kernel.available())
