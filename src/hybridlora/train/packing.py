"""Whether the trainer packs examples into rows, how, and the batching line the run log and CLI print.

Packing is only correct when every mixer restarts at each example boundary inside a row: attention must not
attend across it, and Gated DeltaNet / Mamba-2 recurrent state and their causal conv1d windows must be reset
there. transformers' own forward takes no such boundaries for these mixers. :func:`hybridlora.fast.use`
``("fast")`` binds functions that do (fla / mamba-ssm kernels on CUDA, packing-aware torch references
elsewhere) and :func:`hybridlora.fast.packed_attention` gives softmax attention a varlen path; when both apply,
the trainer packs.

What is packed: exactly the examples of one optimizer step (``micro_batch_size × grad_accum``, the same ones
the padded path would use), in order, into rows of at most ``pack_tokens`` tokens. The step's loss is the
same mean over the same loss tokens, so packing changes the arithmetic (no padding computed, fewer, longer
forwards) and not the recipe. Only the LoRA-dropout masks differ (other shapes, other random draws).
"""
from __future__ import annotations

from typing import Any

from torch import nn

RECURRENT = {"linear_attention": "Gated DeltaNet/linear-attention", "ssm": "Mamba-2/SSM",
             "short_conv": "short-convolution"}


def packing_supported(model: nn.Module) -> tuple[bool, str]:
    """(ok, reason if not) for packing ``model``'s training rows with the functions bound now."""
    from .. import fast

    ok, why = fast.packing_supported(model)
    if ok:
        return True, ""
    from ..components import build_component_map

    try:
        totals = build_component_map(model).totals_by_component()
    except Exception:  # an unclassifiable model: nothing known about its mixers
        totals = {}
    recurrent = [label for comp, label in RECURRENT.items() if comp in totals]
    if recurrent and "no packing-aware" in why:
        return False, (f"the {', '.join(recurrent)} mixers (and their causal conv1d) of this model family take no "
                       "sequence boundaries, so recurrent state would carry across packed examples")
    if not recurrent:
        return False, "no packing-aware path is known for this model family's attention"
    return False, why


def pack_tokens_for(config: Any) -> int:
    """Row budget: ``pack_tokens`` or, when 0, what one padded micro-batch may hold (same memory ceiling)."""
    return config.pack_tokens or config.micro_batch_size * config.max_length


def batching_line(model: nn.Module, config: Any | None = None) -> tuple[bool, str]:
    """(packing used, the one line the run log and the CLI print about batching)."""
    ok, reason = packing_supported(model)
    if config is not None and getattr(config, "packing", "auto") == "off":
        ok, reason = False, "turned off (packing: off)"
    if ok:
        budget = pack_tokens_for(config) if config is not None else None
        rows = f"rows of at most {budget} tokens" if budget else "rows"
        return True, f"packing on: each optimizer step's examples packed into {rows}, example boundaries kept"
    return False, f"packing off: {reason}; padding each micro-batch"
