"""Qwen3.5 (dense and MoE): Gated DeltaNet layers with a full-attention layer every fourth layer."""
from . import Family, Rule, attention_rules, dense_mlp_rules

# Qwen3.5 Gated DeltaNet projections: fused q/k/v, the output gate z, and the per-head a (decay) and
# b (beta) projections; out_proj maps back to the residual stream.
GDN_RULES = (
    Rule(r"linear_attn\.in_proj_(qkv|z|a|b)", "linear_attention", r"\1"),
    Rule(r"linear_attn\.out_proj", "linear_attention", "out"),
    Rule(r"linear_attn\.conv1d", "linear_attention", "conv"),
    Rule(r"linear_attn\.norm", "linear_attention", "norm"),
    Rule(r"linear_attn", "linear_attention", "params"),
)
# Sparse MoE block shared by Qwen3.5-MoE and Qwen3-Next: a router, fused experts and one shared expert
# with its own scalar gate.
QWEN_MOE_RULES = (
    Rule(r"mlp\.shared_expert\.(gate|up|down)_proj", "moe", r"shared_\1"),
    Rule(r"mlp\.shared_expert_gate", "moe", "shared_expert_gate"),
    Rule(r"mlp\.gate", "moe", "router"),
    Rule(r"mlp\.experts", "moe", "experts"),
)

# Small config shared by the Qwen GDN families (dense and MoE keys: each config class reads its own).
TINY_GDN_MOE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    max_position_embeddings=512,
)

_ATTN = ["q", "k", "v", "o"]
_GDN = ["qkv", "z", "a", "b", "out"]
_MLP = ["gate", "up", "down"]

FAMILY = Family(
    name="qwen3_5",
    model_types=("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"),
    topology="sequential",
    schedule_attr="layer_types",
    rules=attention_rules() + GDN_RULES + QWEN_MOE_RULES + dense_mlp_rules(),
    tiny=TINY_GDN_MOE,
    fast_kernels=("fla.chunk_gated_delta_rule", "fla.fused_recurrent_gated_delta_rule", "fla.causal_conv1d",
                  "fla.rms_norm", "fla.rms_norm_gated"),
    logit_multiplier=1.0,
    # "Where Should LoRA Go?" conditions for Qwen3.5-0.8B, named as the study named them.
    study_presets={
        "all_layers": {"softmax_attention": _ATTN, "linear_attention": _GDN, "mlp": _MLP},
        "softmax_only": {"softmax_attention": _ATTN},
        "gdn_only": {"linear_attention": _GDN},
        "mlp_only": {"mlp": _MLP},
        "softmax_plus_mlp": {"softmax_attention": _ATTN, "mlp": _MLP},
        "gdn_plus_mlp": {"linear_attention": _GDN, "mlp": _MLP},
    },
)
