"""Budget matching: choose ranks so that different placements train the same number of parameters.

Every host's rank is scaled by one common factor (so a placement's per-component rank *ratios* are kept),
then rounded; a greedy pass nudges single hosts by ±1 rank to land as close to the budget as possible.
alpha is scaled with rank so the LoRA scale alpha/r is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from .resolve import ResolvedPlacement, with_ranks
from .spec import PlacementError


@dataclass
class BudgetReport:
    requested: int
    achieved: int

    @property
    def relative_error(self) -> float:
        return (self.achieved - self.requested) / self.requested


def match_budget(resolved: ResolvedPlacement, budget: int, max_rank: int = 4096) -> tuple[ResolvedPlacement, BudgetReport]:
    if budget <= 0:
        raise PlacementError(f"--budget must be a positive number of parameters, got {budget}")
    per_rank = {h.name: h.lora_params // h.rank for h in resolved.hosts}
    minimum = sum(per_rank.values())
    if budget < minimum:
        raise PlacementError(
            f"budget {budget:,} is below what placement {resolved.name!r} needs at rank 1 ({minimum:,}); "
            "raise the budget or choose a smaller placement"
        )
    scale = budget / resolved.trainable_params
    ranks = {h.name: min(max_rank, max(1, round(h.rank * scale))) for h in resolved.hosts}
    ranks = _nudge(ranks, per_rank, budget, max_rank)
    matched = with_ranks(resolved, ranks)
    return matched, BudgetReport(budget, matched.trainable_params)


def _nudge(ranks: dict[str, int], per_rank: dict[str, int], budget: int, max_rank: int) -> dict[str, int]:
    """Greedy ±1 rank steps on single hosts while that brings the total closer to the budget."""
    ranks = dict(ranks)
    total = sum(ranks[n] * per_rank[n] for n in ranks)
    for _ in range(4 * len(ranks)):
        gap = budget - total
        step = 1 if gap > 0 else -1
        candidates = [n for n in ranks if 1 <= ranks[n] + step <= max_rank and abs(gap - step * per_rank[n]) < abs(gap)]
        if not candidates:
            break
        best = min(candidates, key=lambda n: abs(gap - step * per_rank[n]))
        ranks[best] += step
        total += step * per_rank[best]
    return ranks
