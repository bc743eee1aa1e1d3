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
    assert load_split(domain, data_dir=data_dir, max_examples=20, seed=2).manifest["train_ids"] != a.manifest["train_ids"]


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
    empty.write_text('{"prompt": ""}\n')
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
