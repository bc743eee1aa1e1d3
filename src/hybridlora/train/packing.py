"""Whether several examples may be packed into one row, and the batching line the run log and CLI print.

Packing is only correct when every mixer of the model restarts at each sequence boundary inside a row:
attention must not attend across it, and Gated DeltaNet / Mamba-2 recurrent state and their causal conv1d state
must be reset there. The transformers forward (the reference path this trainer runs) takes no per-row sequence
boundaries for any of these mixers, so this trainer never packs: it right-pads each micro-batch (right padding is
exact for causal mixers, and padding positions carry no loss). GPU kernels with ``cu_seqlens`` support (see
``hybridlora.fast``) are the place where a packed path would plug in; until then this function says no, with
the reason.
"""
from __future__ import annotations

from torch import nn

RECURRENT = {"linear_attention": "Gated DeltaNet/linear-attention", "ssm": "Mamba-2/SSM",
             "short_conv": "short-convolution"}


def packing_supported(model: nn.Module) -> tuple[bool, str]:
    """(False, reason) on the reference path: which mixers would leak state or attention across packed examples."""
    from ..components import build_component_map

    try:
        totals = build_component_map(model).totals_by_component()
    except Exception:  # an unclassifiable model: nothing known about its mixers
        totals = {}
    recurrent = [label for comp, label in RECURRENT.items() if comp in totals]
    if recurrent:
        return False, (f"the reference {', '.join(recurrent)} mixers (and their causal conv1d) take no sequence "
                       "boundaries, so recurrent state would carry across packed examples")
    return False, "the reference attention path takes no sequence boundaries (no varlen kernel), so packed " \
                  "examples would attend to each other"


def batching_line(model: nn.Module) -> tuple[bool, str]:
    """(packing used, the one line the run log and the CLI print about batching)."""
    ok, reason = packing_supported(model)
    if ok:  # the kernels could, but this loop has no packed path yet: say so rather than claim packing
        reason = "this training loop has no packed path yet"
    return False, f"packing off: {reason}; padding each micro-batch"
