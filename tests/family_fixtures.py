"""Tiny same-family models used across tests (random weights, CPU, built from transformers' defaults plus
each family's ``tiny`` overrides)."""
from __future__ import annotations

import functools

from hybridlora.components import build_component_map
from hybridlora.models import build_model, tiny_config_for

# Every family the foundation issue requires, by one model_type each (plus the MoE variant of Qwen3.5).
REQUIRED_MODEL_TYPES = (
    "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "falcon_h1", "jamba", "zamba2", "bamba",
    "granitemoehybrid", "nemotron_h", "lfm2", "olmo_hybrid", "llama", "qwen3",
)


@functools.lru_cache(maxsize=None)
def tiny_model(model_type: str):
    return build_model(tiny_config_for(model_type))


def tiny_map(model_type: str):
    return build_component_map(tiny_model(model_type))


def compact_map(cmap) -> dict[str, str]:
    """name -> 'component.role' ('!' marks modules that cannot host LoRA)."""
    return {m.name: f"{m.component}.{m.role}{'' if m.eligible else '!'}" for m in cmap.modules}
