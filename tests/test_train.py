"""LoRA fine-tuning on tiny random same-family models (CPU): loss, resume, reload, errors."""
from __future__ import annotations

import json

import pytest
import torch

from hybridlora.components import build_component_map
from hybridlora.data import build_tiny_tokenizer
from hybridlora.families import family_named
from hybridlora.models import build_model, tiny_config_for
from hybridlora.placement import named_preset, resolve
from hybridlora.placement.verify import lora_hosts
from hybridlora.train import (TrainConfig, TrainingError, evaluate_loss, load_adapter, lora_state, prepare_data,
                              train)

RESUME_TOL = 1e-6  # max abs difference of LoRA weights, interrupted+resumed vs uninterrupted (CPU, fp32)


@pytest.fixture(scope="module")
def tok(data_dir):
    return build_tiny_tokenizer(data_dir=data_dir)


def _setup(model_type, preset="all"):
    model = build_model(tiny_config_for(model_type), seed=0)
    cmap = build_component_map(model)
    return model, resolve(named_preset(preset, family_named(cmap.family)), cmap)


def _cfg(**kw):
    base = dict(epochs=3, micro_batch_size=4, grad_accum=1, max_length=384, learning_rate=1e-2, save_every=0,
                norm_every=2, progress=False, warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("model_type,domain", [("qwen3_5_text", "gsm8k"), ("qwen3_5_text", "codealpaca"),
                                               ("qwen3_5_text", "chat"), ("falcon_h1", "gsm8k")])
def test_loss_goes_down(model_type, domain, tok, data_dir, tmp_path):
    model, resolved = _setup(model_type)
    cfg = _cfg()
    tr, va, manifest = prepare_data(domain, tok, cfg, data_dir=data_dir, max_examples=16, val_examples=4)
    before = evaluate_loss(model, tr.examples, tok.pad_token_id)
    result = train(model, resolved, tr, tmp_path, cfg, pad_id=tok.pad_token_id, val_set=va, data_manifest=manifest)
    after = evaluate_loss(result.peft_model, tr.examples, tok.pad_token_id)
    assert after < before - (0.3 if model_type == "qwen3_5_text" else 0.1), (before, after)  # deterministic runs
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["batching"] == "padding (no packing)"
    assert log[-1]["event"] == "end"
    norms = [r for r in log if r["event"] == "lora_norms"]
    assert norms and set(norms[-1]["norms"]) == set(resolved.components())
    for name in ("adapter/adapter_config.json", "run_config.yaml", "data_manifest.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "data_manifest.json").read_text())["train_ids"] == [e.id for e in tr.examples]


def test_kill_and_resume_matches_uninterrupted(tok, data_dir, tmp_path):
    cfg = _cfg(epochs=2, grad_accum=2, micro_batch_size=2, save_every=1, lora_dropout=0.1)
    tr, va, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=12, val_examples=2)
    model, resolved = _setup("qwen3_5_text")
    full = train(model, resolved, tr, tmp_path / "full", cfg, pad_id=tok.pad_token_id)
    model, resolved = _setup("qwen3_5_text")
    part = train(model, resolved, tr, tmp_path / "cut", cfg, pad_id=tok.pad_token_id, stop_after_steps=3)
    assert part.steps == 3 and not (tmp_path / "cut" / "adapter").exists()
    model, resolved = _setup("qwen3_5_text")  # a fresh process would rebuild the base model
    resumed = train(model, resolved, tr, tmp_path / "cut", cfg, pad_id=tok.pad_token_id, resume=True)
    assert resumed.steps == full.steps
    a, b = lora_state(full.peft_model), lora_state(resumed.peft_model)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= RESUME_TOL
    steps = lambda d: [r["loss"] for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines())
                       if r["event"] == "step"]
    assert steps(tmp_path / "cut") == pytest.approx(steps(tmp_path / "full"), abs=1e-6)


@pytest.mark.parametrize("model_type,preset", [("qwen3_5_text", "attention_only"), ("falcon_h1", "recurrent_mlp")])
def test_adapter_reload_gives_identical_logits(model_type, preset, tok, data_dir, tmp_path):
    cfg = _cfg(epochs=1)
    tr, _, _ = prepare_data("codealpaca", tok, cfg, data_dir=data_dir, max_examples=8, val_examples=1)
    model, resolved = _setup(model_type, preset)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, resolved, tr, tmp_path, cfg, pad_id=tok.pad_token_id)
    trained = result.peft_model.eval()
    assert set(lora_hosts(trained)) == {h.name for h in resolved.hosts}
    base_after = trained.get_base_model().state_dict()
    for k, v in base_before.items():  # every base weight untouched (PEFT renames hosts' weights to base_layer)
        key = k if k in base_after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(base_after[key], v), k
    fresh, _ = _setup(model_type, preset)
    reloaded = load_adapter(fresh, result.adapter_dir).eval()
    ids = torch.tensor([tr.examples[0].input_ids[:64]])
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        assert not torch.equal(build_model(tiny_config_for(model_type), seed=0)(input_ids=ids).logits,
                               reloaded(input_ids=ids).logits)


def test_bad_inputs_give_clear_errors(tok, data_dir, tmp_path):
    cfg = _cfg(epochs=1)
    tr, _, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=4, val_examples=1)
    model, resolved = _setup("qwen3_5_text", "mlp_only")
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(model, resolved, tr, tmp_path / "none", cfg, pad_id=tok.pad_token_id, resume=True)
    with pytest.raises(TrainingError, match="epochs"):
        train(model, resolved, tr, tmp_path / "x", _cfg(epochs=0), pad_id=tok.pad_token_id)
    with pytest.raises(TrainingError, match="no training examples"):
        train(model, resolved, [], tmp_path / "y", cfg, pad_id=tok.pad_token_id)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tok, data_dir, tmp_path):
    cfg = _cfg(epochs=2, save_every=1)
    tr, _, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=8, val_examples=1)
    model, resolved = _setup("qwen3_5_text", "mlp_only")
    calls = {"n": 0}
    head = model.lm_head

    def poison(module, args, output):  # the third forward pass goes non-finite
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    head.register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*step-2"):
        train(model, resolved, tr, tmp_path, cfg, pad_id=tok.pad_token_id)
    assert (tmp_path / "checkpoints" / "step-2" / "lora.pt").is_file()
    assert not (tmp_path / "adapter").exists()
    assert json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])["event"] == "error"
