"""Packed training rows on CPU: every mixer keeps the examples apart, and packing changes no result.

The functions ``fast.use("fast")`` binds on CPU (packing-aware references: Gated DeltaNet with its gate reset
at example starts, Mamba-2 per example, the masked short convolution) and the varlen attention path are the
same code paths the GPU kernels plug into, so these checks pin down the packed arithmetic exactly (float32).
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from hybridlora import fast
from hybridlora.components import build_component_map
from hybridlora.data import build_tiny_tokenizer
from hybridlora.families import family_named
from hybridlora.fast import attention, kernels, ops
from hybridlora.models import build_model, tiny_config_for
from hybridlora.placement import named_preset, resolve
from hybridlora.train import TrainConfig, lora_state, prepare_data, train

FAMILIES = ["qwen3_5_text", "falcon_h1"]
pytestmark = pytest.mark.usefixtures("fast_bindings")


@pytest.fixture(scope="module")
def tok(data_dir):
    return build_tiny_tokenizer(data_dir=data_dir)


def test_gate_reset_equals_running_each_example_alone():
    """The gated delta rule with exp(g) ~ 0 at each example's first token equals a fresh start per example."""
    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    reference = kernels._state["originals"][("transformers.models.qwen3_5.modeling_qwen3_5",
                                             "torch_chunk_gated_delta_rule")]
    torch.manual_seed(0)
    lengths = [5, 70, 1, 33]  # crosses the 64-token chunk edge, and a one-token example
    t, h, d = sum(lengths), 2, 8
    q, k, v = (torch.randn(1, t, h, d) for _ in range(3))
    g = -torch.rand(1, t, h)
    beta = torch.rand(1, t, h)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), t, t], dtype=torch.int32)  # padded tail
    packed, _ = mq.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    parts, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        parts.append(reference(q[:, s], k[:, s], v[:, s], g=g[:, s], beta=beta[:, s], use_qk_l2norm_in_kernel=True)[0])
        start += n
    torch.testing.assert_close(packed, torch.cat(parts, 1), rtol=1e-5, atol=1e-5)
    whole, _ = reference(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    assert (whole - packed).abs().max() > 1e-2  # without the reset the state does leak across examples
    assert ops.segment_starts(cu, t).nonzero().flatten().tolist() == [0, 5, 75, 76]


def test_packed_attention_per_example_with_empty_segments():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 9, 8)
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)  # grouped kv heads
    cu = torch.tensor([0, 4, 9, 9, 9], dtype=torch.int32)
    out, _ = attention.packed_attention_forward(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)
    for a, b in ((0, 4), (4, 9)):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b].repeat_interleave(2, 1), v[:, :, a:b].repeat_interleave(2, 1),
            is_causal=True, scale=0.3)
        torch.testing.assert_close(out[0, a:b], ref[0].transpose(0, 1))
    with pytest.raises(RuntimeError, match="packed rows"):
        attention.packed_attention_forward(None, q, k, v, None)


def test_autocast_dtype_names_what_autocast_gives_attention():
    assert attention.autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.autocast_dtype("cpu") == torch.bfloat16
    q = torch.randn(9, 4, 8)  # off CUDA nothing is cast, autocast or not (the reference takes mixed dtypes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t is u for t, u in zip(attention._as_autocast(q, q, q), (q, q, q)))


@pytest.mark.skipif(not torch.cuda.is_available() or attention._varlen_kernel() is None,
                    reason="needs CUDA and torch's varlen flash kernel")
def test_float32_queries_under_cuda_autocast_take_the_flash_kernel(monkeypatch):
    """A lab model with float32 master weights gives attention a float32 query and key (its norms compute in float32)
    beside a bf16 value: under autocast they must reach the flash kernel, not the per-example host loop."""
    torch.manual_seed(1)
    q = torch.randn(1, 4, 9, 16, device="cuda")
    k = torch.randn(1, 2, 9, 16, device="cuda")
    v = torch.randn(1, 2, 9, 16, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="cuda")

    def host_loop(*args):
        raise AssertionError("per-example host loop used under CUDA autocast")

    monkeypatch.setattr(attention, "_causal_per_segment", host_loop)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = attention.packed_attention_forward(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu,
                                                    max_length_q=5)
    assert out.dtype == torch.bfloat16
    for a, b in ((0, 4), (4, 9)):  # SDPA under autocast is the reference: it casts to bf16 the same way
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b].repeat_interleave(2, 1), v[:, :, a:b].repeat_interleave(2, 1),
                is_causal=True, scale=0.25)
        torch.testing.assert_close(out[0, a:b].float(), ref[0].transpose(0, 1).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_row_equals_separate_rows_with_bound_functions(model_type, monkeypatch):
    model = build_model(tiny_config_for(model_type), seed=0)
    calls = {"n": 0}
    real = attention.packed_attention_forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "packed_attention_forward", counting)
    attention.register.__globals__["packed_attention_forward"] = counting
    torch.manual_seed(2)
    exs = [{"input_ids": torch.randint(0, 256, (n,)).tolist(), "labels": [0] * n} for n in (7, 70, 5, 33)]
    row = fast.pack(exs)
    with torch.no_grad(), fast.packed_attention(model):
        packed = model(**{k: v for k, v in row.items() if k != "labels"}, use_cache=False).logits
    assert model.config._attn_implementation != fast.PACKED  # restored on leaving
    with torch.no_grad():
        separate = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits for e in exs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)
    attention_layers = sum("softmax_attention" in layer.mixers for layer in build_component_map(model).schedule)
    assert calls["n"] == attention_layers > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_training_equals_padded_training(model_type, tok, data_dir, tmp_path):
    """Same examples per step, same loss tokens: packing changes the batching arithmetic, not the run."""
    def run(packing):
        model = build_model(tiny_config_for(model_type), seed=0)
        cmap = build_component_map(model)
        resolved = resolve(named_preset("all", family_named(cmap.family)), cmap)
        cfg = TrainConfig(epochs=1, micro_batch_size=2, grad_accum=2, max_length=256, learning_rate=1e-2,
                          save_every=0, norm_every=0, progress=False, warmup_ratio=0.0, lora_dropout=0.0,
                          packing=packing, pack_tokens=300)
        tr, _, _ = prepare_data("gsm8k", tok, cfg, data_dir=data_dir, max_examples=9, val_examples=1)
        result = train(model, resolved, tr, tmp_path / packing, cfg, pad_id=tok.pad_token_id)
        log = [json.loads(x) for x in (tmp_path / packing / "train_log.jsonl").read_text().splitlines()]
        return result, log

    padded, padded_log = run("off")
    packed, packed_log = run("auto")
    assert packed_log[0]["packing"] is True and padded_log[0]["packing"] is False
    steps = lambda log: [r for r in log if r["event"] == "step"]
    assert [r["loss_tokens"] for r in steps(packed_log)] == [r["loss_tokens"] for r in steps(padded_log)]
    assert [r["tokens"] for r in steps(packed_log)] == [r["tokens"] for r in steps(padded_log)]
    computed = lambda log: sum(r["computed_tokens"] for r in steps(log))
    assert computed(packed_log) == sum(r["tokens"] for r in steps(packed_log)) < computed(padded_log)  # no padding
    assert any(r["forwards"] > 1 for r in steps(packed_log))  # the 300-token budget splits some steps into rows
    assert [r["loss"] for r in steps(packed_log)] == pytest.approx([r["loss"] for r in steps(padded_log)], abs=1e-5)
    assert [r["grad_norm"] for r in steps(packed_log)] == pytest.approx(
        [r["grad_norm"] for r in steps(padded_log)], rel=1e-4)
    a, b = lora_state(padded.peft_model), lora_state(packed.peft_model)
    # Adam turns float-rounding differences of near-zero gradients into up to lr-sized steps (lr = 1e-2 here)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-2
    assert sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(a[k].numel() for k in a) <= 1e-4
