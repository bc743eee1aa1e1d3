"""The component map: every parameter-holding module of a causal LM, classified by component type and role.

The map is built from the family table (``hybridlora.families``) when the model's family is known, and by a
structural classifier (module class names) otherwise. Anything neither can classify is listed in
``ComponentMap.unclassified`` — it is never guessed silently.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .families import COMPONENT_TYPES, SEQUENCE_MIXERS, Family, family_for


@dataclass
class ModuleInfo:
    name: str  # full module name, as PEFT sees it (first name of a shared module)
    class_name: str
    layer: int | None
    layer_kind: str | None  # the layer's kind as the config declares it
    component: str
    role: str
    params: int  # own parameters, each tied/shared tensor counted once across the map
    eligible: bool  # can host a LoRA adapter
    reason: str | None = None  # why not eligible
    in_features: int | None = None
    out_features: int | None = None
    tied_to: str | None = None  # name of the module that owns the tied weight
    shared_layers: list[int] = field(default_factory=list)  # other layers reusing this very module

    @property
    def lora_params_per_rank(self) -> int:
        """Trainable parameters one LoRA rank adds here (A: r×in, B: out×r)."""
        return (self.in_features or 0) + (self.out_features or 0)


@dataclass
class LayerInfo:
    index: int
    kind: str | None
    mixers: list[str]


@dataclass
class ComponentMap:
    model_type: str
    family: str | None
    classifier: str  # "family table" or "structural"
    topology: str
    topology_source: str
    schedule: list[LayerInfo]
    modules: list[ModuleInfo]
    unclassified: list[str]
    total_params: int
    notes: str = ""

    def totals_by_component(self) -> dict[str, int]:
        totals: dict[str, int] = {c: 0 for c in COMPONENT_TYPES}
        for m in self.modules:
            totals[m.component] += m.params
        return {c: n for c, n in totals.items() if n}

    def module(self, name: str) -> ModuleInfo:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "family": self.family,
            "classifier": self.classifier,
            "topology": self.topology,
            "topology_source": self.topology_source,
            "total_params": self.total_params,
            "params_by_component": self.totals_by_component(),
            "schedule": [asdict(layer) for layer in self.schedule],
            "unclassified": self.unclassified,
            "notes": self.notes,
            "modules": [asdict(m) for m in self.modules],
        }


# --- structural classifier (unknown families) -------------------------------------------------------
# Ordered: the first keyword found in the nearest classified ancestor's class name wins. Linear mixers are
# tested before softmax attention because their class names often contain "Attention" too.
_STRUCTURAL_KEYWORDS = (
    (re.compile(r"DeltaNet|LinearAttention|Lightning|KDA|DeltaAttention|GatedLinear|RetNet|GLA", re.I),
     "linear_attention"),
    (re.compile(r"Mamba|SSM|Selective", re.I), "ssm"),
    (re.compile(r"ShortConv", re.I), "short_conv"),
    (re.compile(r"Attention|Attn", re.I), "softmax_attention"),
    (re.compile(r"MoE|SparseMoe|Experts|Router", re.I), "moe"),
    (re.compile(r"MLP|FeedForward|FFN", re.I), "mlp"),
)


def _structural_component(name: str, classes: dict[str, str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cls = classes.get(".".join(parts[:i]), "")
        for pattern, component in _STRUCTURAL_KEYWORDS:
            if pattern.search(cls):
                return component
    return None


def _structural_role(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return re.sub(r"_proj$", "", leaf) or leaf


# --- helpers ----------------------------------------------------------------------------------------
def _layer_of(name: str, layers_path: str) -> tuple[int | None, str]:
    m = re.match(rf"^{re.escape(layers_path)}\.(\d+)(?:\.(.*))?$", name)
    if not m:
        return None, name
    return int(m.group(1)), m.group(2) or ""


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _shared_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Map id(module) -> every name under which it appears (more than one for shared blocks)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        names[id(mod)].append(name)
    return names


def _layers_path(model: nn.Module, family: Family | None) -> str:
    if family is not None:
        return family.layers_path
    # Unknown family: the longest ModuleList whose name ends in "layers" holds the decoder layers.
    best, best_len = "model.layers", -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("layers") and len(mod) > best_len:
            best, best_len = name, len(mod)
    return best


def _num_layers(model: nn.Module, layers_path: str) -> int:
    try:
        return len(model.get_submodule(layers_path))
    except AttributeError:
        return 0


def _ineligibility(module: nn.Module, component: str, bypass: str | None) -> str | None:
    if bypass:
        return bypass
    if component in ("norm", "embedding"):
        return f"not a Linear ({type(module).__name__}); hybridlora places LoRA on Linear layers"
    if not isinstance(module, nn.Linear):
        if component == "moe" and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            return (f"fused expert weights ({type(module).__name__} holds 3-D parameters, not Linear "
                    "modules); adapting them needs PEFT target_parameters, not offered yet")
        return f"not a Linear ({type(module).__name__})"
    return None


# --- the map ----------------------------------------------------------------------------------------
def build_component_map(model: nn.Module) -> ComponentMap:
    """Classify every parameter-holding module of ``model`` (works on the meta device)."""
    config = model.config
    model_type = getattr(config, "model_type", "unknown")
    family = family_for(model_type)
    layers_path = _layers_path(model, family)
    n_layers = _num_layers(model, layers_path)
    kinds = family.schedule(config, n_layers) if family else _generic_schedule(config, n_layers)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    classes = {name: type(mod).__name__ for name, mod in model.named_modules()}
    aliases = _shared_aliases(model)
    owner_of: dict[int, str] = {}
    modules: list[ModuleInfo] = []
    unclassified: list[str] = []

    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if not own and not isinstance(mod, nn.Linear):
            continue
        layer, path = _layer_of(name, layers_path)
        layer_kind = kinds[layer] if (kinds and layer is not None and layer < len(kinds)) else None
        component, role = _classify(mod, name, path, layer_kind, family, config, head, classes)
        if component is None:
            unclassified.append(f"{name} ({type(mod).__name__})")
            component, role = "other", _structural_role(name)

        params, tied_to = 0, None
        for p in own:
            if id(p) in owner_of:
                tied_to = owner_of[id(p)]
            else:
                owner_of[id(p)] = name
                params += p.numel()

        bypass = family.bypass_reason(path, layer, config) if (family and layer is not None) else None
        reason = _ineligibility(mod, component, bypass)
        shared = sorted({_layer_of(a, layers_path)[0] for a in aliases[id(mod)]} - {layer, None})
        modules.append(ModuleInfo(
            name=name, class_name=type(mod).__name__, layer=layer, layer_kind=layer_kind,
            component=component, role=role, params=params, eligible=reason is None, reason=reason,
            in_features=getattr(mod, "in_features", None), out_features=getattr(mod, "out_features", None),
            tied_to=tied_to, shared_layers=shared,
        ))

    schedule = _schedule(modules, kinds, n_layers)
    topology, topology_source = _topology(family, schedule)
    return ComponentMap(
        model_type=model_type,
        family=family.name if family else None,
        classifier="family table" if family else "structural",
        topology=topology,
        topology_source=topology_source,
        schedule=schedule,
        modules=modules,
        unclassified=unclassified,
        total_params=sum(p.numel() for p in model.parameters()),
        notes=family.notes if family else "unknown family: classified by module class names; check it",
    )


def _classify(mod, name, path, layer_kind, family, config, head, classes) -> tuple[str | None, str]:
    if head is not None and mod is head:
        return "lm_head", "head"
    if isinstance(mod, nn.Embedding):
        return "embedding", name.rsplit(".", 1)[-1]
    if family is not None and path and name != path:
        found = family.classify(path, layer_kind, config)
        if found:
            return found
    if _is_norm(mod):
        return "norm", name.rsplit(".", 1)[-1]
    if family is None:
        component = _structural_component(name, classes)
        if component:
            return component, _structural_role(name)
    return None, ""


def _generic_schedule(config: Any, n_layers: int) -> list[str] | None:
    """Declared layer kinds for an unknown family, from the attribute names transformers uses."""
    for attr in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types"):
        value = getattr(config, attr, None)
        if value:
            return [str(k) for k in value][:n_layers]
    return None


def _schedule(modules: list[ModuleInfo], kinds: list[str] | None, n_layers: int) -> list[LayerInfo]:
    mixers: dict[int, set[str]] = defaultdict(set)
    for m in modules:
        if m.component in SEQUENCE_MIXERS:
            for layer in ([m.layer] if m.layer is not None else []) + m.shared_layers:
                mixers[layer].add(m.component)
    return [
        LayerInfo(i, kinds[i] if kinds and i < len(kinds) else None, sorted(mixers.get(i, ())))
        for i in range(n_layers)
    ]


def _topology(family: Family | None, schedule: list[LayerInfo]) -> tuple[str, str]:
    if family is not None and family.topology != "by-layer":
        return family.topology, "family table"
    parallel = any(len(layer.mixers) > 1 for layer in schedule)
    return ("parallel" if parallel else "sequential"), "inferred: layers holding more than one mixer"
