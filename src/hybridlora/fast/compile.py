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

import contextlib
from typing import Any

import torch
from torch import nn

SCOPES = ("off", "lora", "layers")
RECOMPILE_LIMIT = 64  # layers of one class recompile per attribute dynamo guards on (e.g. the layer type)
# Layers that read a cache guard on their own ``layer_idx`` (transformers' cache indexes its layers by it), so
# decoding compiles once per (layer, shape): prefill and step, for each batch shape. Falcon-H1's 36 layers hit
# the flat limit of 64 on the H200 (2026-12-04) and ran the rest eagerly; the limit scales with the depth.
COMPILES_PER_LAYER = 8
MIN_TORCH = (2, 7)  # dynamo's recompile_limit and torch.compiler.set_stance
_MARK = "_hybridlora_compiled"
_saved_limit: list[int] = []


def unsupported_reason() -> str | None:
    """Why this torch cannot run compiled regions (None if it can)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        return f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}"
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The causal LM's stack of decoder layers (``model.model.layers`` under any PEFT wrapping), else None."""
    from .state import causal_lm

    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def compile_regions(model: nn.Module, scope: str, *, dynamic: bool | None = False) -> str:
    """Compile ``scope``'s regions of ``model`` in place (lazily: on their first call); returns a line for the
    run log. ``dynamic=False`` specialises on every shape (the trainer's CUDA-graph rows come in a few bucket
    lengths); ``None`` lets dynamo make a dimension symbolic once it changes (eager steps of varying shapes)."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if scope == "off":
        return "off"
    why = unsupported_reason()
    if why:
        raise ValueError(f"compile scope {scope!r} needs torch >= {'.'.join(map(str, MIN_TORCH))}: {why}")
    import torch._dynamo

    targets: list[Any]
    if scope == "lora":
        targets = _lora_layers(model)
    else:
        layers = decoder_layers(model)
        targets = list(layers) if layers is not None else []
    if not targets:
        raise ValueError(f"compile scope {scope!r}: the model has no such modules")
    if not _saved_limit:  # raised while compiled regions exist, put back by uncompile
        _saved_limit.append(torch._dynamo.config.recompile_limit)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT,
                                               COMPILES_PER_LAYER * len(targets))
    for module in targets:
        module.compile(dynamic=dynamic)
        setattr(module, _MARK, True)
    kind = "LoRA layers" if scope == "lora" else "decoder layers"
    shapes = "static shapes" if dynamic is False else "shapes made dynamic when they change"
    return f"{scope}: {len(targets)} {kind} compiled (inductor, {shapes})"


def uncompile(model: nn.Module) -> int:
    """Undo :func:`compile_regions` on ``model`` (callers get it back running eagerly; modules compiled by
    someone else stay compiled); returns the number of modules reset."""
    count = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            module._compiled_call_impl = None
            delattr(module, _MARK)
            count += 1
    if count and _saved_limit:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = _saved_limit.pop()
    return count


def eager():
    """Context in which compiled regions run their original eager code (validation batches of arbitrary
    shapes would otherwise each compile anew)."""
    if unsupported_reason():
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from dynamo / Inductor (as opposed to the model's own code)."""
    kinds: list[type] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        kinds.append(TorchDynamoException)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        kinds.append(InductorError)
    except ImportError:
        pass
    return any(isinstance(e, tuple(kinds)) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
