"""The topology-effect analysis (analysis/topology.py) on synthetic studies with known answers."""
import numpy as np
import pytest

from hybridlora.analysis.contract import BASE, InstanceRecord, runs_of
from hybridlora.analysis.results import StudyResults
from hybridlora.analysis.stats import holm
from hybridlora.analysis.topology import (
    NOT_SIGNIFICANT, SUPPORTS, TopologyPair, placement_roles, topology_contrasts, topology_pairs)

SEQ, PAR = "seq-gdn", "par-gdn"
TAGS = {SEQ: {"topology": "sequential", "mixer": "gdn"}, PAR: {"topology": "parallel", "mixer": "gdn"},
        "attn": {"topology": "all_attention", "mixer": "attention"}}


def _cell(model, placement, domain, seed, bench, correct):
    return [InstanceRecord(model, placement, domain, seed, bench, f"{bench}-{i}", bool(c))
            for i, c in enumerate(correct)]


def _study(accuracy, *, n=400, seeds=(1,), noise_seed=0, base=0.5, other_drop=None):
    """Two models x {attention_only, recurrent_only} x domain 'math' (target bench 'math', other bench 'other').

    ``accuracy[(model, placement)]``: target accuracy of that run (a float, or ``{seed: accuracy}``); ``other_drop[(model, placement)]``:
    how much it loses on 'other' vs base. Each example's correctness is drawn independently.
    """
    rng = np.random.default_rng(noise_seed)
    records = []
    for model in (SEQ, PAR):
        for bench in ("math", "other"):
            records += _cell(model, BASE, BASE, None, bench, rng.random(n) < base)
        for placement in ("attention_only", "recurrent_only"):
            for seed in seeds:
                acc = accuracy[(model, placement)]
                acc = acc[seed] if isinstance(acc, dict) else acc  # per seed where given
                records += _cell(model, placement, "math", seed, "math", rng.random(n) < acc)
                drop = (other_drop or {}).get((model, placement), 0.0)
                records += _cell(model, placement, "math", seed, "other", rng.random(n) < base - drop)
    return StudyResults(records=records, runs=runs_of(records), target_benchmarks={"math": ["math"]},
                        model_tags=dict(TAGS))


FLAT = {(SEQ, "attention_only"): 0.5, (SEQ, "recurrent_only"): 0.5,
        (PAR, "attention_only"): 0.5, (PAR, "recurrent_only"): 0.5}


def test_planted_interaction_is_detected_with_its_sign():
    # recurrent-only helps the parallel model by 30 pp, the sequential one not at all: interaction +30 pp
    acc = dict(FLAT)
    acc[(PAR, "recurrent_only")] = 0.8
    rows = topology_contrasts(_study(acc, n=1000), resamples=2000)
    target = [r for r in rows if r["measure"] == "target"]
    assert len(target) == 1
    row = target[0]
    assert row["pair"] == "gdn" and row["benchmark"] == "math" and row["n_items"] == 1000
    assert 20 < row["interaction_pp"] < 40 and row["ci_low"] < 30 < row["ci_high"]
    assert row["corrected_ci_low"] > 0
    assert row["verdict"] == SUPPORTS
    # the reverse plant gives the reverse sign
    acc = dict(FLAT)
    acc[(SEQ, "recurrent_only")] = 0.8
    row = [r for r in topology_contrasts(_study(acc, n=1000), resamples=2000) if r["measure"] == "target"][0]
    assert row["interaction_pp"] < -20 and row["corrected_ci_high"] < 0 and row["verdict"] == SUPPORTS


def test_planted_forgetting_interaction():
    # recurrent-only makes the parallel model forget 25 pp of 'other'; nothing else forgets
    rows = topology_contrasts(_study(FLAT, other_drop={(PAR, "recurrent_only"): 0.25}), resamples=2000)
    row = [r for r in rows if r["measure"] == "forgetting"][0]
    assert row["benchmark"] == "other"
    assert row["interaction_pp"] > 15 and row["corrected_ci_low"] > 0 and row["verdict"] == SUPPORTS


def test_no_interaction_interval_covers_zero():
    # the same placement effect (+20 pp) in both topologies: no interaction
    acc = {(SEQ, "attention_only"): 0.4, (SEQ, "recurrent_only"): 0.6,
           (PAR, "attention_only"): 0.4, (PAR, "recurrent_only"): 0.6}
    rows = topology_contrasts(_study(acc), resamples=2000)
    target = [r for r in rows if r["measure"] == "target"][0]
    assert target["parallel_effect_pp"] > 10 and target["sequential_effect_pp"] > 10  # real effects, equal
    for r in rows:
        assert r["corrected_ci_low"] < 0 < r["corrected_ci_high"]
        assert r["verdict"] == NOT_SIGNIFICANT


def test_no_interaction_is_rarely_called_significant():
    # calibration over 30 simulated studies without interaction: about alpha of them may be flagged, not more
    acc = {(SEQ, "attention_only"): 0.4, (SEQ, "recurrent_only"): 0.6,
           (PAR, "attention_only"): 0.4, (PAR, "recurrent_only"): 0.6}
    flagged, covered, estimates = 0, 0, []
    for noise_seed in range(30):
        rows = topology_contrasts(_study(acc, noise_seed=100 + noise_seed), resamples=300)
        flagged += any(r["verdict"] == SUPPORTS for r in rows)
        target = [r for r in rows if r["measure"] == "target"][0]
        covered += target["ci_low"] <= 0 <= target["ci_high"]
        estimates.append(target["interaction_pp"])
    assert flagged <= 4          # expected about 0.05 * 30 = 1.5 (family-wise, Holm over 2 contrasts)
    assert covered >= 25         # raw 95 % intervals: expected about 28.5 of 30
    assert abs(np.mean(estimates)) < 3.0


def test_holm_is_applied_across_the_contrasts_shown():
    acc = dict(FLAT)
    acc[(PAR, "recurrent_only")] = 0.58  # a modest effect: raw p small, Holm p larger
    rows = topology_contrasts(_study(acc, other_drop={(PAR, "recurrent_only"): 0.05}), resamples=2000)
    assert len(rows) == 2
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p_boot"] for r in rows]))
    assert any(r["p_holm"] > r["p_boot"] for r in rows)
    # the corrected interval is at Holm's level: the smallest p is tested at 1 - alpha/2, so wider than 95 %
    first = min(rows, key=lambda r: r["p_boot"])
    assert first["corrected_level"] == pytest.approx(0.975)
    assert first["corrected_ci_high"] - first["corrected_ci_low"] > first["ci_high"] - first["ci_low"]


def test_several_seeds_give_a_seed_interval_and_the_verdict_needs_it():
    acc = dict(FLAT)
    acc[(PAR, "recurrent_only")] = 0.8
    rows = topology_contrasts(_study(acc, seeds=(1, 2, 3), n=600), resamples=1000)
    row = [r for r in rows if r["measure"] == "target"][0]
    assert row["k_seeds"] == 3 and row["seed_ci_low"] > 0 and row["seed_p_holm"] < 0.05
    assert row["verdict"] == SUPPORTS
    # a single seed: no seed interval
    single = [r for r in topology_contrasts(_study(acc), resamples=500) if r["measure"] == "target"][0]
    assert single["k_seeds"] == 1 and single["seed_ci_low"] is None and single["seed_p_holm"] is None


def test_the_sentence_says_whether_items_or_seeds_fall_short():
    # seeds that disagree (+30, -5, +25 pp) over clear items: not significant, and the sentence says why
    acc = dict(FLAT)
    acc[(PAR, "recurrent_only")] = {1: 0.8, 2: 0.45, 3: 0.75}
    row = [r for r in topology_contrasts(_study(acc, seeds=(1, 2, 3), n=600), resamples=1000)
           if r["measure"] == "target"][0]
    assert row["p_holm"] < 0.05 and row["corrected_ci_low"] > 0 and row["seed_p_holm"] > 0.05
    assert row["verdict"] == NOT_SIGNIFICANT
    assert "Clear over the 600 items" in row["sentence"] and "not over the 3 seeds" in row["sentence"]
    # no interaction at all: the items fall short
    flat = [r for r in topology_contrasts(_study(FLAT), resamples=500) if r["measure"] == "target"][0]
    assert flat["verdict"] == NOT_SIGNIFICANT and "Not significant over the items" in flat["sentence"]
    planted = dict(FLAT)
    planted[(PAR, "recurrent_only")] = 0.8
    row = [r for r in topology_contrasts(_study(planted, n=1000), resamples=500) if r["measure"] == "target"][0]
    assert "The data support" in row["sentence"]


def test_pairs_by_mixer_and_the_cross_mixer_caveat():
    assert topology_pairs(TAGS, [SEQ, PAR, "attn"]) == [TopologyPair(SEQ, PAR, "gdn")]
    tags = {"Q": {"topology": "sequential", "mixer": "gdn"}, "F": {"topology": "parallel", "mixer": "mamba2"}}
    (pair,) = topology_pairs(tags, ["Q", "F"])
    assert (pair.sequential, pair.parallel) == ("Q", "F") and "differ in mixer" in pair.caveat
    assert topology_pairs({"Q": tags["Q"]}, ["Q"]) == []
    with pytest.raises(ValueError, match="2 sequential"):
        topology_pairs({**TAGS, "seq2": {"topology": "sequential", "mixer": "gdn"}}, [SEQ, "seq2", PAR])


def test_placement_roles_by_name():
    assert placement_roles(["study/softmax_only", "study/gdn_only", "mlp_only"]) == ("study/gdn_only",
                                                                                   "study/softmax_only")
    assert placement_roles(["attention_only", "ssm_only"]) == ("ssm_only", "attention_only")
    assert placement_roles(["all", "mlp_only"]) == (None, None)
    with pytest.raises(ValueError, match="several recurrent-only"):
        placement_roles(["gdn_only", "recurrent_only"])


def test_untagged_study_has_no_contrasts():
    study = _study(FLAT)
    study.model_tags = {}
    assert topology_contrasts(study, resamples=100) == []


# --------------------------------------------------------------------------- the report section and the CLI


def test_report_has_the_section_only_with_both_topologies(tmp_path):
    from hybridlora.analysis.report import build_report

    acc = dict(FLAT)
    acc[(PAR, "recurrent_only")] = 0.8
    paths = build_report(_study(acc), tmp_path / "tagged", resamples=200, progress=False)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "## Topology effect" in md and SUPPORTS in md
    assert "## Topology effect" in paths["html"].read_text(encoding="utf-8").replace("<h2>", "## ").replace("</h2>", "")
    rows = (tmp_path / "tagged" / "tables" / "topology_effect.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("pair,train_domain,measure") and len(rows) == 3  # target + forgetting

    untagged = _study(acc)
    untagged.model_tags = {SEQ: TAGS[SEQ]}  # one topology only: no section
    paths = build_report(untagged, tmp_path / "untagged", resamples=200, progress=False)
    assert "Topology effect" not in paths["markdown"].read_text(encoding="utf-8")
    assert not (tmp_path / "untagged" / "tables" / "topology_effect.csv").exists()


@pytest.mark.parametrize("tag, message", [
    ("m=sequential", "expected MODEL=TOPOLOGY:MIXER"),
    ("m=diagonal:gdn", "topology must be one of"),
    ("nope=sequential:gdn", "no model 'nope'"),
    ("m=sequential:gdn,m2=sequential:gdn", "2 sequential models"),
])
def test_cli_model_tag_bad_input(tmp_path, capsys, tag, message):
    import json

    from hybridlora.cli import main

    res = tmp_path / "res"
    res.mkdir()
    (res / "base.jsonl").write_text(json.dumps({"example_id": 1, "correct": 1}) + "\n", encoding="utf-8")
    runs = [{"model": m, "placement": "base", "train_domain": "base", "seed": None, "files": {"b": "base.jsonl"}}
            for m in ("m", "m2", "m3")]
    (res / "manifest.json").write_text(json.dumps({"runs": runs}), encoding="utf-8")
    tags = [arg for t in tag.split(",") + ["m3=parallel:gdn"] for arg in ("--model-tag", t)]
    code = main(["report", "--import", str(res), "--output", str(tmp_path / "out"), "--no-progress"] + tags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "out").exists()
