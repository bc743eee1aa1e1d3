"""Verification: attach a placement with PEFT and prove that every adapter is where it should be and alive.

Static checks (any device, meta included): the modules PEFT wrapped equal the planned hosts, the trainable
parameter count equals the plan, and nothing outside the placement's components was touched.

Liveness (needs real tensors): with non-zero LoRA weights, one forward/backward must give every adapter a
gradient, and perturbing each adapter's B matrix alone must change the logits. A module whose weight a
kernel reads without calling the module (Jamba ``dt_proj``) fails both and is reported dead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .peft_config import exact_targets, lora_config
from .resolve import ResolvedPlacement


@dataclass
class VerifyReport:
    placement: str
    expected_hosts: int
    actual_hosts: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    forbidden: list[str] = field(default_factory=list)  # hosts on ineligible modules
    rank_mismatch: list[str] = field(default_factory=list)
    planned_trainable: int = 0
    peft_trainable: int = 0
    liveness_checked_on: str | None = None  # "model" | "tiny same-family model" | None
    live: list[str] = field(default_factory=list)
    dead: dict[str, str] = field(default_factory=dict)  # name -> why

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.forbidden or self.rank_mismatch or self.dead) and (
            self.planned_trainable == self.peft_trainable
        )

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def attach(model: nn.Module, resolved: ResolvedPlacement, *, init_lora_weights: bool | str = True):
    """Wrap ``model`` with PEFT LoRA on exactly the resolved hosts."""
    from peft import get_peft_model

    with exact_targets():
        return get_peft_model(model, lora_config(resolved, init_lora_weights=init_lora_weights))


def lora_hosts(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Modules PEFT turned into LoRA layers, by their name in the base model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name[len(prefix):] if name.startswith(prefix) else name: mod
        for name, mod in peft_model.named_modules()
        if isinstance(mod, LoraLayer)
    }


def check_static(peft_model: nn.Module, resolved: ResolvedPlacement, cmap=None) -> VerifyReport:
    hosts = lora_hosts(peft_model)
    planned = {h.name: h for h in resolved.hosts}
    report = VerifyReport(resolved.name, len(planned), len(hosts))
    report.missing = sorted(set(planned) - set(hosts))
    report.unexpected = sorted(set(hosts) - set(planned))
    for name, mod in hosts.items():
        if name in planned and mod.r.get("default") != planned[name].rank:
            report.rank_mismatch.append(f"{name}: r={mod.r.get('default')} planned {planned[name].rank}")
    if cmap is not None:
        by_name = {m.name: m for m in cmap.modules}
        report.forbidden = sorted(n for n in hosts if n in by_name and not by_name[n].eligible)
    report.planned_trainable = resolved.trainable_params
    report.peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return report


def _lora_b_weights(mod: nn.Module) -> list[torch.Tensor]:
    return [p for p in mod.lora_B["default"].parameters()]


def _probe_loss(model: nn.Module, input_ids: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits.float()
    return (logits * probe).sum()


def check_liveness(peft_model: nn.Module, *, seq_len: int = 16, seed: int = 0, rel_tol: float = 1e-6) -> tuple[list[str], dict[str, str]]:
    """Return (live, dead) over every LoRA host of ``peft_model`` (real tensors, any device).

    The model must have been attached with non-zero LoRA weights (``init_lora_weights=False``), otherwise
    B = 0 and A gets no gradient by construction.
    """
    hosts = lora_hosts(peft_model)
    device = next(peft_model.parameters()).device
    vocab = peft_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (1, seq_len), generator=gen).to(device)
    probe = torch.randn(1, seq_len, vocab, generator=gen).to(device)

    peft_model.eval()  # no dropout: perturbation effects must be deterministic
    peft_model.zero_grad(set_to_none=True)
    loss = _probe_loss(peft_model, input_ids, probe)
    loss.backward()
    with torch.no_grad():
        reference = peft_model(input_ids=input_ids).logits.float()
    scale = reference.abs().max().item() or 1.0

    live, dead = [], {}
    for name, mod in hosts.items():
        params = [p for p in mod.parameters() if p.requires_grad]
        has_grad = any(p.grad is not None and p.grad.abs().sum().item() > 0 for p in params)
        changed = _perturbation_changes_output(peft_model, mod, input_ids, reference, scale * rel_tol)
        if has_grad and changed:
            live.append(name)
        else:
            why = []
            if not has_grad:
                why.append("no gradient reaches its LoRA weights")
            if not changed:
                why.append("perturbing its LoRA weights does not change the output")
            dead[name] = "; ".join(why)
    peft_model.zero_grad(set_to_none=True)
    return live, dead


@torch.no_grad()
def _perturbation_changes_output(model, mod, input_ids, reference, tol) -> bool:
    weights = _lora_b_weights(mod)
    saved = [w.detach().clone() for w in weights]
    for w in weights:
        w.add_(torch.randn_like(w) * (w.abs().mean() + 1e-2))
    out = model(input_ids=input_ids).logits.float()
    for w, s in zip(weights, saved):
        w.copy_(s)
    return (out - reference).abs().max().item() > tol


def _host_class(m) -> tuple[str, str, str | None]:
    return (m.component, m.role, m.layer_kind)


def verify_placement(config, placement, *, budget: int | None = None, model: nn.Module | None = None) -> tuple[VerifyReport, ResolvedPlacement]:
    """Full verification of ``placement`` on the model described by ``config``.

    Static checks run on the exact full-size model (on ``meta`` unless ``model`` with real weights is given).
    Liveness runs on ``model`` when given, else on a tiny random same-family model: every host class
    (component, role, layer kind) of the full model must be alive there.
    """
    from ..components import build_component_map
    from ..families import family_for
    from ..models import build_meta_model, build_model, text_config, tiny_config
    from .budget import match_budget
    from .resolve import resolve

    full = model if model is not None else build_meta_model(config)
    cmap = build_component_map(full)
    resolved = resolve(placement, cmap)
    if budget is not None:
        resolved, _ = match_budget(resolved, budget)
    if model is None:
        peft_model = attach(full, resolved)
        report = check_static(peft_model, resolved, cmap)
        family = family_for(text_config(config).model_type)
        if family is None or not family.tiny:
            report.dead["*"] = "liveness not checked: no tiny config for this family; pass --load-weights"
            return report, resolved
        tiny = build_model(tiny_config(config, family))
        tiny_map = build_component_map(tiny)
        tiny_resolved = resolve(placement, tiny_map)
        live, dead = check_liveness(attach(tiny, tiny_resolved, init_lora_weights=False))
        report.liveness_checked_on = "tiny same-family model"
        tiny_class = {m.name: _host_class(m) for m in tiny_map.modules}
        dead_classes = {tiny_class[n]: why for n, why in dead.items()}
        live_classes = {tiny_class[n] for n in live}
        for host in resolved.hosts:
            cls = _host_class(cmap.module(host.name))
            if cls in dead_classes:
                report.dead[host.name] = dead_classes[cls]
            elif cls in live_classes:
                report.live.append(host.name)
            else:
                report.dead[host.name] = f"liveness not checked: the tiny model has no {cls[0]}.{cls[1]} in a {cls[2]} layer"
        return report, resolved
    peft_model = attach(full, resolved, init_lora_weights=False)
    report = check_static(peft_model, resolved, cmap)
    report.live, report.dead = check_liveness(peft_model)
    report.liveness_checked_on = "model"
    return report, resolved
