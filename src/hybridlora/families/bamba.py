"""Bamba: Mamba-2 layers with attention at ``attn_layer_indices``."""
from . import CONV_BYPASS, MAMBA2_OUT_PROJ_BYPASS, Family, attention_rules, dense_mlp_rules, mamba2_rules

FAMILY = Family(
    name="bamba",
    model_types=("bamba",),
    topology="sequential",
    schedule_attr="layers_block_type",  # derived by transformers from attn_layer_indices
    rules=attention_rules() + mamba2_rules("mamba") + dense_mlp_rules("feed_forward"),
    bypassed={r"mamba\.out_proj": MAMBA2_OUT_PROJ_BYPASS, r"mamba\.conv1d": CONV_BYPASS},
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, attn_layer_indices=[1],
        num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, max_position_embeddings=512,
    ),
)
