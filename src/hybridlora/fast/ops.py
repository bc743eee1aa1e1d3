"""Adapters with the signatures of transformers' pure-PyTorch kernels, backed by the fast kernels.

Each adapter takes exactly what transformers' modeling code passes to the function it replaces (extra keyword
arguments such as ``cu_seq_lens_q`` or ``seq_idx`` arrive through ``**kwargs``) and returns what that function
returns, so a model runs unchanged. Packing metadata: a packed row (batch 1) carries ``cu_seq_lens_q`` (the
flash-attention convention transformers forwards to every layer); the adapters turn it into the boundaries
each kernel understands (``cu_seqlens`` for fla, ``seq_idx`` for mamba-ssm and the convolution), so every
mixer's state starts from zero at each example.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from .state import STATE


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """``[1, length]`` int32 segment index (0, 0, ..., 1, 1, ...) from cumulative lengths ``[0, l1, l1+l2, ...]``."""
    cu = cu_seqlens.to(torch.long).flatten()
    positions = torch.arange(length, device=cu.device)
    return torch.searchsorted(cu[1:-1].contiguous(), positions, right=True).to(torch.int32)[None]


def _segments(kwargs: dict[str, Any], length: int) -> torch.Tensor | None:
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is not None:
        return seq_idx
    cu = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens"))
    return seq_idx_from_cu_seqlens(cu, length) if cu is not None else None


def _activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if name is None:
        return None
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def causal_conv1d(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, **kwargs: Any) -> torch.Tensor:
    """Depthwise causal convolution, ``hidden_states`` ``[B, D, T]``, ``weight`` ``[D, W]``.

    The whole row goes through the same cuDNN ``conv1d`` as transformers' fallback. With packing metadata
    (``cu_seq_lens_q``, one packed row) the taps that reach into the previous example are then subtracted
    again, at the first W-1 positions of each example only:
    ``out[t] = bias + Σ_j w[W-1-j] · x[t-j] · [seg(t-j) = seg(t)]``. Everything has static shapes (no host
    sync), so the packed path can run inside a CUDA graph.
    """
    _, dim, length = hidden_states.shape
    width = weight.shape[-1]
    x = hidden_states.to(weight.dtype)
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :length]
    cu = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens"))
    if cu is not None and width > 1:
        out = _drop_cross_example_taps(out, x, weight, cu.to(x.device))
    elif kwargs.get("seq_idx") is not None:  # per-position example index: mask every tap (slower, exact)
        seg = kwargs["seq_idx"].to(x.device)
        out = x * weight[:, width - 1, None]
        for j in range(1, width):
            shifted = F.pad(x, (j, 0))[..., :length]
            same = F.pad(seg, (j, 0), value=-1)[..., :length] == seg  # [B, T]
            out = out + shifted * weight[:, width - 1 - j, None] * same[:, None, :].to(x.dtype)
        if bias is not None:
            out = out + bias[:, None]
    act = _activation(activation)
    if act is not None:
        out = act(out)
    return out.to(hidden_states.dtype)


def make_conv(conv_fn: Callable, *, cpu: bool = False, fwd_bwd: tuple[Callable, Callable] | None = None) -> Callable:
    """:func:`causal_conv1d` on fla's channel-last Triton kernel (``fla.modules.causal_conv1d``), for CUDA.

    transformers hands the convolution ``in_proj(x).transpose(1, 2)``: a ``[B, D, T]`` view of a ``[B, T, D]``
    tensor. PyTorch's depthwise ``conv1d`` wants channels first, so that view was copied to ``[B, D, T]`` and the
    result copied back — four transposing copies of the whole activation per layer and step, forward and backward
    (~7 % of a packed Qwen3.5 step's GPU time at 4096 tokens, fourth-session kernel table). fla's kernel reads the
    ``[B, T, D]`` storage as it is. Packed rows get the same static-shape boundary correction as
    :func:`causal_conv1d` (fla's own ``cu_seqlens`` path sizes its grid from the lengths on the host, which a
    CUDA graph cannot replay); the activation is fused into the kernel where no correction follows it.

    ``fwd_bwd``: fla's forward and backward kernels themselves (``causal_conv1d_fwd`` / ``causal_conv1d_bwd``);
    with them a packed row runs as :class:`_PackedConv`, which corrects only the few positions the crossing taps
    reach, forward and backward. ``cpu``: call the kernels for CPU tensors too (tests, with stand-ins)."""
    def conv(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             activation: str | None = None, **kwargs: Any) -> torch.Tensor:
        cu = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens"))
        if not (hidden_states.is_cuda or cpu) or kwargs.get("seq_idx") is not None or activation not in (None, "silu", "swish"):
            return causal_conv1d(hidden_states, weight, bias, activation, **kwargs)
        width = weight.shape[-1]
        x = hidden_states.to(weight.dtype).transpose(1, 2)  # [B, T, D], a view of the projection's output
        correct = cu is not None and width > 1
        if correct and fwd_bwd is not None and x.shape[0] == 1:
            taps = boundary_taps(cu.to(x.device), x.shape[1], width)
            y = _PackedConv.apply(x, weight, bias, taps.target, taps.source, taps.crosses, fwd_bwd)
        elif correct:
            y, _ = conv_fn(x=x, weight=weight, bias=bias, activation=None)
            y = _drop_cross_example_taps(y, x, weight, cu.to(x.device), time_dim=1)
        else:
            y, _ = conv_fn(x=x, weight=weight, bias=bias, activation=activation)
        if correct:
            act = _activation(activation)
            y = act(y) if act is not None else y
        return y.transpose(1, 2).to(hidden_states.dtype)

    conv.__hybridlora_kernel__ = ("fla.causal_conv1d (packing-aware" +
                                  (", boundary taps corrected in place)" if fwd_bwd is not None else ")"))
    conv.__hybridlora_boundaries__ = True
    return conv


class _PackedConv(torch.autograd.Function):
    """The short convolution over one packed row ``x`` ``[1, T, D]``: fla's kernel convolves the whole row, then
    the taps that reach into the previous example are subtracted at the W-1 first positions of each example —
    in place, forward and backward, so packing adds no pass over the whole activation. (Built from autograd
    ops, the correction's backward materialised a zero ``[T, D]`` gradient per tap and added it in: ~5 ms of a
    4,096-token Qwen3.5 step's 87 ms of kernels, fifth-session source table.)

    ``fwd_bwd``: ``(fwd, bwd)`` with the signatures of fla's ``causal_conv1d_fwd`` / ``causal_conv1d_bwd``."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, source, crosses, fwd_bwd):
        fwd, bwd = fwd_bwd
        y, _ = fwd(x=x, weight=weight, bias=bias, residual=None, activation=None)
        y[0].index_add_(0, target, -_crossing_taps(x[0], weight, source, crosses).to(y.dtype))
        ctx.save_for_backward(x, weight, bias, target, source, crosses)
        ctx.bwd = bwd
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, target, source, crosses = ctx.saved_tensors
        dy = dy.contiguous()
        dx, dw, db, *_ = ctx.bwd(x=x, dy=dy, dht=None, weight=weight, bias=bias, residual=None, activation=None)
        width = weight.shape[-1]
        dy_at = dy[0].index_select(0, target)  # [N, D]: the gradient where the crossing taps landed
        for j in range(1, width):
            hit = crosses[j - 1, :, None] * dy_at  # [N, D]
            if ctx.needs_input_grad[0]:
                dx[0].index_add_(0, source[j - 1], -(hit * weight[:, width - 1 - j]).to(dx.dtype))
            if ctx.needs_input_grad[1]:
                dw[:, width - 1 - j] -= (hit * x[0].index_select(0, source[j - 1])).sum(0).to(dw.dtype)
        return dx, dw, db, None, None, None, None


def make_rms_norm(rms_norm_fn: Callable, original: Callable) -> Callable:
    """``forward`` for Qwen3.5's RMSNorm (``x / rms(x) · (1 + w)``, computed in float32, cast once) on fla's
    fused Triton norm: one kernel each way instead of float copies, a mean, a reciprocal square root and
    multiplies over every ``[tokens, hidden]`` activation (~790 such copies per packed 4,096-token Qwen3.5 step,
    fourth-session kernel table). Same arithmetic order as transformers'; off CUDA the original runs."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return original(self, x)
        return rms_norm_fn(x, 1.0 + self.weight.float(), None, eps=self.eps)

    forward.__hybridlora_kernel__ = "fla.rms_norm"
    return forward


def make_rms_norm_gated(rms_norm_gated_fn: Callable, original: Callable) -> Callable:
    """``forward`` for Qwen3.5's gated RMSNorm of the Gated DeltaNet output (``w · x / rms(x) · silu(gate)``) on
    fla's fused Triton kernel — the norm transformers' Qwen3-Next itself takes from fla when it is installed.
    fla keeps the product in float32 and rounds once; transformers rounds after the weight and again at the
    end (a bf16-rounding difference, within the fast path's stated tolerances). Off CUDA the original runs."""
    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_cuda or getattr(self, "activation", "silu") != "silu":
            return original(self, hidden_states, gate)
        return rms_norm_gated_fn(hidden_states, gate, self.weight, None, activation="silu",
                                 eps=self.variance_epsilon).to(hidden_states.dtype)

    forward.__hybridlora_kernel__ = "fla.rms_norm_gated"
    return forward


class BoundaryTaps(NamedTuple):
    """Where a packed row's convolution taps cross an example boundary. ``N`` = examples × (W-1) candidate
    positions (the first W-1 of each example); ``target`` ``[N]`` those output positions (clamped into the row),
    ``source`` ``[W-1, N]`` the input position tap j reads, ``crosses`` ``[W-1, N]`` 1.0 where that input lies in
    an earlier example (0.0 otherwise, and for padding). Static shapes from ``cu_seqlens`` alone: no host sync."""
    target: torch.Tensor
    source: torch.Tensor
    crosses: torch.Tensor


def boundary_taps(cu_seqlens: torch.Tensor, length: int, width: int) -> BoundaryTaps:
    device = cu_seqlens.device
    seg = seq_idx_from_cu_seqlens(cu_seqlens, length)[0].to(torch.long)  # [T] example of each position
    starts = cu_seqlens.to(torch.long).flatten()[:-1]  # [S] (a padded cu repeats its last value)
    segment = torch.arange(starts.numel(), device=device).repeat_interleave(width - 1)
    t = starts.repeat_interleave(width - 1) + torch.arange(width - 1, device=device).repeat(starts.numel())
    target = t.clamp_max(length - 1)
    own = (t < length) & (seg[target] == segment)  # position t really is offset t - start of this example
    lags = torch.arange(1, width, device=device)[:, None]  # [W-1, 1]
    source = (target[None] - lags).clamp_min(0)
    crosses = own[None] & (target[None] - lags >= 0) & (seg[source] != segment[None])
    return BoundaryTaps(target, source, crosses.to(torch.float32))


def _crossing_taps(x_td: torch.Tensor, weight: torch.Tensor, source: torch.Tensor,
                   crosses: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: Σ_j crosses_j · w[:, W-1-j] · x[source_j], what the crossing taps added to each target."""
    width = weight.shape[-1]
    total = torch.zeros(source.shape[1], x_td.shape[1], dtype=torch.float32, device=x_td.device)
    for j in range(1, width):
        # index_select, not x[src]: its backward is an index_add, where advanced indexing's backward is a
        # sort-based index_put (~3 % of a packed Qwen3.5 step's GPU time on the H100, session 4 kernel table)
        taps = x_td.index_select(0, source[j - 1])
        total = total + crosses[j - 1, :, None] * weight[:, width - 1 - j][None, :] * taps
    return total


def _drop_cross_example_taps(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             cu_seqlens: torch.Tensor, time_dim: int = -1) -> torch.Tensor:
    """Subtract, from the conv output of one packed row, every tap that crosses an example boundary (autograd
    ops; :class:`_PackedConv` does the same in place around fla's kernels).
    ``out``/``x``: ``[1, D, T]`` (``time_dim=-1``) or ``[1, T, D]`` (``time_dim=1``); the result keeps that layout."""
    if x.shape[0] != 1:
        raise ValueError("packed rows have batch size 1")
    channel_last = time_dim in (1, -2)
    x_td = x.squeeze(0) if channel_last else x.squeeze(0).T  # [T, D] view either way
    taps = boundary_taps(cu_seqlens, x_td.shape[0], weight.shape[-1])
    correction = _crossing_taps(x_td, weight, taps.source, taps.crosses).to(out.dtype)
    if channel_last:
        return out.index_add(1, taps.target, -correction[None])
    return out.index_add(-1, taps.target, -correction.T[None])


def _call_with_accepted(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    import inspect

    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


# --- Gated DeltaNet (fla, or the torch reference) -----------------------------------------------------------
# A packed row's examples are separated by zeroing the carried state at every example's first token: the
# gated delta rule is S_t = exp(g_t) S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, so a log-decay of -100 there
# makes exp(g_t) ~ 4e-44 and S_t equals the state of a fresh start. Unlike fla's ``cu_seqlens`` path (which
# builds its chunk index with a host sync) this needs no host round trip, so it can run inside a CUDA graph,
# and it works for the torch reference too. The real g at those positions has no effect on the exact result
# (it multiplies a zero state), so overriding it changes neither the output nor any gradient. In float32 the
# chunked form leaves a trace: within a chunk the decays are differences of cumulative log-decays that include
# the reset's -100 and the previous example's gates, so the next example's outputs round differently with the
# previous example's values (about 1e-5 on logits of the topology preset's models; its causality test bounds it).
GATE_RESET = -100.0


def segment_starts(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """``[length]`` bool, True at the first token of every example; ``cu_seqlens`` may repeat its last value."""
    cu = cu_seqlens.to(torch.long).flatten()[:-1].clamp_max(length)
    starts = torch.zeros(length + 1, dtype=torch.bool, device=cu.device)
    starts.index_fill_(0, cu, True)  # not starts[cu] = True: that copies a host scalar, which breaks graph capture
    return starts[:length]


def reset_gate_at_boundaries(g: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``g`` ``[B, T, H]`` (log-decay) with :data:`GATE_RESET` at every example's first token."""
    starts = segment_starts(cu_seqlens.to(g.device), g.shape[1])
    return torch.where(starts[None, :, None], torch.full_like(g, GATE_RESET), g)


def make_gdn_chunk(chunk_fn: Callable, name: str = "fla.chunk_gated_delta_rule") -> Callable:
    """Chunked GDN with transformers' signature around ``chunk_fn`` (fla's kernel or the torch reference);
    packed rows (``cu_seqlens`` / ``cu_seq_lens_q``) are handled by :func:`reset_gate_at_boundaries`."""
    @functools.wraps(chunk_fn)
    def gdn_chunk(query, key, value, g, beta, chunk_size: int = 64, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel: bool = False, cu_seqlens=None, **kwargs):
        if cu_seqlens is None:
            cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None:
            if initial_state is not None or output_final_state:
                raise NotImplementedError("packed rows carry no recurrent state in or out (training only)")
            g = reset_gate_at_boundaries(g, cu_seqlens)
        return chunk_fn(query, key, value, g=g, beta=beta, initial_state=initial_state,
                      output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    gdn_chunk.__hybridlora_kernel__ = name
    gdn_chunk.__hybridlora_boundaries__ = True
    return gdn_chunk


def make_gdn_recurrent(fla_recurrent: Callable, step_in_place: Callable | None = None) -> Callable:
    """transformers' ``torch_recurrent_gated_delta_rule`` on fla's fused recurrent kernel. With ``step_in_place``
    (see :func:`make_gdn_step_in_place`), a forward-only call inside the project's static decode step
    (:func:`.state.static_decode_step`) that hands in a float32 state and asks for the final one gets the final
    state written over the state it handed in, and that same tensor back: that step hands in its cache's buffer
    and copies the result into that buffer at once (``update_recurrent_state``), a copy PyTorch skips when source
    and target are one tensor. Elsewhere a caller may still need the state it handed in (transformers >= 5.25
    clones the buffer for its rollback history after the call, and chains intermediate states), so fla's own
    call runs. In a kernel table of Qwen3.5-0.8B's eager decode
    steps at 256 rows on the H200 (2026-12-04) that copy was a fifth of the step (2.3 of 10.6 ms)."""
    @functools.wraps(fla_recurrent)
    def gdn_recurrent(query, key, value, g, beta, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel: bool = False, cu_seqlens=None, **kwargs):
        if step_in_place is not None and cu_seqlens is None and output_final_state \
                and STATE.get("static_decode_step") \
                and _state_updatable_in_place(initial_state, (query, key, value, g, beta)):
            return step_in_place(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(torch.long)
        return fla_recurrent(query, key, value, g=g, beta=beta, initial_state=initial_state,
                             output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                             cu_seqlens=cu_seqlens)
    gdn_recurrent.__hybridlora_kernel__ = "fla.fused_recurrent_gated_delta_rule" + \
        (" (decode state updated in place)" if step_in_place is not None else "")
    return gdn_recurrent


def _state_updatable_in_place(state: Any, inputs: tuple) -> bool:
    """A state the kernel may overwrite: float32 (what fla returns, so the result is the same tensor type),
    contiguous and not a broadcast view (each row owns its memory), shaped ``[batch, value heads, K, V]``, on the
    inputs' device, and no gradient wanted (autograd would need the state as it was)."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.float32 or not state.is_contiguous():
        return False
    query, key, value = inputs[:3]
    if state.shape != (value.shape[0], value.shape[2], key.shape[-1], value.shape[-1]) or state.device != value.device:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (state, *inputs) if t is not None))


def make_gdn_step_in_place(fwd_kernel: Any) -> Callable:
    """fla's fused recurrent Gated DeltaNet kernel launched with the final state stored over the initial one.
    Safe because each of the kernel's programs reads its own block of the state once, before its time loop, and
    writes that block back once, after it: no program reads a block another writes. The launch mirrors fla's
    ``fused_recurrent_gated_delta_rule_fwd`` (same block sizes, warps and stages), so the outputs and the state
    are bitwise what fla returns (checked on the GPU by ``tests/test_fast.py``)."""
    def power_of_2(n: int) -> int:  # triton.next_power_of_2
        return 1 << (n - 1).bit_length()

    def step(query, key, value, g, beta, state, use_qk_l2norm_in_kernel):
        q, k, v, g, beta = (t.contiguous() for t in (query, key, value, g, beta))
        batch, length, heads, k_dim = k.shape
        v_heads, v_dim = v.shape[2], v.shape[-1]
        block_v = min(8, power_of_2(v_dim))
        out = torch.empty_like(v)
        with torch.cuda.device(state.device) if state.is_cuda else contextlib.nullcontext():
            fwd_kernel[(-(-v_dim // block_v) * batch * v_heads,)](
                q=q, k=k, v=v, g=g, gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=out, h0=state, ht=state,
                cu_seqlens=None, scale=k_dim ** -0.5, T=length, H=heads, HV=v_heads, K=k_dim, V=v_dim,
                BK=power_of_2(k_dim), BV=block_v, IS_BETA_HEADWISE=beta.ndim != v.ndim,
                USE_QK_L2NORM_IN_KERNEL=use_qk_l2norm_in_kernel, APPLY_BETA_SIGMOID=False, ALLOW_NEG_EIGVAL=False,
                STATE_V_FIRST=False, num_warps=1, num_stages=3)
        return out, state
    return step


def make_conv_update(fla_update: Callable, reference: Callable) -> Callable:
    """transformers' one-token ``causal_conv1d_update(hidden_states [B, D, 1], conv_state [B, D, W], weight [D, W],
    bias, activation)`` on fla's fused Triton step: the state shifted by one, the new column written and the
    window's dot product taken in one kernel, in place on the cache's buffer. Without ``causal-conv1d``
    transformers runs its PyTorch fallback instead (a concatenation, a copy of the state, a generic depthwise
    ``conv1d``, a slice, the activation and casts per layer and step). Same result up to float order (fla sums
    in float32). Shapes the kernel does not take (several tokens, a state not as wide as the kernel, a
    non-contiguous state) keep the reference."""
    @functools.wraps(reference)
    def conv_update(hidden_states, conv_state, weight, bias=None, activation=None, **kwargs):
        if (hidden_states.shape[-1] != 1 or conv_state.shape[-1] != weight.shape[-1] or weight.dim() != 2
                or not conv_state.is_contiguous() or not weight.is_contiguous()):
            return reference(hidden_states, conv_state, weight, bias, activation)
        y, _ = fla_update(hidden_states.transpose(1, 2), conv_state, weight=weight, bias=bias, activation=activation)
        return y.transpose(1, 2)  # [B, 1, D] -> the [B, D, 1] view transformers continues with
    conv_update.__hybridlora_kernel__ = "fla.causal_conv1d_update"
    return conv_update


# --- Mamba-2 SSD (mamba-ssm Triton) --------------------------------------------------------------------------
def make_ssd_chunk(chunk_scan: Callable) -> Callable:
    def ssd_chunk(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                  dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, z=None, **kwargs):
        seq_idx = _segments(kwargs, hidden_states.shape[1])
        return chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                          initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                          dt_limit=tuple(dt_limit) if dt_limit is not None else (0.0, float("inf")),
                          return_final_states=return_final_states)
    ssd_chunk.__hybridlora_kernel__ = "mamba_ssm.mamba_chunk_scan_combined"
    ssd_chunk.__hybridlora_boundaries__ = True
    return ssd_chunk


def make_segmented_ssd(reference: Callable) -> Callable:
    """transformers' pure-PyTorch Mamba-2 scan, run on each example of a packed row separately (exact; a host
    loop, for CPU and tests). Without packing metadata it is the reference itself."""
    @functools.wraps(reference)
    def ssd_segmented(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                      dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        cu = kwargs.pop("cu_seq_lens_q", None)
        kwargs.pop("cu_seq_lens_k", None)
        args = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
        if cu is None:
            return reference(hidden_states, dt, A, B, C, chunk_size, initial_states=initial_states,
                             return_final_states=return_final_states, **args, **kwargs)
        if initial_states is not None or return_final_states:
            raise NotImplementedError("packed rows carry no recurrent state in or out (training only)")
        bounds = cu.to(torch.long).flatten().tolist()
        parts = [reference(hidden_states[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], chunk_size, **args)
                 for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        return torch.cat(parts, dim=1)
    ssd_segmented.__hybridlora_kernel__ = "torch reference (per example)"
    ssd_segmented.__hybridlora_boundaries__ = True
    ssd_segmented.__hybridlora_host_boundaries__ = True  # reads the boundaries on the host: no CUDA graph
    return ssd_segmented


def make_ssd_step(state_update: Callable) -> Callable:
    def ssd_step(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
        return state_update(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    ssd_step.__hybridlora_kernel__ = "mamba_ssm.selective_state_update"
    return ssd_step


def unfused_split_conv1d_scan(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``mamba_split_conv1d_scan_combined``: returning None sends transformers down the unfused path
    (in_proj -> conv -> SSD scan -> norm -> out_proj), where every projection is a module call that PEFT sees.
    The fused kernel would read ``out_proj.weight`` directly and needs the compiled causal-conv1d extension."""
    return None


unfused_split_conv1d_scan.__hybridlora_kernel__ = "unfused (in_proj -> conv -> SSD scan -> out_proj)"
causal_conv1d.__hybridlora_kernel__ = "torch conv1d (packing-aware)"
causal_conv1d.__hybridlora_boundaries__ = True


# --- the fla Hopper guard ------------------------------------------------------------------------------------
def narrow_fla_hopper_guard() -> str | None:
    """fla refuses gated ``chunk_bwd_dqkwg`` on Hopper with Triton in [3.4, 3.7.1) (fla issue #640). The
    miscompile was traced to the K-block width BK = 64 (a BK sweep on Hopper: 32 and 128 pass, 64 fails); fla
    0.6 uses BK = min(next_pow2(K), 128) on Hopper, so key head dims above 64 run with BK = 128. This wraps the
    function the gated-delta-rule backward calls so that the guard is lifted for such calls only; K <= 64 still
    raises. Returns a description of what was done, or None when nothing was needed/possible."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        import fla.ops.gated_delta_rule.chunk as gdn_chunk_mod
    except Exception:
        return None
    guarded = (getattr(chunk_o, "IS_NVIDIA_HOPPER", False) and getattr(chunk_o, "TRITON_ABOVE_3_4_0", False)
               and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True))
    if not guarded:
        return None
    original = gdn_chunk_mod.chunk_bwd_dqkwg
    note = "fla #640 Hopper guard kept for key head dim <= 64 (BK=64) only; larger heads run (BK=128)"
    if getattr(original, "__hybridlora_narrowed__", False):
        return note

    @functools.wraps(original)
    def chunk_bwd_dqkwg(q, k, *args, **kwargs):
        if k.shape[-1] <= 64:
            return original(q, k, *args, **kwargs)  # the affected BK = 64 case: fla raises as before
        saved = chunk_o.TRITON_ABOVE_3_7_1
        chunk_o.TRITON_ABOVE_3_7_1 = True
        try:
            return original(q, k, *args, **kwargs)
        finally:
            chunk_o.TRITON_ABOVE_3_7_1 = saved

    chunk_bwd_dqkwg.__hybridlora_narrowed__ = True
    gdn_chunk_mod.chunk_bwd_dqkwg = chunk_bwd_dqkwg
    return note
