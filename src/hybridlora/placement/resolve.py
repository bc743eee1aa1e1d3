"""Resolving a placement against a component map: the exact modules that will host LoRA adapters."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..components import ComponentMap, ModuleInfo
from .spec import Placement, PlacementError, Target


@dataclass(frozen=True)
class Host:
    name: str
    component: str
    role: str
    layer: int | None
    rank: int
    alpha: float
    lora_params: int  # rank × (in_features + out_features)


@dataclass
class ResolvedPlacement:
    placement: Placement
    hosts: list[Host]
    skipped: dict[str, int] = field(default_factory=dict)  # "component.role: reason" -> count
    base_params: int = 0

    @property
    def name(self) -> str:
        return self.placement.name

    @property
    def trainable_params(self) -> int:
        return sum(h.lora_params for h in self.hosts)

    @property
    def pct_trainable(self) -> float:
        return 100.0 * self.trainable_params / self.base_params if self.base_params else 0.0

    def ranks(self) -> dict[str, int]:
        return {h.name: h.rank for h in self.hosts}

    def components(self) -> dict[str, int]:
        return dict(Counter(h.component for h in self.hosts))


def _matches(target: Target, m: ModuleInfo) -> bool:
    if m.component not in target.components:
        return False
    if target.roles is not None and m.role not in target.roles:
        return False
    if target.layers is not None and (m.layer is None or m.layer not in target.layers):
        return False
    return True


def resolve(placement: Placement, cmap: ComponentMap) -> ResolvedPlacement:
    """Pick host modules. Later targets override earlier ones' rank/alpha for a module both select.

    A role named explicitly that lands on an ineligible module is an error (the user asked for something
    impossible); ineligible modules reached only through a wildcard are skipped and counted.
    """
    chosen: dict[str, Host] = {}
    skipped: Counter[str] = Counter()
    for target in placement.targets:
        for m in cmap.modules:
            if not _matches(target, m):
                continue
            if not m.eligible:
                if target.roles is not None:
                    raise PlacementError(
                        f"placement {placement.name!r} targets {m.name} ({m.component}.{m.role}), which cannot "
                        f"host LoRA: {m.reason}"
                    )
                skipped[f"{m.component}.{m.role}: {m.reason}"] += 1
                continue
            rank, alpha = target.rank_or(placement.rank), target.alpha_or(placement.alpha)
            chosen[m.name] = Host(m.name, m.component, m.role, m.layer, rank, alpha, rank * m.lora_params_per_rank)
    if not chosen:
        raise PlacementError(_nothing_matched(placement, cmap))
    order = {m.name: i for i, m in enumerate(cmap.modules)}
    hosts = sorted(chosen.values(), key=lambda h: order[h.name])
    return ResolvedPlacement(placement, hosts, dict(skipped), cmap.total_params)


def _nothing_matched(placement: Placement, cmap: ComponentMap) -> str:
    present = sorted({f"{m.component}.{m.role}" for m in cmap.modules if m.eligible})
    return (
        f"placement {placement.name!r} matches no eligible module of this {cmap.model_type} model; "
        f"eligible component.role pairs here: {', '.join(present)}"
    )


def with_ranks(resolved: ResolvedPlacement, ranks: dict[str, int], alpha_scale: bool = True) -> ResolvedPlacement:
    """The same hosts at new ranks. With ``alpha_scale`` alpha keeps its ratio to rank (constant LoRA scale)."""
    hosts = []
    for h in resolved.hosts:
        r = ranks[h.name]
        alpha = h.alpha * r / h.rank if alpha_scale else h.alpha
        hosts.append(Host(h.name, h.component, h.role, h.layer, r, alpha, r * (h.lora_params // h.rank)))
    return ResolvedPlacement(resolved.placement, hosts, resolved.skipped, resolved.base_params)
