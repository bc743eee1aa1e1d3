"""The synthetic tasks (generators, benchmarks, training domains) and the demo's pretrained lab models."""
from __future__ import annotations

import json
import re

import pytest

from hybridlora import synthetic


def _solve(name: str, prompt: str) -> str:
    """An independent solver of each task, from the prompt text alone."""
    words = prompt.split()
    if name in ("syn_copy", "syn_reverse", "syn_count", "syn_first"):
        span = words[1]
        return {"syn_copy": span, "syn_reverse": span[::-1], "syn_count": str(len(span)), "syn_first": span[:1]}[name]
    if name == "syn_arith":
        a, op, b = re.fullmatch(r"(\d)([+-])(\d)", prompt).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    pairs = [(w[0], w[1]) for w in words[1:-1]]
    if name == "syn_recall":
        return next(v for k, v in pairs if k == words[-1])
    return next(k for k, v in pairs if v == words[-1])


@pytest.mark.parametrize("name", list(synthetic.TASKS))
def test_answers_are_right_by_construction_and_seeded(name):
    items = synthetic.pairs(name, 300, seed=5)
    assert all(_solve(name, p) == a for p, a in items)
    assert items == synthetic.pairs(name, 300, seed=5)  # same seed, same items
    assert items != synthetic.pairs(name, 300, seed=6)
    assert items != synthetic.pairs(name, 300, seed=5, split=synthetic.TEST_STREAM)  # test stream is another one
    if name == "syn_arith":
        assert all(int(a) >= 0 for _, a in items)  # the language has no negative numbers
    if name == "syn_recall_inverse":  # the value asked about names exactly one key
        assert all(sum(w[1] == p.split()[-1] for w in p.split()[1:-1]) == 1 for p, _ in items)


def test_unknown_task_is_one_line_error():
    with pytest.raises(synthetic.SyntheticError, match="unknown synthetic task 'nope'; known: syn_recall"):
        synthetic.pairs("nope", 3)


def test_rendering_is_the_plain_template_the_trainer_uses():
    from hybridlora.data import load_split
    from hybridlora.data.formatting import tokenize_example
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    split = load_split("syn_reverse", max_examples=4, val_examples=1)
    example = split.train[0]
    prompt, answer = example.messages[0]["content"], example.messages[1]["content"]
    tokenized, _, template = tokenize_example(example, tok, loss_on="full")
    assert template == "plain"
    assert tokenized.input_ids == tok(synthetic.render(prompt, answer), add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert split.manifest["origin"].startswith("generated: hybridlora.synthetic")


def test_benchmarks_are_registered_with_stable_generated_items():
    from hybridlora.evaluate.runner import BENCHMARKS, load_items

    for name in synthetic.TASKS:
        module = BENCHMARKS[name]
        items, shots = load_items(name, None, n=32)
        assert len(items) == 32 and shots == [] and items == load_items(name, "/nonexistent", n=32)[0]
        assert all(_solve(name, i["prompt"]) == i["gold"] for i in items)
        assert module.score(items[0], f" {items[0]['gold']}\n")["correct"] == 1
        assert module.score(items[0], items[0]["gold"] + "x")["correct"] == 0


# ------------------------------------------------------------------ the demo's pretrained models
MODELS = ("demo-sequential", "demo-parallel")


@pytest.fixture(scope="module")
def base_scores():
    """Accuracy of each shipped demo model on each pretraining task (256 generated test items)."""
    from hybridlora.evaluate.lm import CausalLM
    from hybridlora.evaluate.runner import evaluate_benchmark
    from hybridlora.study.jobs import load_base

    scores = {}
    for name in MODELS:
        model, tok = load_base({"model": f"builtin:{name}", "tiny": False, "dtype": "float32"})
        lm = CausalLM(model, tok, batch_size=256, max_length=128, name=name)
        for task in synthetic.PRETRAINING:
            scores[name, task] = evaluate_benchmark(lm, task, n=256, progress=False)["accuracy"]
    return scores


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("task", synthetic.PRETRAINING)
def test_demo_models_score_well_above_chance_on_their_pretraining_tasks(base_scores, name, task):
    # Above chance by at least 4 standard errors of a model guessing at chance on these 256 items, and by at
    # least 5 points. Measured (docs/LAB.md): copy 0.94 / 0.98 and arithmetic 1.00 / 1.00 (sequential / parallel)
    # are far above that; recall, the hardest task at this size, is 0.25 / 0.18 against chance 0.10 (floor 0.175).
    chance = synthetic.TASKS[task].chance
    floor = chance + max(4 * (chance * (1 - chance) / 256) ** 0.5, 0.05)
    assert base_scores[name, task] >= floor, (name, task, base_scores[name, task], chance)


@pytest.mark.parametrize("name", MODELS)
def test_shipped_demo_models_match_the_recipe(name):
    from hybridlora.lab.demo_models import INFO_FILE, MODELS as VARIANTS, PACKAGED, fingerprint

    info = json.loads((PACKAGED / name / INFO_FILE).read_text())
    assert info["fingerprint"] == fingerprint(VARIANTS[name]), (
        f"the shipped {name} was pretrained from another recipe or task version; rebuild it: {info['rebuild']}")


def test_builtin_model_names_resolve_and_unknown_ones_are_one_line_errors():
    from hybridlora.models import ModelError, resolve_model

    assert resolve_model("builtin:demo-parallel").path.name == "demo-parallel"
    with pytest.raises(ModelError, match="unknown built-in model 'builtin:nope'; known: builtin:demo-sequential"):
        resolve_model("builtin:nope")


# ------------------------------------------------------------------ the demo preset
def test_demo_preset_is_the_synthetic_world_on_the_pretrained_pair():
    from hybridlora.study import expand_grid, load_study_config

    config = load_study_config(None)
    jobs = expand_grid(config)
    train = [j for j in jobs if j.kind == "train"]
    assert len(config.seeds) >= 2 and len({j.placement for j in train}) >= 3
    assert {m.model for m in config.models} == {"builtin:demo-sequential", "builtin:demo-parallel"}
    assert {m.topology for m in config.models} == {"sequential", "parallel"}
    assert {d.name for d in config.domains} <= set(synthetic.DOMAINS)
    assert set(config.eval.benchmarks) == {d.name for d in config.domains} | set(synthetic.PRETRAINING)
    assert len(jobs) == 2 + 2 * 3 * len(config.domains) * len(config.seeds)
    assert any("SMALL SYNTHETIC WORLD, NOT A CLAIM ABOUT LARGE MODELS" in n for n in config.notes)


def test_a_trimmed_demo_runs_end_to_end_and_says_what_it_is(tmp_path, capsys):
    from hybridlora.cli import main
    from hybridlora.study import load_study_config

    data = load_study_config("demo").model_dump(mode="json")
    data.update(output=str(tmp_path / "study"), models=data["models"][1:], placements=[{"preset": "attention_only"}],
                domains=[dict(data["domains"][0], max_examples=32)], seeds=[3407],
                eval=dict(data["eval"], benchmarks={name: 16 for name in synthetic.TASKS}))
    (tmp_path / "demo.yaml").write_text(json.dumps(data))
    assert main(["study", str(tmp_path / "demo.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "NOT A CLAIM ABOUT LARGE MODELS" in err and "2/2 jobs complete" in out
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "NOT A CLAIM ABOUT LARGE MODELS" in report and data["domains"][0]["name"] in report


def test_demo_tokenizer_has_the_template_headers_as_single_tokens_and_leaves_the_byte_tokenizer_alone():
    from hybridlora.evaluate.tokenizer import byte_tokenizer
    from hybridlora.lab.mixture import mixture_tokenizer

    tok = mixture_tokenizer()
    ids = tok(synthetic.render("copy ab", "ab"))["input_ids"]
    assert ids == [256, *b"copy ab", 257, *b"ab"] and len(byte_tokenizer()) == 256
    assert tok.decode(ids) == synthetic.render("copy ab", "ab")


def test_eval_scores_a_built_in_model_on_synthetic_benchmarks_and_lm_eval_refuses_them(tmp_path, capsys):
    from hybridlora.cli import main

    out_dir = tmp_path / "e"
    assert main(["eval", "builtin:demo-parallel", "--benchmarks", "syn_arith", "--limit", "8", "--no-progress",
                 "--output", str(out_dir)]) == 0
    records = [json.loads(line) for line in (out_dir / "syn_arith.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {"example_id", "prediction", "gold", "correct"} <= set(records[0])
    capsys.readouterr()
    assert main(["eval", "builtin:demo-parallel", "--benchmarks", "syn_copy", "--protocol", "lm-eval"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --protocol lm-eval has no task for syn_copy") and err.count("\n") == 1


def test_demo_models_command_builds_a_loadable_model_and_records_a_non_recipe_run(tmp_path, capsys):
    from hybridlora.cli import main
    from hybridlora.lab.demo_models import INFO_FILE

    assert main(["lab", "demo-models", "--only", "demo-parallel", "--documents", "32", "--output", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "demo-parallel" / INFO_FILE).read_text())
    assert info["steps"] == 2 and info["fingerprint"] is None  # not the recipe: never mistaken for the shipped one
    assert [p.name for p in tmp_path.iterdir()] == ["demo-parallel"]  # the build folder is gone
    assert main(["inspect", str(tmp_path / "demo-parallel")]) == 0
