"""Kimi Linear: KDA (delta-rule linear attention) and MLA softmax attention layers.

Trap: both mixers live under ``self_attn``; only the declared layer kind tells them apart.
"""
from . import Family, Rule, dense_mlp_rules

_LIN = ("linear_attention",)
_FULL = ("full_attention",)

FAMILY = Family(
    name="kimi_linear",
    model_types=("kimi_linear",),
    topology="sequential",
    schedule_attr="layer_types",
    rules=(
        Rule(r"self_attn\.(q|k|v|o|b)_proj", "linear_attention", r"\1", _LIN),
        Rule(r"self_attn\.(g_a|g_b)_proj", "linear_attention", r"\1", _LIN),
        Rule(r"self_attn\.forget_gate\.(f_a|f_b)_proj", "linear_attention", r"\1", _LIN),
        Rule(r"self_attn\.forget_gate", "linear_attention", "params", _LIN),
        Rule(r"self_attn\.(q|k|v)?_?conv1d", "linear_attention", "conv", _LIN),
        Rule(r"self_attn\.o_norm", "linear_attention", "norm", _LIN),
        Rule(r"self_attn", "linear_attention", "params", _LIN),
        Rule(r"self_attn\.(q|q_a|q_b|o|kv_b)_proj", "softmax_attention", r"\1", _FULL),
        Rule(r"self_attn\.kv_a_proj_with_mqa", "softmax_attention", "kv_a", _FULL),
        Rule(r"self_attn", "softmax_attention", "params", _FULL),
        Rule(r"mlp\.shared_experts\.(gate|up|down)_proj", "moe", r"shared_\1"),
        Rule(r"mlp\.gate", "moe", "router"),
        Rule(r"mlp\.experts", "moe", "experts"),
    )
    + dense_mlp_rules(),
)
