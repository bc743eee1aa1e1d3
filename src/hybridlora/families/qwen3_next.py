"""Qwen3-Next: Gated DeltaNet with fused qkvz / ba projections, full attention every fourth layer, MoE."""
from . import Family, Rule, attention_rules, dense_mlp_rules
from .qwen3_5 import QWEN_MOE_RULES, TINY_GDN_MOE

FAMILY = Family(
    name="qwen3_next",
    model_types=("qwen3_next",),
    topology="sequential",
    logit_multiplier=1.0,
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
    tiny=TINY_GDN_MOE,
)
