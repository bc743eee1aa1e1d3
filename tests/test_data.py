"""Data registry, splits, manifests, formatting and the offline tiny tokenizer (real shared data)."""
from __future__ import annotations

import json

import pytest

from hybridlora.data import (IGNORE, DataError, build_tiny_tokenizer, load_split, tokenize_examples)


@pytest.fixture(scope="module")
def tok(data_dir):
    return build_tiny_tokenizer(data_dir=data_dir)


@pytest.mark.parametrize("domain", ["gsm8k", "codealpaca", "chat"])
def test_domains_load_deterministic_subsets(domain, data_dir):
    a = load_split(domain, data_dir=data_dir, max_examples=20, seed=1)
    b = load_split(domain, data_dir=data_dir, max_examples=20, seed=1)
    c = load_split(domain, data_dir=data_dir, max_examples=40, seed=1)
    assert [e.id for e in a.train] == [e.id for e in b.train]
    assert [e.id for e in c.train][:20] == [e.id for e in a.train]  # smaller subset = prefix of larger
    assert a.manifest["val_ids"] == c.manifest["val_ids"]
    assert not set(a.manifest["train_ids"]) & set(a.manifest["val_ids"])
    assert all(e.messages[-1]["role"] == "assistant" for e in a.train)
    other = load_split(domain, data_dir=data_dir, max_examples=20, seed=2)
    assert other.manifest["train_ids"] != a.manifest["train_ids"]


def test_gsm8k_uses_train_split_only(data_dir):
    split = load_split("gsm8k", data_dir=data_dir)
    assert split.manifest["origin"].endswith("train.jsonl")
    assert split.manifest["usable_examples"] == 7473
    assert all(e.id.startswith("gsm8k/train/") for e in split.train[:5])
    assert "####" in split.train[0].messages[-1]["content"]


def test_local_files_with_field_mapping_and_bad_rows(tmp_path):
    p = tmp_path / "mine.jsonl"
    rows = [{"q": "2+2?", "a": "4"}, {"q": "", "a": "x"}, {"q": "hi"}, {"q": "3+3?", "a": "6"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    split = load_split(str(p), fields={"prompt": "q", "response": "a"}, val_examples=1)
    assert split.manifest["usable_examples"] == 2
    assert sum(split.manifest["skipped_rows"].values()) == 3
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("prompt,response\nhello,world\nfoo,\n")
    assert load_split(str(csv_path), val_examples=0).manifest["num_train"] == 1
    js = tmp_path / "chat.json"
    js.write_text(json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                              {"messages": []}]))
    split = load_split(str(js), val_examples=0)
    assert split.manifest["num_train"] == 1 and split.manifest["skipped_rows"] == {"missing messages": 1}


def test_clear_errors(tmp_path, monkeypatch):
    import hybridlora.models as models

    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(DataError, match="--data-dir"):
        load_split("gsm8k")
    with pytest.raises(DataError, match="hub"):
        load_split("gsm8k")
    with pytest.raises(DataError, match="unknown data"):
        load_split("no_such_thing")
    with pytest.raises(DataError, match="not found"):
        load_split("chat", data_dir=tmp_path)
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"prompt": "", "response": "x"}\n')
    with pytest.raises(DataError, match="no usable examples"):
        load_split(str(empty))


def test_tiny_tokenizer_fits_tiny_models(tok):
    assert len(tok) <= 256
    ids = tok("Natalia sold 48 clips.\n#### 72")["input_ids"]
    assert max(ids) < 256 and tok.decode(ids) == "Natalia sold 48 clips.\n#### 72"


@pytest.mark.parametrize("chat_template", [False, True])
def test_assistant_only_labels(data_dir, chat_template):
    tok = build_tiny_tokenizer(data_dir=data_dir, chat_template=chat_template)
    split = load_split("chat", data_dir=data_dir, max_examples=10)
    ts = tokenize_examples(split.train, tok, max_length=4096)
    assert ts.template == ("chat_template" if chat_template else "plain")
    ex, src = ts.examples[0], next(e for e in split.train if e.id == ts.examples[0].id)
    target = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    for m in src.messages:
        if m["role"] == "assistant":
            assert m["content"][:20] in target
        else:
            assert m["content"][:20] not in target
    full = tokenize_examples(split.train, tok, max_length=4096, loss_on="full")
    assert all(lab != IGNORE for lab in full.examples[0].labels)


def test_overlong_rows_skipped_and_counted(tok, data_dir):
    split = load_split("gsm8k", data_dir=data_dir, max_examples=30)
    ts = tokenize_examples(split.train, tok, max_length=200)
    assert ts.skipped["longer than max_length=200"] > 0
    assert len(ts.examples) + sum(ts.skipped.values()) == 30
    assert all(len(e.input_ids) <= 200 for e in ts.examples)
    with pytest.raises(DataError):
        tokenize_examples(split.train, tok, loss_on="everything")


# --- hub datasets (datasets.load_dataset monkeypatched to read local rows: no hub access here) ------------
def _fake_hub(monkeypatch, rows_by_id: dict, calls: list):
    datasets = pytest.importorskip("datasets")
    import hybridlora.models as models

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if path not in rows_by_id:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub\nsecond line")
        return datasets.Dataset.from_list(rows_by_id[path])

    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def _jsonl(path, n):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def test_domains_from_the_hub(monkeypatch, data_dir):
    gsm = _jsonl(data_dir / "gsm8k" / "train.jsonl", 30)
    ultra = [{"prompt": "hi", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"hello {i}"},
                                                                  {"role": "assistant", "content": "hi there"},
                                                                  {"role": "user", "content": "bye"},
                                                                  {"role": "assistant", "content": "bye!"}]}
             for i in range(12)]
    calls: list = []
    _fake_hub(monkeypatch, {"openai/gsm8k": gsm, "HuggingFaceH4/ultrachat_200k": ultra}, calls)
    hub = load_split("gsm8k", max_examples=10, val_examples=2)
    assert calls[-1] == ("openai/gsm8k", "main", {"split": "train"})
    assert hub.manifest["origin"] == "hf:openai/gsm8k/train"
    assert all(e.id.startswith("gsm8k/train/") and "####" in e.messages[-1]["content"] for e in hub.train)
    chat = load_split("chat", val_examples=2)
    assert calls[-1] == ("HuggingFaceH4/ultrachat_200k", None, {"split": "train_sft"})
    assert chat.train[0].id.startswith("ultrachat_200k/p") and len(chat.train[0].messages) == 4


def test_any_hub_dataset_with_field_mapping(monkeypatch):
    rows = [{"q": f"What is {i}+{i}?", "a": str(2 * i), "sys": "Be brief."} for i in range(10)] + [{"q": "", "a": "x"}]
    calls: list = []
    _fake_hub(monkeypatch, {"someone/arith": rows}, calls)
    split = load_split("someone/arith", fields={"prompt": "q", "response": "a", "system": "sys"}, split="validation",
                       config="v2", val_examples=1)
    assert calls[-1] == ("someone/arith", "v2", {"split": "validation"})
    assert split.manifest["origin"] == "hf:someone/arith/v2/validation"
    assert split.manifest["usable_examples"] == 10 and split.manifest["skipped_rows"] == {"missing q/a": 1}
    ex = split.train[0]
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"] and ex.id.startswith("someone/arith/")
    with pytest.raises(DataError, match="no column question"):
        load_split("hf:someone/arith", fields={"prompt": "question", "response": "a"})
    with pytest.raises(DataError, match="--field prompt=COL"):  # columns that cannot be guessed
        load_split("someone/arith")
    with pytest.raises(DataError, match=r"could not load nobody/missing.*second" + "|" + r"Couldn't reach"):
        load_split("nobody/missing")
    with pytest.raises(DataError, match="local .jsonl/.json/.csv file"):
        load_split("nobody/missing")


def test_offline_without_local_copy_names_both_options(monkeypatch):
    import hybridlora.models as models

    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for domain, hub_id, local in [("gsm8k", "openai/gsm8k", "gsm8k/train.jsonl"),
                                  ("chat", "HuggingFaceH4/ultrachat_200k", "hh-rlhf/")]:
        with pytest.raises(DataError) as err:
            load_split(domain)
        msg = str(err.value)
        assert "\n" not in msg and hub_id in msg and "--data-dir" in msg and local in msg, msg
    with pytest.raises(DataError, match="not reachable.*someone/x.*local .jsonl"):
        load_split("someone/x", fields={"prompt": "q", "response": "a"})


def test_benchmark_test_items_never_trained_on(tmp_path, data_dir):
    test_rows = _jsonl(data_dir / "gsm8k" / "test.jsonl", 3)
    rows = [{"prompt": "  " + r["question"].upper() + " ", "response": r["answer"]} for r in test_rows]
    rows += [{"prompt": f"unrelated {i}", "response": "ok"} for i in range(4)]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    split = load_split(str(p), data_dir=data_dir, val_examples=1)
    assert split.manifest["usable_examples"] == 4
    assert split.manifest["skipped_rows"] == {"GSM8K test item (benchmark, never trained on)": 3}
    assert split.manifest["benchmark_guard"].startswith("on: 1319")
    assert load_split(str(p), val_examples=1).manifest["benchmark_guard"].startswith("off")
    # the gsm8k domain: every training and validation question is a train question, none a test question
    gsm = load_split("gsm8k", data_dir=data_dir)
    test_q = {" ".join(r["question"].lower().split()) for r in _jsonl(data_dir / "gsm8k" / "test.jsonl", 10_000)}
    assert len(test_q) > 1300
    used = gsm.train + gsm.val
    assert len(used) == 7473 and not {" ".join(e.messages[0]["content"].lower().split()) for e in used} & test_q


def test_field_guessing_and_sharegpt(tmp_path):
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps([{"instruction": "Add.", "input": "1 2", "output": "3"},
                             {"instruction": "Say hi.", "input": "", "output": "hi"},
                             {"instruction": "", "input": "x", "output": "y"}]))
    split = load_split(str(p), val_examples=0)
    assert sorted(e.messages[0]["content"] for e in split.train) == ["Add.\n\n1 2", "Say hi."]
    sg = tmp_path / "sharegpt.jsonl"
    sg.write_text(json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}))
    ex = load_split(str(sg), val_examples=0).train[0]
    assert ex.messages == ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
    with pytest.raises(DataError, match="unknown field key"):
        load_split(str(p), fields={"question": "instruction"})
    with pytest.raises(DataError, match="fixed fields"):
        load_split("gsm8k", fields={"prompt": "q", "response": "a"})
    with pytest.raises(DataError, match="not found"):
        load_split(str(tmp_path / "nope.jsonl"))


QWEN3_LIKE = (  # renders an (empty) think block on the latest assistant turn only, like Qwen3's template
    "{% for m in messages %}<bos>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}<think></think>"
    "{% endif %}{{ m['content'] }}<eos>\n{% endfor %}{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


def test_chat_template_that_is_not_prefix_stable(data_dir):
    tok = build_tiny_tokenizer(data_dir=data_dir)
    tok.chat_template = QWEN3_LIKE
    split = load_split("chat", data_dir=data_dir, max_examples=30)
    multi = [e for e in split.train if sum(m["role"] == "assistant" for m in e.messages) >= 2]
    assert len(multi) >= 5
    ts = tokenize_examples(multi, tok, max_length=100_000)
    assert ts.template == "chat_template" and not ts.skipped and len(ts.examples) == len(multi)
    for ex, src in zip(ts.examples, multi):
        spans, cur = [], []
        for i, lab in zip(ex.input_ids, ex.labels):
            if lab != IGNORE:
                cur.append(i)
            elif cur:
                spans.append(tok.decode(cur)), cur.clear()
        spans += [tok.decode(cur)] if cur else []
        answers = [tok.decode(tok(m["content"])["input_ids"]) for m in src.messages if m["role"] == "assistant"]
        assert len(spans) == len(answers)
        for span, answer in zip(spans, answers):
            assert answer[:15] in span and "user" not in span[:10]
            assert span.rstrip().endswith("<eos>")  # the end-of-turn marker is trained
