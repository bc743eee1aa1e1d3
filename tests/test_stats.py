"""Tests of hybridlora.analysis.stats against hand-computable cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hybridlora.analysis import stats as S
from hybridlora.analysis.contract import InstanceRecord, cell_accuracy, group_cells, runs_of, scored_only
from hybridlora.analysis.stats import (
    holm,
    mcnemar_exact,
    paired_bootstrap,
    seed_summary,
    wilson_interval,
)

Z = 1.959963984540054


def cell(values, start=0):
    """{str(i): bool} for a list of 0/1/None."""
    return {str(start + i): (None if v is None else bool(v)) for i, v in enumerate(values)}


# --------------------------------------------------------------------------- Wilson


def test_wilson_222_of_299_matches_closed_form():
    n, k = 299, 222
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(centre - half, abs=1e-12)
    assert high == pytest.approx(centre + half, abs=1e-12)
    # numeric value, to 4 decimals: [0.6901, 0.7887] around p = 0.7425
    assert round(low, 4) == 0.6901
    assert round(high, 4) == 0.7887
    # Wilson is pulled towards 1/2 relative to the point estimate
    assert (low + high) / 2 < p


def test_wilson_edges():
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    # closed form at p=0: upper = (z^2/n) / (1 + z^2/n)
    assert high == pytest.approx((Z**2 / 10) / (1 + Z**2 / 10), abs=1e-12)
    assert round(high, 4) == 0.2775
    low, high = wilson_interval(10, 10)
    assert high == 1.0
    assert low == pytest.approx(1 / (1 + Z**2 / 10), abs=1e-12)
    assert round(low, 4) == 0.7225


def test_wilson_empty_and_invalid():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)


def test_wilson_z_changes_width():
    narrow = wilson_interval(50, 100, z=1.0)
    wide = wilson_interval(50, 100)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_reproducible_with_seed():
    rng = np.random.default_rng(123)
    a = cell(rng.integers(0, 2, 200).tolist())
    b = cell(rng.integers(0, 2, 200).tolist())
    r1 = paired_bootstrap(a, b, resamples=2000, seed=7)
    r2 = paired_bootstrap(dict(reversed(list(a.items()))), b, resamples=2000, seed=7)  # dict order irrelevant
    r3 = paired_bootstrap(a, b, resamples=2000, seed=8)
    assert r1 == r2
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high)
    assert r1.mean_diff == r3.mean_diff
    assert r1.ci_low <= r1.mean_diff <= r1.ci_high


def test_bootstrap_identical_inputs_zero_interval():
    a = cell([1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
    r = paired_bootstrap(a, dict(a), resamples=500)
    assert r == S.BootstrapResult(n_shared=10, mean_diff=0.0, ci_low=0.0, ci_high=0.0)


def test_bootstrap_dominating_and_pairing():
    # a and b agree on 95 of 100 items; a is right and b wrong on the other 5.
    # Unpaired, 0.55 vs 0.50 on n=100 would be nowhere near significant; paired, every
    # resample has diff >= 0 and only ~0.6% of resamples miss all 5 discordant items.
    b_vals = [1] * 50 + [0] * 50
    a_vals = list(b_vals)
    for i in range(50, 55):
        a_vals[i] = 1
    r = paired_bootstrap(cell(a_vals), cell(b_vals), resamples=4000, seed=1)
    assert r.n_shared == 100
    assert r.mean_diff == pytest.approx(0.05)
    assert r.ci_low > 0
    assert r.ci_high < 0.15
    # sign: reversed arguments give the mirrored interval
    r_rev = paired_bootstrap(cell(b_vals), cell(a_vals), resamples=4000, seed=1)
    assert r_rev.mean_diff == pytest.approx(-0.05)
    assert r_rev.ci_high < 0


def test_bootstrap_width_matches_normal_approximation():
    rng = np.random.default_rng(5)
    a_vals = rng.integers(0, 2, 400)
    b_vals = rng.integers(0, 2, 400)
    r = paired_bootstrap(cell(a_vals.tolist()), cell(b_vals.tolist()), resamples=10_000, seed=3)
    d = a_vals - b_vals
    se = d.std(ddof=0) / math.sqrt(d.size)
    assert r.mean_diff == pytest.approx(d.mean())
    assert (r.ci_high - r.ci_low) == pytest.approx(2 * Z * se, rel=0.08)


def test_bootstrap_only_shared_ids_and_scored():
    a = {"1": True, "2": True, "3": False, "4": True, "only_a": True, "x": None}
    b = {"1": False, "2": True, "3": False, "4": False, "only_b": False, "x": True}
    r = paired_bootstrap(a, b, resamples=200)
    assert r.n_shared == 4  # "1".."4"; "x" is unscored in a
    assert r.mean_diff == pytest.approx((3 - 1) / 4)


def test_bootstrap_no_shared_raises():
    with pytest.raises(ValueError, match="share no scored example ids"):
        paired_bootstrap({"a": True}, {"b": True})
    with pytest.raises(ValueError, match="share no scored example ids"):
        paired_bootstrap({"a": None}, {"a": True})


def test_bootstrap_chunking_does_not_change_result(monkeypatch):
    rng = np.random.default_rng(9)
    a = cell(rng.integers(0, 2, 300).tolist())
    b = cell(rng.integers(0, 2, 300).tolist())
    whole = paired_bootstrap(a, b, resamples=3000, seed=4)
    monkeypatch.setattr(S, "_MAX_RESAMPLE_ELEMENTS", 1000)  # 3-row chunks
    chunked = paired_bootstrap(a, b, resamples=3000, seed=4)
    assert chunked == whole


def test_bootstrap_rejects_bad_arguments():
    a = cell([1, 0])
    with pytest.raises(ValueError):
        paired_bootstrap(a, a, resamples=0)
    with pytest.raises(ValueError):
        paired_bootstrap(a, a, level=1.0)
    with pytest.raises(ValueError):
        paired_bootstrap({"1": 2}, {"1": 1})


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_matches_hand_binomial():
    # 1 pair a wrong/b right, 6 pairs a right/b wrong, 5 concordant pairs, 1 id not shared
    a_vals = [0] + [1] * 6 + [1, 1, 0, 0, 1]
    b_vals = [1] + [0] * 6 + [1, 1, 0, 0, 1]
    a = cell(a_vals)
    a["extra"] = True
    r = mcnemar_exact(a, cell(b_vals))
    assert (r.n_shared, r.b01, r.b10) == (12, 1, 6)
    hand = 2 * sum(math.comb(7, k) for k in range(0, 2)) / 2**7
    assert hand == 0.125
    assert r.p_value == pytest.approx(hand, abs=1e-12)
    # swapping arguments swaps the discordant counts, same p
    r2 = mcnemar_exact(cell(b_vals), a)
    assert (r2.b01, r2.b10) == (6, 1)
    assert r2.p_value == pytest.approx(0.125, abs=1e-12)


def test_mcnemar_one_sided_run_and_cap():
    # b01=0, b10=5: p = 2 * (1/2)^5 = 0.0625
    r = mcnemar_exact(cell([1] * 5), cell([0] * 5))
    assert r.p_value == pytest.approx(0.0625, abs=1e-12)
    # balanced discordance: b01 = b10 = 3 -> p capped at 1
    r = mcnemar_exact(cell([1, 1, 1, 0, 0, 0]), cell([0, 0, 0, 1, 1, 1]))
    assert (r.b01, r.b10) == (3, 3)
    assert r.p_value == 1.0


def test_mcnemar_no_discordant_pairs():
    a = cell([1, 0, 1])
    r = mcnemar_exact(a, dict(a))
    assert r == S.McNemarResult(n_shared=3, b01=0, b10=0, p_value=1.0)
    with pytest.raises(ValueError, match="share no scored example ids"):
        mcnemar_exact({"1": True}, {"2": True})


# --------------------------------------------------------------------------- Holm


def test_holm_hand_example():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> max-accumulate 0.06
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)


def test_holm_monotone_and_capped():
    assert holm([0.6, 0.2]) == pytest.approx([0.6, 0.4])
    assert holm([0.7, 0.8]) == [1.0, 1.0]
    assert holm([0.05]) == [0.05]
    assert holm([]) == []
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 0.2, 20)
    adj = np.array(holm(raw.tolist()))
    order = np.argsort(raw)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= raw) and np.all(adj <= 1)


def test_holm_rejects_invalid():
    with pytest.raises(ValueError):
        holm([0.1, float("nan")])
    with pytest.raises(ValueError):
        holm([1.2])


# --------------------------------------------------------------------------- seeds


def test_seed_summary_hand_t_interval():
    # mean 0.54, s = 0.04, t_{0.975, df=2} = 4.302653 (table value)
    mean, low, high = seed_summary([0.50, 0.54, 0.58])
    half = 4.302652729749462 * 0.04 / math.sqrt(3)
    assert mean == pytest.approx(0.54)
    assert low == pytest.approx(0.54 - half, abs=1e-9)
    assert high == pytest.approx(0.54 + half, abs=1e-9)
    assert round(low, 4) == 0.4406 and round(high, 4) == 0.6394


def test_seed_summary_level_and_degenerate():
    m90 = seed_summary([1.0, 2.0, 3.0, 4.0, 5.0], level=0.90)
    m95 = seed_summary([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{0.975, df=4} = 2.776445, s = sqrt(2.5)
    assert m95[2] - m95[0] == pytest.approx(2.7764451051977934 * math.sqrt(2.5) / math.sqrt(5), abs=1e-9)
    assert m90[2] - m90[1] < m95[2] - m95[1]
    mean, low, high = seed_summary([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert seed_summary([0.3, 0.3]) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError):
        seed_summary([])


# --------------------------------------------------------------------------- contract helpers


def test_contract_grouping_and_validation():
    recs = [
        InstanceRecord("m", "base", "base", None, "mmlu", "0", True),
        InstanceRecord("m", "base", "base", None, "mmlu", "1", False),
        InstanceRecord("m", "mlp_only", "chat", 1, "mmlu", "0", True),
        InstanceRecord("m", "mlp_only", "chat", 1, "humaneval", "0", None),
    ]
    cells = group_cells(recs)
    assert cells[("m", "base", "base", None, "mmlu")] == {"0": True, "1": False}
    assert cell_accuracy(cells[("m", "base", "base", None, "mmlu")]) == (1, 2)
    assert cell_accuracy(cells[("m", "mlp_only", "chat", 1, "humaneval")]) == (0, 0)
    assert scored_only({"a": None, "b": False}) == {"b": False}
    assert [r.key for r in runs_of(recs)] == [("m", "base", "base", None), ("m", "mlp_only", "chat", 1)]
    with pytest.raises(ValueError, match="duplicate example_id"):
        group_cells(recs + [recs[0]])
    with pytest.raises(ValueError, match="example_id must be a str"):
        InstanceRecord("m", "base", "base", None, "mmlu", 0, True)
    with pytest.raises(ValueError, match="both set to 'base'"):
        InstanceRecord("m", "base", "chat", None, "mmlu", "0", True)
    with pytest.raises(ValueError, match="correct must be a bool"):
        InstanceRecord("m", "base", "base", None, "mmlu", "0", 1)
