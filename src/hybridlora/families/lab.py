"""hybridlora's own architecture-lab models (``hybridlora.lab``): transformers' mixers in one decoder layer.

Module names are those of the transformers modules the lab borrows (Qwen3.5 attention and Gated DeltaNet,
Falcon-H1's Mamba-2 mixer, LFM2's short convolution), so the rules are theirs; a parallel layer holds attention
beside one recurrent mixer, and its ``normalized`` fusion adds per-branch norms and one projection."""
from . import CONV_BYPASS, MAMBA2_OUT_PROJ_BYPASS, Family, Rule, attention_rules, dense_mlp_rules, mamba2_rules
from .qwen3_5 import GDN_RULES

SHORT_CONV_RULES = (
    Rule(r"conv\.(in|out)_proj", "short_conv", r"\1"),
    Rule(r"conv\.conv", "short_conv", "conv"),
)


def _register() -> None:
    # the lab's config/model classes are not in transformers: importing the module registers them
    import importlib

    importlib.import_module("hybridlora.lab.model")


# the kernels each borrowed mixer runs on the fast path (Qwen3.5's RMSNorm is every lab model's norm)
_MIXER_KERNELS = {
    "gdn": ("fla.chunk_gated_delta_rule", "fla.fused_recurrent_gated_delta_rule", "fla.causal_conv1d",
            "fla.rms_norm_gated"),
    "mamba2": ("mamba_ssm.mamba_chunk_scan_combined", "mamba_ssm.selective_state_update", "fla.causal_conv1d"),
}


def _kernels_for(config) -> tuple[str, ...]:
    mixers = {m for layer in getattr(config, "layer_mixers", []) for m in layer}
    needed = ["fla.rms_norm"] + [k for m in sorted(mixers) for k in _MIXER_KERNELS.get(m, ())]
    return tuple(dict.fromkeys(needed))


FAMILY = Family(
    name="lab",
    model_types=("hybridlora_lab",),
    # a lab model is sequential or parallel by its spec: the component map infers it from the layers' mixers
    topology="by-layer",
    schedule_attr="mixer_schedule",
    rules=attention_rules() + GDN_RULES + mamba2_rules("mamba") + SHORT_CONV_RULES + dense_mlp_rules()
    + (Rule(r"fusion\.proj", "other", "fuse"), Rule(r"fusion\.norms\.(\w+)", "norm", r"fuse_norm_\1")),
    bypassed={r"mamba\.out_proj": MAMBA2_OUT_PROJ_BYPASS, r"mamba\.conv1d": CONV_BYPASS,
              r"conv\.conv": CONV_BYPASS},
    # the depth stays the model's own: cutting it could drop the only attention layer of a sequential stack
    tiny=dict(vocab_size=256, hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
              mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16, max_position_embeddings=512),
    fast_kernels=lambda config: _kernels_for(config),
    logit_multiplier=1.0,
    register=_register,
    notes="hybridlora lab model: topology from its layers (a layer with two mixers is parallel)",
)
