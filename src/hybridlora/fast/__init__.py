"""GPU fast path for the studied hybrid models: kernel detection, explicit binding, loud warnings.

Typical use on CUDA, before training or evaluation::

    from hybridlora import fast
    fast.use("fast")                 # bind fla / mamba-ssm kernels into transformers' Qwen3.5 / Falcon-H1 code
    fast.warn_missing_kernels(model) # loud warning for every kernel the model needs that will not run
    log(fast.describe(model))        # one line naming the active kernels, for the run log

On a machine without CUDA everything reports ``"reference (no CUDA)"`` and warns about nothing.
"""
from .kernels import (
    KERNEL_PURPOSE,
    REFERENCE,
    active_kernels,
    describe,
    missing_kernels,
    required_kernels,
    restore,
    use,
    warn_missing_kernels,
)
from .attention import PACKED, packed_attention
from .lora import skip_input_upcast
from .loss import causal_lm_loss_sum
from .packing import pack, pack_order, packing_supported

__all__ = [
    "KERNEL_PURPOSE", "PACKED", "REFERENCE", "packed_attention", "active_kernels", "causal_lm_loss_sum", "describe", "missing_kernels", "pack",
    "pack_order", "packing_supported", "required_kernels", "restore", "skip_input_upcast", "use", "warn_missing_kernels",
]
