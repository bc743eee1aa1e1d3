"""Jamba: Mamba-1 layers with an attention layer every ``attn_layer_period``; MoE on alternate layers."""
from . import CONV_BYPASS, Family, Rule, attention_rules, dense_mlp_rules

FAMILY = Family(
    name="jamba",
    model_types=("jamba",),
    topology="sequential",
    schedule_attr="layers_block_type",  # derived by transformers from attn_layer_period / attn_layer_offset
    rules=attention_rules()
    + (
        Rule(r"mamba\.(in|x|dt|out)_proj", "ssm", r"\1"),
        Rule(r"mamba\.conv1d", "ssm", "conv"),
        Rule(r"mamba\.(dt|b|c)_layernorm", "ssm", r"\1_norm"),
        Rule(r"mamba", "ssm", "params"),
        Rule(r"feed_forward\.router", "moe", "router"),
        Rule(r"feed_forward\.experts", "moe", "experts"),
    )
    + dense_mlp_rules("feed_forward"),
    bypassed={
        # JambaMambaMixer computes `self.dt_proj.weight @ time_step` instead of calling the module.
        r"mamba\.dt_proj": "kernel-bypassed: the mixer multiplies by dt_proj.weight without calling the module",
        r"mamba\.conv1d": CONV_BYPASS,
    },
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, max_position_embeddings=512,
    ),
)
