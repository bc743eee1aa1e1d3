"""Causal-LM loss without materialising the full logits tensor.

A 248k-token vocabulary makes ``[batch, seq, vocab]`` logits the largest activation of a small model
(4 × 1024 tokens: 2 GB in bf16 plus 4 GB as float32 for the loss, and as much again for their gradient).
:func:`causal_lm_loss_sum` runs the decoder, keeps only the positions that carry a label, and computes the
head and the cross-entropy in row chunks:

* frozen head (the usual case: LoRA not on ``lm_head``): a custom autograd function computes each chunk's
  loss and its gradient w.r.t. the hidden states in the same pass, so no chunk's logits survive the forward
  and the backward is a single stored tensor; on CUDA the chunk's softmax cross-entropy and its gradient are
  one Triton kernel (:mod:`hybridlora.fast.ce_kernel`), elsewhere torch ops;
* a plain trainable head (full-parameter training and the lab's pretraining: an ``nn.Linear`` without bias,
  tied or not): the same fused pass also accumulates the head weight's gradient, so the head is not run again
  in the backward and the softmax gradient is the Triton kernel's on CUDA;
* any other trainable head (LoRA on ``lm_head``, Falcon-H1 ``all_eligible``): each chunk calls the head module
  under activation checkpointing, so PEFT's LoRA path is used and its gradients flow.

The result equals ``cross_entropy(logits[:, :-1].float(), labels[:, 1:], reduction="sum")`` of the plain
forward (the logits are produced in the same dtype, then upcast).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .state import causal_lm as _causal_lm
from .state import use_ce_kernel as _use_ce_kernel

IGNORE = -100
CHUNK_ELEMENTS = 1 << 27  # logits elements per chunk (512 MB as float32)


def head_and_scale(model: nn.Module) -> tuple[nn.Module, nn.Module, float] | None:
    """(decoder, head module, logit multiplier) for the families whose head we know, else None."""
    lm = _causal_lm(model)
    from ..families import family_for

    family = family_for(getattr(getattr(lm, "config", None), "model_type", ""))
    decoder, head = getattr(lm, "model", None), getattr(lm, "lm_head", None)
    if decoder is None or head is None or family is None or family.logit_multiplier is None:
        return None
    scale = family.logit_multiplier
    return decoder, head, float(getattr(decoder, scale) if isinstance(scale, str) else scale)


class _HeadCE(torch.autograd.Function):
    """Sum of token cross-entropies of ``(h @ W.T) * scale``. The gradients w.r.t. h, and w.r.t. W when W is
    trained, are computed in the forward, chunk by chunk, so no chunk's logits outlive it and the head is not run
    again in the backward. Targets equal to ``IGNORE`` contribute neither loss nor gradient. Each chunk's product
    for W's gradient is taken in the compute dtype (bf16 under autocast, as the checkpointed path's backward
    matmul) and summed over chunks in W's own dtype (float32 master weights: the sum loses nothing to bf16)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, rows, dtype, grad_enabled):
        total = hidden.new_zeros((), dtype=torch.float32)
        # under no_grad (a validation loss) nothing is wanted, whatever requires grad: grad mode is always off in
        # here, so the caller says whether it was on
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        grad = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        w = weight.to(dtype)
        fused = hidden.is_cuda and _use_ce_kernel()
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(dtype)
            y = targets[start:start + rows]
            if fused:
                from .ce_kernel import cross_entropy_rows_

                d_logits = h @ w.T  # the logits, overwritten with their gradient by the kernel
                total += cross_entropy_rows_(d_logits, y, scale, IGNORE, want_h or want_w).sum()
            else:
                loss, d_logits = _chunk_ce(h @ w.T, y, scale, want_grad=want_h or want_w)
                total += loss
            if want_h or want_w:
                d_logits = d_logits.to(dtype)
            if want_h:
                grad[start:start + rows] = (d_logits @ w).to(hidden.dtype)
            if want_w:
                grad_w += d_logits.T @ h
        ctx.save_for_backward(grad, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad, grad_w = ctx.saved_tensors
        return (None if grad is None else grad * grad_output.to(grad.dtype),
                None if grad_w is None else grad_w * grad_output.to(grad_w.dtype), None, None, None, None, None)


def _chunk_ce(logits: torch.Tensor, y: torch.Tensor, scale: float, want_grad: bool):
    """(summed CE, d loss / d logits or None) of one chunk with torch ops (CPU, or the Triton kernel switched off);
    ignored rows count zero and get a zero gradient (static shapes: nothing is dropped)."""
    valid = y != IGNORE
    y = torch.where(valid, y, 0)
    logits = logits.float()
    if scale != 1.0:
        logits = logits * scale
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, y[:, None]).squeeze(1)) * valid).sum()
    if not want_grad:
        return loss, None
    probs = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
    probs[torch.arange(len(y), device=y.device), y] -= 1.0
    if scale != 1.0:
        probs.mul_(scale)
    return loss, probs.mul_(valid[:, None])


def _trainable_head_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, scale: float,
                       rows: int, recompute: bool = True) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if scale != 1.0:
            logits = logits * scale
        return nn.functional.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start:start + rows], targets[start:start + rows]
        # recompute=False (CUDA-graph capture): checkpointing would read the RNG state for LoRA dropout's replay
        total = total + (checkpoint(chunk_loss, h, y, use_reentrant=False) if recompute else chunk_loss(h, y))
    return total


def _head_loss(head: nn.Module, hidden: torch.Tensor, y: torch.Tensor, scale: float,
               recompute: bool = True) -> torch.Tensor:
    """Summed CE of ``head(hidden) * scale`` against ``y`` (``[N, H]``, ``[N]``; ``IGNORE`` allowed), in chunks."""
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    rows = max(64, CHUNK_ELEMENTS // vocab)
    # only a bare Linear is its weight: a LoRA-wrapped head (trained or loaded frozen) must run as a module, or
    # its adapter's delta would be dropped
    if type(head) is not nn.Linear or head.bias is not None:
        return _trainable_head_ce(head, hidden, y, scale, rows, recompute)
    weight = head.weight
    dtype = torch.get_autocast_dtype("cuda") if (hidden.is_cuda and torch.is_autocast_enabled("cuda")) else weight.dtype
    if hidden.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    return _HeadCE.apply(hidden, weight, y, scale, rows, dtype, torch.is_grad_enabled())


def causal_lm_loss_sum_static(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                              **model_kwargs: Any) -> torch.Tensor:
    """Sum of next-token losses with static shapes only (no host sync, for CUDA-graph capture): the head and the
    cross-entropy run over every position and ignored targets count zero, instead of gathering the labelled
    positions first. Same value as :func:`causal_lm_loss_sum` (more head work on prompt tokens)."""
    parts = head_and_scale(model)
    if parts is None:
        raise ValueError("the static-shape loss needs a model family with a known decoder and head")
    decoder, head, scale = parts
    model_kwargs.setdefault("use_cache", False)
    hidden = decoder(input_ids=input_ids, **model_kwargs).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return _head_loss(head, hidden, labels[:, 1:].reshape(-1), scale, recompute=False)


def causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, **model_kwargs: Any) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over labelled positions, number of them). ``model_kwargs`` go to the decoder
    (``position_ids``, ``cu_seq_lens_q`` ... for packed rows). Unknown families fall back to full logits."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    count = int(keep.sum())
    parts = head_and_scale(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum")
        return loss, count
    decoder, head, scale = parts
    model_kwargs.setdefault("use_cache", False)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state
    hidden = hidden[:, :-1][keep]
    return _head_loss(head, hidden, targets[keep], scale), count
