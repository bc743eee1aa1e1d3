"""Plain decoder-only transformers (all softmax attention): the all-attention control."""
from . import Family, attention_rules, dense_mlp_rules

FAMILY = Family(
    name="transformer",
    model_types=("llama", "qwen3", "qwen2", "mistral"),
    topology="sequential",
    logit_multiplier=1.0,
    schedule_attr="layer_types",  # absent on llama: every layer is then full attention
    rules=attention_rules() + dense_mlp_rules(),
    tiny=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    ),
)
