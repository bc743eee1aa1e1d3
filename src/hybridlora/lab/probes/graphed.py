"""A probe's training step (forward, loss, backward) replayed as a CUDA graph.

Why: a probe model has ~0.5M parameters, so an eager step waits on Python and kernel launches rather than on
the GPU, and at MAD's settings a run is 20,000 steps (300 eager steps of the ~450k-parameter sequential GDN model
took 11.1 s with their setup on an H200, 2026-12-04). A replayed graph launches the whole forward and backward at
once. Clipping, the optimizer step and the schedule stay eager (a few fused launches).

Same numbers as the eager step: the same kernels on the same inputs. Checked, not assumed: at capture, one replay
on the first batch is set against an eager step on it (loss and every gradient); a mismatch, or a capture that
raises, turns graphs off for the run with one loud warning, and the eager step runs instead (same results,
slower). ``$HYBRIDLORA_PROBE_GRAPHS=0`` turns them off.

What makes the step capturable: every batch has one shape (a run's last, smaller batch runs eagerly), the loss
and counts stay on the device (``base.lm_loss``), the inputs are copied into static tensors, autocast keeps no
weight-cast cache, and the gradients exist before capture, so that the replays add into the same tensors
(zeroed before each replay). Parameters the forward never reaches therefore hold zero gradients instead of none;
AdamW with weight decay would decay them, which changes nothing the probe scores.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

ENV = "HYBRIDLORA_PROBE_GRAPHS"
LOSS_RTOL = 1e-3  # replay against eager on one batch: rounding passes, a wrong graph (stale inputs, lost grads) not
GRAD_RTOL = 1e-2


class _Cuda:
    """The CUDA calls capture makes, in one place (tests run the same code on CPU with a stand-in graph that
    re-runs the step on replay)."""
    current_stream = staticmethod(lambda device: torch.cuda.current_stream(device))
    Stream = staticmethod(lambda device: torch.cuda.Stream(device))
    stream = staticmethod(lambda s: torch.cuda.stream(s))
    set_stream = staticmethod(lambda s: torch.cuda.set_stream(s))
    get_rng_state = staticmethod(lambda device: torch.cuda.get_rng_state(device))
    set_rng_state = staticmethod(lambda state, device: torch.cuda.set_rng_state(state, device))
    synchronize = staticmethod(lambda device: torch.cuda.synchronize(device))
    CUDAGraph = staticmethod(lambda: torch.cuda.CUDAGraph())

    @staticmethod
    def capture(graph, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(graph):
            return fn()

    @staticmethod
    def release_generator(device) -> None:
        from ...fast.graphs import release_generator_after_failed_capture

        release_generator_after_failed_capture(device)


_cuda = _Cuda


def wanted(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV, "1") != "0"


def autocast(device: torch.device):
    """bf16 autocast without the weight-cast cache (cached casts would outlive the capture that made them)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


class GraphedStep:
    """``step(inputs, labels) -> mean loss`` (it runs backward; gradients accumulate), captured for batches of
    ``inputs``' shape. Build with :meth:`capture`."""

    def __init__(self, graph, static_inputs, static_labels, loss, grads):
        self.graph, self.inputs, self.labels, self.loss, self.grads = graph, static_inputs, static_labels, loss, grads

    def fits(self, inputs: torch.Tensor) -> bool:
        return inputs.shape == self.inputs.shape

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(inputs)
        self.labels.copy_(labels)
        torch._foreach_zero_(self.grads)
        self.graph.replay()
        return self.loss.clone()

    def run_eagerly(self, step: Callable, inputs: torch.Tensor, labels: torch.Tensor,
                    params: list[torch.Tensor]) -> torch.Tensor:
        """A batch of another shape (a run's last): the eager step, its gradients left in the graph's tensors."""
        torch._foreach_zero_(self.grads)
        loss = step(inputs, labels)
        for p, g in zip(params, self.grads):
            if p.grad is not g:  # autograd may hand back a new tensor; later replays write into g
                g.copy_(p.grad)
                p.grad = g
        return loss

    @classmethod
    def capture(cls, step: Callable, params: list[torch.Tensor], inputs: torch.Tensor,
                labels: torch.Tensor) -> "tuple[GraphedStep | None, str]":
        """(the graphed step, "cuda graph"), or (None, "eager: <why>") after one loud warning."""
        device = inputs.device
        stream = _cuda.current_stream(device)
        rng = _cuda.get_rng_state(device)
        for p in params:
            p.grad = None
        try:
            reference = _eager_reference(step, params, inputs, labels)
            grads = [torch.zeros_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            static_inputs, static_labels = inputs.clone(), labels.clone()
            side = _cuda.Stream(device)
            side.wait_stream(stream)
            with _cuda.stream(side):
                for _ in range(2):  # autotuning, workspaces, lazy inits: none of that may happen inside capture
                    step(static_inputs, static_labels)
            stream.wait_stream(side)
            _cuda.set_rng_state(rng, device)
            graph = _cuda.CUDAGraph()
            loss = _cuda.capture(graph, lambda: step(static_inputs, static_labels))
            if any(p.grad is not g for p, g in zip(params, grads)):
                raise RuntimeError("autograd replaced gradient tensors during capture instead of adding into them")
            graphed = cls(graph, static_inputs, static_labels, loss, grads)
            _check_against(graphed, reference, params, inputs, labels)
        except Exception as exc:  # loud, once per run; the eager step gives the same numbers
            return None, "eager: " + _give_up(exc, stream, params, device, rng)
        torch._foreach_zero_(grads)
        _cuda.set_rng_state(rng, device)
        return graphed, "cuda graph"


def _eager_reference(step, params, inputs, labels) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = step(inputs, labels)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.clone(), grads


def _check_against(graphed: GraphedStep, reference, params, inputs, labels) -> None:
    ref_loss, ref_grads = reference
    loss = graphed(inputs, labels)
    _cuda.synchronize(inputs.device)
    if not torch.isclose(loss, ref_loss, rtol=LOSS_RTOL, atol=1e-6):
        raise RuntimeError(f"the replayed step's loss {float(loss):.6g} differs from the eager step's "
                           f"{float(ref_loss):.6g}")
    diff = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm((p.grad - g).float())
                                                 for p, g in zip(params, ref_grads)]))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in ref_grads]))
    if diff > GRAD_RTOL * norm + 1e-8:
        raise RuntimeError(f"the replayed step's gradients differ from the eager step's by {float(diff / norm):.3g} "
                           "of their norm")


def _give_up(exc: Exception, stream, params, device, rng) -> str:
    _cuda.set_stream(stream)  # a capture that fails at its end leaves its own stream current
    _cuda.release_generator(device)
    _cuda.synchronize(device)
    for p in params:
        p.grad = None
    _cuda.set_rng_state(rng, device)
    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]
    warnings.warn(f"hybridlora: CUDA graph of the probe's training step not used ({reason}); running the step "
                  f"eagerly for this run (same results, slower; {ENV}=0 skips the attempt)", stacklevel=3)
    return reason
