"""NVIDIA Nemotron-H: every block holds exactly one ``mixer`` — Mamba-2, attention, MLP or MoE — as declared
by the block pattern (``hybrid_override_pattern`` in checkpoints, ``layers_block_type`` in transformers)."""
from . import CONV_BYPASS, MAMBA2_OUT_PROJ_BYPASS, Family, Rule, mamba2_rules

_ATTN = ("attention", "full_attention", "*")
_SSM = ("mamba", "linear_attention", "M")
_MLP = ("mlp", "-")
_MOE = ("moe", "E")

FAMILY = Family(
    name="nemotron_h",
    model_types=("nemotron_h",),
    topology="sequential",
    schedule_attr="layers_block_type",
    layers_path="model.layers",
    rules=(
        Rule(r"mixer\.(q|k|v|o)_proj", "softmax_attention", r"\1", _ATTN),
        Rule(r"mixer", "softmax_attention", "params", _ATTN),
        Rule(r"mixer\.(up|down)_proj", "mlp", r"\1", _MLP),
        Rule(r"mixer\.shared_experts\.(up|down)_proj", "moe", r"shared_\1", _MOE),
        Rule(r"mixer\.gate", "moe", "router", _MOE),
        Rule(r"mixer\.experts", "moe", "experts", _MOE),
        Rule(r"mixer\.fc(1|2)_latent_proj", "moe", r"latent_\1", _MOE),
        Rule(r"mixer", "moe", "params", _MOE),
    )
    + tuple(Rule(r.pattern, r.component, r.role, _SSM) for r in mamba2_rules("mixer")),
    bypassed={r"mixer\.out_proj": MAMBA2_OUT_PROJ_BYPASS, r"mixer\.conv1d": CONV_BYPASS},
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        layers_block_type=["mamba", "moe", "attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, max_position_embeddings=512,
    ),
)
