"""hybridlora advise: signals on exact hosts, budget, liveness, determinism, outputs, validation and the study entry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybridlora.advise.allocate import allocate, check_resolves_exactly, placement_of
from hybridlora.advise.propose import advice_examples, budget_of_rank, propose, write_outputs
from hybridlora.advise.signals import HostSignals, candidate_hosts
from hybridlora.advise.validate import compare_group, summarize
from hybridlora.cli import main
from hybridlora.components import build_component_map
from hybridlora.evaluate.tokenizer import byte_tokenizer
from hybridlora.families import family_for
from hybridlora.models import build_model, resolve_model, text_config, tiny_config
from hybridlora.placement import load_placement_file, resolve

PAD = 0


def tiny(name: str):
    source = resolve_model(name)
    model = build_model(tiny_config(source.config, family_for(text_config(source.config).model_type)), seed=0)
    return model, build_component_map(model)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from hybridlora.study.demo_data import write_demo_data

    target = tmp_path_factory.mktemp("advise") / "data"
    write_demo_data(target)
    return target


@pytest.fixture(scope="module")
def examples(demo_dir):
    tr, held_out, _ = advice_examples("gsm8k", byte_tokenizer(), data_dir=demo_dir, examples=24, max_length=192,
                                      held_out=8)
    return tr, held_out


def _propose(name, examples, budget_rank=4, **kw):
    model, cmap = tiny(name)
    tr, held_out = examples
    return propose(model, cmap, tr, held_out, PAD, budget_of_rank(cmap, budget_rank), **kw), cmap


@pytest.mark.parametrize("name", ["qwen3.5-0.8b", "falcon-h1-0.5b"])
def test_budget_is_met_as_near_as_ranks_allow_and_reported(name, examples):
    proposal, cmap = _propose(name, examples)
    b = proposal.allocation.budget
    cheapest = min(proposal.signal.cost_per_rank.values())
    assert b.achieved <= b.requested and b.requested - b.achieved < cheapest  # no further rank would fit
    assert proposal.resolved.trainable_params == b.achieved
    d = proposal.to_dict()
    assert d["budget"]["requested"] == b.requested and d["budget"]["achieved"] == b.achieved
    assert sum(d["rank_pattern"].values()) > 0 and d["num_target_modules"] == len(d["rank_pattern"])


@pytest.mark.parametrize("name", ["qwen3.5-0.8b", "falcon-h1-0.5b"])
def test_proposal_attaches_with_peft_and_every_adapter_is_live(name, examples):
    from hybridlora.placement.verify import attach, check_liveness, check_static

    proposal, cmap = _propose(name, examples)
    fresh, fresh_map = tiny(name)
    peft_model = attach(fresh, proposal.resolved, init_lora_weights=False)
    report = check_static(peft_model, proposal.resolved, fresh_map)
    assert not (report.missing or report.unexpected or report.forbidden or report.rank_mismatch)
    assert report.peft_trainable == proposal.resolved.trainable_params
    live, dead = check_liveness(peft_model)
    assert not dead and sorted(live) == sorted(proposal.resolved.ranks())


def test_signals_are_measured_on_the_exact_hosts_and_bypassed_modules_are_excluded_with_reason(examples):
    proposal, cmap = _propose("falcon-h1-0.5b", examples)
    hosts = {h.name for h in candidate_hosts(cmap).hosts}
    assert set(proposal.signal.gains) == hosts
    ineligible = {m.name for m in cmap.modules if not m.eligible}
    assert not ineligible & set(proposal.signal.gains) and not ineligible & set(proposal.resolved.ranks())
    bypassed = [m for m in cmap.modules if m.reason and m.reason.startswith("kernel-bypassed")]
    assert bypassed  # Falcon-H1's Mamba out_proj: the fused kernel reads its weight
    assert any("kernel-bypassed" in why for why in proposal.signal.excluded)
    assert sum(n for why, n in proposal.signal.excluded.items() if "kernel-bypassed" in why) == len(bypassed)
    for gains in proposal.signal.gains.values():
        assert np.all(np.diff(gains) <= 1e-12) and gains[0] > 0  # descending spectra, something measured


@pytest.mark.parametrize("signal", ["grad", "probe"])
def test_same_data_and_seed_give_the_same_proposal(signal, examples):
    first, _ = _propose("qwen3.5-0.8b", examples, signal=signal, seed=11)
    second, _ = _propose("qwen3.5-0.8b", examples, signal=signal, seed=11)
    assert first.fingerprint() == second.fingerprint()
    assert first.placement.model_dump() == second.placement.model_dump()
    for host, gains in first.signal.gains.items():
        np.testing.assert_allclose(gains, second.signal.gains[host], rtol=1e-6)


def test_other_data_changes_the_signal(examples):
    tr, held_out = examples
    first, _ = _propose("qwen3.5-0.8b", (tr[:12], held_out))
    second, _ = _propose("qwen3.5-0.8b", (tr[12:], held_out))
    host = next(iter(first.signal.gains))
    assert not np.allclose(first.signal.gains[host], second.signal.gains[host])


def _signals(gains: dict[str, list[float]], cost: dict[str, int]) -> HostSignals:
    return HostSignals("grad", {h: np.array(g) for h, g in gains.items()}, {h: "mlp" for h in gains}, cost)


def test_greedy_buys_the_largest_gain_per_parameter_first():
    _, cmap = tiny("qwen3.5-0.8b")
    cands = candidate_hosts(cmap)
    a, b = cands.hosts[0], cands.hosts[1]
    cands.hosts = [a, b]
    cost = {a.name: a.lora_params // a.rank, b.name: b.lora_params // b.rank}
    sig = _signals({a.name: [10.0, 9.0, 8.0, 0.1], b.name: [5.0, 4.0, 0.0, 0.0]}, cost)
    alloc = allocate(sig, cands, budget=3 * cost[a.name] + cost[b.name])
    if cost[a.name] == cost[b.name]:  # equal costs: the three largest gains of a, then b's first
        assert alloc.ranks == {a.name: 3, b.name: 1}
    assert alloc.budget.achieved <= alloc.budget.requested
    placement = placement_of(alloc, cands, "p")
    assert check_resolves_exactly(placement, cmap, alloc).ranks() == alloc.ranks


def test_component_unit_gives_one_rank_per_component_role(examples):
    proposal, _ = _propose("qwen3.5-0.8b", examples, unit="component")
    by_role: dict[str, set[int]] = {}
    for h in proposal.resolved.hosts:
        by_role.setdefault(f"{h.component}.{h.role}", set()).add(h.rank)
    assert all(len(ranks) == 1 for ranks in by_role.values())


def test_outputs_are_a_placement_yaml_train_accepts_and_a_peft_config_with_rank_pattern(examples, tmp_path):
    from peft import LoraConfig

    proposal, cmap = _propose("qwen3.5-0.8b", examples)
    written = write_outputs(proposal, tmp_path / "advice", "qwen3.5-0.8b")
    placement = load_placement_file(written["placement"])
    assert resolve(placement, cmap).ranks() == proposal.resolved.ranks()
    config = LoraConfig.from_pretrained(str(tmp_path / "advice"))
    assert set(config.target_modules) == set(proposal.resolved.ranks())
    default = config.r
    for name, rank in proposal.resolved.ranks().items():
        key = next((k for k in config.rank_pattern if k.replace("\\", "") == name), None)
        assert (config.rank_pattern[key] if key else default) == rank
    assert json.loads((tmp_path / "advice" / "advice.json").read_text())["fingerprint"] == proposal.fingerprint()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left behind


def test_budget_below_one_rank_is_a_one_line_error(tmp_path, capsys, demo_dir):
    code = main(["advise", "qwen3.5-0.8b", "--tiny", "--data", "gsm8k", "--data-dir", str(demo_dir),
                 "--budget", "10", "--examples", "4", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: budget 10") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["advise", "qwen3.5-0.8b", "--tiny"], "--data"),
    (["advise", "--data", "gsm8k"], "MODEL"),
    (["advise", "--validate", "/nonexistent/study"], "no study.db"),
    (["advise", "qwen3.5-0.8b", "--tiny", "--data", "gsm8k", "--rank", "0"], "--rank must be a positive"),
    (["advise", "qwen3.5-0.8b", "--validate", "somewhere"], "takes no MODEL"),
    (["advise", "--validate", "somewhere", "--signals", "magic"], "--signals"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_cli_prints_requested_vs_achieved_and_writes_outputs(tmp_path, capsys, demo_dir):
    code = main(["advise", "falcon-h1-0.5b", "--tiny", "--data", "gsm8k", "--data-dir", str(demo_dir),
                 "--examples", "8", "--rank", "2", "--format", "json", "--output", str(tmp_path / "out")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["budget"]["requested"] >= out["budget"]["achieved"] > 0
    assert any("kernel-bypassed" in why for why in out["excluded"])
    assert (tmp_path / "out" / "placement.yaml").is_file() and (tmp_path / "out" / "adapter_config.json").is_file()


# --- validation --------------------------------------------------------------------------------------
def _row(scores, acc_by_seed, attention="attention_only", proposals=()):
    accuracy = {p: float(np.mean([s[p] for s in acc_by_seed.values()])) for p in next(iter(acc_by_seed.values()))}
    return compare_group({"grad": scores}, accuracy, acc_by_seed, attention, "grad", list(proposals))


def test_validation_reports_spearman_rank_regret_and_says_when_no_better_than_attention_only():
    seeds = {1: {"attention_only": 0.50, "recurrent_only": 0.40, "all": 0.45},
             2: {"attention_only": 0.52, "recurrent_only": 0.41, "all": 0.44}}
    # the score ranks all > recurrent > attention: the exact reverse of what was measured
    row = _row({"attention_only": 1.0, "recurrent_only": 2.0, "all": 3.0}, seeds)
    grad = row["signals"]["grad"]
    assert grad["spearman"] == pytest.approx(-0.5)
    assert grad["select"]["placement"] == "all" and grad["select"]["rank"] == 2
    assert grad["select"]["regret_pp"] == pytest.approx(6.5)  # (5 + 8) / 2 pp
    assert grad["select"]["ci_low"] is not None and grad["select"]["ci_low"] < 6.5 < grad["select"]["ci_high"]
    assert row["attention_only"]["rank"] == 1 and row["attention_only"]["regret_pp"] == 0
    summary = summarize([{**row, "cost": {}}], "grad")
    assert "NOT shown better than" in summary["verdict"]


def test_validation_credits_an_advisor_that_picks_the_best():
    seeds = {1: {"attention_only": 0.40, "all": 0.50}, 2: {"attention_only": 0.41, "all": 0.52},
             3: {"attention_only": 0.39, "all": 0.55}}
    row = _row({"attention_only": 1.0, "all": 3.0}, seeds)
    summary = summarize([{**row, "cost": {}}], "grad")
    assert row["signals"]["grad"]["select"]["rank"] == 1
    assert summary["verdict"].startswith("the advisor (grad signal) is better than")
    assert "holds 0" not in summary["verdict"]


# --- study entry -------------------------------------------------------------------------------------
def test_study_advisor_entry_resolves_to_a_concrete_cached_placement(tmp_path, monkeypatch):
    from hybridlora.advise import study as advise_study
    from hybridlora.study.config import study_config_from_dict
    from hybridlora.study.grid import expand_grid

    config = study_config_from_dict({
        "name": "adv", "output": str(tmp_path / "study"), "data_dir": "builtin:demo",
        "models": [{"model": "qwen3.5-0.8b", "tiny": True}],
        "placements": ["attention_only", "advisor",
                       {"advisor": {"examples": 8, "unit": "component"}, "match_budget": "attention_only"}],
        "domains": [{"name": "gsm8k", "max_examples": 8}], "train": {"rank": 4, "max_length": 192}})
    calls = []
    real = advise_study._propose_for
    monkeypatch.setattr(advise_study, "_propose_for", lambda *a: calls.append(1) or real(*a))
    jobs = expand_grid(config)
    names = [j.placement for j in jobs if j.kind == "train"]
    assert names == ["attention_only", "advisor", "advisor_component@budget_of_attention_only"]
    advisor = next(j for j in jobs if j.placement == "advisor")
    spec = advisor.spec["placement"]
    assert spec["placement"]["targets"] and spec["match_budget"] is None
    assert spec["advisor"]["budget_achieved"] <= spec["advisor"]["budget_requested"]
    matched = next(j for j in jobs if j.placement.startswith("advisor_component"))
    attention = next(j for j in jobs if j.placement == "attention_only")
    from hybridlora.study.jobs import resolve_placement

    model, cmap = tiny("qwen3.5-0.8b")
    assert resolve_placement(matched.spec, model).trainable_params <= resolve_placement(attention.spec, model).trainable_params
    assert len(calls) == 2
    again = expand_grid(config)  # cached: same ids, no new measurement
    assert [j.id for j in again] == [j.id for j in jobs] and len(calls) == 2


def test_study_config_accepts_the_advisor_spellings():
    from hybridlora.study.config import study_config_from_dict

    base = {"name": "x", "models": ["qwen3.5-0.8b"], "domains": ["gsm8k"]}
    for entry in ("advisor", {"advisor": True}, {"advisor": {"signal": "grad", "examples": 64}, "rank": 8}):
        (placement,) = study_config_from_dict({**base, "placements": [entry]}).placements
        assert placement.advisor is not None and placement.preset is None
    with pytest.raises(Exception, match="signal"):
        study_config_from_dict({**base, "placements": [{"advisor": {"signal": "magic"}}]})


def test_study_config_rejects_an_advisor_entry_mixed_with_a_preset():
    from hybridlora.study.config import StudyConfigError, study_config_from_dict

    with pytest.raises(StudyConfigError, match="exactly one of preset, group or file, or advisor"):
        study_config_from_dict({"name": "x", "models": ["qwen3.5-0.8b"], "domains": ["gsm8k"],
                                "placements": [{"advisor": {}, "preset": "all"}]})


def test_validate_end_to_end_on_a_tiny_finished_study(tmp_path):
    from hybridlora.advise.validate import track_record, write_track_record
    from hybridlora.study.config import study_config_from_dict
    from hybridlora.study.runner import run_study

    config = study_config_from_dict({
        "name": "val", "output": str(tmp_path / "study"), "data_dir": "builtin:demo",
        "models": [{"model": "qwen3.5-0.8b", "tiny": True}], "placements": ["attention_only", "recurrent_only", "all"],
        "domains": [{"name": "gsm8k", "max_examples": 8, "val_examples": 2}],
        "train": {"epochs": 1, "micro_batch_size": 8, "grad_accum": 1, "max_length": 192, "save_every": 0},
        "eval": {"benchmarks": {"mmlu": 6}, "batch_size": 8, "max_length": 256}})
    run = run_study(config, progress=False, report=False)
    assert not run.failed
    record = track_record(tmp_path / "study", signals=["grad", "probe_loss"], examples=8, max_length=192,
                          chosen="grad")
    (row,) = record["groups"]
    assert set(row["placements"]) == {"attention_only", "recurrent_only", "all"}
    grad = row["signals"]["grad"]
    assert grad["n_placements"] == 3 and 1 <= grad["select"]["rank"] <= 3
    assert grad["scores"]["all"] >= max(grad["scores"]["attention_only"], grad["scores"]["recurrent_only"])
    assert row["attention_only"]["placement"] == "attention_only"
    assert row["cost"]["grad"]["fraction_of_grid"] > 0 and row["grid_cells"] == 3
    assert not row["unscored_hosts"]["grad"]  # every host of every grid placement carries a signal
    paths = write_track_record(record, tmp_path / "study")
    assert "verdict: the advisor (grad signal)" in Path(paths["markdown"]).read_text()
    assert json.loads(Path(paths["json"]).read_text())["summary"]["verdict"] == record["summary"]["verdict"]
    # the study's report carries the record as its own section (and has none without it)
    from hybridlora.study.runner import build_study_report

    build_study_report(tmp_path / "study")
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "## Advisor track record" in report and record["summary"]["verdict"] in report
    table = (tmp_path / "study" / "report" / "tables" / "advisor_track_record.csv").read_text().splitlines()
    assert len(table) == 1 + 3  # header + grad, probe_loss and the attention-only baseline for the one group
    Path(paths["json"]).unlink()
    build_study_report(tmp_path / "study")
    assert "Advisor track record" not in (tmp_path / "study" / "report" / "report.md").read_text()


def test_a_preset_cannot_match_the_budget_of_an_advisor_entry(tmp_path):
    from hybridlora.study.config import StudyConfigError, study_config_from_dict
    from hybridlora.study.grid import expand_grid

    config = study_config_from_dict({"name": "x", "output": str(tmp_path), "models": [{"model": "qwen3.5-0.8b",
                                     "tiny": True}], "domains": ["gsm8k"],
                                     "placements": ["advisor", {"preset": "all", "match_budget": "advisor"}]})
    with pytest.raises(StudyConfigError, match="cannot name an advisor entry"):
        expand_grid(config)
    assert not list(tmp_path.iterdir())  # refused before measuring anything
