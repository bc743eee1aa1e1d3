"""The static-shape packed step that CUDA graphs capture, checked on CPU (float32) against the eager packed step.

The capture itself needs CUDA (bench/bench_train_loop.py checks graph replay against eager on the GPU); what is
checked here is everything the graph contains: the padded row with its padding example, the padded
``cu_seq_lens_q``, the loss over every position with ignored targets, and in-place gradient accumulation.
"""
from __future__ import annotations

import json

import pytest
import torch

from hybridlora import fast
from hybridlora.components import build_component_map
from hybridlora.data import build_tiny_tokenizer
from hybridlora.families import family_named
from hybridlora.fast.graphs import PackedStepGraphs, bucket_length, pad_row
from hybridlora.fast.loss import causal_lm_loss_sum, causal_lm_loss_sum_static
from hybridlora.models import build_model, tiny_config_for
from hybridlora.placement import named_preset, resolve
from hybridlora.train import TrainConfig, prepare_data, train
from hybridlora.train import loop
from hybridlora.train.loop import attach_lora

FAMILIES = ["qwen3_5_text", "falcon_h1"]
pytestmark = pytest.mark.usefixtures("fast_bindings")


def _examples(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def test_pad_row_adds_a_padding_example_and_empty_segments():
    row = fast.pack(_examples([5, 9]))
    padded = pad_row(row, 16, max_segments=4, pad_id=7)
    assert padded["input_ids"].shape == padded["labels"].shape == padded["position_ids"].shape == (1, 16)
    assert padded["cu_seq_lens_q"].tolist() == [0, 5, 14, 16, 16]
    assert padded["input_ids"][0, 14:].tolist() == [7, 7] and padded["labels"][0, 14:].tolist() == [-100, -100]
    assert padded["position_ids"][0].tolist() == [*range(5), *range(9), 0, 1]
    assert pad_row(row, 14, max_segments=2, pad_id=0)["cu_seq_lens_q"].tolist() == [0, 5, 14]  # exact fit
    with pytest.raises(ValueError, match="segments"):
        pad_row(row, 16, max_segments=2, pad_id=0)
    with pytest.raises(ValueError, match="does not fit"):
        pad_row(row, 8, max_segments=4, pad_id=0)
    assert [bucket_length(n, 512) for n in (1, 512, 513, 1500)] == [512, 512, 1024, 1536]


def _lora_model(model_type, preset="all"):
    model = build_model(tiny_config_for(model_type), seed=0)
    cmap = build_component_map(model)
    peft = attach_lora(model, resolve(named_preset(preset, family_named(cmap.family)), cmap), dropout=0.0)
    with torch.no_grad():  # non-zero B, so every adapter's gradient matters
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft


@pytest.mark.parametrize("model_type,preset", [("qwen3_5_text", "all"), ("falcon_h1", "all_eligible")])
def test_static_loss_equals_gathered_loss(model_type, preset):
    """All positions with ignored targets == only the labelled ones: loss and LoRA gradients (incl. a LoRA head)."""
    model = _lora_model(model_type, preset)
    row = fast.pack(_examples([7, 40, 12], seed=1))
    kwargs = {k: v for k, v in row.items() if k not in ("input_ids", "labels")}
    head_trains = any(p.requires_grad for p in model.get_base_model().lm_head.parameters())
    assert head_trains == (preset == "all_eligible")

    def run(fn):
        model.zero_grad(set_to_none=True)
        with fast.packed_attention(model):
            out = fn(model, row["input_ids"], row["labels"], **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    gathered, g1 = run(causal_lm_loss_sum)
    static, g2 = run(causal_lm_loss_sum_static)
    torch.testing.assert_close(static, gathered, rtol=1e-5, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_static_padded_step_equals_eager_packed_step(model_type):
    """Two rows into bucket lengths with a padding example and padded boundaries, gradients accumulated in
    place across rows == the eager packed step on the unpadded rows."""
    model = _lora_model(model_type)
    # buckets of 32: 56 tokens -> 64 with a padding example, 64 -> 64 exactly (no padding example, only repeated
    # boundaries), 10 -> 32: three rows, two bucket lengths, one step
    rows = [fast.pack(_examples([30, 5, 21], seed=2)), fast.pack(_examples([50, 14], seed=3)),
            fast.pack(_examples([10], seed=4))]
    n_tokens = sum(int((r["labels"][:, 1:] != -100).sum()) for r in rows)

    model.zero_grad(set_to_none=True)
    eager = 0.0
    for row in rows:
        with fast.packed_attention(model):
            loss, _ = causal_lm_loss_sum(model, row["input_ids"], row["labels"],
                                         **{k: v for k, v in row.items() if k not in ("input_ids", "labels")})
            (loss / n_tokens).backward()
        eager += float(loss) / n_tokens
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    runner = PackedStepGraphs(model, max_segments=4, pad_id=0, autocast_dtype=None, bucket=32)
    assert not runner.capture and "off" in runner.describe()
    assert [runner.row_length(r) for r in rows] == [64, 64, 32]
    for attempt in range(2):  # the second pass checks that zero_grad leaves the same tensors, zeroed
        grads_before = [p.grad for p in runner.params]
        runner.zero_grad()
        total = float(sum(runner.forward_backward(r, 1.0 / n_tokens) for r in rows))
        assert total == pytest.approx(eager, rel=1e-5)
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
        if attempt:
            assert all(a is b for a, b in zip(grads_before, [p.grad for p in runner.params]))


def test_trainer_with_the_static_step_matches_the_eager_packed_run(data_dir, tmp_path, monkeypatch):
    """The trainer's graph branch (run eagerly on CPU): same losses and gradient norms as plain packing."""
    tok = build_tiny_tokenizer(data_dir=data_dir)

    def run(name, graphs):
        monkeypatch.setattr(loop, "_graphs_wanted", lambda device: graphs)
        model = build_model(tiny_config_for("qwen3_5_text"), seed=0)
        cmap = build_component_map(model)
        resolved = resolve(named_preset("all", family_named(cmap.family)), cmap)
        cfg = TrainConfig(epochs=1, micro_batch_size=2, grad_accum=2, max_length=256, learning_rate=1e-2,
                          save_every=0, norm_every=0, progress=False, warmup_ratio=0.0, lora_dropout=0.0,
                          pack_tokens=300)
        tr, _, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=9, val_examples=1)
        train(model, resolved, tr, tmp_path / name, cfg, pad_id=tok.pad_token_id)
        return [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    eager, static = run("eager", False), run("static", True)
    assert eager[0]["cuda_graphs"] == "off: no CUDA"
    assert static[0]["cuda_graphs"].startswith("off (no CUDA)") and static[-1]["event"] == "end"
    steps = lambda log: [r for r in log if r["event"] == "step"]
    assert len(steps(static)) == len(steps(eager)) == 2
    assert [r["loss"] for r in steps(static)] == pytest.approx([r["loss"] for r in steps(eager)], rel=1e-5)
    assert [r["grad_norm"] for r in steps(static)] == pytest.approx([r["grad_norm"] for r in steps(eager)], rel=1e-4)


def test_cuda_graphs_option_is_validated():
    with pytest.raises(loop.TrainingError, match="cuda_graphs"):
        TrainConfig(cuda_graphs="yes").validate()


def test_host_syncs_names_the_lines_that_break_capture():
    from hybridlora.fast.graphs import host_syncs

    def step():
        x = torch.ones(3, device="meta")
        y = x * 2  # device only: fine
        return y + torch.arange(3).to("meta")  # a host tensor copied over: named

    found = host_syncs(step, device_type="meta")
    assert len(found) == 1 and "_to_copy" in found[0] and "test_graphs.py" in found[0] and "in step" in found[0]
    assert host_syncs(lambda: torch.ones(2, device="meta") * 3, device_type="meta") == []

    def reads_back():
        return torch.ones(3, device="meta").sum().item()  # a device value read on the host: named

    found = host_syncs(reads_back, device_type="meta")
    assert any("_local_scalar_dense" in f and "in reads_back" in f for f in found)


def test_trained_model_runs_without_autocast_after_bf16_training(data_dir, tmp_path):
    """bf16 training skips PEFT's LoRA input upcast (autocast makes it redundant); the returned model must have
    it back, or evaluating it outside autocast multiplies bf16 activations by float32 LoRA weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tok = build_tiny_tokenizer(data_dir=data_dir)
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0, dtype=torch.bfloat16)
    cmap = build_component_map(model)
    resolved = resolve(named_preset("attention_only", family_named(cmap.family)), cmap)
    cfg = TrainConfig(epochs=1, micro_batch_size=2, grad_accum=1, max_length=256, save_every=0, norm_every=0,
                      progress=False, precision="bf16")
    tr, _, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=4, val_examples=1)
    result = train(model, resolved, tr, tmp_path / "run", cfg, pad_id=tok.pad_token_id)
    layers = [m for m in result.peft_model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    with torch.no_grad():
        logits = result.peft_model(input_ids=torch.tensor([tr.examples[0].input_ids[:16]])).logits
    assert torch.isfinite(logits).all()


class _FakeCuda:
    """Just enough of torch.cuda for PackedStepGraphs._capture on CPU; the capture itself fails."""

    def __init__(self):
        self.captures_tried = 0
        self.rng_restores = 0
        self.generator_releases = 0

    def install(self, monkeypatch):
        import contextlib

        class Stream:
            def __init__(self, *args, **kwargs):
                pass

            def wait_stream(self, other):
                pass

        fake = self

        class FailingGraph:
            def __init__(self, *args, **kwargs):
                fake.captures_tried += 1

            def __enter__(self):
                raise RuntimeError("capture broke: operation not permitted when stream is capturing")

            def __exit__(self, *exc):
                return False

        def set_rng_state(state, device=None):
            fake.rng_restores += 1

        def release(device=None):
            fake.generator_releases += 1

        from hybridlora.fast import graphs

        monkeypatch.setattr(graphs, "release_generator_after_failed_capture", release)
        for name, value in {"Stream": Stream, "current_stream": lambda *a: Stream(), "stream": lambda s: contextlib.nullcontext(),
                            "get_rng_state": lambda *a: torch.get_rng_state(), "set_rng_state": set_rng_state,
                            "CUDAGraph": lambda: object(), "graph_pool_handle": lambda: object(), "graph": FailingGraph,
                            "set_stream": lambda s: None, "synchronize": lambda *a: None}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_failed_capture_falls_back_with_gradients_as_if_run_eagerly(monkeypatch):
    """A capture that fails leaves no trace: the warm-ups' gradients are undone, the row runs eagerly once, the
    failure is named loudly and counted as no capture, and no further capture is tried."""
    rows = [fast.pack(_examples([30, 5, 21], seed=2)), fast.pack(_examples([40], seed=3))]
    eager_model, model = _lora_model("qwen3_5_text"), _lora_model("qwen3_5_text")
    eager = PackedStepGraphs(eager_model, max_segments=4, pad_id=0, autocast_dtype=None, bucket=32, capture=False)
    expected = [float(eager.forward_backward(r, 0.01)) for r in rows]

    fake = _FakeCuda()
    fake.install(monkeypatch)
    runner = PackedStepGraphs(model, max_segments=4, pad_id=0, autocast_dtype=None, bucket=32, capture=True)
    with pytest.warns(UserWarning, match="capture of the packed training step failed .*capture broke"):
        got = [float(runner.forward_backward(rows[0], 0.01))]
    got.append(float(runner.forward_backward(rows[1], 0.01)))  # another bucket: no new attempt
    assert got == pytest.approx(expected, rel=1e-6)
    assert fake.captures_tried == 1 and runner.captures == 0 and not runner._graphs
    assert fake.rng_restores == 2  # after the warm-ups, and after the failure
    assert fake.generator_releases == 1  # the generator is taken out of capture mode
    assert "capture broke" in runner.failure and runner.describe().startswith("off (capture failed")
    for (name, a), b in zip(model.named_parameters(), eager_model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_ops_run_after_a_failed_capture_on_cuda():
    """A capture that raises mid-way leaves PyTorch's CUDA generator marked as capturing (later random ops
    raise "Offset increment outside graph capture"); the fallbacks release it."""
    from hybridlora.fast.graphs import release_generator_after_failed_capture

    x = torch.ones(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    with pytest.raises(Exception):
        with torch.cuda.graph(graph):
            torch.nn.functional.dropout(x, 0.5)
            float(x.sum())  # a host read: the capture fails
    torch.cuda.set_stream(stream)
    release_generator_after_failed_capture(x.device)
    a, b = torch.rand(8, device="cuda"), torch.rand(8, device="cuda")
    assert not torch.equal(a, b)
    assert 0.3 < float(torch.nn.functional.dropout(x, 0.5).eq(0).float().mean()) < 0.7


def test_graphs_stay_off_where_a_bound_function_loops_over_examples_on_the_host(monkeypatch):
    """Where mamba-ssm is missing, Mamba-2 runs the torch reference once per example (boundaries read on the
    host): no CUDA graph can hold that, so the trainer does not try. Gated DeltaNet's reference keeps its
    boundaries on the device (gate reset) and does not block graphs."""
    from hybridlora.fast import kernels
    from hybridlora.fast.kernels import host_read_boundaries

    # mamba-ssm and fla's GDN made missing, also where they are installed (on CPU nothing is probed anyway)
    probe = {k: ({"fn": None, "reason": "made missing by the test"} if k.startswith("mamba_ssm.")
                 or "gated_delta_rule" in k else v) for k, v in kernels._probe().items()}
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    fast.use("fast")
    falcon = build_model(tiny_config_for("falcon_h1"), seed=0)
    qwen = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    assert host_read_boundaries(falcon) == ["modeling_falcon_h1.mamba2_chunk_scan"]  # CPU binding: reference
    assert host_read_boundaries(qwen) == []
    cfg = TrainConfig()
    assert loop._step_graphs(falcon, cfg, torch.device("cuda"), True, "bf16", 0) == (
        None, "off: modeling_falcon_h1.mamba2_chunk_scan run per example on the host (a fast kernel is missing)")
