"""torch.compile of the code between the fast kernels: LoRA hosts or whole decoder layers.

After the mixers moved to Triton kernels and the step into CUDA graphs, the GPU time of a packed training step
went mostly to small element-wise kernels around the matmuls: PEFT's dropout, scaling and adds on every LoRA
host, muP multipliers, gates, casts. Inductor fuses those. Scopes:

* ``"lora"``: every PEFT LoRA layer's forward (base matmul, dropout, A, B, scale, add) is compiled;
* ``"layers"``: every decoder layer's forward is compiled; the bound mixer kernels (:mod:`.kernels`) are opaque
  to dynamo (``torch.compiler.disable``), so each layer compiles into the pieces between them.

Compiled regions run inside the trainer's CUDA graphs: compilation happens in the warm-up steps before capture.
Inductor draws dropout masks from its own Philox stream, so masks differ from eager ones (same distribution,
still reproducible from the seed); losses and gradients otherwise match eager within bf16 rounding.
"""
from __future__ import annotations

from typing import Any

from torch import nn

SCOPES = ("off", "lora", "layers")
RECOMPILE_LIMIT = 64  # layers of one class recompile per attribute dynamo guards on (e.g. the layer type)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of decoder layers: the longest ModuleList (None if there is none)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def compile_regions(model: nn.Module, scope: str) -> str:
    """Compile ``scope``'s regions of ``model`` in place (lazily: on their first call); returns a line for the
    run log."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if scope == "off":
        return "off"
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    targets: list[Any]
    if scope == "lora":
        targets = _lora_layers(model)
    else:
        layers = decoder_layers(model)
        targets = list(layers) if layers is not None else []
    if not targets:
        raise ValueError(f"compile scope {scope!r}: the model has no such modules")
    for module in targets:
        module.compile(dynamic=False)
    kind = "LoRA layers" if scope == "lora" else "decoder layers"
    return f"{scope}: {len(targets)} {kind} compiled (inductor, static shapes)"


def uncompile(model: nn.Module) -> int:
    """Undo :func:`compile_regions` (callers get the model back running eagerly); returns modules reset."""
    count = 0
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            count += 1
    return count
