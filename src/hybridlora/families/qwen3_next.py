"""Qwen3-Next: Gated DeltaNet with fused qkvz / ba projections, full attention every fourth layer, MoE."""
from . import Family, Rule, attention_rules, dense_mlp_rules
from .qwen3_5 import QWEN_MOE_RULES

FAMILY = Family(
    name="qwen3_next",
    model_types=("qwen3_next",),
    topology="sequential",
    schedule_attr="layer_types",
    rules=attention_rules()
    + (
        Rule(r"linear_attn\.in_proj_(qkvz|ba)", "linear_attention", r"\1"),
        Rule(r"linear_attn\.out_proj", "linear_attention", "out"),
        Rule(r"linear_attn\.conv1d", "linear_attention", "conv"),
        Rule(r"linear_attn\.norm", "linear_attention", "norm"),
        Rule(r"linear_attn", "linear_attention", "params"),
    )
    + QWEN_MOE_RULES
    + dense_mlp_rules(),
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        max_position_embeddings=512,
    ),
)
