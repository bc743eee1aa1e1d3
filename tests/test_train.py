"""LoRA fine-tuning on tiny random same-family models (CPU): loss, resume, reload, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from hybridlora.components import build_component_map
from hybridlora.data import build_tiny_tokenizer
from hybridlora.families import family_named
from hybridlora.models import build_model, tiny_config_for
from hybridlora.placement import named_preset, resolve
from hybridlora.placement.verify import lora_hosts
from hybridlora.train import (TrainConfig, TrainingError, checkpoints, evaluate_loss, load_adapter, lora_state,
                              packing_supported, prepare_data, train)

RESUME_TOL = 1e-6  # max abs difference of LoRA weights, interrupted+resumed vs uninterrupted (CPU, fp32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on shared cores OpenMP spinning makes them 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


FAMILIES = ["qwen3_5_text", "falcon_h1"]
DROP = {"qwen3_5_text": 0.3, "falcon_h1": 0.05}  # required drop of the training-set loss (nats/token), 12ish steps
# (Falcon-H1 tiny on chat: 0.097 with the LoRA init its recipe seed gives; the loss is computed on the training set
# itself, without noise, so any clear drop is learning)
DOMAINS = ["gsm8k", "codealpaca", "chat"]


def _log(d):
    return [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]


def test_tiny_config_for_multimodal_type_is_a_tiny_text_model():
    for mm, text in [("qwen3_5", "qwen3_5_text"), ("qwen3_5_moe", "qwen3_5_moe_text")]:
        cfg = tiny_config_for(mm)
        assert cfg.model_type == text and cfg.hidden_size == 64 and cfg.num_hidden_layers == 4
        assert cfg.to_dict() == tiny_config_for(text).to_dict()
    model = build_model(tiny_config_for("qwen3_5"))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("domain", DOMAINS)
def test_loss_goes_down(model_type, domain, tok, data_dir, tmp_path):
    """Each family × each study domain, a real slice from the shared data folder, CPU."""
    model, resolved = _setup(model_type)
    cfg = _cfg()
    tr, va, manifest = prepare_data(domain, tok, cfg, data_dir=data_dir, max_examples=16, val_examples=4)
    assert len(tr.examples) >= 10
    before = evaluate_loss(model, tr.examples, tok.pad_token_id)
    result = train(model, resolved, tr, tmp_path, cfg, pad_id=tok.pad_token_id, val_set=va, data_manifest=manifest)
    after = evaluate_loss(result.peft_model, tr.examples, tok.pad_token_id)
    assert after < before - DROP[model_type], (before, after)  # deterministic runs
    log = _log(tmp_path)
    start = log[0]
    # on CPU the trainer binds packing-aware references, so each step's examples are packed into rows
    assert start["event"] == "start" and start["packing"] is True
    assert start["batching"].startswith("packing on: ") and "example boundaries kept" in start["batching"]
    assert start["trainable_params"] == resolved.trainable_params == result.trainable_params
    assert start["skipped_total"] == sum(manifest["skipped_rows"].values()) + sum(
        sum(v.values()) for v in manifest["skipped_formatting"].values())
    steps = [r for r in log if r["event"] == "step"]
    assert len(steps) == result.steps == 3 * math.ceil(len(tr.examples) / 4)
    first, last = [r["loss"] for r in steps[:3]], [r["loss"] for r in steps[-3:]]
    assert sum(last) < sum(first)
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in steps)
    assert log[-1]["event"] == "end" and log[-1]["val_loss"] is not None
    norms = [r for r in log if r["event"] == "lora_norms"]
    assert norms and set(norms[-1]["norms"]) == set(resolved.components())
    assert all(v > 0 for v in norms[-1]["norms"].values())
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run_config.yaml",
                 "data_manifest.json"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "data_manifest.json").read_text())
    assert saved["train_ids"] == [e.id for e in tr.examples] and saved["val_ids"] == [e.id for e in va.examples]
    run = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    assert run["training"]["learning_rate"] == cfg.learning_rate and run["training"]["batching"] == start["batching"]
    assert {h["name"] for h in run["placement"]["hosts"]} == {h.name for h in resolved.hosts}


def test_packing_supported_says_why_not(tok):
    from hybridlora import fast

    try:
        fast.use("reference")  # the study's path: transformers' functions, which ignore example boundaries
        for model_type in ("qwen3_5_text", "falcon_h1"):
            ok, reason = packing_supported(build_model(tiny_config_for(model_type)))
            assert ok is False and "boundaries" in reason, reason
        fast.use("fast")
        for model_type in ("qwen3_5_text", "falcon_h1"):
            assert packing_supported(build_model(tiny_config_for(model_type))) == (True, "")
        ok, reason = packing_supported(build_model(tiny_config_for("llama")))
        assert ok is False and "attention" in reason, reason
    finally:
        fast.restore()


def test_study_defaults():
    c = TrainConfig()
    assert (c.lora_dropout, c.learning_rate, c.epochs, c.effective_batch, c.max_length, c.weight_decay, c.seed,
            c.loss_on, c.gradient_checkpointing) == (0.05, 2e-4, 3, 16, 1024, 0.01, 3407, "assistant", False)


def test_loss_on_full(tok, data_dir):
    cfg = _cfg(loss_on="full")
    tr, _, manifest = prepare_data("codealpaca", tok, cfg, data_dir=data_dir, max_examples=4, val_examples=1)
    assert manifest["loss_on"] == "full" and all(x != -100 for e in tr.examples for x in e.labels)
    part, _, _ = prepare_data("codealpaca", tok, _cfg(), data_dir=data_dir, max_examples=4, val_examples=1)
    assert all(a.num_loss_tokens < b.num_loss_tokens for a, b in zip(part.examples, tr.examples))


def test_crash_and_resume_matches_uninterrupted(tok, data_dir, tmp_path):
    """A crash in the middle of an accumulation, past the last checkpoint; resume gives the same adapter."""
    # padded micro-batches, so that a step has two forwards to crash between (packing would make it one row)
    cfg = _cfg(epochs=2, grad_accum=2, micro_batch_size=2, save_every=2, lora_dropout=0.1, packing="off")
    tr, va, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=16, val_examples=2)
    assert len(tr.examples) == 13  # 7 micro-batches, 4 steps per epoch, 8 steps, 14 forward passes
    model, resolved = _setup("qwen3_5_text")
    full = train(model, resolved, tr, tmp_path / "full", cfg, pad_id=tok.pad_token_id)
    model, resolved = _setup("qwen3_5_text")
    calls = {"n": 0}

    def crash(module, args, output):  # forward 11 = second micro-batch of step 6 (checkpoint at step 4)
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("simulated crash")

    model.model.register_forward_hook(crash)  # the decoder: once per forward (the loss never calls lm_head)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, resolved, tr, tmp_path / "cut", cfg, pad_id=tok.pad_token_id)
    assert [p.name for p in checkpoints(tmp_path / "cut")][-1] == "step-4"
    assert [r["step"] for r in _log(tmp_path / "cut") if r["event"] == "step"] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "cut" / "adapter").exists()
    with pytest.raises(TrainingError, match="unfinished run.*--resume"):  # never silently restarts
        train(*_setup("qwen3_5_text"), tr, tmp_path / "cut", cfg, pad_id=tok.pad_token_id)
    other, _, _ = prepare_data("gsm8k", tok, _cfg(seed=1), data_dir=data_dir, max_examples=16, val_examples=2)
    with pytest.raises(TrainingError, match=r"different run \(data differ\)"):
        train(*_setup("qwen3_5_text"), other, tmp_path / "cut", cfg, pad_id=tok.pad_token_id, resume=True)
    with pytest.raises(TrainingError, match=r"\(config.learning_rate differ\)"):
        train(*_setup("qwen3_5_text"), tr, tmp_path / "cut", _cfg(epochs=2, grad_accum=2, micro_batch_size=2,
              save_every=2, lora_dropout=0.1, learning_rate=1e-3, packing="off"), pad_id=tok.pad_token_id,
              resume=True)
    model, resolved = _setup("qwen3_5_text")  # a fresh process would rebuild the base model
    resumed = train(model, resolved, tr, tmp_path / "cut", cfg, pad_id=tok.pad_token_id, resume=True)
    assert resumed.steps == full.steps
    a, b = lora_state(full.peft_model), lora_state(resumed.peft_model)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= RESUME_TOL
    losses = lambda d: [(r["step"], r["loss"]) for r in _log(d) if r["event"] == "step"]
    assert [s for s, _ in losses(tmp_path / "cut")] == list(range(1, full.steps + 1))
    assert [x for _, x in losses(tmp_path / "cut")] == pytest.approx([x for _, x in losses(tmp_path / "full")],
                                                                    abs=1e-6)
    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(*_setup("qwen3_5_text"), tr, tmp_path / "full", cfg, pad_id=tok.pad_token_id, resume=True)


KILLED_CHILD = r"""
import sys, time
from pathlib import Path
import hybridlora.train.loop as loop
real, calls = loop._sum_loss, [0]
def forward_then_hang(*a, **k):  # the 4th forward (step 4) hangs until the parent SIGKILLs this process
    calls[0] += 1
    if calls[0] == 4:
        Path(sys.argv[1]).write_text("ready")
        time.sleep(600)
    return real(*a, **k)
loop._sum_loss = forward_then_hang
from hybridlora.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_cli_sigkill_then_resume_gives_the_uninterrupted_adapter(data_dir, tmp_path, capsys):
    """The CLI end to end: a real SIGKILL during training (after checkpoint step-2, step 3 logged), then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from hybridlora.cli import main

    args = lambda out: ["train", "qwen3.5-0.8b", "--tiny", "--placement", "all", "--data", "gsm8k", "--data-dir",
                        str(data_dir), "--max-examples", "8", "--val-examples", "2", "--epochs", "2",
                        "--micro-batch-size", "2", "--grad-accum", "1", "--max-length", "512", "--lr", "5e-3",
                        "--save-every", "2", "--no-progress", "--threads", "1", "--output", str(tmp_path / out)]
    # one thread in every run (the killed child, the resume, the reference): the same float summation order
    marker = tmp_path / "ready"
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(marker), *args("run")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the child never reached step 4"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-2"]
    assert [r["step"] for r in _log(tmp_path / "run") if r["event"] == "step"] == [1, 2, 3]

    assert main(args("run") + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "packing on: " in out and "data: gsm8k from " in out and "cuda graphs: off: no CUDA" in out
    assert main(args("ref")) == 0
    a = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= RESUME_TOL
    steps = [r["step"] for r in _log(tmp_path / "run") if r["event"] in ("step", "end")]
    assert steps == [r["step"] for r in _log(tmp_path / "ref") if r["event"] in ("step", "end")]
    assert main(args("run")) == 2 and "already holds a finished run" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradient_checkpointing_gives_the_same_updates(model_type, tok, data_dir, tmp_path):
    cfg = _cfg(epochs=1, micro_batch_size=2, grad_accum=2, max_length=256, lora_dropout=0.1)
    tr, _, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=8, val_examples=1)
    plain = train(*_setup(model_type), tr, tmp_path / "plain", cfg, pad_id=tok.pad_token_id)
    gc_cfg = _cfg(epochs=1, micro_batch_size=2, grad_accum=2, max_length=256, lora_dropout=0.1,
                  gradient_checkpointing=True)
    model, resolved = _setup(model_type)
    ckpt = train(model, resolved, tr, tmp_path / "gc", gc_cfg, pad_id=tok.pad_token_id)
    assert model.is_gradient_checkpointing and _log(tmp_path / "gc")[0]["gradient_checkpointing"] is True
    losses = lambda d: [r["loss"] for r in _log(d) if r["event"] == "step"]
    assert losses(tmp_path / "gc") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    a, b = lora_state(plain.peft_model), lora_state(ckpt.peft_model)
    # recomputation reorders float work; Adam turns near-zero gradient noise into up to lr-sized steps
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0


@pytest.mark.parametrize("model_type,preset", [("qwen3_5_text", "attention_only"), ("falcon_h1", "recurrent_mlp")])
def test_adapter_reload_gives_identical_logits(model_type, preset, tok, data_dir, tmp_path):
    cfg = _cfg(epochs=1)
    tr, _, _ = prepare_data("codealpaca", tok, cfg, data_dir=data_dir, max_examples=8, val_examples=1)
    model, resolved = _setup(model_type, preset)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, resolved, tr, tmp_path, cfg, pad_id=tok.pad_token_id)
    trained = result.peft_model.eval()
    hosts = lora_hosts(trained)
    assert set(hosts) == {h.name for h in resolved.hosts}
    assert all(m.lora_B["default"].weight.abs().max() > 0 for m in hosts.values())  # every host trained
    from safetensors.torch import load_file

    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(hosts)  # lora_A and lora_B of the placement's hosts, nothing else
    assert {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in saved} == set(hosts)
    base_after = trained.get_base_model().state_dict()
    for k, v in base_before.items():  # every base weight untouched (PEFT renames hosts' weights to base_layer)
        key = k if k in base_after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(base_after[key], v), k
    fresh, _ = _setup(model_type, preset)
    reloaded = load_adapter(fresh, result.adapter_dir).eval()
    from peft import PeftModel

    plain = PeftModel.from_pretrained(_setup(model_type, preset)[0], str(result.adapter_dir)).eval()  # stock PEFT
    ids = torch.tensor([tr.examples[0].input_ids[:64]])
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        assert torch.equal(trained(input_ids=ids).logits, plain(input_ids=ids).logits)
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

    def poison(module, args, output):  # the third forward pass goes non-finite
        calls["n"] += 1
        if calls["n"] == 3:
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    model.model.register_forward_hook(poison)  # the decoder (the chunked loss reads lm_head's weight directly)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*step-2"):
        train(model, resolved, tr, tmp_path, cfg, pad_id=tok.pad_token_id)
    assert (tmp_path / "checkpoints" / "step-2" / "lora.pt").is_file()
    assert not (tmp_path / "adapter").exists()
    assert json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])["event"] == "error"


def test_fingerprint_accepts_recipe_fields_added_later_at_their_defaults():
    from hybridlora.train.loop import _fingerprint_mismatch

    current = {"data": "a", "config.packing": '"auto"', "config.pack_tokens": "0", "config.epochs": "3"}
    older = {"data": "a", "config.epochs": "3"}  # written before packing existed
    assert _fingerprint_mismatch(older, current) == []
    assert _fingerprint_mismatch(older, {**current, "config.packing": '"off"'}) == ["config.packing"]
    assert _fingerprint_mismatch({**older, "data": "b"}, current) == ["data"]


def test_step_plan_is_a_function_of_the_step_alone():
    """Each epoch visits every example once, in randperm(n, seed + epoch) order, and a step's examples do not
    depend on the steps before it (what lets a resumed run pick up exactly where it stopped)."""
    from hybridlora.train.loop import _StepPlan

    plan = _StepPlan.for_data(13, _cfg(epochs=2, micro_batch_size=2, grad_accum=2, seed=5))
    assert (plan.micro_per_epoch, plan.steps_per_epoch, plan.total_steps) == (7, 4, 8)
    steps = [plan.micro_batches(s) for s in range(plan.total_steps)]
    assert [len(micro) for _, micro in steps] == [2, 2, 2, 1] * 2  # an epoch's last step takes what is left
    for epoch in (0, 1):
        visited = [i for e, micro in steps if e == epoch for batch in micro for i in batch]
        assert visited == torch.randperm(13, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
    assert [plan.micro_batches(s) for s in reversed(range(plan.total_steps))] == steps[::-1]


def test_the_adapter_does_not_depend_on_what_ran_before_in_the_process(tok, data_dir, tmp_path):
    """A study runner runs many cells in one process: a cell's LoRA init and dropout come from its recipe's seed,
    not from the generator state earlier cells (or a model load that draws no seed) left behind."""
    cfg = _cfg(epochs=1, micro_batch_size=2, lora_dropout=0.1, packing="off")
    tr, _, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=6, val_examples=1)
    states = []
    for i, draws in enumerate((0, 1234)):
        model, resolved = _setup("qwen3_5_text")
        torch.rand(draws)  # what an earlier cell or an unseeded load would have consumed
        train(model, resolved, tr, tmp_path / f"run{i}", cfg, pad_id=tok.pad_token_id)
        states.append(lora_state(model))
    assert states[0].keys() == states[1].keys() and states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
