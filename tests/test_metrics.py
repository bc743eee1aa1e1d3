"""Metrics of the placement study on small hand-made tables whose answers are computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from hybridlora.analysis.contract import InstanceRecord, RunInfo
from hybridlora.analysis.metrics import (
    accuracy_matrix,
    accuracy_summary,
    compute_tables,
    delta_table,
    domain_effects,
    efficiency_table,
    index_study,
    loss_curves,
    norm_curves,
    paired_comparisons,
    pareto_mask,
    placement_means,
    practitioner_recipe,
    recipe_choice,
    resolve_full_placements,
    seed_comparisons,
)
from hybridlora.analysis.results import StudyResults
from hybridlora.analysis.stats import holm

M = "toy/model"


def cell(placement, domain, seed, bench, values, model=M):
    """Records of one cell; ``values`` is a list of True/False/None (ids "0", "1", ...) or a dict."""
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return [InstanceRecord(model, placement, domain, seed, bench, str(i), v) for i, v in items]


def bits(n_correct, n):
    return [True] * n_correct + [False] * (n - n_correct)


def study(records, runs=None, **kw):
    if runs is None:
        keys = dict.fromkeys((r.model, r.placement, r.train_domain, r.seed) for r in records)
        runs = [RunInfo(*k) for k in keys]
    return StudyResults(records=records, runs=runs, **kw)


def by(rows, **match):
    out = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(out) == 1, (match, out)
    return out[0]


# --------------------------------------------------------------------------- accuracy


def test_accuracy_row_and_wilson_by_hand():
    res = study(cell("base", "base", None, "arc", bits(222, 299)))
    row = accuracy_matrix(index_study(res))[0]
    n, k, z = 299, 222, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (row["n"], row["correct"], row["status"]) == (299, 222, "scored")
    assert row["accuracy"] == pytest.approx(0.742474916, abs=1e-9)
    assert row["wilson_low"] == pytest.approx(centre - half, abs=1e-12)
    assert row["wilson_high"] == pytest.approx(centre + half, abs=1e-12)
    assert (round(row["wilson_low"], 4), round(row["wilson_high"], 4)) == (0.6901, 0.7887)
    assert row["seed"] is None and row["train_domain"] == "base"


def test_unscored_cell_is_not_zero_and_not_in_means():
    recs = (cell("base", "base", None, "mmlu", bits(2, 4))
            + cell("a", "codealpaca", 1, "mmlu", bits(3, 4))
            + cell("a", "codealpaca", 1, "humaneval", [None] * 5))
    res = study(recs)
    index = index_study(res)
    he = by(accuracy_matrix(index), benchmark="humaneval")
    assert he["status"] == "not scored"
    assert he["accuracy"] is None and he["correct"] is None and he["n"] == 0 and he["n_examples"] == 5
    deltas = delta_table(res, index)
    assert by(deltas, benchmark="humaneval")["status"] == "not scored"
    eff = domain_effects(res, deltas)[0]
    # the target (humaneval) is not scored: no target delta, and mmlu alone makes the mean
    assert eff["target_delta_pp"] is None and eff["target_note"] == "target benchmark not scored"
    assert eff["mean_delta_pp"] == pytest.approx(25.0)
    means = placement_means(index)
    assert means[0]["benchmarks"] == ["mmlu"] and means[0]["mean_accuracy"] == pytest.approx(0.75)


def test_partially_scored_cell_uses_scored_examples():
    res = study(cell("base", "base", None, "b", [True, None, False, True]))
    row = accuracy_matrix(index_study(res))[0]
    assert (row["n"], row["correct"], row["status"]) == (3, 2, "partially scored")


def test_accuracy_summary_over_seeds():
    recs = [r for seed, k in ((1, 5), (2, 7), (3, 6)) for r in cell("a", "d", seed, "b", bits(k, 10))]
    summary = accuracy_summary(accuracy_matrix(index_study(study(recs))))
    row = by(summary, placement="a")
    vals = [0.5, 0.7, 0.6]
    half = sps.t.ppf(0.975, 2) * np.std(vals, ddof=1) / math.sqrt(3)
    assert row["k_seeds"] == 3 and row["accuracy"] == pytest.approx(0.6)
    assert row["seed_ci_low"] == pytest.approx(0.6 - half) and row["seed_ci_high"] == pytest.approx(0.6 + half)


# --------------------------------------------------------------------------- deltas, forgetting, efficiency


def test_delta_pairs_on_shared_ids_only():
    base = cell("base", "base", None, "gsm8k", [True, True, False, False])          # ids 0..3: 2/4
    tuned = cell("a", "chat", 1, "gsm8k", [True, True, True, False] + [True] * 4)   # ids 0..7: 7/8
    res = study(base + tuned)
    row = by(delta_table(res, index_study(res)), placement="a")
    # on the 4 shared ids: 3/4 - 2/4 = +25 pp (the unpaired 7/8 - 2/4 would say +37.5)
    assert row["n_shared"] == 4
    assert row["delta_pp"] == pytest.approx(25.0)
    assert (row["accuracy"], row["base_accuracy"]) == (0.75, 0.5)


def _forgetting_study(params=2_000_000):
    recs = []
    for bench in ("gsm8k", "mmlu", "arc"):
        recs += cell("base", "base", None, bench, bits(2, 4))
    recs += cell("a", "gsm8k", 1, "gsm8k", bits(3, 4))  # +25 pp (target)
    recs += cell("a", "gsm8k", 1, "mmlu", bits(1, 4))   # -25 pp
    recs += cell("a", "gsm8k", 1, "arc", bits(3, 4))    # +25 pp
    runs = [RunInfo(M, "base", "base", None, 0), RunInfo(M, "a", "gsm8k", 1, params)]
    return study(recs, runs)


def test_target_non_target_and_forgetting_by_hand():
    res = _forgetting_study()
    index = index_study(res)
    eff = domain_effects(res, delta_table(res, index))[0]
    assert eff["target_delta_pp"] == pytest.approx(25.0)
    assert eff["non_target_delta_pp"] == pytest.approx(0.0)           # (-25 + 25) / 2
    assert eff["forgetting_pp"] == pytest.approx(12.5)                # (max(0, 25) + max(0, -25)) / 2
    assert eff["mean_delta_pp"] == pytest.approx(25.0 / 3)
    assert eff["target_benchmarks"] == ["gsm8k"] and sorted(eff["non_target_benchmarks"]) == ["arc", "mmlu"]


def test_gain_per_million_params():
    res = _forgetting_study(params=2_000_000)
    index = index_study(res)
    eff = domain_effects(res, delta_table(res, index))
    row = efficiency_table(index, eff)[0]
    assert row["trainable_params"] == 2_000_000
    assert row["gain_pp_per_million"] == pytest.approx((25.0 / 3) / 2.0)
    res_unknown = _forgetting_study(params=None)
    idx = index_study(res_unknown)
    assert efficiency_table(idx, domain_effects(res_unknown, delta_table(res_unknown, idx)))[0][
        "gain_pp_per_million"] is None


def test_domain_without_targets_counts_everything_as_non_target():
    recs = cell("base", "base", None, "mmlu", bits(2, 4)) + cell("a", "chat", 1, "mmlu", bits(1, 4))
    res = study(recs)
    eff = domain_effects(res, delta_table(res, index_study(res)))[0]
    assert eff["target_delta_pp"] is None and eff["target_note"] == "no target benchmark defined"
    assert eff["forgetting_pp"] == pytest.approx(25.0)


# --------------------------------------------------------------------------- Pareto and recipe


def test_pareto_mask_by_hand():
    params = [1, 2, 3, 4, 2]
    scores = [0.5, 0.6, 0.55, 0.7, 0.6]
    # point 2 (3 params, 0.55) is dominated by point 1 (2, 0.6); the two identical points both survive
    assert pareto_mask(params, scores) == [True, True, False, True, True]
    assert pareto_mask([5, 5], [0.1, 0.2]) == [False, True]


def test_recipe_choice_by_hand():
    cands = [("all", 100, 0.60), ("a", 10, 0.58), ("b", 5, 0.56), ("c", 10, 0.59)]
    pick = recipe_choice(cands, "all")
    assert pick["threshold"] == pytest.approx(0.57)
    assert pick["qualifying"] == ["c", "a", "all"]    # fewest params first; tie on params -> higher accuracy
    assert pick["choice"] == "c"
    assert recipe_choice(cands, "all", fraction=0.99)["choice"] == "all"
    unknown = recipe_choice([("all", None, 0.6), ("a", None, 0.59)], "all")
    assert unknown["choice"] is None and "unknown" in unknown["reason"]


def _recipe_study(with_params=True, full=None):
    """Three placements on one domain and two benchmarks; params 100 / 30 / 10."""
    accs = {"all": (8, 8), "mid": (8, 7), "small": (6, 6)}  # correct out of 10 on b1, b2
    params = {"all": 100, "mid": 30, "small": 10}
    recs, runs = [], [RunInfo(M, "base", "base", None, 0)]
    for bench in ("b1", "b2"):
        recs += cell("base", "base", None, bench, bits(5, 10))
    for name, (k1, k2) in accs.items():
        recs += cell(name, "d", 1, "b1", bits(k1, 10)) + cell(name, "d", 1, "b2", bits(k2, 10))
        runs.append(RunInfo(M, name, "d", 1, params[name] if with_params else None))
    return study(recs, runs, full_placement=full or {})


def test_practitioner_recipe_on_a_small_table():
    res = _recipe_study()
    index = index_study(res)
    full = resolve_full_placements(res, index)
    assert full[M].placement == "all" and full[M].source == "most trainable params" and "all" in full[M].note
    means = placement_means(index)
    assert by(means, placement="mid")["mean_accuracy"] == pytest.approx(0.75)
    # Pareto: small (10, 0.6), mid (30, 0.75), all (100, 0.8): none dominates another
    assert all(r["pareto"] for r in means)
    recipe = practitioner_recipe(means, full)[0]
    # threshold 0.95 * 0.8 = 0.76: mid (0.75) misses it, so only `all` qualifies
    assert recipe["threshold"] == pytest.approx(0.76)
    assert recipe["recommended"] == "all" and recipe["qualifying"] == ["all"]
    # at 90% (0.72) the mid placement is the smallest that qualifies
    assert practitioner_recipe(means, full, fraction=0.90)[0]["recommended"] == "mid"
    assert practitioner_recipe(means, full, fraction=0.90)[0]["ratio_to_full"] == pytest.approx(0.75 / 0.8)


def test_full_placement_rules():
    res = _recipe_study(full={M: "mid"})
    assert resolve_full_placements(res, index_study(res))[M].source == "given"
    res = _recipe_study(with_params=False)
    choice = resolve_full_placements(res, index_study(res))[M]
    assert (choice.placement, choice.source) == ("all", "name")
    res = _recipe_study(with_params=False, full={M: "nonexistent"})
    choice = resolve_full_placements(res, index_study(res))[M]
    assert choice.placement == "all" and "nonexistent" in choice.note


def test_placement_means_use_ids_common_to_the_group():
    recs = (cell("a", "d", 1, "b", [True, False, True, True])       # ids 0..3
            + cell("c", "d", 1, "b", [True, True, False]))          # ids 0..2
    means = placement_means(index_study(study(recs)))
    assert by(means, placement="a")["mean_accuracy"] == pytest.approx(2 / 3)  # ids 0..2 only
    assert by(means, placement="a")["n_per_benchmark"] == {"b": 3}


# --------------------------------------------------------------------------- paired tests


def _paired_study(extra_model=False):
    base = {str(i): v for i, v in enumerate(bits(10, 20))}
    tuned = {str(i): (i < 14) for i in range(20)}
    tuned.update({str(i): False for i in range(20, 40)})  # 20 ids the base never saw
    tuned["0"] = None                                       # unscored: excluded from the pairs
    recs = cell("base", "base", None, "b", base) + cell("a", "d", 1, "b", tuned)
    if extra_model:
        recs += cell("base", "base", None, "b", base, model="other")
        recs += cell("a", "d", 1, "b", bits(3, 20), model="other")
    return study(recs)


def test_paired_comparison_by_hand_and_no_unshared_ids():
    res = _paired_study()
    index = index_study(res)
    rows, gaps = paired_comparisons(index, resolve_full_placements(res, index), resamples=2000, seed=0)
    assert gaps == []
    row = by(rows, placement_b="base")
    # shared scored ids: 1..19; tuned right on 1..13, base right on 1..9 -> b10 = 4 (ids 10..13), b01 = 0
    assert row["n_shared"] == 19
    assert (row["b01"], row["b10"]) == (0, 4)
    assert row["mean_diff"] == pytest.approx(100 * 4 / 19)
    assert row["mcnemar_p"] == pytest.approx(2 * 0.5 ** 4)
    assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"]
    assert row["ci_low"] >= 0.0    # every discordant pair favours a: no replicate can be negative


def test_paired_bootstrap_is_seeded_and_independent_of_other_comparisons():
    res = _paired_study()
    index = index_study(res)
    full = resolve_full_placements(res, index)
    first = paired_comparisons(index, full, resamples=500, seed=7)[0]
    again = paired_comparisons(index, full, resamples=500, seed=7)[0]
    assert first == again
    # on a larger pair set the interval does depend on the seed
    rng = np.random.default_rng(1)
    big = study(cell("base", "base", None, "b", [bool(x) for x in rng.random(300) < 0.5])
                + cell("a", "d", 1, "b", [bool(x) for x in rng.random(300) < 0.6]))
    big_index = index_study(big)
    big_full = resolve_full_placements(big, big_index)
    cis = {seed: tuple(paired_comparisons(big_index, big_full, resamples=500, seed=seed)[0][0][k]
                       for k in ("ci_low", "ci_high")) for seed in (7, 8)}
    assert cis[7] != cis[8]
    res2 = _paired_study(extra_model=True)
    index2 = index_study(res2)
    rows2, _ = paired_comparisons(index2, resolve_full_placements(res2, index2), resamples=500, seed=7)
    same = by(rows2, model=M)
    assert {k: same[k] for k in ("n_shared", "mean_diff", "ci_low", "ci_high", "mcnemar_p")} == \
        {k: first[0][k] for k in ("n_shared", "mean_diff", "ci_low", "ci_high", "mcnemar_p")}


def test_vs_full_and_holm_per_model():
    res = _recipe_study()
    index = index_study(res)
    rows, gaps = paired_comparisons(index, resolve_full_placements(res, index), resamples=200, seed=0)
    vs_full = [r for r in rows if r["reference"] == "full"]
    assert {r["placement_a"] for r in vs_full} == {"mid", "small"}
    assert all(r["placement_b"] == "all" for r in vs_full)
    # 3 placements x 2 benchmarks vs base + 2 x 2 vs full (+ the small/mid pairs, tested below)
    model_family = [r for r in rows if r["reference"] != "pair"]
    assert len(model_family) == 10 and gaps == []
    assert {r["holm_family"] for r in model_family} == {"model"}
    assert [r["p_holm"] for r in model_family] == pytest.approx(holm([r["mcnemar_p"] for r in model_family]))


def test_every_pair_of_placements_is_compared_with_holm_within_model_domain_benchmark():
    res = _recipe_study()
    # a fourth placement, so that one model x domain x benchmark holds several pairs
    res = study(res.records + cell("tiny", "d", 1, "b1", bits(3, 10)) + cell("tiny", "d", 1, "b2", bits(9, 10)),
                res.runs + [RunInfo(M, "tiny", "d", 1, 5)])
    index = index_study(res)
    rows, gaps = paired_comparisons(index, resolve_full_placements(res, index), resamples=200, seed=0)
    pairs = [r for r in rows if r["reference"] == "pair"]
    # placements by params: tiny 5, small 10, mid 30 (all = full: its pairs are the "full" rows)
    assert sorted((r["benchmark"], r["placement_a"], r["placement_b"]) for r in pairs) == sorted(
        (b, a, c) for b in ("b1", "b2") for a, c in (("tiny", "small"), ("tiny", "mid"), ("small", "mid")))
    assert gaps == [] and {r["holm_family"] for r in pairs} == {"model x domain x benchmark"}
    # by hand on b1: small right on ids 0..5, mid on 0..7 -> small - mid = -20 pp, b01 = 2 (a wrong, b right)
    row = by(pairs, benchmark="b1", placement_a="small", placement_b="mid")
    assert (row["n_shared"], row["b01"], row["b10"]) == (10, 2, 0)
    assert row["mean_diff"] == pytest.approx(-20.0) and row["mcnemar_p"] == pytest.approx(0.5)
    for bench in ("b1", "b2"):  # Holm within the three pairs of one benchmark, not with the other rows
        family = [r for r in pairs if r["benchmark"] == bench]
        assert [r["p_holm"] for r in family] == pytest.approx(holm([r["mcnemar_p"] for r in family]))
    # the base/full family is adjusted as if the pairs did not exist
    base_full = [r for r in rows if r["reference"] != "pair"]
    assert [r["p_holm"] for r in base_full] == pytest.approx(holm([r["mcnemar_p"] for r in base_full]))


def test_unscored_comparisons_are_gaps_not_rows():
    recs = cell("base", "base", None, "he", [None] * 3) + cell("a", "d", 1, "he", [None] * 3)
    res = study(recs)
    index = index_study(res)
    rows, gaps = paired_comparisons(index, resolve_full_placements(res, index), resamples=10)
    assert rows == [] and [g["reason"] for g in gaps] == ["not scored"]


def test_seed_comparisons_by_hand():
    # three seeds with deltas +10, +20, +30 pp vs base (10 examples each)
    recs = cell("base", "base", None, "b", bits(5, 10))
    for seed, k in ((1, 6), (2, 7), (3, 8)):
        recs += cell("a", "d", seed, "b", bits(k, 10))
    res = study(recs)
    tables = compute_tables(res, resamples=100, seed=0)
    row = by(tables.seed_comparisons, placement_b="base")
    half = sps.t.ppf(0.975, 2) * 10.0 / math.sqrt(3)
    assert row["k_seeds"] == 3 and row["mean_diff"] == pytest.approx(20.0)
    assert (row["seed_ci_low"], row["seed_ci_high"]) == pytest.approx((20 - half, 20 + half))
    t = 20.0 / (10.0 / math.sqrt(3))
    assert row["t_p"] == pytest.approx(2 * sps.t.sf(t, 2))
    assert row["p_holm"] == pytest.approx(row["t_p"])  # the only row of its model
    delta = by(tables.delta_summary, placement="a")
    assert (delta["k_seeds"], delta["delta_pp"]) == (3, pytest.approx(20.0))
    assert seed_comparisons(tables.paired[:1]) == []   # one seed only: nothing to aggregate


# --------------------------------------------------------------------------- traces and matrices


def test_curves_and_norms_shapes():
    key = (M, "a", "d", 1)
    res = study(cell("a", "d", 1, "b", bits(1, 2)),
                curves={key: [{"step": 2, "loss": 1.0}, {"step": 1, "loss": 2.0, "val_loss": 2.5}]},
                norms={key: [{"step": 1, "norms": {"attention": 0.1, "mlp": 0.2}},
                             {"step": 2, "norms": {"attention": 0.3, "mlp": 0.4}}]})
    curves = loss_curves(res)[(M, "d")]
    assert curves[0].label == "a" and curves[0].x.tolist() == [1.0, 2.0] and curves[0].y.tolist() == [2.0, 1.0]
    assert curves[1].label == "a (val)" and curves[1].y.tolist() == [2.5]
    norms = norm_curves(res)[(M, "d")]["a"]
    assert [s.label for s in norms] == ["attention", "mlp"] and norms[1].y.tolist() == [0.2, 0.4]


def test_heatmap_matrices_mark_unscored_and_targets():
    recs = (cell("base", "base", None, "gsm8k", bits(1, 2)) + cell("a", "gsm8k", 1, "gsm8k", bits(2, 2))
            + cell("a", "gsm8k", 1, "humaneval", [None]))
    tables = compute_tables(study(recs), resamples=10)
    acc = tables.accuracy_maps[M]
    assert acc.row_labels == ["base", "gsm8k / a"] and acc.col_labels == ["gsm8k", "humaneval"]
    assert acc.values[0, 0] == 0.5 and math.isnan(acc.values[1, 1]) and acc.marks[1][1] == "n/s"
    assert acc.marks[0][1] == "—"                 # the base model never ran humaneval
    assert (1, 0) in acc.highlight                 # gsm8k is the target of the gsm8k domain
    assert tables.delta_maps[M].values[0, 0] == pytest.approx(50.0)
    assert tables.transfer_maps[M].values[0, 0] == pytest.approx(50.0)
