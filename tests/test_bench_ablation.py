"""bench/bench_ablation.py's projection arithmetic (no model: rates given): each benchmark's generation at its
own row count, MMLU's multiple choice at the rate of its per-subject prefix groups, and `--prefix-reuse` counted
in the "every lever" projection only where it is faster than whole rows."""
from __future__ import annotations

import argparse
import importlib.util
import math
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_ablation.py"


@pytest.fixture(scope="module")
def bench():
    with warnings.catch_warnings():  # the bench silences FutureWarning for its runner processes: not for the tests
        spec = importlib.util.spec_from_file_location("bench_ablation_under_test", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _conditions(bench, n: int):
    from hybridlora.ablation.plans import Condition

    return [Condition(f"c{i}", "skip", [f"softmax_attention@{i}"], "layer") for i in range(n)]


def _args(**overrides):
    settings = {"ppl_tokens": 290_000, "gen_batch": 256, "small_gen_batch": 8, "ppl_batch_large": 32}
    return argparse.Namespace(**(settings | overrides))


def _rates(**overrides):
    rates = {"ppl_tokens_per_s": 50_000.0, "mc_s_per_question": 4e-3, "gen_s_per_step": 10e-3, "gen_fixed_s": 0.5,
             "ppl_tokens_per_s_large_batch": 100_000.0, "prefix_reused_rows": 300,
             "mc_s_per_question_prefix_reuse": 2e-3}
    return {"ablated": rates | overrides}


def test_generation_takes_each_benchmark_at_its_own_row_count(bench):
    """GSM8K's 256 prompts decode at 256 rows, HumanEval's 164 at 164 rows when that rate was measured."""
    both_at_256 = bench.generation_s(10e-3, 256, 0.5)
    assert math.isclose(both_at_256, (0.5 + 256 * 10e-3) + (0.5 + 512 * 10e-3))
    at_rows = {164: {"s_per_step": 7e-3, "fixed_s": 0.4}}
    assert math.isclose(bench.generation_s(10e-3, 256, 0.5, at_rows), (0.5 + 256 * 10e-3) + (0.4 + 512 * 7e-3))
    # batches of 8: 32 and 21 calls, each decoded to its budget
    assert math.isclose(bench.generation_s(1e-3, 8, 0.1), 32 * (0.1 + 256e-3) + 21 * (0.1 + 512e-3))


def test_mmlu_takes_the_grouped_reuse_rate_and_the_other_two_the_one_prefix_rate(bench):
    projection = bench.project(_rates(mc_s_per_question_prefix_reuse_grouped=5e-3), _conditions(bench, 9), _args())
    expected = (299 + 512) * 2e-3 + 512 * 5e-3
    assert math.isclose(projection["mc_with_prefix_reuse_s"], expected)
    assert projection["removals"] == 10  # nine removals and the intact model
    assert math.isclose(projection["with_prefix_reuse_min"],
                        10 * (projection["per_condition_s"]["total"] - projection["per_condition_s"]["mc"] + expected)
                        / 60)


@pytest.mark.parametrize("grouped, reuse_pays", [(2.5e-3, True), (9e-3, False)])
def test_every_lever_counts_prefix_reuse_only_where_it_is_faster(bench, grouped, reuse_pays):
    projection = bench.project(_rates(mc_s_per_question_prefix_reuse_grouped=grouped), _conditions(bench, 4),
                               _args(), gain=1.25)
    levers = projection["with_every_lever"]
    mc_whole = projection["per_condition_s"]["mc"]
    mc = projection["mc_with_prefix_reuse_s"] if reuse_pays else mc_whole
    assert levers["prefix_reuse"] is reuse_pays
    per = 290_000 / 100_000.0 + mc + projection["per_condition_s"]["generation"]
    assert math.isclose(levers["per_condition_s"], per)
    assert math.isclose(levers["total_min"], 5 * per / 60 / 1.25)


def test_reuse_that_was_switched_off_is_not_projected(bench):
    projection = bench.project(_rates(prefix_reuse_off="its log-probs differ"), _conditions(bench, 3), _args())
    assert "mc_with_prefix_reuse_s" not in projection
    assert projection["with_every_lever"]["prefix_reuse"] is False


def test_sharing_divides_each_decode_call_among_its_conditions_and_runs_whole_groups(bench):
    """K conditions a forward: a decode call at K x 256 rows serves K conditions; multiple choice at the shared
    rate (reuse where faster); perplexity at the large batch's rate; 10 removals in groups of 4 cost 12."""
    shared = {"mc_s_per_question": 3e-3, "mc_s_per_question_prefix_reuse": 1e-3,
              "mc_s_per_question_prefix_reuse_grouped": 2e-3, "prefix_reused_rows": 100,
              "gen_at_rows": {256: {"s_per_step": 20e-3, "fixed_s": 1.0}, 164: {"s_per_step": 16e-3, "fixed_s": 0.8}}}
    rates = _rates()
    rates["shared"] = {4: shared}
    projection = bench.project(rates, _conditions(bench, 9), _args())
    got = projection["with_every_lever_sharing"][4]
    gen = ((1.0 + 256 * 20e-3) + (0.8 + 512 * 16e-3)) / 4
    mc = (299 + 512) * 1e-3 + 512 * 2e-3
    assert math.isclose(got["per_condition_s"]["generation"], gen) and got["prefix_reuse"] is True
    per = 290_000 / 100_000.0 + mc + gen
    assert math.isclose(got["per_condition_s"]["total"], per)
    assert got["groups"] == 3 and math.isclose(got["total_min"], 12 * per / 60)
    rates["shared"][4] = shared | {"prefix_reuse_off": "its log-probs differ"}
    off = bench.project(rates, _conditions(bench, 9), _args())["with_every_lever_sharing"][4]
    assert off["prefix_reuse"] is False and math.isclose(off["per_condition_s"]["mc"], 1323 * 3e-3)


def test_reproject_reads_a_saved_run_back_to_the_live_projection(bench, tmp_path, capsys):
    """--reproject: a run's bench_ablation.json (JSON keys are text, arguments stored as text) projects to the
    numbers the run itself printed, over the current reference plan's count of removals."""
    import json

    from hybridlora.ablation.plans import reference_conditions
    from hybridlora.components import build_component_map
    from hybridlora.models import build_meta_model, resolve_model

    shared = {"mc_s_per_question": 3e-3, "mc_s_per_question_prefix_reuse": 1e-3, "prefix_reused_rows": 100,
              "gen_at_rows": {256: {"s_per_step": 20e-3, "fixed_s": 1.0}, 164: {"s_per_step": 16e-3, "fixed_s": 0.8}}}
    rates = _rates(gen_at_rows={164: {"s_per_step": 8e-3, "fixed_s": 0.3}})["ablated"]
    saved = {"date": "2026-12-05", "device": "stand-in", "args": {k: str(v) for k, v in vars(_args()).items()},
             "models": {"qwen": {"conditions": 1, "rates": {"ablated": rates, "shared": {"4": shared}}}}}
    path = tmp_path / "bench_ablation.json"
    path.write_text(json.dumps(saved))
    mu = bench.model_units(build_component_map(build_meta_model(resolve_model("qwen3.5-0.8b").config)))
    live = bench.project({"ablated": rates, "shared": {"4": shared}}, reference_conditions(mu, 5, 0), _args())
    bench.reproject(path, argparse.Namespace(models="qwen"))
    printed = capsys.readouterr().out
    assert f"whole set {live['with_every_lever']['total_min']:.1f} min" in printed
    assert f"whole set {live['with_every_lever_sharing']['4']['total_min']:.1f} min in 14 groups" in printed
    assert f"{live['removals']} removals (the run counted 1 conditions)" in printed
    with pytest.raises(SystemExit, match="give a bench_ablation.json"):
        bench.reproject(tmp_path / "missing.json", argparse.Namespace(models="qwen"))


def test_a_runner_gain_counts_only_for_the_conditions_a_batch_it_was_measured_with(bench):
    shared = {"mc_s_per_question": 3e-3, "gen_at_rows": {256: {"s_per_step": 20e-3, "fixed_s": 1.0},
                                                         164: {"s_per_step": 16e-3, "fixed_s": 0.8}}}
    rates = _rates()
    rates["shared"] = {2: dict(shared), 4: dict(shared)}
    alone = bench.project(rates, _conditions(bench, 9), _args(runner_share=4))
    gained = bench.project(rates, _conditions(bench, 9), _args(runner_share=4), gain=1.25)
    assert math.isclose(gained["with_every_lever_sharing"][4]["total_min"],
                        alone["with_every_lever_sharing"][4]["total_min"] / 1.25)
    assert gained["with_every_lever_sharing"][2]["total_min"] == alone["with_every_lever_sharing"][2]["total_min"]
    assert gained["total_min"] == alone["total_min"] and gained["runner_gain"] == 1.0
    unshared = bench.project(rates, _conditions(bench, 9), _args(runner_share=1), gain=1.25)
    assert math.isclose(unshared["total_min"], alone["total_min"] / 1.25)
    assert unshared["with_every_lever_sharing"][4]["total_min"] == alone["with_every_lever_sharing"][4]["total_min"]
