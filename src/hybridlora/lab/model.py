"""The lab model: a transformers PreTrainedConfig / PreTrainedModel pair built from transformers' own mixers.

Mixers are transformers' modules, unchanged (so hybridlora.fast binds its kernels into them as it does for the
real models): ``Qwen3_5Attention`` (gated softmax attention with q/k norms), ``Qwen3_5GatedDeltaNet``, the
Mamba-2 mixer of Falcon-H1 (``FalconH1Mixer``, with its µP multipliers at 1) and LFM2's ``Lfm2ShortConv``.
Norms (``Qwen3_5RMSNorm``), MLP (``Qwen3_5MLP``), embeddings, rotary embedding and init are shared by every
architecture. There is ONE decoder-layer class: a layer holds one mixer (sequential stack) or attention beside
one recurrent mixer (parallel), and the only difference is how the mixer outputs are wired into the residual:

* ``sum``: ``h + Σ_b mixer_b(norm(h))`` — with one mixer this is exactly the sequential layer;
* ``normalized``: ``h + W_fuse · Σ_b RMSNorm_b(mixer_b(norm(h)))`` (2510.04800: normalising each branch before
  fusing is what makes intra-layer hybrids train well).

Importing this module registers ``hybridlora_lab`` with AutoConfig / AutoModel / AutoModelForCausalLM.
Heavy transformers modeling modules are imported only when a model is built.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

MODEL_TYPE = "hybridlora_lab"
# mixer name -> the attribute holding it in a layer (transformers' own names, so the family rules read alike)
MIXER_ATTR = {"attention": "self_attn", "gdn": "linear_attn", "mamba2": "mamba", "short_conv": "conv"}


def require_cache_api() -> None:
    """The lab's models call transformers' mixers and masks with the names of transformers >= 5.24 (``cache``, not
    ``past_key_values``); an older transformers gets one clear line instead of a TypeError deep in a forward."""
    import inspect

    import transformers
    from transformers.masking_utils import create_causal_mask

    if "cache" not in inspect.signature(create_causal_mask).parameters:
        from ..models import ModelError

        raise ModelError(f"lab models need transformers >= 5.24 (found {transformers.__version__}); "
                         "pip install -U 'transformers>=5.24'")


class LabConfig(PreTrainedConfig):
    """Every size of a lab model. ``layer_mixers`` lists each layer's mixers (``[["gdn"], ["attention"], ...]``
    or ``[["attention", "gdn"], ...]`` for a parallel stack); the attribute names the mixers read are those of
    the transformers configs they come from (Qwen3.5, Falcon-H1, LFM2)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 192,
                 num_hidden_layers: int = 2, layer_mixers: list[list[str]] | None = None, fusion: str = "sum",
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 16,
                 linear_num_key_heads: int = 4, linear_num_value_heads: int = 4, linear_key_head_dim: int = 16,
                 linear_value_head_dim: int = 16, linear_conv_kernel_dim: int = 4,
                 mamba_n_heads: int = 8, mamba_d_head: int = 16, mamba_d_state: int = 16, mamba_n_groups: int = 1,
                 mamba_d_conv: int = 4, mamba_chunk_size: int = 64, conv_L_cache: int = 3,
                 hidden_act: str = "silu", rms_norm_eps: float = 1e-6, initializer_range: float = 0.02,
                 max_position_embeddings: int = 4096, rope_parameters: dict | None = None,
                 attention_bias: bool = False, attention_dropout: float = 0.0, tie_word_embeddings: bool = True,
                 spec: dict | None = None, pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, use_cache: bool = True, **kwargs: Any):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers = num_hidden_layers
        schedule = [list(m) for m in (layer_mixers or [["gdn"], ["attention"]])]  # default: a small hybrid
        # a schedule shorter or longer than the depth repeats / is cut (tiny same-family configs shrink depth)
        self.layer_mixers = [schedule[i % len(schedule)] for i in range(num_hidden_layers)]
        self.fusion = fusion
        self.num_attention_heads, self.num_key_value_heads, self.head_dim = num_attention_heads, num_key_value_heads, head_dim
        self.linear_num_key_heads, self.linear_num_value_heads = linear_num_key_heads, linear_num_value_heads
        self.linear_key_head_dim, self.linear_value_head_dim = linear_key_head_dim, linear_value_head_dim
        self.linear_conv_kernel_dim = linear_conv_kernel_dim
        self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state = mamba_n_heads, mamba_d_head, mamba_d_state
        self.mamba_n_groups, self.mamba_d_conv, self.mamba_chunk_size = mamba_n_groups, mamba_d_conv, mamba_chunk_size
        self.conv_L_cache = conv_L_cache
        self.hidden_act, self.rms_norm_eps, self.initializer_range = hidden_act, rms_norm_eps, initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias, self.attention_dropout = attention_bias, attention_dropout
        self.spec = spec or {}
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    # --- what the borrowed mixers and transformers' cache read ----------------------------------------
    @property
    def layer_types(self) -> list[str]:
        """Cache layer kinds: attention only -> full_attention, one recurrent mixer -> linear_attention,
        attention beside a recurrent mixer -> hybrid (KV cache and recurrent state in one cache layer)."""
        out = []
        for mixers in self.layer_mixers:
            if mixers == ["attention"]:
                out.append("full_attention")
            else:
                out.append("hybrid" if "attention" in mixers else "linear_attention")
        return out

    @property
    def mixer_schedule(self) -> list[str]:
        """Each layer's mixers as one word (``gdn``, ``attention``, ``attention+gdn``): the family schedule."""
        return ["+".join(m) for m in self.layer_mixers]

    # Falcon-H1 Mamba-2 mixer settings that the lab keeps fixed (no µP multipliers: plain Mamba-2)
    mamba_d_ssm = property(lambda self: self.mamba_n_heads * self.mamba_d_head)
    mamba_expand = 2
    mamba_proj_bias = False
    mamba_conv_bias = True
    mamba_rms_norm = True
    mamba_norm_before_gate = False
    projectors_bias = False
    time_step_limit = (0.0, float("inf"))
    ssm_in_multiplier = 1.0
    conv_bias = False  # LFM2 short conv


def _mixer(name: str, config: LabConfig, layer_idx: int) -> nn.Module:
    if name == "attention":
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention

        return Qwen3_5Attention(config, layer_idx)
    if name == "gdn":
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

        return Qwen3_5GatedDeltaNet(config, layer_idx)
    if name == "mamba2":
        from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer

        mixer = FalconH1Mixer(config, layer_idx)
        # Falcon-H1 scales the projections by a µP vector; all ones here (plain Mamba-2)
        mixer.register_buffer("mup_vector", torch.ones(1, 1, mixer.in_proj.out_features), persistent=False)
        return mixer
    if name == "short_conv":
        from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv

        return Lfm2ShortConv(config, layer_idx)
    raise ValueError(f"unknown mixer {name!r}")


def _rms_norm(config: LabConfig) -> nn.Module:
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    return Qwen3_5RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LabFusion(nn.Module):
    """``normalized`` fusion: RMS-normalise each branch, sum, project back to the residual width."""

    def __init__(self, config: LabConfig, mixers: list[str]):
        super().__init__()
        self.norms = nn.ModuleDict({m: _rms_norm(config) for m in mixers})
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(sum(self.norms[m](y) for m, y in outputs.items()))


class LabDecoderLayer(nn.Module):
    """The one decoder layer: pre-norm, the layer's mixers on the same normed input, fusion, residual, MLP."""

    def __init__(self, config: LabConfig, layer_idx: int):
        super().__init__()
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5MLP

        self.mixers = list(config.layer_mixers[layer_idx])
        self.input_layernorm = _rms_norm(config)
        for name in self.mixers:
            setattr(self, MIXER_ATTR[name], _mixer(name, config, layer_idx))
        self.fusion = LabFusion(config, self.mixers) if len(self.mixers) > 1 and config.fusion == "normalized" else None
        self.post_attention_layernorm = _rms_norm(config)
        self.mlp = Qwen3_5MLP(config, config.intermediate_size)
        # which branch outputs to zero (tests and ablations of a parallel layer); empty in normal use
        self.silenced: set[str] = set()

    def mixer_outputs(self, x: torch.Tensor, masks: dict[str, Any], position_embeddings, position_ids, cache,
                      **kwargs) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.mixers:
            module = getattr(self, MIXER_ATTR[name])
            if name == "attention":
                y, _ = module(hidden_states=x, position_embeddings=position_embeddings,
                              attention_mask=masks["full_attention"], position_ids=position_ids, cache=cache, **kwargs)
            else:
                y = module(hidden_states=x, cache=cache, attention_mask=masks["recurrent"], **kwargs)
            out[name] = torch.zeros_like(y) if name in self.silenced else y
        return out

    def forward(self, hidden_states: torch.Tensor, masks: dict[str, Any], position_embeddings=None,
                position_ids=None, cache=None, **kwargs) -> torch.Tensor:
        outputs = self.mixer_outputs(self.input_layernorm(hidden_states), masks, position_embeddings, position_ids,
                                     cache, **kwargs)
        mixed = self.fusion(outputs) if self.fusion is not None else sum(outputs.values())
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LabPreTrainedModel(PreTrainedModel):
    config_class = LabConfig
    config: LabConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LabDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' init for Linear/Embedding/norms, then each borrowed mixer's own parameter init
        from torch.nn import init as torch_init
        from transformers import initialization as init
        from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet, Qwen3_5RMSNorm

        super()._init_weights(module)
        if isinstance(module, Qwen3_5GatedDeltaNet):  # as Qwen3.5 does
            init.ones_(module.dt_bias)
            init.copy_(module.A_log, torch.empty(module.num_v_heads, device=module.A_log.device).uniform_(0.01, 16).log_())
        elif isinstance(module, FalconH1Mixer):  # as Falcon-H1 does
            init.ones_(module.dt_bias)
            init.copy_(module.A_log, torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            with torch.no_grad():
                torch_init.ones_(module.mup_vector)
        elif isinstance(module, Qwen3_5RMSNorm):  # zero-centred weight: (1 + w)
            init.zeros_(module.weight)


class LabModel(LabPreTrainedModel):
    def __init__(self, config: LabConfig):
        require_cache_api()
        super().__init__(config)
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LabDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _rms_norm(config)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        from transformers.cache_utils import DynamicCache
        from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

        legacy = kwargs.pop("past_key_values", None)  # older callers' name for the cache
        cache = cache if cache is not None else legacy
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        has_attention = any("attention" in m for m in self.config.layer_mixers)
        if position_ids is None:
            # only attention layers count cached tokens (a recurrent-only stack needs no positions)
            past = cache.get_seq_length() if cache is not None and has_attention else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           cache=cache, position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**mask_kwargs) if has_attention else None,
                 "recurrent": create_recurrent_attention_mask(**mask_kwargs)}
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, masks, position_embeddings, position_ids, cache, **kwargs)
            else:
                hidden_states = layer(hidden_states, masks, position_embeddings=position_embeddings,
                                      position_ids=position_ids, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class LabForCausalLM(LabPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LabConfig):
        super().__init__(config)
        self.model = LabModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        from ..fast.kernels import guard_cpu_path

        guard_cpu_path(self)  # on a GPU machine, a lab model on the CPU must not reach the borrowed mixers' Triton kernels

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def mixer_modules(self) -> set[str]:
        """The transformers modeling modules of this model's mixers and norms: where hybridlora.fast binds the
        kernels they call (the lab model's own module holds none)."""
        return {type(m).__module__ for layer in self.model.layers for m in layer.children()
                if type(m).__module__.startswith("transformers.models.")}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


def register() -> None:
    """Make transformers' Auto classes know the lab model (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, LabConfig)
    except ValueError:
        return  # already registered
    AutoModel.register(LabConfig, LabModel)
    AutoModelForCausalLM.register(LabConfig, LabForCausalLM)


register()
