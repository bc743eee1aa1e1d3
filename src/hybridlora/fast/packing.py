"""Padding-free packing with example boundaries every mixer respects.

:func:`pack` concatenates examples into one row (batch 1) and returns, beside ``input_ids`` and ``labels``:

* ``position_ids`` restarting at 0 for each example: transformers derives a block-diagonal causal mask for
  softmax attention from them (SDPA / eager) and rotary positions stay per example;
* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 ``[0, l1, l1+l2, ...]``) and ``max_length_q`` / ``max_length_k``:
  transformers forwards them to every layer; with :func:`hybridlora.fast.use` ``("fast")`` the Gated DeltaNet
  kernel gets them as ``cu_seqlens``, the Mamba-2 scan and the short convolutions as ``seq_idx``, so every
  recurrent state and convolution window starts from zero at each example.

The first label of every example is set to -100: after the causal shift it would be predicted from the
previous example's last token. With that, the summed loss equals that of the same examples right-padded.

Packing is only exact when every mixer honours the boundaries: :func:`packing_supported` says whether the
functions bound now do (transformers' own pure-PyTorch references ignore them; ``fast.use("fast")`` binds
packing-aware versions of them where no fast kernel runs).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE = -100


def pack(examples: Sequence[Any]) -> dict[str, Any]:
    """One packed row from examples with ``input_ids`` and ``labels`` (objects or dicts)."""
    ids, labels, positions, cu = [], [], [], [0]
    for ex in examples:
        x = ex["input_ids"] if isinstance(ex, dict) else ex.input_ids
        y = ex["labels"] if isinstance(ex, dict) else ex.labels
        if len(x) != len(y) or not x:
            raise ValueError("each example needs equally long, non-empty input_ids and labels")
        ids.extend(x)
        labels.extend([IGNORE, *y[1:]])
        positions.extend(range(len(x)))
        cu.append(cu[-1] + len(x))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    longest = int((cu_t[1:] - cu_t[:-1]).max())
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t.clone(),
        "max_length_q": longest, "max_length_k": longest,
    }


def pack_order(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group example indices, in order, into packs of at most ``max_tokens`` tokens (an example longer than
    ``max_tokens`` gets a pack of its own)."""
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def packing_supported(model: Any) -> tuple[bool, str]:
    """(True, "") when every mixer of ``model`` keeps the examples of a packed row apart with the functions bound
    now: after :func:`hybridlora.fast.use` ``("fast")`` — fast kernels on CUDA, packing-aware torch references
    where a kernel is missing or on CPU. Softmax attention is handled by :func:`hybridlora.fast.packed_attention`."""
    from . import kernels

    if not kernels.required_kernels(model):
        return False, "no packing-aware mixers known for this model family"
    if kernels.active_kernels()["mode"] == "reference":
        return False, "hybridlora.fast.use('reference') is in force: the study's kernels ignore example boundaries"
    if not kernels.boundary_aware(model):
        return False, "the mixer functions bound now ignore example boundaries (call hybridlora.fast.use('fast'))"
    return True, ""
