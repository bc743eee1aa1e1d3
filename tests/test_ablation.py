"""Component ablation: hooks against independent computations, plans, perplexity protocol, resume, CLI errors."""
from __future__ import annotations

import copy
import json
import math
import sqlite3

import pytest
import torch

from family_fixtures import REQUIRED_MODEL_TYPES, tiny_model
from hybridlora.ablation.methods import Ablation, AblationError, collect_means, model_units
from hybridlora.ablation.perplexity import plan_windows, strided_nll, summarize
from hybridlora.ablation.plans import build_plan, parse_remove, random_controls, group_conditions
from hybridlora.components import build_component_map
from hybridlora.families import SEQUENCE_MIXERS

OUTPUT_ROLES = {"o", "out", "down", "shared_down", "shared_out_proj"}


def _ids(vocab: int, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _zero_outputs(model, cmap, component: str) -> torch.nn.Module:
    """An independent model with ``component``'s contribution removed: a copy whose output projections (and, for
    MoE, expert weights) of that component are zero — no hook involved."""
    clone = copy.deepcopy(model)
    zeroed = 0
    for info in cmap.modules:
        if info.component != component or info.layer is None:
            continue
        if info.role in OUTPUT_ROLES or info.role == "experts":
            for p in clone.get_submodule(info.name).parameters(recurse=False):
                p.data.zero_()
                zeroed += 1
    assert zeroed, f"no output projection of {component} found"
    return clone


CASES = [(mt, c) for mt in REQUIRED_MODEL_TYPES for c in SEQUENCE_MIXERS + ("mlp", "moe")]


@pytest.mark.parametrize("model_type,component", CASES)
def test_skip_all_of_a_component_equals_model_with_its_output_zeroed(model_type, component):
    model = tiny_model(model_type)
    cmap = build_component_map(model)
    mu = model_units(cmap)
    units = mu.of(component)
    if not units:
        pytest.skip(f"{model_type} has no {component}")
    ids = _ids(model.config.vocab_size)
    expected = _logits(_zero_outputs(model, cmap, component), ids)
    intact = _logits(model, ids)
    with Ablation(model, units, "skip", mu.layers_path):
        ablated = _logits(model, ids)
    assert torch.allclose(ablated, expected, atol=1e-5, rtol=1e-4), (ablated - expected).abs().max()
    assert not torch.allclose(ablated, intact, atol=1e-4)  # the removal changed something
    assert torch.equal(_logits(model, ids), intact)  # hooks detached: the model is intact again


def test_zero_attention_in_parallel_falcon_block_equals_block_by_hand():
    model = tiny_model("falcon_h1")
    mu = model_units(build_component_map(model))
    assert mu.topology == "parallel"
    layer = model.model.layers[0]
    unit = mu.by_key()["softmax_attention@0"]
    assert unit.parallel
    seen = {}

    def capture(module, args, kwargs, output):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()
        seen["out"] = output[0].clone()
    handle = layer.register_forward_hook(capture, with_kwargs=True)
    ids = _ids(model.config.vocab_size, n=10)
    try:
        with Ablation(model, [unit], "zero", mu.layers_path), torch.inference_mode():
            model(input_ids=ids)
    finally:
        handle.remove()
    with torch.inference_mode():  # the block without its attention branch, written out
        h = seen["in"]
        mamba = layer.mamba(hidden_states=layer.input_layernorm(h), cache=None, attention_mask=None)
        h = h + mamba * layer.ssm_out_multiplier
        expected = h + layer.feed_forward(layer.pre_ff_layernorm(h))
    assert torch.allclose(seen["out"], expected, atol=1e-5)


def test_skip_layer_is_identity_of_the_decoder_layer():
    model = tiny_model("qwen3_5_text")
    mu = model_units(build_component_map(model))
    ids = _ids(model.config.vocab_size)
    units = [mu.by_key()["softmax_attention@3"]]
    with Ablation(model, units, "skip_layer", mu.layers_path), torch.inference_mode():
        logits = model(input_ids=ids).logits
    with torch.inference_mode():  # by hand: three layers run, the last one skipped, then final norm and head
        out = model.model(input_ids=ids, output_hidden_states=True)
    # hidden_states[3] is the input of layer 3 = what the (skipped) layer passes on
    expected = model.lm_head(model.model.norm(out.hidden_states[3]))
    assert torch.allclose(logits, expected, atol=1e-5)


def test_mean_ablation_uses_the_stored_means():
    model = tiny_model("falcon_h1")
    mu = model_units(build_component_map(model))
    unit = mu.by_key()["ssm@1"]
    rows = [list(range(1, 30)), list(range(40, 70))]
    means = collect_means(model, [unit], mu.layers_path, rows)
    # independent: average the module's output over the same tokens ourselves
    outs = []
    handle = model.get_submodule(unit.modules[0]).register_forward_hook(lambda m, a, o: outs.append(o[0].detach()))
    with torch.inference_mode():
        for row in rows:
            model(input_ids=torch.tensor([row]))
    handle.remove()
    manual = torch.cat(outs).mean(0)
    stored = means[unit.key][unit.modules[0]]
    assert torch.allclose(stored, manual, atol=1e-6)
    # a distinct vector per unit, so ablation really replaces the output with the stored one
    stored = stored + 1.0
    seen = []
    with Ablation(model, [unit], "mean", mu.layers_path, means={unit.key: {unit.modules[0]: stored}}):
        handle = model.get_submodule(unit.modules[0]).register_forward_hook(lambda m, a, o: seen.append(o.clone()))
        with torch.inference_mode():
            model(input_ids=_ids(model.config.vocab_size))
        handle.remove()
    assert torch.allclose(seen[0], stored.expand_as(seen[0]))


def test_mean_needs_stored_means():
    model = tiny_model("falcon_h1")
    mu = model_units(build_component_map(model))
    with pytest.raises(AblationError, match="no stored mean"):
        Ablation(model, mu.of("ssm"), "mean", mu.layers_path, means={})


# ------------------------------------------------------------------------------------------ plans
def _meta_units(name: str):
    from hybridlora.models import build_meta_model, resolve_model

    return model_units(build_component_map(build_meta_model(resolve_model(name).config)))


@pytest.mark.parametrize("name", ["qwen3.5-0.8b", "falcon-h1-0.5b"])
def test_random_controls_seeded_matched_and_never_the_target(name):
    mu = _meta_units(name)
    targets = group_conditions(mu, ["auto"])
    first = random_controls(targets, mu, trials=5, seed=7)
    assert [c.units for c in first] == [c.units for c in random_controls(targets, mu, trials=5, seed=7)]
    assert [c.units for c in first] != [c.units for c in random_controls(targets, mu, trials=5, seed=8)]
    by_name = {(t.name, t.method): t for t in targets}
    assert first
    for control in first:
        target = by_name[(control.detail["control_of"], control.detail["control_method"])]
        assert len(control.units) == len(target.units) == control.detail["n"]
        if target.method == "skip_layer":
            layers = lambda keys: {int(k.split("@")[1]) for k in keys}  # noqa: E731
            assert layers(control.units) != layers(target.units)
        else:
            assert set(control.units) != set(target.units)
        assert len(set(control.units)) == len(control.units)


def test_random_controls_of_a_target_equal_to_half_the_pool_never_draw_it():
    mu = _meta_units("qwen3.5-0.8b")
    from hybridlora.ablation.plans import Condition, mixer_units

    pool = [u.key for u in mixer_units(mu)]
    target = Condition("t", "skip", pool[:2], "group")
    # a 2-of-24 pool: 276 subsets; 2000 draws would hit the target ~7 times if it were not excluded
    controls = random_controls([target], mu, trials=2000, seed=0)
    assert len(controls) == 2000 and all(set(c.units) != set(pool[:2]) for c in controls)


def test_plans_cover_every_family_with_sensible_conditions():
    for model_type in REQUIRED_MODEL_TYPES:
        mu = model_units(build_component_map(tiny_model(model_type)))
        conditions = build_plan(mu, "all", trials=2, seed=0)
        assert conditions[0].method == "none"
        keys = set(mu.by_key())
        assert all(set(c.units) <= keys for c in conditions)
        assert any(c.plan == "layer" for c in conditions)
        parallel = any(u.parallel for u in mu.units if u.component in SEQUENCE_MIXERS)
        assert any(c.method == ("zero" if parallel and mu.topology == "parallel" else "skip") for c in conditions)


@pytest.mark.parametrize("name,method,layers", [("qwen3.5-0.8b", "skip_layer", 24), ("falcon-h1-0.5b", "zero", 72)])
def test_reference_plan_is_the_papers_set_with_its_methods(name, method, layers):
    from collections import Counter

    mu = _meta_units(name)
    plan = build_plan(mu, "reference")
    assert plan[0].method == "none" and {c.method for c in plan[1:]} == {method}
    assert all(mu.by_key()[k].component in SEQUENCE_MIXERS for c in plan for k in c.units)  # no MLP removed
    counts = Counter((c.plan, c.detail.get("order")) for c in plan[1:])
    assert counts[("group", None)] == 2 and counts[("layer", None)] == layers
    # N in 1, 2, 4, 6, 8, 12, 18: every size fits both recurrent pools (18 Gated DeltaNet, 36 Mamba-2 layers)
    assert counts[("progressive", "first")] == counts[("progressive", "last")] == counts[("progressive", "random")] == 7
    assert counts[("progressive", "early")] == counts[("progressive", "middle")] == counts[("progressive", "late")] == 2
    assert counts[("random", None)] == 5 * 2  # 5 controls of each group, as the reference's published results
    by_name = {c.name: c for c in plan}
    for control in (c for c in plan if c.plan == "random"):
        target = by_name[control.detail["control_of"]]
        assert target.plan == "group"
        assert len(control.units) == len(target.units) and control.units != target.units
    assert [c.units for c in plan] == [c.units for c in build_plan(mu, "reference")]  # seeded
    with pytest.raises(AblationError, match="drop --method"):
        build_plan(mu, "reference", methods=["skip"])


def test_reference_plan_builds_for_every_family():
    for model_type in REQUIRED_MODEL_TYPES:
        mu = model_units(build_component_map(tiny_model(model_type)))
        plan = build_plan(mu, "reference", trials=2, seed=0)
        keys = set(mu.by_key())
        assert len(plan) > 2 and all(set(c.units) <= keys for c in plan), model_type
        assert any(c.plan == "layer" for c in plan) and any(c.plan == "group" for c in plan), model_type


def test_progressive_sizes_follow_the_model():
    mu = _meta_units("qwen3.5-0.8b")  # 18 Gated DeltaNet layers
    conditions = build_plan(mu, "progressive")
    sizes = sorted({c.detail["n"] for c in conditions if c.detail.get("order") == "first"})
    assert sizes == [1, 2, 4, 6, 8, 12]
    first4 = next(c for c in conditions if c.name == "first_4_recurrent" and c.method == "skip")
    assert first4.units == ["linear_attention@0", "linear_attention@1", "linear_attention@2", "linear_attention@4"]


def test_parse_remove_ranges_and_aliases():
    mu = _meta_units("falcon-h1-0.5b")
    assert [u.key for u in parse_remove("ssm@0-2", mu)] == ["ssm@0", "ssm@1", "ssm@2"]
    assert len(parse_remove("softmax_attention", mu)) == 36
    assert [u.key for u in parse_remove("ssm@3+softmax_attention@3", mu)] == ["softmax_attention@3", "ssm@3"]


# ------------------------------------------------------------------------------------------ perplexity
def _short_text(data_dir) -> str:
    return (data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:90]


def test_perplexity_single_window_equals_hand_computed_nll(data_dir):
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    model = tiny_model("qwen3_5_text")
    ids = list(byte_tokenizer()(_short_text(data_dir)).input_ids)
    records = strided_nll(model, ids, plan_windows(len(ids), 512, 256))
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    hand = -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
    summary = summarize(records, len(ids))
    assert summary["tokens"] == len(ids) - 1 and summary["whole_set"]
    assert math.isclose(summary["nll_sum"], hand, rel_tol=1e-5)
    assert math.isclose(summary["ppl"], math.exp(hand / (len(ids) - 1)), rel_tol=1e-5)


def test_a_perplexity_batch_that_does_not_fit_runs_in_halves_with_a_warning(monkeypatch, data_dir):
    """A forward of more than 2 windows "runs out of GPU memory" (simulated): the batch is run again in halves,
    every window scored once with the records of an unsplit run, and the warning names the size that fitted."""
    from hybridlora.ablation import perplexity
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    model = tiny_model("qwen3_5_text")
    text = (data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:400]
    ids = list(byte_tokenizer()(text).input_ids)
    windows = plan_windows(len(ids), 32, 16)[:9]  # 9 full windows: one batch of 8, then 1
    assert {w.end - w.begin for w in windows} == {32}
    expected = strided_nll(model, ids, windows, batch_size=1)
    real, sizes = perplexity._logits, []

    def small_gpu(model, rows, keep):
        sizes.append(rows.shape[0])
        if rows.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, rows, keep)

    monkeypatch.setattr(perplexity, "_logits", small_gpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.warns(RuntimeWarning, match="batch of 8 windows did not fit.*batches of 4"):
        records = strided_nll(model, ids, windows, batch_size=8)
    assert [r["window"] for r in records] == [r["window"] for r in expected]
    for got, want in zip(records, expected):
        assert got["tokens"] == want["tokens"] and math.isclose(got["nll_sum"], want["nll_sum"], rel_tol=1e-6)
    assert max(s for s in sizes if s <= 2) == 2 and 8 in sizes and 4 in sizes


def test_strided_perplexity_scores_each_token_once_with_its_window_context(data_dir):
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    model = tiny_model("falcon_h1")
    ids = list(byte_tokenizer()(_short_text(data_dir)).input_ids)
    window, stride = 32, 16
    records = strided_nll(model, ids, plan_windows(len(ids), window, stride), batch_size=3)
    hand = 0.0
    with torch.inference_mode():
        for t in range(1, len(ids)):
            begin = max(0, stride * math.ceil((t - window + 1) / stride))  # the first window reaching t
            logits = model(input_ids=torch.tensor([ids[begin:t + 1]])).logits[0, -2].float()
            hand -= float(torch.log_softmax(logits, -1)[ids[t]])
    assert sum(r["tokens"] for r in records) == len(ids) - 1
    assert math.isclose(sum(r["nll_sum"] for r in records), hand, rel_tol=1e-5)


def test_max_windows_keeps_the_first_windows_and_says_so():
    windows = plan_windows(1000, 100, 50, max_windows=3)
    assert [(w.begin, w.end, w.first_target) for w in windows] == [(0, 100, 1), (50, 150, 100), (100, 200, 150)]
    summary = summarize([{"tokens": 99, "nll_sum": 1.0}], 1000)
    assert not summary["whole_set"]


def test_diagnostics_reuse_the_intact_outputs_they_were_given():
    """The job keeps the intact model's layer outputs across conditions: a kept copy must be the intact model's
    (not the first condition's ablated outputs) and give exactly what a fresh intact forward gives."""
    from hybridlora.ablation.diagnostics import layer_diagnostics

    model = tiny_model("qwen3_5_text")
    cmap = build_component_map(model)
    mu = model_units(cmap)
    rows = _ids(model.config.vocab_size, n=16).tolist()
    attach = lambda component: Ablation(model, mu.of(component), "skip", mu.layers_path)  # noqa: E731
    kept: dict = {}
    first = layer_diagnostics(model, cmap, mu, rows, attach("softmax_attention"), intact=kept)
    assert kept and first["final_kl"] > 0
    fresh = layer_diagnostics(model, cmap, mu, rows, attach("linear_attention"))
    reused = layer_diagnostics(model, cmap, mu, rows, attach("linear_attention"), intact=kept)
    assert json.dumps(reused) == json.dumps(fresh) and reused["final_kl"] > 0
    intact = layer_diagnostics(model, cmap, mu, rows, None, intact=kept)
    assert intact["final_kl"] == 0 and intact["mean_cka"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ decode
def test_static_decode_loop_replays_the_hooks_like_generate():
    from hybridlora.fast.decode import greedy_generate

    model = tiny_model("qwen3_5_text")
    mu = model_units(build_component_map(model))
    ids = _ids(model.config.vocab_size, n=6)
    mask = torch.ones_like(ids)
    with Ablation(model, mu.of("softmax_attention"), "skip", mu.layers_path), torch.inference_mode():
        static = greedy_generate(model, ids, mask, max_new_tokens=8, pad_token_id=0, graphs=False).tokens
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0,
                            temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
    with torch.inference_mode():
        intact = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                pad_token_id=0, temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
    assert torch.equal(static[:, :hf.shape[1]], hf)
    assert not torch.equal(hf, intact)


# ------------------------------------------------------------------------------------------ CLI and runner
def _args(tmp_path, data_dir, *extra):
    text = tmp_path / "text.txt"
    text.write_text((data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:3000])
    return ["ablate", "qwen3.5-0.8b", "--tiny", "--data-dir", str(data_dir), "--text", str(text),
            "--window", "128", "--reference-windows", "2", "--output", str(tmp_path / "abl"), "--quiet", *extra]


def test_ablate_json_contract_and_report_rebuild(capsys, tmp_path, data_dir):
    from hybridlora.cli import main

    code = main(_args(tmp_path, data_dir, "--remove", "softmax_attention", "--remove", "linear_attention@0-1",
                      "--method", "skip,mean", "--benchmarks", "mmlu,arc_challenge", "--limit", "3",
                      "--format", "json"))
    out, err = capsys.readouterr()
    assert code == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    assert [(o["name"], o["method"]) for o in objects] == [
        ("intact", "none"), ("softmax_attention", "skip"), ("softmax_attention", "mean"),
        ("linear_attention@0-1", "skip"), ("linear_attention@0-1", "mean")]
    assert objects[1]["removed"] == ["model.layers.3.self_attn"]
    assert objects[3]["removed"] == ["model.layers.0.linear_attn", "model.layers.1.linear_attn"]
    for o in objects:
        assert set(o["metrics"]) == {"perplexity", "mmlu", "arc_challenge"}
        assert o["metrics"]["mmlu"]["n"] == 3 and 0 <= o["metrics"]["mmlu"]["correct"] <= 3
        p = o["metrics"]["perplexity"]
        assert math.isclose(p["ppl"], math.exp(p["nll_sum"] / p["tokens"]), rel_tol=1e-9)
    assert objects[0]["metrics"]["perplexity"]["tokens"] == objects[1]["metrics"]["perplexity"]["tokens"]
    assert objects[0]["metrics"]["perplexity"]["ppl"] != objects[1]["metrics"]["perplexity"]["ppl"]
    assert list((tmp_path / "abl" / "means").glob("*.pt"))
    report = tmp_path / "abl" / "report" / "report.html"
    assert report.is_file() and "Component ablation" in report.read_text()
    assert "NO scientific" in report.read_text()
    report.unlink()
    assert main(["report", str(tmp_path / "abl")]) == 0
    assert report.is_file()
    groups = (tmp_path / "abl" / "report" / "tables" / "groups.csv").read_text()
    assert "softmax_attention" in groups


def test_two_runner_processes_split_the_conditions_and_match_one_runner(tmp_path, data_dir, capfd, monkeypatch):
    """--workers-per-gpu 2 on a machine without a GPU: two runner processes on one store; every condition runs
    once, both runners take some, and the results are those of one runner."""
    from hybridlora.cli import main

    monkeypatch.setenv("HYBRIDLORA_TEST_JOB_DELAY", "3")  # each claim waits: the second runner surely gets work
    # one thread in every process: otherwise one runner takes more threads than each of two, and CPU reductions
    # split differently change the last bits (seen on a 16-core machine), which is not what this test is about
    monkeypatch.setenv("HYBRIDLORA_THREADS", "1")
    from hybridlora.ablation import jobs

    monkeypatch.setattr(jobs, "_NOTES_SAID", set())  # notes are said once per process: earlier tests said them here
    extra = ["--remove", "softmax_attention", "--remove", "linear_attention@0-1", "--remove", "mlp@0",
             "--benchmarks", "mmlu,gsm8k", "--limit", "2", "--max-new-tokens", "4", "--format", "json", "--no-report"]
    outputs = {}
    for name, workers in (("one", []), ("two", ["--workers-per-gpu", "2"])):
        (tmp_path / name).mkdir()
        assert main(_args(tmp_path / name, data_dir, *extra, *workers)) == 0
        outputs[name] = capfd.readouterr()  # the runner processes' stderr too
    objects = {name: [{k: v for k, v in json.loads(line).items() if k != "job"}  # job ids hash the text's path
                      for line in o.out.splitlines()] for name, o in outputs.items()}
    assert objects["two"] == objects["one"] and len(objects["one"]) == 4
    assert "runners:" not in outputs["two"].err  # --quiet: the runner line is progress, not said
    notes = [line for line in outputs["one"].err.splitlines() if line.startswith("note: mmlu: prompts kept")]
    assert len(notes) == 1 and outputs["two"].err.count(notes[0]) == 1  # said once, not once per runner
    db = sqlite3.connect(tmp_path / "two" / "abl" / "study.db")
    rows = db.execute("SELECT status, attempts, owner FROM jobs").fetchall()
    assert [(s, a) for s, a, _ in rows] == [("complete", 1)] * 4
    assert len({owner.split("|")[1] for _, _, owner in rows}) == 2  # two processes did the work


class _Killed(BaseException):
    """Stands for kill -9 inside one process (as in test_study)."""


@pytest.mark.parametrize("per_batch", ["1", "2"])
@pytest.mark.parametrize("point", ["claimed", "evaluated", "before_complete", "after_complete"])
def test_resume_after_crash_runs_every_condition_once(tmp_path, data_dir, monkeypatch, capsys, point, per_batch):
    """A runner killed at any point of its second job (with --conditions-per-batch 2: of its second group, the
    third condition beside an intact filler) leaves it to the next run, which runs it again; each condition is
    recorded once."""
    from hybridlora.cli import main

    calls = {"n": 0}

    def crash(name):
        if name == point:
            calls["n"] += 1
            if calls["n"] == 2:
                raise _Killed(name)
    monkeypatch.setattr("hybridlora.ablation.jobs.crash_point", crash)
    monkeypatch.setattr("hybridlora.study.runner.crash_point", crash)
    argv = _args(tmp_path, data_dir, "--remove", "softmax_attention", "--remove", "mlp@0", "--benchmarks", "none",
                 "--no-report", "--conditions-per-batch", per_batch)
    with pytest.raises(_Killed):
        main(argv)
    monkeypatch.undo()
    assert main(argv) == 0
    db = sqlite3.connect(tmp_path / "abl" / "study.db")
    rows = db.execute("SELECT status, attempts FROM jobs").fetchall()
    assert {s for s, _ in rows} == {"complete"} and len(rows) == 3
    assert sorted(a for _, a in rows) == ([1, 1, 1] if point == "after_complete" else [1, 1, 2])
    assert db.execute("SELECT COUNT(*) FROM metrics WHERE benchmark = 'perplexity'").fetchone()[0] == 3


@pytest.mark.parametrize("extra,message", [
    (["--remove", "mamba"], "unknown component 'mamba'"),
    (["--remove", "linear_attention@7"], "layer 7 out of range"),
    (["--remove", "ssm"], "this model has no ssm"),
    (["--remove", "softmax_attention@0"], "no softmax_attention at layer(s) 0"),
    (["--plan", "everything"], "--plan everything"),
    (["--plan", "reference", "--method", "skip"], "drop --method"),
    (["--method", "delete"], "--method delete"),
    (["--benchmarks", "trivia"], "unknown benchmark"),
    (["--workers-per-gpu", "0"], "--workers-per-gpu 0"),
    (["--backend", "ray", "--workers-per-gpu", "2"], "--gpus-per-job 1/N"),
    (["--gen-batch-size", "0"], "--gen-batch-size must be at least 1"),
    (["--conditions-per-batch", "0"], "--conditions-per-batch must be at least 1"),
])
def test_bad_input_is_one_error_line(capsys, tmp_path, data_dir, extra, message):
    from hybridlora.cli import main

    code = main(_args(tmp_path, data_dir, *extra))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "abl").exists()  # nothing written


def test_a_plan_file_that_is_not_utf8_is_one_error_line(capsys, tmp_path, data_dir):
    from hybridlora.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_bytes(b"conditions:\n  - remove: \xff\xfe\n")
    code = main(_args(tmp_path, data_dir, "--plan", str(plan)))
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "not UTF-8" in err, err
    assert not (tmp_path / "abl").exists()


def test_study_link_rank_correlates_importance_with_adaptation_gain(tmp_path):
    from hybridlora.ablation.stats import study_link
    from hybridlora.study.grid import Job
    from hybridlora.study.store import Store, make_owner

    store = Store(tmp_path)
    gains = {"softmax_attention": 0.10, "linear_attention": 0.05, "mlp": 0.02, None: 0.0}
    jobs = []
    for component in gains:
        kind = "base" if component is None else "train"
        spec = {"kind": kind} if component is None else {
            "kind": kind, "placement": {"name": component, "placement": {"targets": [{"components": [component]}]}}}
        jobs.append(Job(f"{kind}-{component}", kind, "m", component or "base", "gsm8k", None, spec))
    store.register(jobs)
    owner = make_owner()
    for job in jobs:
        assert store.claim(owner, ids=[job.id]).id == job.id
        acc = 0.5 + gains[None if job.kind == "base" else job.placement]
        store.complete(job.id, owner, {"summaries": {"mmlu": {"n": 100, "correct": int(acc * 100), "accuracy": acc}},
                                       "records": []})
    store.close()
    rows = [{"plan": "group", "method": "skip", "detail": {"component": c}, "dlogppl": d}
            for c, d in (("softmax_attention", 0.9), ("linear_attention", 0.4), ("mlp", 0.1))]
    link = study_link(rows, tmp_path)
    assert [r["component"] for r in link["components"]] == ["linear_attention", "mlp", "softmax_attention"]
    assert link["spearman"]["rho"] == pytest.approx(1.0) and link["spearman"]["n"] == 3
    rows[0]["dlogppl"] = 0.0  # attention now the least important: the ranks disagree
    assert study_link(rows, tmp_path)["spearman"]["rho"] < 1.0


def test_adapter_is_merged_so_units_keep_the_base_names(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hybridlora.ablation import jobs
    from hybridlora.study.jobs import load_base

    model_spec = {"model": "qwen3.5-0.8b", "name": "q", "tiny": True, "dtype": "float32", "model_seed": 0}
    base, _ = load_base(model_spec)
    names = [n for n, _ in base.named_modules() if n.endswith(("self_attn.q_proj", "linear_attn.out_proj"))]
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=names, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = _ids(256).to(next(base.parameters()).device)  # load_base puts the model on the GPU where there is one
    expected = _logits(peft_model, ids)
    jobs._MODEL_CACHE.clear()
    loaded = jobs.base_model({"model": model_spec, "adapter": str(tmp_path / "adapter")})
    model, mu = loaded.model, loaded.units
    jobs._MODEL_CACHE.clear()
    merge_error = (_logits(model, ids) - expected).abs().max().item()
    # fp32 throughout; on CUDA fla's Triton kernels multiply in TF32 (measured on an H200: 2e-4 apart)
    assert merge_error < (1e-4 if ids.device.type == "cpu" else 2e-3)
    assert mu.by_key()["softmax_attention@3"].modules == ("model.layers.3.self_attn",)
    with Ablation(model, mu.of("softmax_attention"), "skip", mu.layers_path):
        ablation_effect = (_logits(model, ids) - expected).abs().max().item()
    assert ablation_effect > 10 * max(merge_error, 1e-5)  # the removal is seen through the merged model


def test_kimi_linear_units_hook_self_attn_as_either_mixer():
    mu = _meta_units("kimi-linear-48b-a3b")  # both mixers live under `self_attn`; the layer kind tells them apart
    kinds = {u.component for u in mu.units if u.component in SEQUENCE_MIXERS}
    assert kinds == {"linear_attention", "softmax_attention"}
    for unit in mu.units:
        if unit.component in SEQUENCE_MIXERS:
            assert unit.modules == (f"model.layers.{unit.layer}.self_attn",)
    assert len([u for u in mu.units if u.component in SEQUENCE_MIXERS]) == mu.num_layers


@pytest.mark.parametrize("model_type,method", [("qwen3_5_text", "skip"), ("qwen3_5_text", "mean"),
                                               ("falcon_h1", "zero")])
def test_prefix_reuse_scores_an_ablated_model_as_whole_rows_do(model_type, method, data_dir):
    """`ablate --prefix-reuse`: the removal hooks act on the shared prefix's forward and on each question's part
    alike, so multiple-choice log-probs of an ablated model equal those of whole rows."""
    from hybridlora.evaluate.lm import CausalLM
    from hybridlora.evaluate.runner import prepare_benchmark
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    model = tiny_model(model_type)
    mu = model_units(build_component_map(model))
    component = "ssm" if model_type == "falcon_h1" else "linear_attention"
    units = mu.of(component)[:2]
    means = None
    if method == "mean":
        means = collect_means(model, units, mu.layers_path, [_ids(model.config.vocab_size)[0].tolist()])
    scores = {}
    with Ablation(model, units, method, mu.layers_path, means=means):
        for reuse in (False, True):
            lm = CausalLM(model, byte_tokenizer(), batch_size=4, max_length=1536, prefix_reuse=reuse)
            prepared = prepare_benchmark(lm, "arc_challenge", data_dir=data_dir, limit=6)
            scores[reuse] = lm.score_choices(prepared.inputs)
    assert lm.prefix_reused_rows >= 2 and lm.prefix_reuse_note is None
    assert max(abs(a - b) for x, y in zip(scores[False], scores[True]) for a, b in zip(x, y)) <= 1e-4


def test_on_a_gpu_ablate_names_its_opt_in_levers_until_they_are_given(capsys, tmp_path, data_dir, monkeypatch):
    import torch

    from hybridlora.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the note reads it in a dry run
    base = ["ablate", "qwen3.5-0.8b", "--dry-run", "--data-dir", str(data_dir), "--benchmarks", "gsm8k,mmlu",
            "--output", str(tmp_path / "abl")]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "--gen-batch-size 256" in err and "--prefix-reuse" in err and "--batch-size 64" in err
    assert main(base + ["--gen-batch-size", "256"]) == 0
    err = capsys.readouterr().err
    assert "--gen-batch-size 256" not in err and "--prefix-reuse" in err and "--batch-size 64" in err
    assert main(base + ["--gen-batch-size", "256", "--prefix-reuse"]) == 0
    err = capsys.readouterr().err
    assert "--prefix-reuse" not in err and "--batch-size 64" in err
    all_three = base + ["--gen-batch-size", "256", "--prefix-reuse", "--batch-size", "64"]
    assert main(all_three + ["--plan", "groups"]) == 0  # a few removals: sharing forwards would not pay
    assert "note: on a GPU" not in capsys.readouterr().err
    assert main(all_three + ["--plan", "reference"]) == 0
    assert "--conditions-per-batch 4" in capsys.readouterr().err
    assert main(all_three + ["--plan", "reference", "--conditions-per-batch", "8"]) == 0
    assert "note: on a GPU" not in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(base) == 0
    assert "note: on a GPU" not in capsys.readouterr().err
