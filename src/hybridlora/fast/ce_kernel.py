"""Cross-entropy of a logits chunk and its gradient in one Triton kernel, in place (CUDA only).

Why: with Qwen3.5's 248k vocabulary the frozen-head loss of ``fast.loss`` spent about 12 % of a packed 4096-token
step's GPU time on elementwise passes over each ``[rows, V]`` chunk (float copy, scale, max, subtract, exp, sum,
gather, softmax, one-hot subtract, scale, bf16 copy: fourth-session kernel table). This kernel reads the chunk
twice and writes it once: per row an online max / sum of exponentials, then the gradient
``scale · (softmax(scale · z) − onehot(y))`` written over the logits in their own dtype (the torch path rounds it
to the same dtype before the next matmul). Rows whose target is ``ignore_index`` get zero loss and zero gradient.
No host synchronisation and fixed launch parameters, so it runs inside the trainer's CUDA graphs.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows(logits_ptr, targets_ptr, loss_ptr, stride, vocab, scale, ignore_index,
                WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < vocab)
        cols = tl.arange(0, BLOCK)
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            mask = start + cols < vocab
            z = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale
            new_max = tl.maximum(running_max, z)
            # lanes still at -inf (nothing seen yet) keep a zero sum instead of exp(nan)
            running_sum = tl.where(new_max == float("-inf"), 0.0,
                                   running_sum * tl.exp(running_max - new_max) + tl.exp(z - new_max))
            running_max = new_max
        row_max = tl.max(running_max, 0)
        lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), 0))
        safe_target = tl.where(valid & in_range, target, 0)
        target_logit = tl.load(base + safe_target).to(tl.float32) * scale
        # a target outside the vocabulary (a data bug; torch's gather would raise) makes the loss NaN, never a
        # silent number or an out-of-bounds read
        row_loss = tl.where(in_range, lse - target_logit, float("nan"))
        tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0))
        if WANT_GRAD:
            keep = tl.where(valid, scale, 0.0)
            for start in range(0, vocab, BLOCK):
                idx = start + cols
                mask = idx < vocab
                z = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) * scale
                grad = (tl.exp(z - lse) - tl.where(idx == safe_target, 1.0, 0.0)) * keep
                tl.store(base + idx, grad.to(logits_ptr.dtype.element_ty), mask=mask)

    return ce_rows


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can run here (CUDA and an importable Triton); asked once per process."""
    if not torch.cuda.is_available():
        return False
    try:
        _kernel()
    except Exception:  # no Triton: the torch path of fast.loss runs
        return False
    return True


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int,
                        want_grad: bool) -> torch.Tensor:
    """Per-row losses ``[N]`` (float32) of ``logits`` ``[N, V]`` (scaled by ``scale``) against ``targets`` ``[N]``;
    with ``want_grad`` the logits are overwritten with d(sum of losses)/d(logits)."""
    if logits.dim() != 2 or logits.stride(1) != 1 or not logits.is_cuda:
        raise ValueError("cross_entropy_rows_ takes a CUDA [N, V] tensor with contiguous rows")
    rows, vocab = logits.shape
    if targets.shape != (rows,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer [{rows}], got {targets.dtype} {tuple(targets.shape)}")
    targets = targets.contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _kernel()[(rows,)](logits, targets, loss, logits.stride(0), vocab, float(scale), int(ignore_index),
                           WANT_GRAD=want_grad, BLOCK=4096, num_warps=8)
    return loss
