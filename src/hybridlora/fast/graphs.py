"""A packed row's forward + backward replayed as a CUDA graph, so short training steps stop waiting on Python.

Why: a packed optimizer step of the study's short examples is one forward + backward of 1.5–4k tokens through
~190–290 LoRA-wrapped projections. On an H100 the kernels take a fraction of the time Python and the kernel
launches do (docs/PERFORMANCE.md). Replaying a captured graph launches all of that work at once.

What makes the packed step capturable (every shape static, no host sync inside):

* the row is padded to a bucket length (a multiple of :data:`BUCKET` tokens) with one padding *example* whose
  labels are all ignored, and ``cu_seq_lens_q`` is padded to a fixed number of entries by repeating its last
  value (zero-length segments); every packing-aware mixer accepts both (tests/test_graphs.py);
* the loss runs the head over every position and counts ignored targets as zero
  (:func:`hybridlora.fast.loss.causal_lm_loss_sum_static`) instead of gathering the labelled positions;
* gradients are allocated before capture and the replays *accumulate* into them (autograd adds in place when
  a gradient exists), so the trainer zeroes them with ``zero_grad(set_to_none=False)``;
* the step's 1/(loss tokens) is a device scalar the replay reads.

Every trainable parameter therefore has a gradient, zeros where the forward does not reach it; AdamW would
then decay such a parameter, where the eager path leaves a ``None`` gradient alone. Placements resolved by
hybridlora only hold adapters the forward uses (the liveness check), so this is a note, not a difference.

One graph per bucket length, all in one memory pool. Before a bucket is captured its step runs twice eagerly on
a side stream (Triton autotuning, cuBLAS workspaces); then the gradients and the CUDA random state are put back,
so a resumed run, which captures at other steps, draws the same dropout masks. LoRA dropout draws fresh masks on
every replay (PyTorch's graph-safe generator). If capture fails, the runner says so loudly once (naming where host
tensors reach GPU ops or device values are read on the host), frees the graphs it holds and runs the same static
step eagerly from then on (same numbers, no speed-up).

On CPU (tests) the runner runs the static step eagerly: that checks the padding and the static loss, and
everything except the capture itself.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

BUCKET = 512  # row lengths are rounded up to a multiple of this: few graphs, little padding
IGNORE = -100


def bucket_length(tokens: int, bucket: int = BUCKET) -> int:
    return max(bucket, -(-tokens // bucket) * bucket)


def pad_row(row: dict[str, Any], length: int, max_segments: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The packed row ``row`` (from :func:`hybridlora.fast.pack`) padded to ``length`` tokens: the tail becomes one
    more example (``pad_id`` tokens, no labels) and ``cu_seq_lens_q`` gets exactly ``max_segments + 1`` entries
    (its last value repeated). ``max_segments`` counts the padding example."""
    tokens = row["input_ids"].shape[1]
    cu = row["cu_seq_lens_q"].to(torch.int32).flatten()
    tail = length - tokens
    if tail < 0:
        raise ValueError(f"a packed row of {tokens} tokens does not fit a bucket of {length}")
    if tail:
        cu = torch.cat([cu, torch.tensor([length], dtype=torch.int32)])
    if cu.numel() > max_segments + 1:
        raise ValueError(f"a packed row of {cu.numel() - 1} segments exceeds the graph's {max_segments}")
    cu = torch.cat([cu, cu[-1:].expand(max_segments + 1 - cu.numel())])
    pad = lambda t, value: torch.cat([t, torch.full((1, tail), value, dtype=t.dtype)], dim=1)
    return {"input_ids": pad(row["input_ids"], pad_id), "labels": pad(row["labels"], IGNORE),
            "position_ids": torch.cat([row["position_ids"], torch.arange(tail, dtype=torch.long)[None]], dim=1),
            "cu_seq_lens_q": cu}


class PackedStepGraphs:
    """Runs packed rows' forward + backward with static shapes; on CUDA, as one captured graph per bucket.

    ``model``: the PEFT-wrapped causal LM, trainable parameters on one device. ``max_segments``: the most
    examples one row can hold (the step's example count) — the padding example is added on top.
    ``autocast_dtype``: bf16 autocast (None: none). ``capture``: default True on CUDA.
    """

    def __init__(self, model: nn.Module, *, max_segments: int, pad_id: int, autocast_dtype: torch.dtype | None,
                 bucket: int = BUCKET, capture: bool | None = None):
        self.model = model
        self.max_segments = max_segments + 1
        self.pad_id = pad_id
        self.bucket = bucket
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.failure: str | None = None
        self.captures = 0  # graphs captured so far (the trainer logs how many each step added)
        self._graphs: dict[int, tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._pool = None
        self._scale = torch.ones((), dtype=torch.float32, device=self.device)

    # --- public ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        if self.failure:
            return f"off (capture failed: {self.failure}); static packed step run eagerly"
        if not self.capture:
            return "off (no CUDA); static packed step run eagerly"
        return f"on: one graph per row length (multiples of {self.bucket} tokens), {len(self._graphs)} captured"

    def row_length(self, row: dict[str, Any]) -> int:
        """Tokens the static step computes for ``row`` (its bucket length)."""
        return bucket_length(int(row["input_ids"].shape[1]), self.bucket)

    def forward_backward(self, row: dict[str, Any], scale: float) -> torch.Tensor:
        """Add ``scale`` × the row's summed loss to the gradients; returns that scaled loss (device scalar)."""
        length = self.row_length(row)
        padded = pad_row(row, length, self.max_segments, self.pad_id)
        self._scale.fill_(scale)
        if self.capture and not self.failure and length not in self._graphs:
            captured = self._capture(padded)
            if captured is not None:
                self._graphs[length] = captured
                self.captures += 1
        if not self.capture or self.failure:
            return self._step({k: v.to(self.device) for k, v in padded.items()}).clone()
        graph, static, loss = self._graphs[length]
        for key, value in padded.items():
            static[key].copy_(value, non_blocking=True)
        graph.replay()
        return loss.clone()

    def zero_grad(self) -> None:
        """Zero the gradients in place (the captured graphs write into these very tensors)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    # --- internals -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: cached casts would outlive the capture that allocated them
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self, static: dict[str, torch.Tensor]) -> torch.Tensor:
        """The code that is captured: forward, scaled loss, backward (gradients accumulate)."""
        from .attention import packed_attention
        from .loss import causal_lm_loss_sum_static

        length = static["input_ids"].shape[1]
        with self._autocast(), packed_attention(self.model):
            total = causal_lm_loss_sum_static(
                self.model, static["input_ids"], static["labels"], position_ids=static["position_ids"],
                cu_seq_lens_q=static["cu_seq_lens_q"], cu_seq_lens_k=static["cu_seq_lens_q"],
                max_length_q=length, max_length_k=length)  # an upper bound: no host read of the real maximum
            loss = total * self._scale
            loss.backward()
        return loss.detach()

    def _ensure_grads(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def _capture(self, padded: dict[str, torch.Tensor]):
        """(graph, static inputs, static loss) for ``padded``'s bucket, or None (and :attr:`failure` set).
        Leaves the gradients and the CUDA random state as they were: the warm-up steps' gradients are undone,
        and their dropout draws too, so that a resumed run draws the same masks as an uninterrupted one."""
        static = {k: v.to(self.device) for k, v in padded.items()}
        grads = self._ensure_grads()
        saved = [g.clone() for g in grads]
        pointers = [g.data_ptr() for g in grads]
        rng = torch.cuda.get_rng_state(self.device)
        stream = torch.cuda.current_stream(self.device)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(2):  # autotune, workspaces, lazy inits: nothing of that may happen in capture
                    self._step(static)
            stream.wait_stream(side)
            torch.cuda.set_rng_state(rng, self.device)  # capture itself draws nothing: replays advance the offset
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self._step(static)
            if [p.grad.data_ptr() if p.grad is not None else None for p in self.params] != pointers:
                raise RuntimeError("autograd replaced gradient tensors during capture instead of accumulating")
        except Exception as exc:  # loud, once; the eager static step gives the same numbers
            from .compile import is_compile_error

            if is_compile_error(exc):  # not a capture problem: the trainer reports it (compile: off helps)
                torch.cuda.set_stream(stream)
                release_generator_after_failed_capture(self.device)
                raise
            self._give_up(exc, stream, static, saved, rng)
            return None
        torch._foreach_copy_(grads, saved)  # undo the warm-up steps' gradients
        return graph, static, loss

    def _give_up(self, exc: Exception, stream, static: dict[str, torch.Tensor], saved: list[torch.Tensor],
                 rng: torch.Tensor) -> None:
        """After a failed capture: the stream, gradients and random state as before it, the graphs' memory
        released, the cause named (also the one behind a capture invalidated by it), one loud warning."""
        torch.cuda.set_stream(stream)  # a capture that fails at its end leaves its own stream current
        release_generator_after_failed_capture(self.device)
        causes = [exc] + ([exc.__context__] if exc.__context__ is not None else [])
        self.failure = "; ".join(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}" for e in causes)[:400]
        self._graphs.clear()  # no replays from here on: free the pool before the eager steps need memory
        self._pool = None
        torch.cuda.synchronize(self.device)
        for p, g in zip(self.params, saved):
            p.grad = g.clone()
        culprits = host_syncs(lambda: self._step(static))  # this eager step adds to the gradients...
        if culprits:
            self.failure += f" [host tensors or host reads at: {'; '.join(culprits[:3])}]"
        for p, g in zip(self.params, saved):  # ...so they are restored from the untouched copies
            p.grad = g
        torch.cuda.set_rng_state(rng, self.device)
        warnings.warn(f"hybridlora: CUDA graph capture of the packed training step failed ({self.failure}); "
                      "running it eagerly from now on (correct, but host-bound and slower)", stacklevel=4)


def release_generator_after_failed_capture(device: torch.device | int | None = None) -> None:
    """Put the device's default CUDA generator back in eager mode after a capture that raised.

    A capture that fails before ``capture_end`` leaves the generator marked as capturing: every later random op
    on the device (dropout, ``torch.randn``) then raises "Offset increment outside graph capture encountered
    unexpectedly". The generator gets a fresh copy of its own state (same seed and offset, not capturing).
    Graphs captured earlier keep the old state object, so call this only where no graph that draws random
    numbers is kept (both callers free theirs)."""
    from torch.cuda._utils import _get_device_index

    index = _get_device_index(device, optional=True)  # int, "cuda:1", torch.device; None: the current device
    generator = torch.cuda.default_generators[torch.cuda.current_device() if index is None else index]
    if not hasattr(generator, "graphsafe_set_state"):  # torch without graph-safe generator states
        warnings.warn("hybridlora: this torch cannot reset the CUDA generator after a failed graph capture; "
                      "random ops on the device may fail from here on (upgrade torch)", stacklevel=3)
        return
    generator.graphsafe_set_state(generator.clone_state())


def host_syncs(step, device_type: str = "cuda") -> list[str]:
    """Run ``step`` eagerly and name what breaks CUDA-graph capture in it: host tensors handed to device ops
    (copied over), and device values read on the host (``.item()``, ``.tolist()``, ``nonzero``, copies to the
    host). One "op at file:line in function" per distinct place, innermost frame outside torch itself."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    found: dict[str, None] = {}
    # under inference mode ``.item()`` reaches the mode as aten.item itself, not its decomposition
    host_reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.nonzero.default}

    def where() -> str:
        frames = [f for f in traceback.extract_stack()
                  if "/torch/" not in f.filename and f.name not in ("where", "__torch_dispatch__")]
        f = frames[-1] if frames else None
        return f"{f.filename.rsplit('/site-packages/', 1)[-1]}:{f.lineno} in {f.name}" if f else "?"

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            on_device = any(t.device.type == device_type for t in leaves)
            # any host tensor, 0-dim ones included (``x[idx] = True`` passes the scalar as a host tensor that
            # index_put_ copies over); a host scalar tensor in a pointwise op may be harmless, so these are
            # suspects, to be read as such
            host_in = any(t.device.type == "cpu" for t in leaves)
            if on_device and (host_in or func in host_reads):  # noted before the call, which may raise
                found.setdefault(f"{func} at {where()}")
            out = func(*args, **(kwargs or {}))
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if (host_in and any(t.device.type == device_type for t in outs)) or (
                    on_device and any(t.device.type == "cpu" for t in outs)):
                found.setdefault(f"{func} at {where()}")
            return out

    try:
        with Spy():
            step()
    except Exception as exc:  # diagnosis only
        found.setdefault(f"(diagnosis stopped: {type(exc).__name__}: {exc})")
    return list(found)

