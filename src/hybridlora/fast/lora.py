"""PEFT LoRA layers without the float32 round trip of their inputs.

PEFT keeps LoRA weights in float32 and, by default, casts each LoRA layer's input to the weight dtype before
dropout and ``lora_A``. Under bf16 autocast that copy is wasted: autocast casts the activations straight back to
bf16 for the matmul, and dropout of a bf16 tensor rounds once to bf16 just as the float32 path does at the
matmul. On a 4 x 1024-token micro-batch of Qwen3.5-0.8B with LoRA on every projection these copies were the
largest single item of the step's GPU time (see docs/PERFORMANCE.md). :func:`skip_input_upcast` turns the cast
off (PEFT's own ``cast_input_dtype_enabled`` switch, as ``peft.helpers.disable_input_dtype_casting`` does); use
it only with autocast, where it leaves the computed values unchanged.
"""
from __future__ import annotations

from torch import nn


def skip_input_upcast(model: nn.Module, enabled: bool = True) -> int:
    """Set every PEFT tuner layer of ``model`` to skip (``enabled``) or do the input dtype cast; returns the
    number of layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = not enabled
            count += 1
    return count
