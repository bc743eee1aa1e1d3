"""From a spec to a config: choose the width (and trim the MLP) so the model meets the parameter target.

Parameters grow monotonically with the width, so a bisection over widths (multiples of 8) finds the widest
model not above the target. One width step moves a small model by several percent, so the MLP width (the one
size that is free in every architecture) is then set, in multiples of 8, to the value whose count is closest to
the target. Counts are exact: each candidate is built on the meta device and its parameters counted (tied
weights once).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .spec import ArchSpec, SpecError, heads_for

WIDTH_STEP = 8
MLP_STEP = 8
TOLERANCE = 0.01  # the bound on |achieved - target| / target


@dataclass
class Match:
    target: int
    achieved: int
    width: int
    intermediate_size: int

    @property
    def relative_error(self) -> float:
        return (self.achieved - self.target) / self.target if self.target else 0.0

    def line(self) -> str:
        if not self.target:
            return f"{self.achieved:,} parameters (no target; width {self.width}, MLP {self.intermediate_size})"
        return (f"{self.achieved:,} parameters for a target of {self.target:,} ({100 * self.relative_error:+.2f}%; "
                f"width {self.width}, MLP {self.intermediate_size})")


def vocab_size_of(spec: ArchSpec) -> int:
    if not spec.tokenizer:
        return spec.vocab_size
    return len(load_tokenizer(spec.tokenizer))


def load_tokenizer(path: str | Path):
    """A tokenizer directory (save_pretrained) or a tokenizers ``tokenizer.json``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.exists():
        raise SpecError(f"tokenizer {path} not found; give a tokenizer directory or tokenizer.json")
    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # a file that is no tokenizer: say which
        raise SpecError(f"tokenizer {path} could not be loaded ({type(exc).__name__}: {exc})") from None


def config_for(spec: ArchSpec, width: int, intermediate_size: int, vocab_size: int | None = None, **extra: Any):
    """The LabConfig of ``spec`` at this width and MLP size."""
    from .model import LabConfig

    heads = heads_for(spec, width)
    rec = heads["recurrent"]
    return LabConfig(
        vocab_size=vocab_size or spec.vocab_size, hidden_size=width, intermediate_size=intermediate_size,
        num_hidden_layers=spec.depth, layer_mixers=[list(m) for m in spec.layer_mixers()], fusion=spec.fusion,
        num_attention_heads=heads["attention"], num_key_value_heads=heads["kv"], head_dim=spec.head_dim,
        linear_num_key_heads=rec, linear_num_value_heads=rec, linear_key_head_dim=spec.head_dim,
        linear_value_head_dim=spec.head_dim, linear_conv_kernel_dim=spec.conv_kernel,
        mamba_n_heads=rec * spec.mamba_expand, mamba_d_head=spec.head_dim, mamba_d_state=spec.mamba_d_state,
        mamba_d_conv=spec.conv_kernel, mamba_chunk_size=spec.mamba_chunk_size, conv_L_cache=spec.conv_kernel - 1,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        initializer_range=spec.initializer_range, tie_word_embeddings=spec.tie_embeddings,
        spec=_spec_record(spec), **extra)


def _spec_record(spec: ArchSpec) -> dict[str, Any]:
    record = asdict(spec)
    record["mixers"] = list(spec.mixers)
    record["pattern"] = list(spec.pattern) if spec.pattern else None
    return record


def count_params(config) -> int:
    from .model import LabForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LabForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _mlp_for(spec: ArchSpec, width: int) -> int:
    return max(MLP_STEP, round(spec.mlp_ratio * width / MLP_STEP) * MLP_STEP)


def solve(spec: ArchSpec, **extra: Any):
    """(LabConfig, Match) for ``spec``; raises SpecError when the target cannot be met within 1%."""
    vocab = vocab_size_of(spec)
    if not spec.target_params:
        cfg = config_for(spec, spec.width, _mlp_for(spec, spec.width), vocab, **extra)
        n = count_params(cfg)
        return cfg, Match(0, n, spec.width, cfg.intermediate_size)
    size = lambda w, ff: count_params(config_for(spec, w, ff, vocab))  # noqa: E731
    lo, hi = 1, 2048  # in WIDTH_STEPs: widths 8 ... 16384
    if size(lo * WIDTH_STEP, _mlp_for(spec, lo * WIDTH_STEP)) > spec.target_params:
        raise SpecError(f"target_params {spec.target_params:,} is below the smallest model of this spec "
                        f"({size(WIDTH_STEP, MLP_STEP):,} at width {WIDTH_STEP}); raise it or lower depth/vocab_size")
    while lo < hi:  # widest width whose model (at the spec's MLP ratio) is not above the target
        mid = (lo + hi + 1) // 2
        if size(mid * WIDTH_STEP, _mlp_for(spec, mid * WIDTH_STEP)) <= spec.target_params:
            lo = mid
        else:
            hi = mid - 1
    width, ff = _best_width_and_mlp(spec, lo * WIDTH_STEP, vocab)
    cfg = config_for(spec, width, ff, vocab, **extra)
    match = Match(spec.target_params, count_params(cfg), width, ff)
    if abs(match.relative_error) > TOLERANCE:
        raise SpecError(f"{spec.name}: cannot meet target_params {spec.target_params:,} within 1% "
                        f"(best: {match.line()}); change target_params, depth or head_dim")
    return cfg, match


def _best_width_and_mlp(spec: ArchSpec, width: int, vocab: int) -> tuple[int, int]:
    """Around the bisection's width, the (width, MLP) pair closest to the target. MLP widths are multiples of
    MLP_STEP (kernel-friendly); only where no such pair is within the tolerance (tiny models, where one step is
    several percent) any MLP width is allowed."""
    best = None
    for step in (MLP_STEP, 1):
        for w in range(max(WIDTH_STEP, width - 2 * WIDTH_STEP), width + 2 * WIDTH_STEP, WIDTH_STEP):
            ff = _closest_mlp(spec, w, vocab, step)
            error = abs(count_params(config_for(spec, w, ff, vocab)) - spec.target_params) / spec.target_params
            if best is None or error < best[0]:
                best = (error, w, ff)
        if best[0] <= TOLERANCE:
            break
    return best[1], best[2]


def _closest_mlp(spec: ArchSpec, width: int, vocab: int, step: int) -> int:
    """MLP width (multiple of ``step``) whose model count is closest to the target: counts are linear in it."""
    a, b = step, 2 * step
    na = count_params(config_for(spec, width, a, vocab))
    per_step = count_params(config_for(spec, width, b, vocab)) - na
    steps = round((spec.target_params - na) / per_step)
    return max(step, a + steps * step)


def build(spec: ArchSpec, seed: int = 0, dtype: torch.dtype = torch.float32, **extra: Any):
    """(model on CPU in ``dtype``, Match): the spec's model, randomly initialised from ``seed``."""
    from .model import LabForCausalLM

    cfg, match = solve(spec, **extra)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LabForCausalLM(cfg).to(dtype)
    return model, match


def save_config(config, directory: str | Path) -> Path:
    """config.json of a lab model (for `inspect`/`plan` on the meta device) without weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    return directory / "config.json"
