"""Softmax attention over packed rows: one varlen call instead of a block-diagonal mask.

transformers' SDPA path handles a packed row (``position_ids`` restarting per example) by building a dense
``[1, 1, L, L]`` block-diagonal mask, which makes attention quadratic in the *row* length and needs a host
sync to detect the packing. :data:`PACKED` is an attention implementation registered with transformers'
``AttentionInterface`` that instead reads the ``cu_seq_lens_q`` / ``max_length_q`` boundaries transformers
forwards to every layer:

* on CUDA it calls PyTorch's flash-attention varlen kernel (``torch.nn.attention.varlen``), causal, with
  grouped key/value heads as they are;
* elsewhere (CPU, or float32 rows outside autocast: the flash kernel takes half precision only) it runs causal
  SDPA on each example separately — the exact reference. Under CUDA autocast the inputs are first cast to the
  autocast dtype, as SDPA would cast them, so float32 queries from float32 norms still reach the flash kernel.

The implementation name is only in force inside :func:`packed_attention` (a context manager), because it
ignores ``attention_mask``: right-padded batches must keep using SDPA with their mask. Zero-length segments
(``cu_seq_lens_q`` padded by repeating its last value, as the CUDA-graph path does) are allowed.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
import torch.nn.functional as F

PACKED = "hybridlora_packed"


def _varlen_kernel():
    try:
        from torch.nn.attention import varlen
    except Exception:
        return None
    return getattr(varlen, "varlen_attn", None)


@torch.compiler.disable  # the flash varlen kernel is one opaque call; compiling around it is all there is to do
def _causal_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                   scaling: float | None) -> torch.Tensor:
    """``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` -> ``[T, Hq, D]`` with PyTorch's flash varlen kernel."""
    fn = _varlen_kernel()
    params = inspect.signature(fn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1] and "enable_gqa" in params:
        causal["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # older torch: flash varlen takes fewer kv heads natively, but be safe
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal)


def _causal_per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                        scaling: float | None) -> torch.Tensor:
    """Exact reference: causal SDPA on each example of the row separately (host loop; for CPU and tests)."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives attention on ``device_type`` right now, None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _as_autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """On CUDA under autocast, the inputs in the autocast dtype — what SDPA does with them there (it is on
    autocast's lower-precision list). Why: a model trained with float32 master weights (the lab's full-parameter
    pretraining) hands attention a float32 query and key (its q/k norms compute in float32) beside a bf16 value;
    left as they are, the flash kernel (half precision only) is skipped for the per-example host loop, which is
    slow and cannot be captured in a CUDA graph."""
    dtype = autocast_dtype("cuda") if q.is_cuda else None
    if dtype is None:
        return q, k, v
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: ``query`` ``[1, Hq, T, D]``, ``key``/``value``
    ``[1, Hkv, T, D]``; returns ``([1, T, Hq, D], None)``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise RuntimeError(f"attention implementation {PACKED!r} needs packed rows (cu_seq_lens_q); it is only meant "
                           "to be active inside hybridlora.fast.packed_attention()")
    if query.shape[0] != 1:
        raise RuntimeError(f"{PACKED!r} expects one packed row per forward, got batch {query.shape[0]}")
    if dropout:
        raise RuntimeError(f"{PACKED!r} has no attention dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    q, k, v = _as_autocast(q, k, v)
    cu = cu.to(device=q.device, dtype=torch.int32)
    if q.is_cuda and _varlen_kernel() is not None and q.dtype in (torch.bfloat16, torch.float16):
        max_len = kwargs.get("max_length_q") or q.shape[0]
        out = _causal_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_len), scaling)
    else:
        out = _causal_per_segment(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def register() -> str:
    """Register :data:`PACKED` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, packed_attention_forward)
    return PACKED


def kernel_name(device: torch.device | str) -> str:
    """What :func:`packed_attention_forward` runs on ``device``, for run logs."""
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and _varlen_kernel() is not None:
        return "torch varlen flash attention"
    return "per-example SDPA (reference)" + ("" if not on_cuda else ": torch has no nn.attention.varlen, slow")


def _configs(model: torch.nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every softmax-attention layer of ``model`` uses :data:`PACKED`; restored afterwards."""
    register()
    configs = _configs(model)
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c in configs:
            c._attn_implementation = PACKED
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
