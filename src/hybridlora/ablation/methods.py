"""Removing a component: the ablation units of a model and the forward hooks that remove them.

A **unit** is one component at one layer (``softmax_attention@3``): the module(s) whose output is that
component's contribution at that layer — the common parent of the component's modules in the component map
(``model.layers.3.self_attn``), or what the family entry declares in ``ablation_modules`` where the component
spans several modules (Granite's routed experts + shared MLP) or sits in a block shared across layers (Zamba2).

Methods (each hook replaces the *output* of the hooked module; the module still runs):

* ``skip`` — the mixer's residual contribution removed: its output replaced by zeros, so the layer adds nothing
  through it (``h + mixer(norm(h))`` becomes ``h``). The name for sequential layers.
* ``zero`` — the same operation named for a branch of a parallel block (Falcon-H1 sums attention and Mamba-2 on
  one input; zeroing one branch leaves the block computing the other alone — the reference's Falcon method).
* ``skip_layer`` — the whole decoder layer replaced by identity (its output := its input): mixer *and* MLP gone.
  The reference's Qwen3.5 method; offered for sequential layers.
* ``mean`` — the output replaced by its mean over a reference text set (one vector per unit and module,
  measured on the intact model and stored; see :func:`collect_means`).

Hooks are pure tensor operations on the output's device and dtype (no host sync, no data-dependent Python), so
they are recorded into a CUDA graph captured while they are attached — the static decode loop of
``hybridlora.fast.decode`` replays them (a graph captured *before* attaching would not; every ablation job
builds its evaluator after attaching).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..families import SEQUENCE_MIXERS, family_named

ABLATABLE = SEQUENCE_MIXERS + ("mlp", "moe")
METHODS = ("skip", "zero", "skip_layer", "mean")


class AblationError(ValueError):
    """Bad ablation input (unknown component, layer out of range, …); the message says what to do."""


@dataclass(frozen=True)
class Unit:
    layer: int
    component: str
    modules: tuple[str, ...]  # full module names whose outputs are replaced
    layer_module: str  # the decoder layer's full name
    parallel: bool  # the layer holds more than one sequence mixer (a parallel block)

    @property
    def key(self) -> str:
        return f"{self.component}@{self.layer}"


@dataclass
class ModelUnits:
    units: list[Unit]
    num_layers: int
    topology: str
    family: str | None
    layers_path: str
    components: list[str] = field(default_factory=list)

    def by_key(self) -> dict[str, Unit]:
        return {u.key: u for u in self.units}

    def of(self, component: str) -> list[Unit]:
        return [u for u in self.units if u.component == component]


def _layers_path(cmap) -> str:
    return family_named(cmap.family).layers_path if cmap.family else "model.layers"


def model_units(cmap) -> ModelUnits:
    """Every (layer, component) of the component map that can be removed, in layer order."""
    family = family_named(cmap.family) if cmap.family else None
    layers_path = _layers_path(cmap)
    members: dict[tuple[int, str], list[str]] = {}
    for m in cmap.modules:
        if m.component not in ABLATABLE or m.layer is None:
            continue
        for layer in [m.layer] + list(m.shared_layers):
            members.setdefault((layer, m.component), []).append(m.name)
    parallel_layers = {layer.index for layer in cmap.schedule if len(layer.mixers) > 1}
    units = []
    for (layer, component), names in sorted(members.items()):
        layer_name = f"{layers_path}.{layer}"
        declared = family.ablation_modules.get(component) if family else None
        if declared:
            modules = tuple(f"{layer_name}.{path}" for path in declared)
        else:
            own = [n for n in names if n.startswith(layer_name + ".")]
            if not own:  # only reached through a module shared from another layer, with no declared path
                raise AblationError(f"{component} at layer {layer} is a module shared from another layer; declare "
                                    f"its path in ablation_modules of families/{cmap.family}.py")
            parent = ".".join(os.path.commonprefix([n.split(".") for n in own]))  # a lone module is its own
            if parent == layer_name:
                raise AblationError(f"{component} at layer {layer} spans several modules with no common parent "
                                    f"below the layer; declare them in ablation_modules of families/"
                                    f"{cmap.family or 'FAMILY'}.py")
            modules = (parent,)
        units.append(Unit(layer, component, modules, layer_name, layer in parallel_layers))
    components = list(dict.fromkeys(c for c in ABLATABLE if any(u.component == c for u in units)))
    return ModelUnits(units, len(cmap.schedule), cmap.topology, cmap.family, layers_path, components)


def default_method(unit: Unit) -> str:
    return "zero" if unit.parallel else "skip"


# ---------------------------------------------------------------------------------------------- hooks
def _primary(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise AblationError(f"cannot ablate a module returning {type(output).__name__}; expected a tensor or a tuple "
                        "whose first item is the hidden states")


def _replace(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return tensor
    return type(output)([tensor, *output[1:]]) if isinstance(output, list) else (tensor, *output[1:])


class LayerTracker:
    """Which decoder layer is running now, and its batch size: lets a hook on a module shared by several layers
    (Zamba2's shared block) act only when called from the layers being ablated, and a shared-conditions hook check
    that its output's first dimension is the batch."""

    def __init__(self, model: nn.Module, layers_path: str):
        self.current: int | None = None
        self.batch: int | None = None
        self.handles = []
        for index, layer in enumerate(model.get_submodule(layers_path)):
            self.handles.append(layer.register_forward_pre_hook(self._enter(index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._leave))

    def _enter(self, index: int):
        def hook(module, args, kwargs):
            self.current = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            self.batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) else None
        return hook

    def _leave(self, module, args, output):
        self.current = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Hooks:
    """Forward hooks attached to a model with a layer tracker; a context manager (``remove()`` detaches every hook,
    leaving the model as it was)."""
    handles: list
    tracker: LayerTracker

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.tracker.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Ablation(_Hooks):
    """Attach the hooks removing ``units`` with ``method`` from ``model``; a context manager (``remove()``
    detaches every hook, leaving the model as it was)."""

    def __init__(self, model: nn.Module, units: Sequence[Unit], method: str, layers_path: str, *,
                 means: dict[str, dict[str, torch.Tensor]] | None = None):
        if method not in METHODS:
            raise AblationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.handles: list = []
        self.tracker = LayerTracker(model, layers_path)
        if method == "skip_layer":
            for layer_name in sorted({u.layer_module for u in units}):
                self.handles.append(model.get_submodule(layer_name).register_forward_hook(_identity_layer,
                                                                                         with_kwargs=True))
            return
        wanted: dict[str, dict[int, torch.Tensor | None]] = {}
        for unit in units:
            for name in unit.modules:
                wanted.setdefault(name, {})[unit.layer] = _stored_mean(means, unit, name) if method == "mean" else None
        param = next(model.parameters())
        for name, per_layer in wanted.items():
            # means moved to the model's device now: no host-to-device copy may happen inside a CUDA-graph capture
            per_layer = {layer: None if v is None else v.to(device=param.device, dtype=param.dtype)
                         for layer, v in per_layer.items()}
            self.handles.append(model.get_submodule(name).register_forward_hook(self._hook(per_layer)))

    def _hook(self, per_layer: dict[int, torch.Tensor | None]):
        tracker = self.tracker
        cache: dict[tuple, torch.Tensor] = {}

        def hook(module, args, output):
            if tracker.current not in per_layer:
                return None
            hidden = _primary(output)
            mean = per_layer[tracker.current]
            if mean is None:
                return _replace(output, torch.zeros_like(hidden))
            if mean.dtype != hidden.dtype or mean.device != hidden.device:  # e.g. fp32 outputs of a bf16 model
                key = (tracker.current, hidden.device, hidden.dtype)
                if key not in cache:
                    cache[key] = mean.to(device=hidden.device, dtype=hidden.dtype)
                mean = cache[key]
            return _replace(output, mean.expand_as(hidden).clone())
        return hook



class SharedAblation(_Hooks):
    """Several conditions in one batch: the hooks of ``conditions`` (each ``(units, method)``; ``([], "none")`` is
    the intact model) attached at once, each acting only on its own rows. Every forward's batch must hold the rows
    interleaved by condition — row ``r`` belongs to condition ``r % len(conditions)`` (each row's copies next to
    each other, as :class:`hybridlora.evaluate.lm.CausalLM` lays them out with ``copies``); a batch that is not a
    multiple of the conditions raises instead of mixing them up.

    Each hooked output becomes ``output * keep[c] + replacement[c]`` for its row's condition ``c`` (keep 1 and
    replacement 0 where ``c`` leaves the unit alone; 0 and zeros or the stored mean where it removes it), so a
    row computes exactly what its condition alone computes at the same batch size: ``x * 1 + 0`` is ``x``, and
    ``x * 0 + m`` is ``m`` for any finite ``x``. ``skip_layer`` blends the layer's output with its input the same
    way. Pure tensor operations on shapes known before the forward: recorded into CUDA graphs like
    :class:`Ablation`'s."""

    def __init__(self, model: nn.Module, conditions: Sequence[tuple[Sequence[Unit], str]], layers_path: str, *,
                 means: dict[str, dict[str, torch.Tensor]] | None = None):
        for _, method in conditions:
            if method not in METHODS + ("none",):
                raise AblationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.count = len(conditions)
        if self.count < 1:
            raise AblationError("no condition to attach")
        self.tracker = LayerTracker(model, layers_path)
        self.handles: list = []
        param = next(model.parameters())
        # per hooked module and layer: which conditions remove it, and with what
        removed: dict[str, dict[int, dict[int, torch.Tensor | None]]] = {}
        skipped_layers: dict[str, set[int]] = {}
        for c, (units, method) in enumerate(conditions):
            for unit in units if method != "none" else ():
                if method == "skip_layer":
                    skipped_layers.setdefault(unit.layer_module, set()).add(c)
                    continue
                for name in unit.modules:
                    value = None
                    if method == "mean":  # moved now: never a host-to-device copy inside a graph capture
                        value = _stored_mean(means, unit, name).to(device=param.device, dtype=param.dtype)
                    removed.setdefault(name, {}).setdefault(unit.layer, {})[c] = value
        for layer_name, by in sorted(skipped_layers.items()):
            keep = self._keep(by, param)
            self.handles.append(model.get_submodule(layer_name).register_forward_hook(self._layer_hook(keep),
                                                                                     with_kwargs=True))
        for name, per_layer in removed.items():
            self.handles.append(model.get_submodule(name).register_forward_hook(self._hook(per_layer, param)))

    def _keep(self, removing: Iterable[int], param: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(self.count, device=param.device, dtype=param.dtype)
        keep[list(removing)] = 0
        return keep

    def _rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` as ``[rows / conditions, conditions, ...]`` (its batch interleaved by condition)."""
        batch = self.tracker.batch
        if batch is not None and hidden.shape[0] != batch:  # e.g. tokens flattened: rows would be mixed up
            raise AblationError(f"an ablated module's output has {hidden.shape[0]} rows in a batch of {batch}; shared "
                                "conditions need outputs whose first dimension is the batch (--conditions-per-batch 1)")
        if hidden.shape[0] % self.count:
            raise AblationError(f"a batch of {hidden.shape[0]} rows cannot hold {self.count} conditions' rows "
                                "equally; shared conditions need every forward to carry each row once per condition")
        return hidden.reshape(hidden.shape[0] // self.count, self.count, *hidden.shape[1:])

    def _hook(self, per_layer: dict[int, dict[int, torch.Tensor | None]], param: torch.Tensor):
        tracker, count = self.tracker, self.count
        factors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for layer, by in per_layer.items():
            keep = self._keep(by, param)
            means = {c: v for c, v in by.items() if v is not None}
            replacement = None
            if means:
                width = next(iter(means.values())).shape[-1]
                replacement = torch.zeros(count, width, device=param.device, dtype=param.dtype)
                for c, v in means.items():
                    replacement[c] = v.reshape(-1)
            factors[layer] = (keep, replacement)
        cast: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

        def hook(module, args, output):
            if tracker.current not in factors:
                return None
            hidden = _primary(output)
            key = (tracker.current, hidden.device, hidden.dtype)
            if key not in cast:  # e.g. fp32 outputs of a bf16 model: cast once, before any graph capture replays it
                keep, replacement = factors[tracker.current]
                cast[key] = (keep.to(device=hidden.device, dtype=hidden.dtype),
                             None if replacement is None else replacement.to(device=hidden.device, dtype=hidden.dtype))
            keep, replacement = cast[key]
            rows = self._rows(hidden)
            shape = (1, count) + (1,) * (rows.dim() - 2)
            out = rows * keep.view(shape)
            if replacement is not None:
                out = out + replacement.view(1, count, *(1,) * (rows.dim() - 3), -1)
            return _replace(output, out.reshape(hidden.shape))
        return hook

    def _layer_hook(self, keep: torch.Tensor):
        count = self.count
        weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (keep, 1 - keep) per device and dtype

        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden_in, torch.Tensor):
                raise AblationError(f"skip_layer: cannot find the input hidden states of {type(module).__name__}")
            hidden_out = _primary(output)
            key = (hidden_out.device, hidden_out.dtype, hidden_out.dim())
            if key not in weights:  # made once, before any graph capture replays the hook
                k = keep.to(device=hidden_out.device, dtype=hidden_out.dtype).view(
                    (1, count) + (1,) * (hidden_out.dim() - 1))
                weights[key] = (k, 1 - k)
            k, skip = weights[key]
            out = self._rows(hidden_out) * k + self._rows(hidden_in) * skip
            return _replace(output, out.reshape(hidden_out.shape))
        return hook


def _stored_mean(means: dict | None, unit: Unit, name: str) -> torch.Tensor:
    try:
        return means[unit.key][name]
    except (KeyError, TypeError):
        raise AblationError(f"no stored mean for {unit.key} ({name}); compute the means first") from None


def _identity_layer(module, args, kwargs, output):
    hidden_in = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden_in, torch.Tensor):
        raise AblationError(f"skip_layer: cannot find the input hidden states of {type(module).__name__}")
    return _replace(output, hidden_in)


# ---------------------------------------------------------------------------------------------- means
def collect_means(model: nn.Module, units: Iterable[Unit], layers_path: str,
                  windows: Sequence[Sequence[int]]) -> dict[str, dict[str, torch.Tensor]]:
    """The mean output vector of every unit's module(s) over every token of ``windows`` (token id rows, no
    padding), on the intact model; float32 on the CPU."""
    units = list(units)
    tracker = LayerTracker(model, layers_path)
    sums: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[tuple[str, int], int] = {}
    layers_of: dict[str, set[int]] = {}
    for unit in units:
        for name in unit.modules:
            layers_of.setdefault(name, set()).add(unit.layer)

    def capture(name: str):
        def hook(module, args, output):
            if tracker.current not in layers_of[name]:
                return None
            hidden = _primary(output).detach().float()
            flat = hidden.reshape(-1, hidden.shape[-1])
            key = (name, tracker.current)
            sums[key] = sums.get(key, 0) + flat.sum(0).cpu()
            counts[key] = counts.get(key, 0) + flat.shape[0]
            return None
        return hook

    handles = [model.get_submodule(name).register_forward_hook(capture(name)) for name in layers_of]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for row in windows:
                model(input_ids=torch.tensor([list(row)], device=device))
    finally:
        for h in handles:
            h.remove()
        tracker.remove()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for unit in units:
        for name in unit.modules:
            key = (name, unit.layer)
            if key not in counts:
                raise AblationError(f"{unit.key}: {name} never ran on the reference text; mean ablation impossible")
            out.setdefault(unit.key, {})[name] = sums[key] / counts[key]
    return out
