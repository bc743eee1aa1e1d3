"""Greedy decoding on a static cache, with the decode step replayed as a CUDA graph (issue 6).

Why: at the study's batch sizes (GSM8K 256 prompts, HumanEval 164) one decode step of a 0.5–0.8B hybrid is a few
hundred small kernels whose launch costs more host time than their GPU time (third device session: 24 / 22 ms of
kernels against 44–46 / 63–78 ms of wall time per step). Replaying the step as one CUDA graph takes Python and
the launches out of the loop.

What makes the step capturable: transformers' ``StaticCache`` preallocates every layer's keys/values and mixer
states and updates them in place (its sequence length is a device tensor), the decode step's inputs live in
fixed buffers (token, position, a 2D mask as long as the cache), and the greedy pick, the end-of-sequence flag
and the output column are device ops in the same graph. The host looks at the tokens only every
``check_every`` steps, for stop strings and for "all rows done".

Semantics are those of transformers' greedy ``generate``: CPU tests compare the two token for token on every family
with a tiny config (float32), and on the H100 ``bench/bench_decode.py`` found identical tokens on every row of both
full-size models in bf16 with the fast kernels bound. (The static cache attends over its whole length with the
unwritten slots masked, so in bf16 a near-tie could in principle round the other way.) The first
token comes from the prefill, a row ends at an end-of-sequence token or at the step where the caller's
``stop_at`` says a stop string completed, later tokens of an ended row are ``pad_token_id``, and decoding
ends when every row has ended or after ``max_new_tokens`` tokens. Steps run between two host checks after a
row ended are overwritten with padding, so they change nothing but time.

Not used (the caller keeps transformers' ``generate``) when the model's generation config asks for logits
processors (repetition penalty, banned words, forced tokens …): :func:`unsupported_reason` says which.
If the capture fails, the batch is redone eagerly on the same static cache path and the reason is reported.
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .graphs import release_generator_after_failed_capture
from .state import static_decode_step


# Generation-config fields that make transformers' greedy search add a logits processor, with the value that
# adds none. Decoding here implements plain argmax only, so any other value keeps transformers' generate.
_NO_PROCESSOR = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "sequence_bias": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False), "watermarking_config": (None,),
    "force_words_ids": (None,), "constraints": (None,), "num_beams": (None, 1), "penalty_alpha": (None,),
    "guidance_scale": (None, 1.0),
}

# The oldest transformers whose StaticCache was checked against its generate for both hybrid families.
TESTED_TRANSFORMERS = "5.23.0"

# A row's end, as the host sees it: the index of its last generated token, or None while it runs.
StopAt = Callable[[list[int], int], "int | None"]


def unsupported_reason(model: Any) -> str | None:
    """Why greedy decoding here would not reproduce transformers' generate for ``model`` (None: it would)."""
    config = getattr(model, "generation_config", None)
    for name, neutral in _NO_PROCESSOR.items():
        value = getattr(config, name, None) if config is not None else None
        if value not in neutral and value != []:
            return f"generation config sets {name}={value!r} (a logits processor)"
    import transformers
    from packaging.version import Version

    from ..families import family_for
    from .kernels import _model_config

    model_type = getattr(_model_config(model), "model_type", None)
    family = family_for(model_type or "")
    if family is None or not family.tiny:
        # the static loop is checked against generate, token for token, on each family's tiny config
        # (tests/test_decode.py); a model without one keeps generate
        return f"static decoding is not verified for model_type {model_type!r} (no tiny config to check it on)"

    if Version(transformers.__version__) < Version(TESTED_TRANSFORMERS):
        # older static caches had no entry for hybrid layers (KV + mixer state): keep generate's own cache
        return f"transformers {transformers.__version__} < {TESTED_TRANSFORMERS} (static cache for hybrid layers)"
    return None


def eos_ids(model: Any) -> list[int]:
    """End-of-sequence ids as transformers' generate takes them: the generation config's, one or a list."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@dataclass
class GreedyResult:
    tokens: torch.Tensor  # [batch, length] generated ids after the prompt, pad after each row's end (CPU)
    steps: int  # decode steps run on the device (the prefill not counted)
    graph: str  # "replayed" | "eager" | "failed: <why>" — how the decode steps ran
    culprits: list[str] = field(default_factory=list)  # after a failed capture: where host values reach the step


def cache_argument(model: Any) -> str:
    """The forward's name for the cache: ``cache`` from transformers 5.24 (``past_key_values`` still works there but
    warns that it will go), ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's forward takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class _Batch:
    """The fixed buffers and the one step function of a batch; the step reads and writes only these."""

    def __init__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_token_id: int, eos: Sequence[int]) -> None:
        from transformers import StaticCache

        batch, width = input_ids.shape
        device = input_ids.device
        self.model, self.pad = model, int(pad_token_id)
        config = model.config
        self.cache = StaticCache(config=config, max_cache_len=width + max_new_tokens)
        # The decode mask covers the whole cache: prompt padding stays masked, every later slot is a real token
        # (slots not yet written are masked by causality from the cache's own position).
        self.mask = torch.ones((batch, width + max_new_tokens), dtype=torch.bool, device=device)
        self.mask[:, :width] = attention_mask.bool()
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask
        # transformers' position ids for left-padded rows: count real tokens, padding at 0.
        positions = attention_mask.long().cumsum(-1) - 1
        self.prompt_positions = positions.masked_fill(attention_mask == 0, 0)
        self.position = self.prompt_positions[:, -1:] + 1
        self.token = torch.full((batch, 1), self.pad, dtype=torch.long, device=device)
        self.out = torch.full((batch, max_new_tokens), self.pad, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(list(eos), dtype=torch.long, device=device)
        self.cache_arg = {cache_argument(model): self.cache}

    def _pick(self, logits: torch.Tensor) -> None:
        """Greedy token, padding for ended rows, end flag, output column: all on the device."""
        token = logits[:, -1].argmax(-1)
        token = torch.where(self.done, torch.full_like(token, self.pad), token)
        if self.eos.numel():
            self.done |= torch.isin(token, self.eos)
        self.out.index_copy_(1, self.column, token[:, None])
        self.column += 1
        self.token.copy_(token[:, None])

    def prefill(self) -> None:
        logits = self.model(input_ids=self.prompt_ids, attention_mask=self.prompt_mask,
                            position_ids=self.prompt_positions, use_cache=True, **self.cache_arg,
                            logits_to_keep=1).logits
        self._pick(logits)

    def step(self) -> None:
        with static_decode_step():
            logits = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                                use_cache=True, **self.cache_arg).logits
        self._pick(logits)
        self.position += 1


class _Replayer:
    """Runs decode steps: two eager warm-up steps on a side stream (Triton autotuning, cuBLAS workspaces), then a
    capture (records, runs nothing), then replays. Eager throughout off CUDA or when ``graphs`` is False."""

    def __init__(self, batch: _Batch, graphs: bool) -> None:
        self.batch = batch
        self.graphs = graphs and batch.out.is_cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.state = "eager"  # "replayed" once a capture took place (a batch of <= 2 decode steps never captures)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.graphs or self.eager_steps < 2:
            self._eager()
            return
        self._capture()
        self.graph.replay()

    def _eager(self) -> None:
        if self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.batch.step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            self.batch.step()
        self.eager_steps += 1

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.batch.step()
        self.graph = graph
        self.state = "replayed"


@torch.inference_mode()
def greedy_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                    pad_token_id: int, stop_at: StopAt | None = None, check_every: int = 16,
                    graphs: bool = True) -> GreedyResult:
    """Greedy completions of one left-padded batch (see the module docstring for the exact semantics).

    ``stop_at(tokens, first)``: given a row's generated tokens so far, the first index ≥ ``first`` at which a
    stop string has completed, else None. ``graphs``: replay the decode step as a CUDA graph (CUDA only).
    """
    if not (graphs and input_ids.is_cuda):
        return _generate(model, input_ids, attention_mask, max_new_tokens, pad_token_id, stop_at, check_every, False)
    stream = torch.cuda.current_stream()
    try:
        return _generate(model, input_ids, attention_mask, max_new_tokens, pad_token_id, stop_at, check_every, True)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a failed capture is reported and the batch redone eagerly
        causes = [error] + ([error.__context__] if error.__context__ is not None else [])
        reason = "; ".join(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}" for e in causes)[:400]
        del causes  # the exceptions' tracebacks hold the failed attempt's frames
    # outside the except block: the failed attempt's frames (cache, buffers, graph pool) are released first
    torch.cuda.set_stream(stream)  # a capture that fails at its end leaves its own stream current
    release_generator_after_failed_capture(input_ids.device)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    culprits = _diagnose(model, input_ids, attention_mask, max_new_tokens, pad_token_id)
    result = _generate(model, input_ids, attention_mask, max_new_tokens, pad_token_id, stop_at, check_every, False)
    result.graph = f"failed: {reason}" + (f" [host tensors or host reads at: {'; '.join(culprits[:3])}]"
                                          if culprits else "")
    result.culprits = culprits
    warnings.warn(f"hybridlora: the decode step could not be captured as a CUDA graph ({result.graph[8:]}); "
                  "this batch was decoded again without graphs (correct, but host-bound and slower)",
                  RuntimeWarning, stacklevel=2)
    return result


def time_decode_step(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, new: int, *,
                     graphs: bool = True, pad_token_id: int = 0) -> dict[str, Any]:
    """Seconds per decode step of :func:`greedy_generate` on this batch, apart from what each call costs once
    (prefill, static cache, graph capture). An untimed call at each timed length first: a shape not seen
    before autotunes its kernels in its first call, which would land in a timed call and make steps look free
    or dear. Then calls of ``new // 4`` and ``new`` tokens: the step is their difference per step *decoded* (a
    batch whose rows all end early runs fewer steps than asked: dividing by the steps asked for would make steps
    look cheap), or, where that is below the timing's noise, the longer call's average, said so in ``timing``.
    A timing meant to decode every step should clear the model's end-of-sequence ids first. Returns ``s_per_step``, ``fixed_s``,
    ``timing``, ``steps`` (decoded in the short and the long call) and ``result`` (the longer call's
    :class:`GreedyResult`)."""
    import time

    if new < 3:
        raise ValueError("time_decode_step: give at least 3 new tokens (two timed calls of different lengths)")

    def timed(steps: int):
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = greedy_generate(model, input_ids, attention_mask, max_new_tokens=steps, pad_token_id=pad_token_id,
                                 graphs=graphs)
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    # warm-up calls at both timed lengths: each length is its own cache shape, whose first call pays one-time
    # costs (attention plans, autotuning) that would otherwise land in one timed call and skew the difference
    # (bench_decode.py's 4.24 ms for Qwen3.5's step on the H200 came from such a call; the step is 10-11 ms)
    timed(max(2, new // 4))
    timed(new)
    t_short, short = timed(max(2, new // 4))
    t_long, result = timed(new)
    # `steps` counts device steps after the prefill, which yields the first token: a call of n tokens runs n - 1
    n_short, n_long = short.steps, result.steps
    ended = "" if (n_short, n_long) == (max(2, new // 4) - 1, new - 1) else \
        f"; the rows ended early: {n_short} and {n_long} steps decoded"
    if t_long > t_short and n_long > n_short:
        step = (t_long - t_short) / (n_long - n_short)
        timing = f"marginal step ({n_short + 1} vs {n_long + 1} tokens{ended})"
    else:  # the extra steps cost less than the timing's noise (a tiny model, few tokens), or none were run
        step = t_long / max(1, n_long + 1)
        timing = f"whole call (the marginal step was below the timing noise{ended})"
    return {"s_per_step": step, "fixed_s": max(0.0, t_long - n_long * step), "timing": timing,
            "steps": (n_short, n_long), "result": result}


def _diagnose(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              pad_token_id: int) -> list[str]:
    """Where host values reach the decode step (after a failed capture): one step of a throwaway batch under
    :func:`hybridlora.fast.graphs.host_syncs`, so that a step the diagnosis interrupts corrupts nothing."""
    from .graphs import host_syncs

    scratch = _Batch(model, input_ids, attention_mask, max(2, max_new_tokens), pad_token_id, eos_ids(model))
    scratch.prefill()
    culprits = host_syncs(scratch.step)
    del scratch
    torch.cuda.empty_cache()
    return culprits


def _generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              pad_token_id: int, stop_at: StopAt | None, check_every: int, graphs: bool) -> GreedyResult:
    eos = set(eos_ids(model))
    batch = _Batch(model, input_ids, attention_mask, max_new_tokens, pad_token_id, sorted(eos))
    runner = _Replayer(batch, graphs)
    ends: list[int | None] = [None] * input_ids.shape[0]
    rows: list[list[int]] = [[] for _ in ends]  # the generated tokens, copied to the host column block by block
    generated, checked, steps = 1, 0, 0
    batch.prefill()
    while True:
        checked = _check(batch, rows, ends, generated, checked, eos, stop_at)
        if generated >= max_new_tokens or all(end is not None for end in ends):
            break
        for _ in range(min(check_every, max_new_tokens - generated)):
            runner.step()
            steps += 1
            generated += 1
    length = generated if any(end is None for end in ends) else max(ends) + 1
    tokens = batch.out[:, :length].cpu()
    for row, end in enumerate(ends):
        if end is not None and eos:  # transformers pads ended rows only when it has an end-of-sequence id
            tokens[row, end + 1:] = batch.pad
    return GreedyResult(tokens=tokens, steps=steps, graph=runner.state)


def _check(batch: _Batch, rows: list[list[int]], ends: list[int | None], generated: int, checked: int,
           eos: set[int], stop_at: StopAt | None) -> int:
    """Copies tokens ``checked..generated-1`` to the host rows and finds the rows that ended among them; marks
    those done on the device so that their later tokens are padding. Returns the new ``checked``."""
    for row, block in zip(rows, batch.out[:, checked:generated].tolist()):
        row.extend(block)
    newly = []
    for row, tokens in enumerate(rows):
        if ends[row] is not None:
            continue
        end = next((t for t in range(checked, generated) if tokens[t] in eos), None)
        if stop_at is not None:
            stop = stop_at(tokens[: end + 1] if end is not None else tokens, checked)
            end = stop if stop is not None and (end is None or stop < end) else end
        if end is not None:
            ends[row] = end
            newly.append(row)
    if newly and eos:
        batch.done[torch.tensor(newly, device=batch.done.device)] = True
    return generated
