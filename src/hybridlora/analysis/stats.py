"""Statistics core: intervals, paired tests and multiplicity correction.

All functions are pure (no I/O, no global random state). Accuracies and differences are in
*proportion units* (0.0 .. 1.0, or -1.0 .. 1.0 for differences); multiply by 100 for
percentage points.

Paired functions take two cells as ``{example_id: correct}`` mappings (see
:func:`hybridlora.analysis.contract.group_cells`) and pair them on the example ids that are
present in both *and* scored (not ``None``) in both. Ids present in only one mapping are
ignored; ``n_shared`` in the result says how many pairs were used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as _sps

__all__ = [
    "Z_95",
    "BootstrapResult",
    "McNemarResult",
    "wilson_interval",
    "paired_bootstrap",
    "mcnemar_exact",
    "holm",
    "seed_summary",
    "paired_arrays",
]

Z_95 = 1.959963984540054
"""Standard-normal quantile for a two-sided 95% interval."""

_MAX_RESAMPLE_ELEMENTS = 1 << 22
"""Upper bound on the entries of one resample-index chunk (about 32 MiB of int64)."""


@dataclass(frozen=True)
class BootstrapResult:
    """Paired-bootstrap result. ``mean_diff`` = mean(a) - mean(b) over the ``n_shared``
    pairs, in proportion units; ``[ci_low, ci_high]`` its percentile interval."""

    n_shared: int
    mean_diff: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar result over ``n_shared`` pairs. ``b01``: pairs with a wrong, b right;
    ``b10``: pairs with a right, b wrong; ``p_value``: exact two-sided."""

    n_shared: int
    b01: int
    b10: int
    p_value: float


def wilson_interval(correct: int, n: int, z: float = Z_95) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Inputs: ``correct`` successes out of ``n`` trials (ints, ``0 <= correct <= n``), ``z``
    the normal quantile (default: two-sided 95%).
    Output: ``(low, high)`` in proportion units, clipped to [0, 1]; ``(nan, nan)`` if
    ``n == 0``.

    With ``p = correct / n``::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    """
    if isinstance(correct, bool) or isinstance(n, bool):
        raise TypeError("correct and n must be ints, not bools")
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact bounds at the edges
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


def _as_flag(value: object, side: str, eid: str) -> Optional[bool]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{side}[{eid!r}] must be True/False/0/1/None, got {value!r}")


def paired_arrays(
    a: Mapping[str, Optional[bool]], b: Mapping[str, Optional[bool]]
) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Align two cells on their shared, scored example ids.

    Inputs: two ``{example_id: correct}`` mappings (``correct`` True/False/0/1, or ``None``
    = not scored).
    Output: ``(ids, xa, xb)`` — ``ids`` the shared ids scored in both, sorted (string
    order); ``xa``, ``xb`` boolean arrays of shape ``(len(ids),)`` aligned with ``ids``.
    """
    ids: List[str] = []
    xa: List[bool] = []
    xb: List[bool] = []
    for eid in sorted(set(a).intersection(b)):
        va = _as_flag(a[eid], "a", eid)
        vb = _as_flag(b[eid], "b", eid)
        if va is None or vb is None:
            continue
        ids.append(eid)
        xa.append(va)
        xb.append(vb)
    return ids, np.asarray(xa, dtype=bool), np.asarray(xb, dtype=bool)


def _shared_or_raise(a, b, what: str) -> Tuple[np.ndarray, np.ndarray]:
    ids, xa, xb = paired_arrays(a, b)
    if not ids:
        raise ValueError(
            f"{what}: the two cells share no scored example ids "
            f"(a has {len(a)} ids, b has {len(b)}); nothing to pair"
        )
    return xa, xb


def paired_bootstrap(
    a: Mapping[str, Optional[bool]],
    b: Mapping[str, Optional[bool]],
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Paired percentile bootstrap of the accuracy difference ``mean(a) - mean(b)``.

    Inputs: two cells ``{example_id: correct}``; pairs are the ids present and scored in
    both (sorted, so the result does not depend on dict order). ``resamples`` bootstrap
    replicates, each drawing ``n_shared`` pairs with replacement from a
    ``numpy.random.default_rng(seed)`` stream; ``level`` the interval's coverage.
    Output: :class:`BootstrapResult` ``(n_shared, mean_diff, ci_low, ci_high)``; all
    differences in proportion units (e.g. 0.05 = five percentage points). The interval is
    the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the replicate differences.
    Raises ``ValueError`` when no scored id is shared.

    Resample indices are drawn as ``(chunk, n_shared)`` matrices with
    ``chunk * n_shared <= 2**22`` to bound memory.
    """
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    xa, xb = _shared_or_raise(a, b, "paired_bootstrap")
    n = xa.size
    # per-pair difference in {-1, 0, 1}
    d = xa.astype(np.int8) - xb.astype(np.int8)
    mean_diff = float(d.sum(dtype=np.int64)) / n

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_RESAMPLE_ELEMENTS // n)
    reps = np.empty(int(resamples), dtype=np.float64)
    done = 0
    while done < resamples:
        m = min(chunk, int(resamples) - done)
        idx = rng.integers(0, n, size=(m, n))
        reps[done : done + m] = d[idx].sum(axis=1, dtype=np.int64) / n
        done += m
    alpha = 1.0 - level
    low, high = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return BootstrapResult(n_shared=int(n), mean_diff=mean_diff, ci_low=float(low), ci_high=float(high))


def mcnemar_exact(a: Mapping[str, Optional[bool]], b: Mapping[str, Optional[bool]]) -> McNemarResult:
    """Exact (binomial) two-sided McNemar test on paired correctness.

    Inputs: two cells ``{example_id: correct}``, paired on shared scored ids as in
    :func:`paired_bootstrap`.
    Output: :class:`McNemarResult` with ``b01`` = #(a wrong, b right), ``b10`` = #(a right,
    b wrong), and ``p_value`` = two-sided ``scipy.stats.binomtest(b10, b01 + b10, 0.5)``
    p-value; ``1.0`` when there are no discordant pairs.
    Raises ``ValueError`` when no scored id is shared.
    """
    xa, xb = _shared_or_raise(a, b, "mcnemar_exact")
    b01 = int(np.count_nonzero(~xa & xb))
    b10 = int(np.count_nonzero(xa & ~xb))
    if b01 + b10 == 0:
        p = 1.0
    else:
        p = float(_sps.binomtest(b10, b01 + b10, 0.5, alternative="two-sided").pvalue)
    return McNemarResult(n_shared=int(xa.size), b01=b01, b10=b10, p_value=min(1.0, p))


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm–Bonferroni adjusted p-values.

    Input: ``m`` raw p-values (each in [0, 1], no NaN), in any order.
    Output: list of ``m`` adjusted p-values in the *same order* as the input. With the raw
    values sorted ascending ``p_(1) <= ... <= p_(m)``, the adjusted value of ``p_(i)`` is
    ``min(1, max_{j <= i} (m - j + 1) * p_(j))``, so adjusted values are monotone in the raw
    ones and capped at 1. Reject at family-wise level alpha where adjusted <= alpha.
    """
    p = np.asarray(list(p_values), dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("p_values must be a flat sequence")
    if p.size == 0:
        return []
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must lie in [0, 1] (no NaN), got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(scaled))
    out = np.empty(m, dtype=np.float64)
    out[order] = adjusted_sorted
    return out.tolist()


def seed_summary(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """Mean over seeds with a Student-t interval.

    Input: ``k`` per-seed values (e.g. accuracies of the same cell under different seeds),
    ``level`` the interval's coverage.
    Output: ``(mean, low, high)`` with ``low/high = mean -/+ t_{(1+level)/2, k-1} * s /
    sqrt(k)`` and ``s`` the sample standard deviation (ddof=1). For ``k == 1`` the interval
    is ``(nan, nan)``. Raises ``ValueError`` for an empty input or NaN values.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("seed_summary needs a non-empty flat sequence of values")
    if np.isnan(x).any():
        raise ValueError(f"seed_summary got NaN among {x.tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    mean = float(x.mean())
    k = x.size
    if k == 1:
        return (mean, math.nan, math.nan)
    sem = float(x.std(ddof=1)) / math.sqrt(k)
    half = float(_sps.t.ppf((1.0 + level) / 2.0, df=k - 1)) * sem
    return (mean, mean - half, mean + half)
