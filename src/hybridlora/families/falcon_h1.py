"""Falcon-H1: every layer runs attention and a Mamba-2 mixer in parallel on the same input and sums them."""
from . import CONV_BYPASS, MAMBA2_OUT_PROJ_BYPASS, Family, attention_rules, dense_mlp_rules, mamba2_rules

_QKV = ["q", "k", "v"]
_MLP = ["gate", "up", "down"]

FAMILY = Family(
    name="falcon_h1",
    model_types=("falcon_h1",),
    topology="parallel",
    schedule_attr="layers_block_type",
    rules=attention_rules() + mamba2_rules("mamba") + dense_mlp_rules("feed_forward"),
    bypassed={r"mamba\.out_proj": MAMBA2_OUT_PROJ_BYPASS, r"mamba\.conv1d": CONV_BYPASS},
    fast_kernels=("mamba_ssm.mamba_chunk_scan_combined", "mamba_ssm.selective_state_update", "fla.causal_conv1d"),
    logit_multiplier="lm_head_multiplier",
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
        mamba_d_conv=4, mamba_chunk_size=16, max_position_embeddings=512,
    ),
    # "Where Should LoRA Go?" conditions for Falcon-H1-0.5B. The study's attention placement adapts
    # q/k/v only, and all_eligible includes lm_head but never the kernel-bypassed Mamba out_proj/conv1d.
    study_presets={
        "all_eligible": {"softmax_attention": ["*"], "ssm": ["*"], "mlp": ["*"], "lm_head": ["*"]},
        "attention_only": {"softmax_attention": _QKV},
        "ssm_only": {"ssm": ["in"]},
        "mlp_only": {"mlp": _MLP},
        "attention_plus_mlp": {"softmax_attention": _QKV, "mlp": _MLP},
        "ssm_plus_mlp": {"ssm": ["in"], "mlp": _MLP},
    },
)
