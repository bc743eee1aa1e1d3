"""OLMo hybrid: Gated DeltaNet layers and full-attention layers.

Trap: the Gated DeltaNet mixer (``linear_attn``) reuses the attention names q_proj/k_proj/v_proj/o_proj,
so a suffix selector like ``q_proj`` would hit both mixers. Rules here are anchored on the parent module.
"""
from . import Family, Rule, attention_rules, dense_mlp_rules

FAMILY = Family(
    name="olmo_hybrid",
    model_types=("olmo_hybrid",),
    topology="sequential",
    schedule_attr="layer_types",
    rules=attention_rules()
    + (
        Rule(r"linear_attn\.(q|k|v|o|a|b|g)_proj", "linear_attention", r"\1"),
        Rule(r"linear_attn\.conv1d", "linear_attention", "conv"),
        Rule(r"linear_attn\.(q|k|v)_conv1d", "linear_attention", r"\1_conv"),
        Rule(r"linear_attn\.o_norm", "linear_attention", "norm"),
        Rule(r"linear_attn", "linear_attention", "params"),
    )
    + dense_mlp_rules(),
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=32,
        max_position_embeddings=512,
    ),
)
