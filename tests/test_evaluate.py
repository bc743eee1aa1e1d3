"""Evaluation: the five study benchmarks end to end on real data with a tiny random model (CPU, offline)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from hybridlora.evaluate import gsm8k, humaneval, mmlu
from hybridlora.evaluate.data import BenchmarkError, fit_prompt, seeded_subset
from hybridlora.evaluate.lm import CausalLM, stop_window, trim_at_stop
from hybridlora.evaluate.runner import (BENCHMARKS, NOT_RUN, PreparedCache, build_prompts, evaluate,
                                        evaluate_benchmark, load_items, parse_benchmarks, perplexity)
from hybridlora.evaluate.tokenizer import byte_tokenizer
from hybridlora.models import build_model, tiny_config_for

LETTERS = [" A", " B", " C", " D"]


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    model = build_model(tiny_config_for("llama"), seed=0)
    return CausalLM(model, byte_tokenizer(), batch_size=4, max_length=512, name="tiny-llama")


@pytest.fixture()
def offline(monkeypatch):
    import hybridlora.models

    monkeypatch.setattr(hybridlora.models, "hub_reachable", lambda *a, **k: False)


def test_byte_tokenizer_round_trips_in_256_ids():
    tok = byte_tokenizer()
    text = "Answer: B — é\n  def f():"
    ids = tok(text).input_ids
    assert len(tok) == 256 and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok(" A", add_special_tokens=False).input_ids == [32, 65]


def reference_choice_logprobs(lm: CausalLM, context: str, choice: str) -> float:
    """Unbatched, unpadded: full forward over context + choice, summed log-probs of the choice's tokens."""
    ctx = lm.encode(context)
    cont = lm.continuation_ids(context, choice)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits.float(), dim=-1)[0]
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_one_forward_scoring_equals_unbatched(lm, data_dir):
    items, dev = load_items("mmlu", data_dir, limit=6)
    prompts = [p for p, _ in build_prompts(lm, mmlu, items, dev, reserve=2)]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    batched = lm.choice_logprobs(prompts, [LETTERS] * len(prompts))
    for prompt, scores in zip(prompts, batched):
        reference = [reference_choice_logprobs(lm, prompt, c) for c in LETTERS]
        assert max(abs(a - b) for a, b in zip(scores, reference)) < 1e-4
        assert scores.index(max(scores)) == reference.index(max(reference))


def test_scoring_counts_one_forward_per_batch(lm, data_dir):
    calls = []
    handle = lm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        lm.choice_logprobs(["Q1\nAnswer:", "Longer question two\nAnswer:", "3\nAnswer:"], [LETTERS] * 3)
    finally:
        handle.remove()
    assert len(calls) == 1  # batch_size 4 >= 3 questions


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_end_to_end(lm, data_dir, tmp_path, name):
    summary = evaluate_benchmark(lm, name, data_dir=data_dir, limit=3, output_dir=tmp_path, max_new_tokens=12,
                                 progress=False)
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    written = json.loads((tmp_path / f"{name}.summary.json").read_text())
    assert len(records) == summary["n"] == written["n"] == 3
    assert len({r["example_id"] for r in records}) == 3 and all(isinstance(r["example_id"], str) for r in records)
    assert all(r["benchmark"] == name for r in records)
    assert written["model"] == "tiny-llama" and written["protocol"] and written["examples_per_s"] > 0
    assert written["num_fewshot"] == BENCHMARKS[name].NUM_FEWSHOT
    if name == "humaneval":
        assert written["accuracy"] == NOT_RUN and all(r["correct"] is None for r in records)
        assert all("completion" in r for r in records)
    elif name == "gsm8k" or name.startswith("syn_"):  # generative: GSM8K and the synthetic tasks (exact match)
        assert all(r["correct"] in (0, 1) and "completion" in r and r["gold"] for r in records)
    else:
        assert 0.0 <= written["accuracy"] <= 1.0
        assert all(r["prediction"] in "ABCDE" and len(r["scores"]) >= 3 for r in records)
        assert all(r["correct"] == int(r["prediction"] == r["gold"]) for r in records)


def _evaluated(lm, name, data_dir, tmp_path, cache, **settings):
    summary = evaluate_benchmark(lm, name, data_dir=data_dir, output_dir=tmp_path, progress=False, cache=cache,
                                 **settings)
    return [{k: v for k, v in r.items()} for r in summary["records"]]


@pytest.mark.parametrize("name", ["arc_challenge", "gsm8k"])
def test_prepared_cache_gives_what_preparing_afresh_gives(lm, data_dir, tmp_path, name):
    """The cache must never hand one setting's items or prompts to another: every setting that shapes them is
    in its key (limit, max length, generation budget, tokenizer), and a hit returns what a fresh run returns."""
    cache = PreparedCache()
    settings = [{"limit": 3, "max_new_tokens": 8}, {"limit": 4, "max_new_tokens": 8},
                {"limit": 3, "max_new_tokens": 16}, {"limit": 3, "max_new_tokens": 8}]
    cached = [_evaluated(lm, name, data_dir, tmp_path, cache, **s) for s in settings]
    fresh = [_evaluated(lm, name, data_dir, tmp_path, None, **s) for s in settings]
    assert cached == fresh
    assert [len(r) for r in cached] == [3, 4, 3, 3]
    assert cache.hits == 1 if name == "gsm8k" else cache.hits == 2  # MC prompts do not depend on the budget

    wide = CausalLM(lm.model, lm.tokenizer, batch_size=4, max_length=3072, name="tiny-llama")
    more = _evaluated(wide, name, data_dir, tmp_path, cache, limit=3, max_new_tokens=8)
    assert more == _evaluated(wide, name, data_dir, tmp_path, None, limit=3, max_new_tokens=8)
    assert sum(r["num_fewshot"] for r in more) > sum(r["num_fewshot"] for r in cached[0])  # more shots fit

    other = CausalLM(lm.model, copy.deepcopy(lm.tokenizer), batch_size=4, max_length=512, name="tiny-llama")
    before = cache.misses
    _evaluated(other, name, data_dir, tmp_path, cache, limit=3, max_new_tokens=8)
    assert cache.misses == before + 1  # another tokenizer object: prepared again


def test_prepared_cache_keys_data_folder_subset_and_seed(lm, data_dir, monkeypatch):
    key = lambda **kw: PreparedCache.key(lm, "mmlu", **{"data_dir": data_dir, "n": None, "limit": 3,  # noqa: E731
                                                        "seed": 1234, "reserve": 2, **kw})
    assert len({key(), key(limit=4), key(n=100), key(seed=1), key(reserve=8), key(data_dir="/elsewhere")}) == 6
    monkeypatch.setenv("HYBRIDLORA_DATA", "/a")
    first = key(data_dir=None)
    monkeypatch.setenv("HYBRIDLORA_DATA", "/b")
    assert key(data_dir=None) != first


def test_generation_batches_change_the_batching_not_the_completions(lm, data_dir):
    items, shots = load_items("gsm8k", data_dir, limit=5)
    prompts = [p for p, _ in build_prompts(lm, gsm8k, items, shots, reserve=6)]
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0])
                                                if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        whole = CausalLM(lm.model, lm.tokenizer, batch_size=2, max_length=512, generate_batch_size=5)
        assert whole.generate_until(prompts, gsm8k.STOP, 6) == lm.generate_until(prompts, gsm8k.STOP, 6)
    finally:
        handle.remove()
    assert calls == [5, 4, 1]  # prefills: the five prompts in one batch, then in batches of batch_size 4
    summary = evaluate_benchmark(whole, "gsm8k", data_dir=data_dir, limit=2, max_new_tokens=4, progress=False)
    assert summary["settings"]["generate_batch_size"] == 5 and summary["settings"]["batch_size"] == 2


def test_subsets_are_fixed_and_limits_are_prefixes(data_dir):
    full, _ = load_items("gsm8k", data_dir)
    again, _ = load_items("gsm8k", data_dir)
    short, _ = load_items("gsm8k", data_dir, limit=5)
    assert len(full) == 256 and [i["example_id"] for i in full] == [i["example_id"] for i in again]
    assert short == full[:5]
    sizes = {name: len(load_items(name, data_dir)[0]) for name in BENCHMARKS}
    synthetic = {name: 256 for name in ("syn_recall", "syn_copy", "syn_arith", "syn_count", "syn_first", "syn_recall_inverse",
                                        "syn_reverse")}
    assert sizes == {"mmlu": 512, "arc_challenge": 299, "hellaswag": 512, "gsm8k": 256, "humaneval": 164, **synthetic}


def test_fewshot_protocol(data_dir):
    items, dev = load_items("mmlu", data_dir, limit=2)
    header, shots, query = mmlu.prompt_parts(items[0], dev)
    assert len(shots) == 5 and items[0]["subject"].replace("_", " ") in header and query.endswith("Answer:")
    assert all(s.rstrip().endswith((" A", " B", " C", " D")) for s in shots)
    hs_items, hs_shots = load_items("hellaswag", data_dir)
    assert len(hs_shots) == 10 and not {s["example_id"] for s in hs_shots} & {i["example_id"] for i in hs_items}
    assert len(load_items("arc_challenge", data_dir)[1]) == 25 and len(load_items("gsm8k", data_dir)[1]) == 8


def test_prompt_trimming_drops_oldest_shot_first():
    prompt, kept = fit_prompt("H|", ["s1|", "s2|", "s3|"], "Q", lambda text: len(text) <= 8)
    assert (prompt, kept) == ("H|s3|Q", 1)
    assert fit_prompt("", ["a"], "Q", lambda text: False) == ("Q", 0)


def test_gsm8k_answer_extraction():
    assert gsm8k.extract_answer("so 3+4=7\n#### 7") == "7"
    assert gsm8k.extract_answer("#### $1,234.00 dollars") == "1234"
    assert gsm8k.extract_answer("first 5 then 12.50 last") == "12.5"
    assert gsm8k.extract_answer("#### -3") == "-3"
    assert gsm8k.extract_answer("The answer is 18.") == "18"
    assert gsm8k.extract_answer("no number here") is None
    item = {"gold": "18"}
    assert gsm8k.score(item, " 9*2 = 18\n#### 18")["correct"] == 1
    assert gsm8k.score(item, " #### 17")["correct"] == 0


def test_humaneval_stop_sequences():
    text = "    return x + 1\n\ndef check():\n    pass\n"
    assert humaneval.trim_completion(text) == "    return x + 1\n"
    assert humaneval.trim_completion("    return 1\nif __name__ == '__main__':\n") == "    return 1"
    assert humaneval.trim_completion("    return 1\nprint(f(2))") == "    return 1"
    assert humaneval.trim_completion("    def inner():\n        return 1\n    return inner()") == \
        "    def inner():\n        return 1\n    return inner()"  # nested defs are not top level
    assert trim_at_stop("abcQuestion: x", ["Question:"]) == "abc"


def test_generation_stops_and_batching_matches_single(lm):
    prompts = ["Question: 2+2?\nAnswer:", "def add(a, b):\n", "x"]
    batched = lm.generate_until(prompts, stop=["\n"], max_new_tokens=10)
    single = [CausalLM(lm.model, lm.tokenizer, batch_size=1, max_length=512).generate_until([p], ["\n"], 10)[0]
              for p in prompts]
    assert batched == single
    assert all("\n" not in c for c in batched)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_stop_window_sees_every_stop_string_when_it_completes(tokenizer, data_dir):
    """Decoding only the last stop_window(stop) generated tokens finds a stop string at the step its last
    character arrives (multi-byte characters and multi-character tokens included)."""
    from hybridlora.data import build_tiny_tokenizer

    tok = byte_tokenizer() if tokenizer == "byte" else build_tiny_tokenizer(data_dir=data_dir)
    texts = ["The answer is 42.", "def f(x):\n    return x * 2", "Ünïcödé ✓ text — with dashes", "a" * 300]
    checked = 0
    for stop in ["\n", "Question:", "\n\n#", "✓ t"]:
        for text in texts:
            ids = tok(text + stop + " tail", add_special_tokens=False)["input_ids"]
            if stop not in tok.decode(ids):  # the tiny BPE tokenizer maps non-ASCII characters to <unk>
                continue
            step = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))
            assert stop in tok.decode(ids[max(0, step - stop_window([stop])):step]), (stop, text)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("decode, method", [("hf", "batch_decode"), ("static", "decode")])
def test_stop_check_decodes_a_bounded_tail(lm, monkeypatch, decode, method):
    """Per step the stop check decodes at most stop_window tokens per row, however long the generation — in
    transformers' stopping criterion (batch_decode of every row) and in the static loop's (decode of one row)."""
    seen = []
    real = getattr(type(lm.tokenizer), method)

    def spy(self, *args, **kwargs):
        sequences = args[0] if args else kwargs.get("sequences", kwargs.get("token_ids"))
        rows = sequences if method == "batch_decode" else [sequences]
        seen.append(max(len(s) for s in rows))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lm, "decode", decode)
    monkeypatch.setattr(type(lm.tokenizer), method, spy)
    lm.generate_until(["x", "y"], stop=["never-generated-stop"], max_new_tokens=60)
    checks = seen[:-1] if method == "batch_decode" else seen  # batch_decode's last call: the finished completions
    assert len(checks) >= 59 and max(checks) == stop_window(["never-generated-stop"]) < 60


def test_humaneval_execution_only_when_allowed(lm, data_dir, monkeypatch):
    sandbox = pytest.importorskip("hybridlora.evaluate.sandbox")
    from hybridlora.evaluate.sandbox import SandboxResult

    calls = []

    def fake_run_many(items, **kwargs):
        items = list(items)
        calls.append(len(items))
        return [SandboxResult(True, "passed", "", 0.0) for _ in items]

    monkeypatch.setattr(sandbox, "run_many", fake_run_many)
    off = evaluate_benchmark(lm, "humaneval", data_dir=data_dir, limit=2, max_new_tokens=4, progress=False)
    assert off["accuracy"] == NOT_RUN and calls == []
    on = evaluate_benchmark(lm, "humaneval", data_dir=data_dir, limit=2, max_new_tokens=4, progress=False,
                            allow_code_execution=True)
    assert calls == [2] and on["accuracy"] == 1.0 and on["settings"]["code_execution"] == "run"


def test_perplexity_matches_manual(lm, tmp_path):
    text = "The quick brown fox jumps over the lazy dog."
    result = perplexity(lm, [text], output_dir=tmp_path)
    ids = torch.tensor([lm.encode(text)])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits, dim=-1)[0, :-1]
    manual = float(logp.gather(1, ids[0, 1:, None]).mean())
    assert result["tokens"] == ids.shape[1] - 1
    assert abs(result["mean_token_logprob"] - manual) < 1e-5
    assert math.isclose(result["perplexity"], math.exp(-manual), rel_tol=1e-5)
    assert (tmp_path / "perplexity.summary.json").is_file()


def test_evaluate_writes_combined_summary(lm, data_dir, tmp_path):
    results = evaluate(lm, "mmlu,arc_challenge", data_dir=data_dir, limit=2, output_dir=tmp_path, progress=False)
    combined = json.loads((tmp_path / "summary.json").read_text())
    assert set(results) == set(combined) == {"mmlu", "arc_challenge"}
    assert "records" not in combined["mmlu"]


def test_bad_inputs_give_clear_errors(lm, tmp_path, offline):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'squad'.*mmlu"):
        parse_benchmarks("mmlu,squad")
    with pytest.raises(BenchmarkError, match=r"no local data at .*mmlu.*hub is unreachable for cais/mmlu"):
        evaluate_benchmark(lm, "mmlu", data_dir=tmp_path, progress=False)
    with pytest.raises(BenchmarkError, match="openai/gsm8k"):
        load_items("gsm8k", tmp_path / "missing")
    with pytest.raises(ValueError, match="shared prefix"):
        lm.choice_logprobs(["Q:"], [[" yes", " no"]])
    with pytest.raises(BenchmarkError, match="limit"):
        seeded_subset([{"example_id": "a"}], None, limit=-1)


def test_adapter_loads_inside_exact_targets(tmp_path, data_dir):
    from peft import LoraConfig, get_peft_model

    from hybridlora.evaluate.lm import load_lm

    base = load_lm("llama-3.2-1b", tiny=True, max_length=512)
    names = [n for n, m in base.model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    peft_model = get_peft_model(base.model, LoraConfig(r=4, target_modules=names, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = CausalLM(peft_model, base.tokenizer).choice_logprobs(["Q: x\nAnswer:"], [LETTERS])
    loaded = load_lm("llama-3.2-1b", tiny=True, max_length=512, adapter=tmp_path / "adapter")
    assert loaded.adapter and type(loaded.model).__name__.startswith("Peft")
    got = loaded.choice_logprobs(["Q: x\nAnswer:"], [LETTERS])
    assert max(abs(a - b) for a, b in zip(got[0], expected[0])) < 1e-5


@pytest.mark.parametrize("model", ["qwen3.5-0.8b", "falcon-h1-0.5b"])
def test_batched_scoring_exact_on_hybrid_models(model):
    """Right padding + per-row last index is exact for recurrent mixers too (GDN, Mamba-2)."""
    from hybridlora.evaluate.lm import load_lm

    hybrid = load_lm(model, tiny=True, batch_size=4, max_length=512)
    prompts = ["Q: short\nAnswer:", "A much longer question with many more tokens\nAnswer:", "Mid q?\nAnswer:"]
    batched = hybrid.choice_logprobs(prompts, [LETTERS] * 3)
    for prompt, scores in zip(prompts, batched):
        reference = [reference_choice_logprobs(hybrid, prompt, c) for c in LETTERS]
        assert max(abs(a - b) for a, b in zip(scores, reference)) < 1e-4
