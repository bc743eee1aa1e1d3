"""From per-host spectra to a placement: which hosts get LoRA and at which rank, within a parameter budget.

Each host's value is concave in its rank (its per-rank gains are sorted descending), so the greedy that always
buys the next rank with the largest gain per trainable parameter is the classic answer to this separable
knapsack: it is exact at the budget points it passes through, and the last purchase is the only approximation.
Ranks are bought in ``unit`` groups: ``host`` (each module its own rank; layers fall out of the signal; modules
a spec cannot tell apart, such as one layer's MoE experts, share one) or
``component`` (all hosts of one component.role share a rank, a coarser and less noisy proposal).

The result is a :class:`~hybridlora.placement.Placement` (one target per component, role and rank, with its
layers), so it travels as YAML to ``train`` and ``study`` and resolves to exactly the chosen hosts and ranks.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..placement import BudgetReport, Placement, PlacementError, ResolvedPlacement, Target, resolve
from .signals import HostSignals

UNITS = ("host", "component")


@dataclass
class Allocation:
    ranks: dict[str, int]  # host -> rank (hosts with rank 0 are not in the placement)
    budget: BudgetReport
    predicted_value: float  # the signal's total value of the proposal (for comparison with presets)


def _units(signals: HostSignals, candidates: ResolvedPlacement, unit: str) -> dict[str, list[str]]:
    # A placement spec addresses modules by component, role and layer, so modules that share all three (the
    # experts of one MoE layer) must share a rank: they are one unit even at "host" granularity.
    groups: dict[str, list[str]] = defaultdict(list)
    for h in candidates.hosts:
        key = f"{h.component}.{h.role}" + (f"@{h.layer}" if unit == "host" else "")
        groups[key].append(h.name)
    return dict(groups)


def allocate(signals: HostSignals, candidates: ResolvedPlacement, budget: int, *, unit: str = "host",
             max_rank: int = 256) -> Allocation:
    """Greedy rank purchase until no further rank fits the budget (ties: cheapest, then name order)."""
    if unit not in UNITS:
        raise PlacementError(f"unknown allocation unit {unit!r}; choose from {', '.join(UNITS)}")
    units = _units(signals, candidates, unit)
    cost = {u: sum(signals.cost_per_rank[h] for h in hosts) for u, hosts in units.items()}
    cheapest = min(cost.values())
    if budget < cheapest:
        raise PlacementError(f"budget {budget:,} is below one rank on the cheapest host ({cheapest:,} parameters); "
                             "raise --budget or --rank")

    def gain(u: str, r: int) -> float:  # value of the (r+1)-th rank of unit u
        if r >= max_rank:
            return -1.0
        return float(sum(signals.gains[h][r] if r < len(signals.gains[h]) else 0.0 for h in units[u]))

    rank = {u: 0 for u in units}
    heap = [(-gain(u, 0) / cost[u], cost[u], u) for u in sorted(units)]
    heapq.heapify(heap)
    spent, value = 0, 0.0
    while heap:
        neg_ratio, c, u = heapq.heappop(heap)
        if neg_ratio > 0 or spent + c > budget:  # exhausted (rank cap) or too expensive now: drop the unit
            continue
        value += gain(u, rank[u])
        rank[u] += 1
        spent += c
        heapq.heappush(heap, (-gain(u, rank[u]) / c, c, u))
    ranks = {h: rank[u] for u, hosts in units.items() for h in hosts if rank[u] > 0}
    return Allocation(ranks, BudgetReport(budget, spent), value)


def placement_of(allocation: Allocation, candidates: ResolvedPlacement, name: str, *,
                 alpha_ratio: float = 2.0) -> Placement:
    """The allocation as a placement spec: one target per (component, role, rank) with its layers.

    alpha = ``alpha_ratio`` × rank on every host, so the LoRA scale alpha/r is the study's (32/16) everywhere.
    """
    groups: dict[tuple[str, str, int], list] = defaultdict(list)
    for h in candidates.hosts:
        r = allocation.ranks.get(h.name, 0)
        if r:
            groups[(h.component, h.role, r)].append(h.layer)
    if not groups:
        raise PlacementError("the allocation chose no host; raise the budget")
    targets = []
    for (component, role, r), layers in sorted(groups.items()):
        in_layers = [layer for layer in layers if layer is not None]
        if len(in_layers) != len(layers):
            raise PlacementError(f"{component}.{role} hosts outside the decoder layers cannot be placed by layer")
        targets.append(Target(components=(component,), roles=(role,), layers=tuple(sorted(in_layers)), rank=r,
                              alpha=alpha_ratio * r))
    return Placement(name=name, targets=tuple(targets), rank=max(r for *_, r in groups), alpha=alpha_ratio * 16,
                     description="proposed by hybridlora advise")


def check_resolves_exactly(placement: Placement, cmap, allocation: Allocation) -> ResolvedPlacement:
    """Resolve the proposed spec and insist that it lands on exactly the allocated hosts and ranks."""
    resolved = resolve(placement, cmap)
    got = resolved.ranks()
    if got != allocation.ranks:
        diff = sorted(set(got.items()) ^ set(allocation.ranks.items()))[:3]
        raise PlacementError(f"internal: the proposal's YAML resolves to other hosts/ranks than allocated ({diff})")
    return resolved


def placement_value(signals: HostSignals, resolved: ResolvedPlacement) -> float:
    """The signal's value of any placement at its own ranks (hosts without a signal count zero and are named
    by ``unscored_hosts``)."""
    return float(sum(signals.value(h.name, h.rank) for h in resolved.hosts if h.name in signals.gains))


def unscored_hosts(signals: HostSignals, resolved: ResolvedPlacement) -> list[str]:
    return [h.name for h in resolved.hosts if h.name not in signals.gains]


def component_shares(resolved: ResolvedPlacement) -> dict[str, float]:
    """Fraction of the trainable parameters per component type."""
    totals: dict[str, int] = defaultdict(int)
    for h in resolved.hosts:
        totals[h.component] += h.lora_params
    whole = sum(totals.values()) or 1
    return {c: n / whole for c, n in sorted(totals.items(), key=lambda kv: -kv[1])}


def rank_summary(resolved: ResolvedPlacement) -> dict[str, dict]:
    """Per component.role: hosts, layers and the ranks used (min / median / max)."""
    by: dict[str, list] = defaultdict(list)
    for h in resolved.hosts:
        by[f"{h.component}.{h.role}"].append(h)
    out = {}
    for key, hosts in sorted(by.items()):
        ranks = [h.rank for h in hosts]
        out[key] = {"hosts": len(hosts), "layers": sorted({h.layer for h in hosts if h.layer is not None}),
                    "rank_min": min(ranks), "rank_median": float(np.median(ranks)), "rank_max": max(ranks),
                    "params": sum(h.lora_params for h in hosts)}
    return out
