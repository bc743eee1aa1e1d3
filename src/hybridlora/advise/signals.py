"""Signals of how much adapting each LoRA host would help, measured on a few hundred examples of the user's data.

Every signal is a *spectrum* per host: ``gains[h][i]`` is what the (i+1)-th rank on host ``h`` is worth, in
descending order, so that the value of rank ``r`` on ``h`` is ``gains[h][:r].sum()``. That one shape lets the
allocator (``allocate``) trade ranks between hosts, and lets ``validate`` score any placement at its own ranks.

* ``grad`` — LoRA-GA's view: the loss gradient with respect to each host's frozen weight, accumulated over the
  examples by PEFT's own ``preprocess_loraga``; a rank-r update can capture at first order the gradient's top-r
  singular directions, so ``gains = σ_i(G)²`` (the first-order loss decrease of a unit-norm step restricted to
  rank r is ``sqrt(Σ_{i≤r} σ_i²)``). One forward/backward pass over the examples, no training.
* ``probe`` — a short all-host LoRA run (the project's trainer, a few dozen steps); ``gains = σ_i(s·B·A)²``, the
  spectrum of the update each host actually learned (``s`` = alpha / r). Capped at the probe's rank.
* ``probe_loss`` (placement-level, for validation) — held-out loss of the probe with only a placement's adapters
  kept, against the base model's loss.

Signals are computed on the candidate placement's exact hosts (``all`` resolved on the component map); modules a
kernel reads without calling them are not hosts and are reported with the map's reason (``excluded``).
"""
from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

SIGNALS = ("grad", "probe")


@dataclass
class HostSignals:
    """Per-host spectra of one signal on one model + data, and how they were measured."""
    signal: str
    gains: dict[str, np.ndarray]  # host name -> descending per-rank gains
    component_of: dict[str, str]
    cost_per_rank: dict[str, int]  # trainable parameters one rank adds on the host
    excluded: dict[str, int] = field(default_factory=dict)  # "component.role: reason" -> modules
    examples: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def value(self, host: str, rank: int) -> float:
        return float(self.gains[host][:rank].sum())

    def by_component(self, rank: int) -> dict[str, float]:
        """Each component type's total value at one rank per host, normalised to sum to 1."""
        out: dict[str, float] = {}
        for h in self.gains:
            out[self.component_of[h]] = out.get(self.component_of[h], 0.0) + self.value(h, rank)
        total = sum(out.values()) or 1.0
        return {c: v / total for c, v in sorted(out.items(), key=lambda kv: -kv[1])}


def candidate_hosts(cmap, rank: int = 16, alpha: float = 32.0):
    """Every host the advisor may choose: the ``all`` preset (attention, recurrent mixers, MLP/MoE) resolved on
    the component map; kernel-bypassed and non-Linear modules are skipped there, with their reason."""
    from ..placement import named_preset, resolve

    return resolve(named_preset("all", None).with_defaults(rank, alpha), cmap)


def _batches(examples, pad_id: int, batch_size: int):
    from ..data import collate

    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device):
    # bf16 on GPU as the study trains; fp32 on CPU (the same choice as the trainer's "auto")
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _mean_loss_backward(model, examples, pad_id: int, batch_size: int) -> tuple[float, int]:
    """Backward of the mean token loss over all examples (gradients accumulate); returns (loss, tokens)."""
    from ..fast import causal_lm_loss_sum

    device = _device(model)
    total_tokens = sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
    loss_sum = 0.0
    for batch in _batches(examples, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device):
            loss, _ = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"],
                                         attention_mask=batch["attention_mask"])
        (loss / max(total_tokens, 1)).backward()
        loss_sum += float(loss.detach())
    return loss_sum / max(total_tokens, 1), total_tokens


def _spectrum(matrix: torch.Tensor, max_rank: int) -> np.ndarray:
    """Squared singular values, descending, at most ``max_rank`` of them (float64 on the host)."""
    s = torch.linalg.svdvals(matrix.detach().float())
    return (s[:max_rank].double() ** 2).cpu().numpy()


def gradient_signals(model: nn.Module, candidates, examples, pad_id: int, *, max_rank: int = 256,
                     batch_size: int = 8) -> HostSignals:
    """LoRA-GA gradients of the candidate hosts (PEFT ``preprocess_loraga``), reduced to their spectra."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from ..placement import lora_config

    start = time.perf_counter()
    config = lora_config(candidates)
    config.lora_ga_config = LoraGAConfig()
    modules = dict(model.named_modules())
    stats = {}

    def train_step() -> None:  # PEFT calls it with gradients enabled on the candidate weights only
        stats["loss"], stats["tokens"] = _mean_loss_backward(model, examples, pad_id, batch_size)

    was_training = model.training
    with warnings.catch_warnings():  # PEFT counts backward calls with full hooks; torch notes frozen inputs
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, config, train_step)
    model.train(was_training)  # PEFT leaves train mode on when the model came in eval mode; put it back
    gains, never_called = {}, []
    for host in candidates.hosts:
        module = modules[host.name]
        grad = getattr(module, "_peft_loraga_grad", None)
        if grad is None:
            never_called.append(host.name)
            continue
        gains[host.name] = _spectrum(grad, max_rank)
        del module._peft_loraga_grad
    if never_called:
        raise RuntimeError(f"no gradient reached {len(never_called)} host(s) (e.g. {never_called[0]}); the component "
                           "map should have marked them ineligible")
    return HostSignals("grad", gains, {h.name: h.component for h in candidates.hosts},
                       {h.name: h.lora_params // h.rank for h in candidates.hosts}, dict(candidates.skipped),
                       examples=len(examples), tokens=stats["tokens"], wall_s=time.perf_counter() - start,
                       extra={"loss": stats["loss"]})


@dataclass
class Probe:
    """A short all-host LoRA run: its per-host update spectra and the PEFT model (for placement-level scores)."""
    signals: HostSignals
    peft_model: nn.Module
    base_loss: float | None
    held_out: list


def probe_signals(model: nn.Module, candidates, train_examples, held_out, pad_id: int, *, seed: int,
                  steps: int = 32, batch_size: int = 8, learning_rate: float = 1e-3) -> Probe:
    """Train LoRA on every candidate host for ``steps`` optimizer steps (the project's trainer, one pass over
    ``steps × batch_size`` examples), then read each host's learned update ``s·B·A``."""
    from ..train import TrainConfig, evaluate_loss, train
    from ..placement.verify import lora_hosts

    start = time.perf_counter()
    chosen = train_examples[:steps * batch_size]
    base_loss = evaluate_loss(model, held_out, pad_id) if held_out else None
    config = TrainConfig(epochs=1, micro_batch_size=batch_size, grad_accum=1, learning_rate=learning_rate,
                         warmup_ratio=0.0, seed=seed, save_every=0, norm_every=0, progress=False,
                         loss_on="full", max_length=max(len(e.input_ids) for e in chosen))
    with tempfile.TemporaryDirectory(prefix="hybridlora-probe-") as tmp:
        result = train(model, candidates, chosen, tmp, config, pad_id=pad_id)
    peft_model = result.peft_model
    gains = {}
    with torch.no_grad():
        for name, mod in lora_hosts(peft_model).items():
            a = mod.lora_A["default"].weight.float()
            b = mod.lora_B["default"].weight.float()
            gains[name] = _spectrum(mod.scaling["default"] * (b @ a), a.shape[0])
    signals = HostSignals("probe", gains, {h.name: h.component for h in candidates.hosts},
                          {h.name: h.lora_params // h.rank for h in candidates.hosts}, dict(candidates.skipped),
                          examples=len(chosen), tokens=sum(len(e.input_ids) for e in chosen),
                          wall_s=time.perf_counter() - start,
                          extra={"steps": result.steps, "final_loss": result.final_loss, "base_loss": base_loss})
    return Probe(signals, peft_model, base_loss, held_out)


@torch.no_grad()
def probe_loss_with_only(probe: Probe, keep: set[str], pad_id: int) -> float:
    """Held-out loss of the probe model with the adapters outside ``keep`` switched off (B zeroed, restored)."""
    from ..placement.verify import lora_hosts
    from ..train import evaluate_loss

    saved = {}
    for name, mod in lora_hosts(probe.peft_model).items():
        if name not in keep:
            weight = mod.lora_B["default"].weight
            saved[name] = weight.detach().clone()
            weight.zero_()
    try:
        return evaluate_loss(probe.peft_model, probe.held_out, pad_id)
    finally:
        for name, mod in lora_hosts(probe.peft_model).items():
            if name in saved:
                mod.lora_B["default"].weight.copy_(saved[name])
