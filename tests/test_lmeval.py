"""Conformance with EleutherAI's lm-evaluation-harness, and the ``--protocol lm-eval`` bridge.

The conformance tests write an lm-eval task YAML that reproduces one of the study's task definitions (our
benchmark module's prompt format is the definition), run it through lm-eval's own ``HFLM`` on the very model
object our evaluator uses, and require the same prompts, the same per-example predictions and log-likelihoods
within ``LOGPROB_TOL`` (multiple choice), or the same greedy completions (GSM8K).

Model: a tiny random Falcon-H1 (hybrid: attention + Mamba-2 mixers) with the offline byte tokenizer, on CPU.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from hybridlora.evaluate import arc, gsm8k, mmlu  # noqa: E402
from hybridlora.evaluate.data import letters  # noqa: E402
from hybridlora.evaluate.lm import CausalLM  # noqa: E402
from hybridlora.evaluate.lmeval_bridge import (NOT_RUN, evaluate_lmeval, lmeval_version, make_hflm,  # noqa: E402
                                               run_tasks)
from hybridlora.evaluate.runner import build_prompts, evaluate_benchmark, load_items  # noqa: E402
from hybridlora.evaluate.tokenizer import byte_tokenizer  # noqa: E402

MODEL = "falcon-h1-0.5b"
LOGPROB_TOL = 1e-4  # float32 on CPU; the two sides batch and pad differently, observed differences are ~1e-6
ARC_ITEMS, ARC_SHOTS = 20, 3
GSM_ITEMS, GSM_SHOTS, GSM_TOKENS = 3, 2, 16


@pytest.fixture(scope="module")
def lm():
    """The tiny model ``load_lm(MODEL, tiny=True)`` builds, but initialised at a larger weight scale: at the default
    (0.02) it scores every letter at about 2*log(1/256) whatever the prompt, which would make equal scores cheap."""
    from hybridlora.families import family_for
    from hybridlora.models import build_model, resolve_model, text_config, tiny_config

    config = text_config(resolve_model(MODEL).config)
    config = tiny_config(config, family_for(config.model_type))
    config.initializer_range = 0.5
    return CausalLM(build_model(config, seed=0), byte_tokenizer(), batch_size=4, max_length=4096, name=MODEL)


@pytest.fixture(scope="module")
def hflm(lm):
    return make_hflm(lm)


def write_task(folder, name, config, splits):
    """An lm-eval task YAML in ``folder`` reading our items from JSON-lines files (one per split)."""
    files = {}
    for split, rows in splits.items():
        path = folder / f"{name}_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files[split] = str(path)
    task = {"task": name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files, "cache_dir": str(folder / "cache")}, **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")


# The study's ARC task (hybridlora.evaluate.arc / data.mc_block) written as an lm-eval task: the question, the
# choices lettered "A. text" on their own lines, "Answer:", the answer letter after one space, examples separated
# by a blank line, the fixed shots in their fixed order (first_n over a split holding exactly those shots).
ARC_TASK = {
    "output_type": "multiple_choice",
    "training_split": "train",
    "fewshot_split": "train",
    "validation_split": "validation",
    "fewshot_config": {"sampler": "first_n"},
    "num_fewshot": ARC_SHOTS,
    "doc_to_text": "{{ question.strip() }}\n{% for text in choices %}{{ 'ABCDEFGH'[loop.index0] }}. "
                   "{{ text.strip() }}\n{% endfor %}Answer:",
    "doc_to_choice": "{{ ['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H'][:choices|length] }}",
    "doc_to_target": "gold",
    "target_delimiter": " ",
    "fewshot_delimiter": "\n\n",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}

# The study's GSM8K task (hybridlora.evaluate.gsm8k): "Question: ...\nAnswer:", worked answers as shots, greedy
# decoding until the module's stop strings.
GSM_TASK = {
    "output_type": "generate_until",
    "training_split": "train",
    "fewshot_split": "train",
    "test_split": "test",
    "fewshot_config": {"sampler": "first_n"},
    "num_fewshot": GSM_SHOTS,
    "doc_to_text": "Question: {{ question.strip() }}\nAnswer:",
    "doc_to_target": "{{ answer.strip() }}",
    "target_delimiter": " ",
    "fewshot_delimiter": "\n\n",
    "generation_kwargs": {"until": list(gsm8k.STOP), "do_sample": False, "max_gen_toks": GSM_TOKENS},
    "metric_list": [{"metric": "bypass", "aggregation": "bypass", "higher_is_better": True}],
}


def test_arc_conformance_with_lm_eval(lm, hflm, data_dir, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(arc, "NUM_FEWSHOT", ARC_SHOTS)  # the study pipeline as is, with a smaller fixed shot count
        ours = evaluate_benchmark(lm, "arc_challenge", data_dir=data_dir, limit=ARC_ITEMS, progress=False)
        items, shots = load_items("arc_challenge", data_dir, limit=ARC_ITEMS)
    prompts = build_prompts(lm, arc, items, shots, reserve=2)
    assert len(shots) == ARC_SHOTS and all(kept == ARC_SHOTS for _, kept in prompts)  # nothing trimmed
    write_task(tmp_path, "study_arc", ARC_TASK, {"train": shots, "validation": items})
    theirs = run_tasks(hflm, [], include_path=tmp_path, task_names=["study_arc"], progress=False)
    samples = sorted(theirs["samples"]["study_arc"], key=lambda s: s["doc_id"])

    assert len(samples) == len(ours["records"]) == ARC_ITEMS
    worst = 0.0
    for record, sample, (prompt, _) in zip(ours["records"], samples, prompts):
        assert sample["doc"]["example_id"] == record["example_id"]
        contexts = {ctx for ctx, _ in sample["arguments"]}
        assert contexts == {prompt}, f"{record['example_id']}: lm-eval built a different prompt"
        assert [cont for _, cont in sample["arguments"]] == [f" {c}" for c in letters(len(record["scores"]))]
        theirs_scores = [float(ll) for ll, _ in sample["filtered_resps"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(record["scores"], theirs_scores)))
        assert record["pred_index"] == max(range(len(theirs_scores)), key=theirs_scores.__getitem__)
        assert record["correct"] == int(sample["acc"])
    assert worst < LOGPROB_TOL, f"max |log p(ours) - log p(lm-eval)| = {worst:.3g}"
    print(f"ARC conformance: {ARC_ITEMS} items, max |log-likelihood difference| = {worst:.3g}")
    # not a degenerate comparison: the scores differ between examples and between choices
    assert len({round(s, 2) for r in ours["records"] for s in r["scores"]}) > ARC_ITEMS


def test_gsm8k_greedy_completions_match_lm_eval(lm, hflm, data_dir, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gsm8k, "NUM_FEWSHOT", GSM_SHOTS)
        ours = evaluate_benchmark(lm, "gsm8k", data_dir=data_dir, limit=GSM_ITEMS, max_new_tokens=GSM_TOKENS,
                                  progress=False)
        items, shots = load_items("gsm8k", data_dir, limit=GSM_ITEMS)
    prompts = build_prompts(lm, gsm8k, items, shots, reserve=GSM_TOKENS)
    write_task(tmp_path, "study_gsm8k", GSM_TASK, {"train": shots, "test": items})
    theirs = run_tasks(hflm, [], include_path=tmp_path, task_names=["study_gsm8k"], progress=False)
    samples = sorted(theirs["samples"]["study_gsm8k"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours["records"]) == GSM_ITEMS
    for record, sample, item, (prompt, _) in zip(ours["records"], samples, items, prompts):
        assert sample["arguments"][0][0] == prompt
        completion = sample["resps"][0][0]
        assert completion == record["completion"] and completion
        assert gsm8k.score(item, completion) == {k: record[k] for k in ("correct", "prediction", "gold")}


def test_stock_mmlu_through_bridge_equals_study_protocol(lm, data_dir, tmp_path):
    """lm-eval's stock MMLU task (template, first dev shots of the subject, ' A'..' D' scoring) equals the study
    protocol (the study strips each choice; lm-eval does not, so items with padded choices are left out).
    Two shots instead of five, on both sides, to keep the test short."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mmlu, "NUM_FEWSHOT", 2)
        ours = evaluate_benchmark(lm, "mmlu", data_dir=data_dir, limit=6, progress=False)
        result = evaluate_lmeval(lm, "mmlu", data_dir=data_dir, limit=6, output_dir=tmp_path, progress=False)["mmlu"]
    assert result["num_fewshot"] == ours["num_fewshot"] == 2 and ours["mean_fewshot_kept"] == 2
    items, _ = load_items("mmlu", data_dir, limit=6)
    clean = [i for i, item in enumerate(items) if all(c == c.strip() for c in item["choices"])]
    assert len(clean) >= 4
    for i in clean:
        a, b = ours["records"][i], result["records"][i]
        assert a["example_id"] == b["example_id"] and a["prediction"] == b["prediction"]
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) < LOGPROB_TOL
    assert result["protocol"] == "lm-eval" and result["lm_eval_version"] == lmeval_version()
    assert set(result["lmeval"]["results"]) == {f"mmlu_{s}" for s in {item["subject"] for item in items}}


def test_bridge_writes_records_for_every_benchmark(lm, data_dir, tmp_path):
    names = ["arc_challenge", "hellaswag", "gsm8k", "humaneval"]
    results = evaluate_lmeval(lm, names, data_dir=data_dir, limit=2, num_fewshot=1, max_new_tokens=6,
                              output_dir=tmp_path, progress=False)
    combined = json.loads((tmp_path / "summary.json").read_text())
    assert set(combined) == set(names)
    for name in ["arc_challenge", "hellaswag", "gsm8k"]:
        summary = combined[name]
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        expected = [item["example_id"] for item in load_items(name, data_dir, limit=2)[0]]
        assert [r["example_id"] for r in records] == expected  # the study's subset, in order
        assert summary["protocol"] == "lm-eval" and summary["lm_eval_version"] == lmeval_version()
        assert summary["n"] == 2 and summary["accuracy"] == sum(r["correct"] for r in records) / 2
        assert summary["settings"]["data_source"].startswith("local ")
        assert "dataset_kwargs" not in json.dumps(summary["lmeval"]["configs"])  # no stale temp paths
        for record in records:
            assert set(record) >= {"benchmark", "example_id", "correct", "prediction", "gold"}
            if name == "gsm8k":
                assert isinstance(record["completion"], str) and "correct_flexible" in record
            else:
                assert len(record["scores"]) >= 3 and "correct_norm" in record
    # HumanEval runs code: without permission it is reported as not run and nothing is generated
    assert combined["humaneval"]["accuracy"] == NOT_RUN and combined["humaneval"]["n"] == 0
    assert results["humaneval"]["records"] == []


def _spy_on_confirmation(bridge, monkeypatch) -> dict:
    """Record the ``confirm_run_unsafe_code`` that the bridge hands lm-eval (``seen["confirm"]``)."""
    seen = {}
    real = bridge.run_tasks

    def spy(*args, **kwargs):
        seen["confirm"] = kwargs.get("confirm_run_unsafe_code")
        return real(*args, **kwargs)

    monkeypatch.setattr(bridge, "run_tasks", spy)
    return seen


def test_bridge_humaneval_runs_in_sandbox_only_when_allowed(lm, hflm, data_dir, monkeypatch):
    import hybridlora.evaluate.lmeval_bridge as bridge

    seen = _spy_on_confirmation(bridge, monkeypatch)
    summary = bridge.evaluate_benchmark_lmeval(lm, "humaneval", hflm=hflm, data_dir=data_dir, limit=1,
                                               max_new_tokens=4, allow_code_execution=True, progress=False)
    (record,) = summary["records"]
    assert record["task_id"] == "HumanEval/0" and record["status"] != NOT_RUN and record["correct"] in (0, 1)
    assert summary["settings"]["code_execution"] == "sandbox"
    assert seen["confirm"] is False  # lm-eval itself executed nothing


def test_bridge_humaneval_lm_eval_executor_gets_the_confirmation(lm, hflm, data_dir, monkeypatch):
    """code_executor="lm-eval": lm-eval's stock metric runs, and only because the confirmation is passed. HF
    evaluate's code_eval (a hub script) is replaced by a stand-in that judges without executing anything."""
    import types

    import hybridlora.evaluate.lmeval_bridge as bridge

    judged = []

    class FakeCodeEval:
        def compute(self, references, predictions, k):
            assert os.environ.get("HF_ALLOW_CODE_EVAL") == "1"  # set for this run only
            judged.append(predictions[0][0])
            return {"pass@1": float(len(predictions[0][0]) % 2)}, {}

    before = os.environ.get("HF_ALLOW_CODE_EVAL")
    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=lambda name: FakeCodeEval()))
    monkeypatch.delitem(sys.modules, "lm_eval.tasks.humaneval.utils", raising=False)
    seen = _spy_on_confirmation(bridge, monkeypatch)
    summary = bridge.evaluate_benchmark_lmeval(lm, "humaneval", hflm=hflm, data_dir=data_dir, limit=2,
                                               max_new_tokens=4, allow_code_execution=True, code_executor="lm-eval",
                                               progress=False)
    assert seen["confirm"] is True
    items, _ = load_items("humaneval", data_dir, limit=2)
    for record, item in zip(summary["records"], items):
        program = item["prompt"] + record["completion"]  # lm-eval's stock build_predictions filter
        assert program in judged and record["correct"] == len(program) % 2
        assert record["status"] == "lm-eval code_eval"
    assert "HF_ALLOW_CODE_EVAL" not in os.environ or os.environ["HF_ALLOW_CODE_EVAL"] == before


def test_cli_protocol_lm_eval(data_dir, tmp_path, capsys):
    from hybridlora.cli import main

    out = tmp_path / "res"
    code = main(["eval", MODEL, "--tiny", "--protocol", "lm-eval", "--benchmarks", "arc_challenge", "--limit", "2",
                 "--data-dir", str(data_dir), "--output", str(out), "--max-length", "1024", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "arc_challenge.summary.json").read_text())
    assert summary["protocol"] == "lm-eval" and summary["n"] == 2 and summary["num_fewshot"] == arc.NUM_FEWSHOT
    assert "protocol lm-eval" in capsys.readouterr().err
