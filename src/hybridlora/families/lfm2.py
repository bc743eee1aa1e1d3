"""Liquid LFM2: gated short-convolution layers and grouped-query attention layers."""
from . import CONV_BYPASS, Family, Rule

FAMILY = Family(
    name="lfm2",
    model_types=("lfm2",),
    topology="sequential",
    schedule_attr="layer_types",
    rules=(
        Rule(r"self_attn\.(q|k|v)_proj", "softmax_attention", r"\1"),
        Rule(r"self_attn\.out_proj", "softmax_attention", "o"),
        Rule(r"conv\.(in|out)_proj", "short_conv", r"\1"),
        Rule(r"conv\.conv", "short_conv", "conv"),
        Rule(r"feed_forward\.w1", "mlp", "gate"),
        Rule(r"feed_forward\.w3", "mlp", "up"),
        Rule(r"feed_forward\.w2", "mlp", "down"),
    ),
    bypassed={r"conv\.conv": CONV_BYPASS},
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        layer_types=["conv", "full_attention", "conv"], num_attention_heads=4, num_key_value_heads=2,
        block_auto_adjust_ff_dim=False, max_position_embeddings=512,
    ),
)
