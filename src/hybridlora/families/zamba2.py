"""Zamba2: Mamba-2 backbone; hybrid layers also run a *shared* attention+MLP block whose output is projected by
a per-layer Linear before the layer's Mamba mixer. transformers gives each hybrid layer its own copy of the
block with the weights tied, so the map counts them once (``tied_to``) while LoRA adapters on them are per
layer (the frozen base weight stays shared)."""
import re

from . import CONV_BYPASS, MAMBA2_OUT_PROJ_BYPASS, Family, Rule, mamba2_rules

_SHARED = r"shared_transformer"


def _unused_adapter(path: str, layer: int, config) -> str | None:
    """Each copy of the shared block holds one adapter per hybrid layer but calls only the one for its own
    layer; the others exist (tied across copies) and are never run here."""
    m = re.search(r"adapter_list\.(\d+)\.", path)
    hybrid = list(getattr(config, "hybrid_layer_ids", []) or [])
    if not m or layer not in hybrid:
        return None
    serves = hybrid[int(m.group(1))] if int(m.group(1)) < len(hybrid) else None
    if serves == layer:
        return None
    return f"never called at layer {layer}: this adapter slot serves hybrid layer {serves}"

FAMILY = Family(
    name="zamba2",
    model_types=("zamba2",),
    topology="sequential",
    schedule_attr="layers_block_type",
    rules=(
        Rule(rf"{_SHARED}\.self_attn\.(q|k|v|o)_proj", "softmax_attention", r"\1"),
        Rule(rf"{_SHARED}\.self_attn\.linear_(q|k|v)_adapter_list\.\d+\.\d+", "softmax_attention", r"\1_adapter"),
        Rule(rf"{_SHARED}\.self_attn", "softmax_attention", "params"),
        Rule(rf"{_SHARED}\.feed_forward\.gate_up_proj", "mlp", "gate_up"),
        Rule(rf"{_SHARED}\.feed_forward\.down_proj", "mlp", "down"),
        Rule(rf"{_SHARED}\.feed_forward\.gate_up_proj_adapter_list\.\d+\.\d+", "mlp", "gate_up_adapter"),
        # Per-layer projection of the shared block's output into the residual stream.
        Rule(r"linear", "softmax_attention", "shared_out"),
    )
    + mamba2_rules(r"(?:mamba_decoder\.)?mamba"),
    bypassed={r"(?:mamba_decoder\.)?mamba\.out_proj": MAMBA2_OUT_PROJ_BYPASS,
              r"(?:mamba_decoder\.)?mamba\.conv1d": CONV_BYPASS},
    tiny=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], hybrid_layer_ids=[1, 3],
        num_attention_heads=4, num_key_value_heads=4, attention_head_dim=32, intermediate_size=128,
        attention_hidden_size=128, kv_channels=16, num_query_groups=4,  # derived keys transformers serialises
        mamba_d_state=16, mamba_headdim=16, n_mamba_heads=8, mamba_ngroups=1, chunk_size=16,
        num_mem_blocks=1, use_shared_attention_adapter=False, adapter_rank=8, max_position_embeddings=512,
    ),
    unused=_unused_adapter,
    # The shared block runs attention then its MLP in series (no residual inside), projected by `linear` into the
    # Mamba layer's input; the hooks sit on the shared block's attention and MLP as called at each hybrid layer.
    ablation_modules={"softmax_attention": (f"{_SHARED}.self_attn",), "mlp": (f"{_SHARED}.feed_forward",)},
    notes="The shared transformer block's weights are tied across hybrid layers (counted once); LoRA adapters "
    "on it are separate per layer.",
)
