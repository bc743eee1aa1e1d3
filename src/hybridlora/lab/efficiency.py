"""Efficiency profile of a lab architecture: training tokens/s, MFU and memory; prefill and decode throughput
and memory against sequence length.

Training: full-parameter steps of ``batch × seq_len`` random tokens in bf16 autocast (fp32 on CPU), AdamW
(fused on CUDA), the loss through hybridlora.fast's chunked cross-entropy, the fast kernels bound
(``fast.use("fast")``) and missing ones warned about. MFU counts 6 × parameters FLOPs per token (the issue's
convention: attention's quadratic term is left out, so long sequences read low) against ``peak_tflops``.
Inference runs a bf16 copy on CUDA. Prefill: one forward of ``[1, L]`` that fills the cache. Decode: greedy steps
after a prefill of ``L`` tokens through the project's static-cache decoding (graph-replayed on CUDA), the
marginal seconds of a step (tokens/s of the steps alone). Memory: the CUDA allocator's peak for each measurement.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

H200_BF16_TFLOPS = 790.0  # the ceiling for MFU (dense bf16, H200)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plain_training_step(model, *, batch: int, seq_len: int) -> tuple[Callable[[], None], str, list]:
    """(one full-parameter step of ``batch × seq_len`` random tokens, the precision, the bound kernels): bf16
    autocast on CUDA, the chunked cross-entropy, AdamW (fused on CUDA). Shared by the timing below and
    bench/profile_lab_step.py, which profiles the very same step."""
    from ..fast import causal_lm_loss_sum
    from ..train.loop import _autocast, bind_kernels

    device = next(model.parameters()).device
    kernels = bind_kernels(model)
    ctx, precision = _autocast(device, "auto")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    mask = torch.ones_like(ids)
    model.train()

    def step():
        with ctx:
            loss, n = causal_lm_loss_sum(model, ids, ids, attention_mask=mask)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, precision, kernels


def training_profile(model, *, batch: int, seq_len: int, steps: int = 10, warmup: int = 3,
                     peak_tflops: float = H200_BF16_TFLOPS) -> dict[str, Any]:
    device = next(model.parameters()).device
    step, precision, kernels = plain_training_step(model, batch=batch, seq_len=seq_len)
    params = sum(p.numel() for p in model.parameters())
    _reset_peak(device)
    seconds = _timed(step, device, steps, warmup)
    tokens_per_s = batch * seq_len / seconds
    return {"batch": batch, "seq_len": seq_len, "params": params, "precision": precision, "kernels": kernels,
            "step_s": seconds, "tokens_per_s": tokens_per_s,
            "mfu": 6 * params * tokens_per_s / (peak_tflops * 1e12), "peak_tflops": peak_tflops,
            "peak_mem_gib": _peak_gib(device)}


def trainer_profile(model, *, batch: int, seq_len: int, steps: int = 10, warmup: int = 3, compile: str = "off",
                    peak_tflops: float = H200_BF16_TFLOPS) -> dict[str, Any]:
    """The same measurement through the project's trainer (``train.loop.train`` with every weight training, as
    ``lab pretrain`` runs it): each step's ``batch`` examples of ``seq_len`` random tokens packed into one row,
    CUDA graphs on CUDA, optional ``torch.compile`` regions. Rates come from the trainer's own JSONL log; the
    first ``warmup`` steps (graph capture, compilation, autotuning) are left out."""
    import json
    import tempfile
    from pathlib import Path

    from ..data.formatting import TokenizedExample
    from ..train.loop import LOG_NAME, TrainConfig, train

    gen = torch.Generator().manual_seed(0)
    n = batch * (steps + warmup)
    ids = torch.randint(1, model.config.vocab_size, (n, seq_len), generator=gen).tolist()
    examples = [TokenizedExample(id=str(i), input_ids=row, labels=row) for i, row in enumerate(ids)]
    config = TrainConfig(epochs=1, micro_batch_size=batch, grad_accum=1, max_length=seq_len, learning_rate=1e-4,
                         warmup_ratio=0.0, save_every=0, norm_every=0, loss_on="full", progress=False,
                         lora_dropout=0.0, pack_tokens=batch * seq_len, compile=compile)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model, None, examples, Path(tmp), config, pad_id=0)
        log = [json.loads(line) for line in (Path(tmp) / LOG_NAME).read_text().splitlines()]
    start = next(r for r in log if r["event"] == "start")
    rates = sorted(r["tokens_per_s"] for r in log if r["event"] == "step" and r["step"] > warmup)
    tokens_per_s = rates[len(rates) // 2] if rates else float("nan")
    return {"batch": batch, "seq_len": seq_len, "params": params, "precision": start["precision"],
            "kernels": start["kernels"], "batching": start["batching"], "cuda_graphs": result.cuda_graphs,
            "compile": compile, "tokens_per_s": tokens_per_s,
            "mfu": 6 * params * tokens_per_s / (peak_tflops * 1e12), "peak_tflops": peak_tflops,
            "peak_mem_gib": _peak_gib(next(model.parameters()).device)}


@torch.no_grad()
def inference_profile(model, lengths: list[int], *, decode_tokens: int = 64, repeats: int = 3,
                      warmup: int = 1, on_row=None) -> list[dict[str, Any]]:
    """Prefill and greedy decode at each context length (batch 1) of the model as one serves it: a bf16 copy on
    CUDA (the model passed in, which may hold float32 training weights, is left alone), float32 on CPU. Decode
    runs the project's decoding (:func:`hybridlora.fast.decode.greedy_generate`: static cache, the step replayed
    as a CUDA graph on CUDA), timed as the marginal cost of a step between two calls of different lengths, so
    the prefill and the graph capture are not charged to the steps. A length that runs out of memory is
    recorded so. ``on_row(row)``, if given, is called as each length finishes (a caller under a time limit keeps
    the lengths measured so far)."""
    device = next(model.parameters()).device
    served = _served_copy(model, device)
    rows = []
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        try:
            rows.append({"length": length, **_prefill(served, ids, device, repeats, warmup),
                         **_decode(served, ids, device, decode_tokens)})
        except torch.OutOfMemoryError:
            rows.append({"length": length, "error": "out of memory"})
            torch.cuda.empty_cache()
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _served_copy(model, device: torch.device):
    import copy

    served = copy.deepcopy(model)
    if device.type == "cuda":
        served.to(torch.bfloat16)
    served.generation_config.eos_token_id = None  # random weights may pick the end token: decode every timed step
    return served.eval()


def _prefill(model, ids, device, repeats, warmup) -> dict[str, Any]:
    def run():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)

    _reset_peak(device)
    seconds = _timed(run, device, repeats, warmup)
    return {"prefill_s": seconds, "prefill_tokens_per_s": ids.shape[1] / seconds, "prefill_peak_mem_gib": _peak_gib(device)}


def _decode(model, ids, device, steps: int) -> dict[str, Any]:
    from ..fast.decode import time_decode_step

    _reset_peak(device)
    t = time_decode_step(model, ids, torch.ones_like(ids), steps, graphs=device.type == "cuda")
    return {"decode_tokens": steps, "decode_s_per_token": t["s_per_step"], "decode_tokens_per_s": 1.0 / t["s_per_step"],
            "decode_fixed_s": t["fixed_s"], "decode_timing": t["timing"], "decode_path": t["result"].graph,
            "decode_peak_mem_gib": _peak_gib(device)}
