"""IBM Granite 4.0-H: Mamba-2 and attention layers, each followed by MoE experts plus an always-on shared MLP
(the only MLP when the checkpoint is dense, ``num_local_experts == 0``)."""
from . import CONV_BYPASS, MAMBA2_OUT_PROJ_BYPASS, Family, Rule, attention_rules, mamba2_rules


def _has_experts(config) -> bool:
    return bool(getattr(config, "num_local_experts", 0))


FAMILY = Family(
    name="granitemoehybrid",
    model_types=("granitemoehybrid",),
    topology="sequential",
    schedule_attr="layer_types",
    rules=attention_rules()
    + mamba2_rules("mamba")
    + (
        Rule(r"block_sparse_moe\.router", "moe", "router"),
        Rule(r"block_sparse_moe\.experts", "moe", "experts"),
        # input_linear holds gate and up fused; output_linear is the down projection.
        Rule(r"shared_mlp\.input_linear", "moe", "shared_gate_up", when=_has_experts),
        Rule(r"shared_mlp\.output_linear", "moe", "shared_down", when=_has_experts),
        Rule(r"shared_mlp\.input_linear", "mlp", "gate_up"),
        Rule(r"shared_mlp\.output_linear", "mlp", "down"),
    ),
    bypassed={r"mamba\.out_proj": MAMBA2_OUT_PROJ_BYPASS, r"mamba\.conv1d": CONV_BYPASS},
    # With experts the layer adds the routed experts and the always-on shared MLP: both are the MoE's output.
    ablation_modules={"moe": ("block_sparse_moe", "shared_mlp")},
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=32, shared_intermediate_size=64, num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"], layers_block_type=["mamba", "attention", "mamba"],
        num_local_experts=4, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, max_position_embeddings=512,
        position_embedding_type="rope",
    ),
)
