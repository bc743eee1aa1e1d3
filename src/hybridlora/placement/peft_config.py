"""PEFT ``LoraConfig`` for a resolved placement: exact full module names, never suffixes."""
from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from pathlib import Path

from .resolve import ResolvedPlacement


def lora_config(resolved: ResolvedPlacement, *, dropout: float = 0.05, init_lora_weights: bool | str = True):
    from peft import LoraConfig

    hosts = resolved.hosts
    default_rank = Counter(h.rank for h in hosts).most_common(1)[0][0]
    default_alpha = Counter(h.alpha for h in hosts).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes anchored at a module-name boundary; escaping the full name
    # makes each key select exactly one module.
    rank_pattern = {re.escape(h.name): h.rank for h in hosts if h.rank != default_rank}
    alpha_pattern = {re.escape(h.name): h.alpha for h in hosts if h.alpha != default_alpha}
    return LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        lora_dropout=dropout,
        target_modules=[h.name for h in hosts],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=init_lora_weights,
    )


def save_adapter_config(resolved: ResolvedPlacement, directory: str | Path, base_model: str | None = None) -> Path:
    """Write PEFT's adapter_config.json (loadable by ``LoraConfig.from_pretrained``)."""
    config = lora_config(resolved)
    config.base_model_name_or_path = base_model
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    path = directory / "adapter_config.json"
    json.loads(path.read_text())  # written whole, readable
    return path


@contextlib.contextmanager
def exact_targets():
    """Stop PEFT rewriting our exact target names while it attaches or loads an adapter.

    PEFT (0.21) converts LoRA configs written for transformers v4 MoE models: on Qwen-MoE-style models
    (qwen3_next, qwen3_5_moe, ...) any target ending in ``.gate_proj``/``.up_proj``/``.down_proj``/``.gate`` is
    re-pointed at the fused expert parameters — including our *shared expert* and router names, which would move
    the adapter to modules the placement never chose. hybridlora's configs are always written for the model as
    built, so the conversion never applies; verification (``check_static``) would report the move otherwise.
    """
    from unittest import mock

    try:
        import peft.utils.transformers_weight_conversion as conversion
    except ImportError:  # older PEFT without the conversion: nothing to neutralise
        yield
        return
    with mock.patch.object(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None):
        yield
