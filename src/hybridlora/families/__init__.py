"""The family table: what hybridlora knows about each hybrid model family.

Each family lives in one small module of this package that defines ``FAMILY``; registering a family is
one line in ``_FAMILY_MODULES`` below. Family modules are the only place in hybridlora where a
``model_type`` string or a family-specific module name appears.

A family entry is declarative:

* ``model_types`` — the transformers ``config.model_type`` values it covers;
* ``schedule_attr`` — the config attribute that declares each layer's kind (``layer_types``,
  ``layers_block_type``, ...), as transformers exposes it;
* ``topology`` — ``sequential`` (one sequence mixer per layer) or ``parallel`` (a layer sums several);
* ``rules`` — ordered ``Rule``s mapping a module path *inside a decoder layer* to a component type and
  a role; the first match wins;
* ``bypassed`` — modules whose weight a kernel reads directly, so a LoRA adapter on them never acts;
* ``tiny`` — config overrides giving a small same-family model for CPU liveness checks and tests;
* ``study_presets`` — the placements of the published study, where the family was in it;
* ``ablation_modules`` — where a component's output is not one module's output (ablation hooks).
* ``topology`` may also be ``by-layer``: sequential or parallel as the model's layers hold one or more mixers.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

COMPONENT_TYPES = (
    "softmax_attention",
    "linear_attention",
    "ssm",
    "short_conv",
    "mlp",
    "moe",
    "norm",
    "embedding",
    "lm_head",
    "other",
)
SEQUENCE_MIXERS = ("softmax_attention", "linear_attention", "ssm", "short_conv")
RECURRENT_MIXERS = ("linear_attention", "ssm", "short_conv")


@dataclass(frozen=True)
class Rule:
    """Classify modules whose path inside a layer fully matches ``pattern``.

    ``role`` may use the pattern's groups (``r"\\1"``). ``layer_kinds`` restricts the rule to layers whose
    declared kind is listed (needed where two mixers share a module name, e.g. Kimi's ``self_attn``).
    ``when`` restricts it to configs for which it returns True.
    """

    pattern: str
    component: str
    role: str
    layer_kinds: tuple[str, ...] | None = None
    when: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENT_TYPES:
            raise ValueError(f"unknown component type {self.component!r} in rule {self.pattern!r}")

    def match(self, path: str, layer_kind: str | None, config: Any) -> str | None:
        """Return the role if this rule classifies ``path``, else None."""
        if self.layer_kinds is not None and layer_kind not in self.layer_kinds:
            return None
        if self.when is not None and not self.when(config):
            return None
        m = re.fullmatch(self.pattern, path)
        return m.expand(self.role) if m else None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    topology: str
    rules: tuple[Rule, ...]
    schedule_attr: str | None = None
    bypassed: dict[str, str] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    study_presets: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    layers_path: str = "model.layers"
    # GPU fast path (hybridlora.fast): the kernels this family's mixers need, and how its LM head scales logits
    # for the chunked cross-entropy (None: unknown, so no chunked loss; 1.0: plain; a str: a decoder attribute).
    fast_kernels: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()  # or per config (the lab)
    logit_multiplier: float | str | None = None
    notes: str = ""
    # (path inside layer, layer index, config) -> reason when a module exists but is never called at that layer
    unused: Callable[[str, int, Any], str | None] | None = None
    # Ablation (hybridlora.ablation): component -> the module path(s) inside a decoder layer whose output is that
    # component's contribution, where it is not simply the common parent of the component's modules.
    ablation_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # for families whose classes transformers does not ship (the lab): makes the Auto classes know them
    register: Callable[[], None] | None = None

    def classify(self, path: str, layer_kind: str | None, config: Any) -> tuple[str, str] | None:
        for rule in self.rules:
            role = rule.match(path, layer_kind, config)
            if role is not None:
                return rule.component, role
        return None

    def bypass_reason(self, path: str, layer: int | None = None, config: Any = None) -> str | None:
        for pattern, reason in self.bypassed.items():
            if re.fullmatch(pattern, path):
                return reason
        if self.unused is not None and layer is not None:
            return self.unused(path, layer, config)
        return None

    def schedule(self, config: Any, num_layers: int) -> list[str] | None:
        if self.schedule_attr is None:
            return None
        kinds = getattr(config, self.schedule_attr, None)
        if kinds is None:
            return None
        kinds = [str(k) for k in kinds]
        return kinds[:num_layers]


# Shared rule fragments used by several families (module names that transformers uses in many models).
def attention_rules(prefix: str = "self_attn", layer_kinds: tuple[str, ...] | None = None) -> tuple[Rule, ...]:
    return (
        Rule(rf"{prefix}\.(q|k|v|o)_proj", "softmax_attention", r"\1", layer_kinds),
        Rule(rf"{prefix}", "softmax_attention", "params", layer_kinds),
    )


def dense_mlp_rules(prefix: str = "mlp") -> tuple[Rule, ...]:
    return (Rule(rf"{prefix}\.(gate|up|down)_proj", "mlp", r"\1"),)


def mamba2_rules(prefix: str = "mamba") -> tuple[Rule, ...]:
    return (
        Rule(rf"{prefix}\.in_proj", "ssm", "in"),
        Rule(rf"{prefix}\.out_proj", "ssm", "out"),
        Rule(rf"{prefix}\.conv1d", "ssm", "conv"),
        Rule(rf"{prefix}\.norm", "ssm", "norm"),
        Rule(rf"{prefix}", "ssm", "params"),
    )


# Why Mamba-2 out_proj is unusable for LoRA: the fused training kernel
# (mamba_ssm mamba_split_conv1d_scan_combined) takes out_proj.weight as a raw tensor.
MAMBA2_OUT_PROJ_BYPASS = (
    "kernel-bypassed: the fused Mamba-2 training kernel (mamba_split_conv1d_scan_combined) reads "
    "out_proj.weight directly, so a LoRA adapter here is skipped on the fast path"
)
CONV_BYPASS = "not a Linear: depthwise Conv1d whose weight the causal-conv1d kernels read directly"


_FAMILY_MODULES = (
    "qwen3_5",
    "qwen3_next",
    "falcon_h1",
    "jamba",
    "zamba2",
    "bamba",
    "granitemoehybrid",
    "nemotron_h",
    "lfm2",
    "olmo_hybrid",
    "kimi_linear",
    "transformer",
    "lab",
)


def _load_families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(f"{__name__}.{m}").FAMILY for m in _FAMILY_MODULES)


FAMILIES: tuple[Family, ...] = _load_families()
_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def family_for(model_type: str) -> Family | None:
    """The family entry covering ``model_type``, or None (→ the structural classifier)."""
    return _BY_MODEL_TYPE.get(model_type)


def ensure_registered(model_type: str) -> None:
    """Let transformers' Auto classes know ``model_type`` where a family brings its own classes (the lab)."""
    family = family_for(model_type or "")
    if family is not None and family.register is not None:
        family.register()


def family_named(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"no family named {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
