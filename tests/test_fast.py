"""hybridlora.fast on CPU: detection, binding, the mamba-ssm import shim, packing and the chunked loss.

The kernels themselves need CUDA; bench/bench_gpu.py checks them against the references on a GPU
(docs/PERFORMANCE.md). Here the plumbing around them is tested with the pure-PyTorch references.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
import types
import warnings

import pytest
import torch

from hybridlora import fast
from hybridlora.fast import kernels, ops, shim
from hybridlora.models import build_model, tiny_config_for


@pytest.fixture(autouse=True)
def _restore_bindings():
    yield
    kernels.restore()


def _lora_model(model_type: str, preset: str):
    from hybridlora.components import build_component_map
    from hybridlora.families import family_named
    from hybridlora.placement import named_preset, resolve
    from hybridlora.train.loop import attach_lora

    model = build_model(tiny_config_for(model_type), seed=0)
    cmap = build_component_map(model)
    peft_model = attach_lora(model, resolve(named_preset(preset, family_named(cmap.family)), cmap))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return peft_model.eval()


# --- detection -------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_cpu_reports_reference_and_stays_quiet():
    info = fast.active_kernels()
    assert info["mode"] == fast.REFERENCE == "reference (no CUDA)"
    assert set(info["kernels"]) == set(fast.KERNEL_PURPOSE)
    assert all(not k["usable"] and k["reason"] == "no CUDA" for k in info["kernels"].values())
    assert fast.describe() == "kernels: reference (no CUDA)"
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast.warn_missing_kernels(model) == {}


def test_required_kernels_per_family():
    qwen = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    falcon = build_model(tiny_config_for("falcon_h1"), seed=0)
    assert fast.required_kernels(qwen) == ("fla.chunk_gated_delta_rule", "fla.fused_recurrent_gated_delta_rule",
                                           "fla.causal_conv1d", "fla.rms_norm", "fla.rms_norm_gated")
    assert fast.required_kernels(falcon) == ("mamba_ssm.mamba_chunk_scan_combined", "mamba_ssm.selective_state_update",
                                             "fla.causal_conv1d")
    assert fast.required_kernels(types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))) == ()


def test_missing_kernel_on_cuda_is_a_loud_warning(monkeypatch):
    """With CUDA present but a kernel absent, the model's run gets a RuntimeWarning naming it and why."""
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    probe = {k: {"fn": None, "reason": "mamba-ssm not installed"} for k in fast.KERNEL_PURPOSE}
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="falcon_h1"),
                                  parameters=lambda: iter([types.SimpleNamespace(device=torch.device("cuda"))]))
    with pytest.warns(RuntimeWarning, match="mamba_ssm.mamba_chunk_scan_combined.*mamba-ssm not installed"):
        missing = fast.warn_missing_kernels(model)
    assert set(missing) == {"mamba_ssm.mamba_chunk_scan_combined", "mamba_ssm.selective_state_update",
                            "fla.causal_conv1d"}
    assert "mamba_ssm.mamba_chunk_scan_combined=off" in fast.describe(model)


def _qwen_on_fake_cuda(monkeypatch):
    """A CUDA machine where every kernel imports (no Hopper guard), and a Qwen3.5 model "on" it."""
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    probe = {k: {"fn": lambda *a, **k: None, "reason": "ok"} for k in fast.KERNEL_PURPOSE}
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_gdn_backward_blocked", lambda *a: None)
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen3_5_text"),
                                 parameters=lambda: iter([types.SimpleNamespace(device=torch.device("cuda"))]))


def test_unbound_kernels_count_as_missing_on_cuda(monkeypatch):
    model = _qwen_on_fake_cuda(monkeypatch)
    monkeypatch.setitem(kernels._state, "mode", None)
    assert all("use('fast')" in why for why in fast.missing_kernels(model).values())
    monkeypatch.setitem(kernels._state, "mode", "fast")
    assert fast.missing_kernels(model) == {}


def test_a_refused_backward_is_missing_for_training_only(monkeypatch):
    """fla #640 refuses Gated DeltaNet's backward on Hopper: training must hear it, evaluation (forward only,
    where the kernel runs) must not get the loud warning, and its summary says the kernel is on."""
    model = _qwen_on_fake_cuda(monkeypatch)
    monkeypatch.setitem(kernels._state, "mode", "fast")
    monkeypatch.setattr(kernels, "_gdn_backward_blocked", lambda *a: "refused (fla #640)")
    assert "fla.chunk_gated_delta_rule (backward)" in fast.missing_kernels(model)
    assert fast.missing_kernels(model, training=False) == {}
    assert "fla.chunk_gated_delta_rule=off" in fast.describe(model)
    assert "fla.chunk_gated_delta_rule=on" in fast.describe(model, training=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast.warn_missing_kernels(model, training=False) == {}


# --- binding ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour (on a GPU machine the CUDA kernels are bound)")
def test_use_binds_references_on_cpu_and_restore_undoes_it():
    mf = importlib.import_module("transformers.models.falcon_h1.modeling_falcon_h1")
    fast.restore()  # an earlier test file may have left its bindings in place: start from transformers' own
    before = mf.mamba2_chunk_scan
    bound = fast.use("fast")  # on CPU: the references, wrapped so that packed rows keep their examples apart
    assert bound["modeling_falcon_h1.mamba2_chunk_scan"] == "torch reference (per example)"
    assert bound["modeling_qwen3_5.torch_chunk_gated_delta_rule"] == "torch reference (packing-aware)"
    assert bound["modeling_falcon_h1.mamba2_selective_state_update"] == "torch reference"
    assert inspect.unwrap(mf.mamba2_chunk_scan) is inspect.unwrap(before)
    bound = fast.use("reference")  # the study's path: transformers' functions as they are
    assert set(bound.values()) == {"torch reference"} and mf.mamba2_chunk_scan is inspect.unwrap(before)
    fast.restore()
    assert mf.mamba2_chunk_scan is before
    with pytest.raises(ValueError):
        fast.use("turbo")


def test_fast_adapters_on_cuda_are_chosen_when_kernels_import(monkeypatch):
    calls = {}

    def fake_chunk(q, k, v, g, beta, **kw):
        calls["kw"] = {**kw, "g": g}
        return v, None

    probe = {k: {"fn": fake_chunk, "reason": "fake"} for k in fast.KERNEL_PURPOSE}
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_gdn_backward_blocked", lambda *a: None)  # a real Hopper GPU would block it
    monkeypatch.setattr(kernels, "_on_cuda", lambda args, kwargs: True)  # CPU tensors stand for CUDA ones here
    bound = fast.use("fast")
    assert bound["modeling_qwen3_5.torch_chunk_gated_delta_rule"] == "fla.chunk_gated_delta_rule"
    assert bound["modeling_falcon_h1.mamba2_split_conv1d_scan_combined"].startswith("unfused")
    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    q = torch.randn(1, 6, 2, 4)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    g = torch.full((1, 6, 2), -0.5)
    mq.torch_chunk_gated_delta_rule(q, q, q, g=g, beta=q[..., 0], cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    # packed rows reach the kernel as one sequence whose log-decay is reset at each example's first token
    assert calls["kw"]["use_qk_l2norm_in_kernel"] and "cu_seqlens" not in calls["kw"]
    assert calls["kw"]["g"][0, :, 0].tolist() == [ops.GATE_RESET, -0.5, ops.GATE_RESET, -0.5, -0.5, -0.5]


def test_binding_kernels_into_a_transformers_newer_than_the_gpu_tests_is_said(monkeypatch):
    import transformers

    probe = {k: {"fn": lambda *a, **kw: None, "reason": "fake"} for k in fast.KERNEL_PURPOSE}
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_gdn_backward_blocked", lambda *a: None)
    monkeypatch.delenv(kernels.LIFT_GUARD_ENV, raising=False)  # its narrowing note is not this test's concern
    monkeypatch.setitem(kernels._state, "notes", [])
    try:
        monkeypatch.setattr(transformers, "__version__", f"{kernels.GPU_VERIFIED_TRANSFORMERS}.9")
        fast.use("fast")
        assert kernels._state["notes"] == []  # a patch release of the verified one is quiet
        monkeypatch.setattr(transformers, "__version__", "5.99.0")
        # a handler on the module's own logger: on the GPU machine caplog's root handler saw nothing here (after
        # the CUDA tests before it in the same process); the state printed on failure says why if it recurs
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        kernels.logger.addHandler(handler)
        try:
            fast.use("fast")
            fast.use("fast")  # said once
        finally:
            kernels.logger.removeHandler(handler)
        said = [r.getMessage() for r in records if "newer than" in r.getMessage()]
        state = (f"logger disabled={kernels.logger.disabled} level={kernels.logger.level} "
                 f"propagate={kernels.logger.propagate} manager disable={logging.root.manager.disable} "
                 f"notes={kernels._state['notes']}")
        assert len(said) == 1 and "5.99.0" in said[0], state
        assert f"<{kernels._next_minor(kernels.GPU_VERIFIED_TRANSFORMERS)}'" in said[0]
        assert kernels._state["notes"] == said
    finally:
        monkeypatch.undo()
        fast.restore()


@pytest.mark.parametrize("narrowed", [True, False])
def test_refused_gdn_backward_sends_only_trained_calls_to_the_reference(monkeypatch, narrowed):
    """fla #640 on Hopper refuses Gated DeltaNet's backward -- for every head dim, or with the guard narrowed
    only for key heads <= 64. Calls that need that gradient must take the torch reference and say so; every
    forward-only call (evaluation, ablation, decoding) must keep fla's kernel, with or without the opt-in."""
    calls = []

    def fake_chunk(q, k, v, g, beta, **kw):
        calls.append(k.shape[-1])
        return v, None

    def blocked(key_head_dim=None):
        if narrowed:  # the opt-in: only heads <= 64 still refused
            return "refused (fla #640)" if key_head_dim and key_head_dim <= 64 else None
        return "refused (fla #640)"

    probe = {k: {"fn": fake_chunk, "reason": "fake"} for k in fast.KERNEL_PURPOSE}
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_gdn_backward_blocked", blocked)
    monkeypatch.setattr(kernels, "_on_cuda", lambda args, kwargs: True)
    kernels._state.get("warned", set()).clear()
    bound = fast.use("fast")["modeling_qwen3_5.torch_chunk_gated_delta_rule"]
    assert bound.startswith("fla.chunk_gated_delta_rule")
    assert ("trained key heads <= 64" in bound) == narrowed and ("forward only" in bound) != narrowed
    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")

    def run(head_dim, grad):
        q = torch.randn(1, 8, 2, head_dim, requires_grad=grad)
        g = torch.full((1, 8, 2), -0.5)
        return mq.torch_chunk_gated_delta_rule(q, q, q, g=g, beta=torch.rand(1, 8, 2), use_qk_l2norm_in_kernel=True)

    run(16, grad=False)  # forward only: fla serves it
    run(128, grad=False)
    with torch.no_grad():
        run(128, grad=True)  # parameters that require grad, but no graph is built: forward only
    assert calls == [16, 128, 128]
    if narrowed:
        run(128, grad=True)
        assert calls == [16, 128, 128, 128]
    with pytest.warns(RuntimeWarning, match="key head dim 16 trains on the slow torch reference"):
        out, _ = run(16, grad=True)
    assert len(calls) == (4 if narrowed else 3) and out.requires_grad  # the reference ran, with a gradient
    if not narrowed:
        with pytest.warns(RuntimeWarning, match=f"key head dim 128 .*{kernels.LIFT_GUARD_ENV}=1"):
            run(128, grad=True)
        assert calls == [16, 128, 128]


# --- the mamba-ssm shim ----------------------------------------------------------------------------------
def test_extension_stand_in_raises_only_on_use():
    name = "hybridlora_test_missing_ext"
    try:
        assert shim.install_extension_stand_in(name, why="not built in this test")
        mod = importlib.import_module(name)  # importing works
        with pytest.raises(shim.MissingExtensionError, match="not built in this test"):
            mod.fwd(1)
        with pytest.raises(AttributeError):
            mod.__path__  # noqa: B018 - dunders behave like a plain module's
        assert shim.install_extension_stand_in(name)  # already there: reported, not replaced
    finally:
        sys.modules.pop(name, None)
    assert not shim.install_extension_stand_in("json")  # a real module is never shadowed


def _fake_mamba(tmp_path, init_body: str):
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text(init_body)
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text("def mamba_chunk_scan_combined(*a, **k):\n    return 'ssd'\n")
    (pkg / "ops" / "triton" / "selective_state_update.py").write_text(
        "def selective_state_update(*a, **k):\n    return 'step'\n")


@pytest.mark.parametrize("init_body, how", [
    ("import selective_scan_cuda\n", "extension stand-in"),
    ("import selective_scan_cuda\nimport some_other_missing_dependency\n", "package without __init__"),
    ("", "plain"),
])
def test_mamba_shim_imports_triton_ops(tmp_path, monkeypatch, init_body, how):
    _fake_mamba(tmp_path, init_body)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("mamba_ssm") or k == shim.EXTENSION}
    try:
        fns, used = shim.import_mamba_triton_ops()
        assert used == how
        assert fns["mamba_chunk_scan_combined"]() == "ssd" and fns["selective_state_update"]() == "step"
        if how != "plain":
            with pytest.raises(shim.MissingExtensionError):
                sys.modules[shim.EXTENSION].selective_scan_fwd()
    finally:
        for k in [k for k in sys.modules if k.startswith("mamba_ssm") or k == shim.EXTENSION]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_mamba_shim_reports_absence(monkeypatch):
    # mamba-ssm made absent whether or not this machine has it: no spec, and every import of it fails
    real_import = importlib.import_module

    def without_mamba(name, *args, **kwargs):
        if name.split(".")[0] == "mamba_ssm":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(importlib, "import_module", without_mamba)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("mamba_ssm")}
    try:
        with pytest.raises(ImportError, match="mamba-ssm Triton ops not importable"):
            shim.import_mamba_triton_ops()
    finally:
        sys.modules.update(saved)


def test_fla_guard_left_alone_without_fla():
    if importlib.util.find_spec("fla") is None:
        assert ops.narrow_fla_hopper_guard() is None


# --- ops ------------------------------------------------------------------------------------------------
def test_seq_idx_from_cu_seqlens():
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    assert ops.seq_idx_from_cu_seqlens(cu, 6).tolist() == [[0, 0, 1, 1, 1, 2]]


def test_causal_conv1d_matches_transformers_and_resets_at_boundaries():
    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    reference = inspect.unwrap(mq.causal_conv1d_fn)
    torch.manual_seed(0)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    parts = [torch.randn(1, 6, n) for n in (5, 1, 2, 7)]  # a one-token example: taps cross two boundaries
    for x in parts:
        torch.testing.assert_close(ops.causal_conv1d(x, weight, bias, "silu"), reference(x, weight, bias, "silu"))
    separate = torch.cat([ops.causal_conv1d(x, weight, bias, "silu") for x in parts], -1)
    cu = torch.tensor([0, 5, 6, 8, 15], dtype=torch.int32)
    packed = ops.causal_conv1d(torch.cat(parts, -1), weight, bias, "silu", cu_seq_lens_q=cu)
    torch.testing.assert_close(packed, separate)
    padded_cu = torch.tensor([0, 5, 6, 8, 15, 15, 15], dtype=torch.int32)  # zero-length tail segments
    torch.testing.assert_close(ops.causal_conv1d(torch.cat(parts, -1), weight, bias, "silu", cu_seq_lens_q=padded_cu),
                               separate)
    x = torch.cat(parts, -1).requires_grad_()
    ops.causal_conv1d(x, weight, bias, "silu", cu_seq_lens_q=cu).square().sum().backward()
    xs = [p.clone().requires_grad_() for p in parts]
    torch.cat([ops.causal_conv1d(p, weight, bias, "silu") for p in xs], -1).square().sum().backward()
    torch.testing.assert_close(x.grad, torch.cat([p.grad for p in xs], -1))
    seq_idx = ops.seq_idx_from_cu_seqlens(cu, 15)
    torch.testing.assert_close(ops.causal_conv1d(torch.cat(parts, -1), weight, None, None, seq_idx=seq_idx),
                               torch.cat([ops.causal_conv1d(x, weight, None, None) for x in parts], -1))


def _channel_last_conv(x, weight, bias=None, activation=None, **kwargs):
    """A CPU stand-in with the contract of fla.modules.causal_conv1d: x ``[B, T, D]`` of any strides."""
    assert x.shape[-1] == weight.shape[0] and not kwargs
    return ops.causal_conv1d(x.transpose(1, 2), weight, bias, activation).transpose(1, 2).contiguous(), None


def _packed_conv_case(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    dim = 64
    weight, bias = torch.randn(dim, 4, device=device, dtype=dtype), torch.randn(dim, device=device, dtype=dtype)
    # the model's layout: a [B, D, T] view of the projection's [B, T, D] output
    projected = torch.randn(1, 15, dim, device=device, dtype=dtype)
    cu = torch.tensor([0, 5, 6, 8, 15, 15], dtype=torch.int32, device=device)  # one-token example, padded cu
    return projected, weight, bias, cu


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("packed", [True, False])
def test_channel_last_conv_wrapper_equals_the_reference(activation, packed):
    """make_conv hands the kernel the projection's own [B, T, D] storage, corrects packed rows and applies the
    activation after the correction (inside the kernel when there is none): values and input gradients as
    the channel-first reference."""
    projected, weight, bias, cu = _packed_conv_case()
    kw = {"cu_seq_lens_q": cu} if packed else {}
    conv = ops.make_conv(_channel_last_conv, cpu=True)
    a = projected.clone().requires_grad_()
    b = projected.clone().requires_grad_()
    out = conv(a.transpose(1, 2), weight, bias, activation, **kw)
    ref = ops.causal_conv1d(b.transpose(1, 2), weight, bias, activation, **kw)
    torch.testing.assert_close(out, ref)
    assert out.shape == ref.shape and out.transpose(1, 2).is_contiguous()  # no transposing copy on the way out
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad)
    assert getattr(conv, "__hybridlora_boundaries__", False)


def _fwd_stand_in(x, weight, bias, residual=None, activation=None, **kwargs):
    """fla's ``causal_conv1d_fwd`` contract on CPU: x ``[B, T, D]`` of any strides -> (y contiguous, state)."""
    assert residual is None and activation is None and not kwargs
    return ops.causal_conv1d(x.transpose(1, 2), weight, bias).transpose(1, 2).contiguous(), None


def _bwd_stand_in(x, dy, dht, weight, bias, residual=None, activation=None, **kwargs):
    """fla's ``causal_conv1d_bwd`` contract on CPU: (dx, dw, db, dresidual, dinitial_state) of the plain conv."""
    assert dht is None and residual is None and activation is None and not kwargs
    inputs = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    with torch.enable_grad():
        y, _ = _fwd_stand_in(*inputs[:2], inputs[2] if bias is not None else None)
        grads = torch.autograd.grad(y, inputs, dy)
    return grads[0], grads[1], grads[2] if bias is not None else None, None, None


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_conv_corrected_in_place_equals_per_example_convolution(activation, with_bias):
    """With fla's forward/backward kernels (CPU stand-ins here), a packed row runs as one autograd function that
    corrects only the boundary positions: output, input gradient *and* weight / bias gradients equal the
    convolution of each example on its own (one-token example and a padded cu included)."""
    projected, weight, bias, cu = _packed_conv_case()
    bias = bias if with_bias else None
    conv = ops.make_conv(_channel_last_conv, cpu=True, fwd_bwd=(_fwd_stand_in, _bwd_stand_in))
    assert "in place" in conv.__hybridlora_kernel__
    x = projected.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    out = conv(x.transpose(1, 2), w, b, activation, cu_seq_lens_q=cu)
    assert out.grad_fn is not None and out.transpose(1, 2).is_contiguous()
    g = torch.randn_like(out)
    out.backward(g)

    xr = projected.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    br = bias.clone().requires_grad_() if with_bias else None
    bounds = cu.tolist()
    parts = [ops.causal_conv1d(xr[:, s:e].transpose(1, 2), wr, br, activation)
             for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    ref = torch.cat(parts, -1)
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    if with_bias:
        torch.testing.assert_close(b.grad, br.grad)


def test_boundary_taps_mark_exactly_the_taps_into_earlier_examples():
    cu = torch.tensor([0, 5, 6, 8, 8], dtype=torch.int32)  # examples of 5, 1, 2 tokens and a padding entry
    taps = ops.boundary_taps(cu, 8, 4)
    hits = {(int(taps.target[n]), int(taps.source[j, n])) for j in range(3) for n in range(taps.target.numel())
            if taps.crosses[j, n]}
    # a width-4 tap reads lags 1..3: position 5 (the 1-token example) reads 4, 3, 2, all earlier; position 6
    # (first of the 2-token example) reads 5, 4, 3; position 7 reads 6 (its own example), then 5 and 4
    assert hits == {(5, 4), (5, 3), (5, 2), (6, 5), (6, 4), (6, 3), (7, 5), (7, 4)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton conv needs a GPU")
@pytest.mark.parametrize("in_place", [False, True])
def test_fla_conv_equals_the_reference_on_cuda(in_place):
    fla_conv = pytest.importorskip("fla.modules.causal_conv1d").causal_conv1d
    from hybridlora.fast import kernels
    fwd_bwd = kernels._fla_conv_kernels() if in_place else None
    assert fwd_bwd is not None or not in_place, "fla 0.6's causal_conv1d_fwd / _bwd not found"
    conv = ops.make_conv(fla_conv, fwd_bwd=fwd_bwd)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        projected, weight, bias, cu = _packed_conv_case("cuda", dtype)
        for kw in ({}, {"cu_seq_lens_q": cu}):
            a, b = projected.clone().requires_grad_(), projected.clone().requires_grad_()
            wa, wb = weight.clone().requires_grad_(), weight.clone().requires_grad_()
            out = conv(a.transpose(1, 2), wa, bias, "silu", **kw)
            ref = ops.causal_conv1d(b.transpose(1, 2), wb, bias, "silu", **kw)
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
            g = torch.randn_like(ref)
            out.backward(g)
            ref.backward(g)
            torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(wa.grad.float(), wb.grad.float(), atol=tol * 10, rtol=tol)


def _fla_conv_update_semantics(x, cache, weight=None, bias=None, activation=None):
    """What fla's ``causal_conv1d_update`` kernel computes, written out (a CPU stand-in for the Triton kernel):
    ``x`` ``[N, 1, D]`` channel-last, ``cache`` ``[N, D, W]`` shifted by one in place with ``x`` as its last
    column, the output the window's dot product with ``weight`` ``[D, W]`` (+ bias, activation) in float32."""
    cache.copy_(torch.cat([cache[:, :, 1:], x.transpose(1, 2).to(cache.dtype)], dim=-1))
    y = (cache.float() * weight.float()).sum(-1) + (bias.float() if bias is not None else 0.0)
    if activation in ("silu", "swish"):
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)[:, None, :], cache


def _conv_update_case(device, dtype, batch=3, dim=10, width=4):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, 1, dim, generator=g).to(device, dtype).transpose(1, 2)  # as transformers hands it
    state = torch.randn(batch, dim, width, generator=g).to(device, dtype)
    weight = torch.randn(dim, width, generator=g).to(device, dtype)
    bias = torch.randn(dim, generator=g).to(device, dtype)
    return hidden, state, weight, bias


def test_the_decode_convolution_binds_only_when_asked_for_and_keeps_transformers_semantics(monkeypatch):
    """$HYBRIDLORA_FLA_CONV_UPDATE=1 binds fla's one-token convolution into the Qwen3.5 and Falcon-H1 modules; the
    wrapper's layout (transformers' [B, D, 1] view and [B, D, W] state, fla's channel-last step) gives
    transformers' output and state; without the variable, or after it is dropped, transformers' own choice stays."""
    probe = {k: {"fn": None, "reason": "absent"} for k in fast.KERNEL_PURPOSE}
    probe["fla.causal_conv1d_update"] = {"fn": _fla_conv_update_semantics, "reason": "stand-in"}
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_on_cuda", lambda args, kwargs: True)
    modules = [importlib.import_module(f"transformers.models.{m}.modeling_{m}") for m in ("qwen3_5", "falcon_h1")]
    references = [inspect.unwrap(m.causal_conv1d_update) for m in modules]
    monkeypatch.delenv(kernels.CONV_UPDATE_ENV, raising=False)
    bound = fast.use("fast")
    assert not any(k.endswith("causal_conv1d_update") for k in bound)
    assert all(inspect.unwrap(m.causal_conv1d_update) is r for m, r in zip(modules, references))
    monkeypatch.setenv(kernels.CONV_UPDATE_ENV, "1")
    bound = fast.use("fast")
    for module, reference in zip(modules, references):
        assert bound[f"{module.__name__.rsplit('.', 1)[-1]}.causal_conv1d_update"] == "fla.causal_conv1d_update"
        for activation in ("silu", None):
            hidden, state, weight, bias = _conv_update_case("cpu", torch.float32)
            ours, theirs = state.clone(), state.clone()
            out = module.causal_conv1d_update(hidden, ours, weight, bias, activation)
            expected = reference(hidden, theirs, weight, bias, activation)
            assert out.shape == expected.shape == (3, 10, 1)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours, theirs)  # the state moved on in place, like transformers'
        hidden, state, weight, bias = _conv_update_case("cpu", torch.float32, width=4)
        narrow = state[:, :, 1:].contiguous()  # a state narrower than the kernel: the reference serves it
        torch.testing.assert_close(module.causal_conv1d_update(hidden, narrow.clone(), weight, bias, "silu"),
                                   reference(hidden, narrow.clone(), weight, bias, "silu"))
    monkeypatch.delenv(kernels.CONV_UPDATE_ENV)
    fast.use("fast")
    assert all(inspect.unwrap(m.causal_conv1d_update) is r for m, r in zip(modules, references))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need a GPU")
def test_fla_decode_convolution_equals_transformers_on_cuda():
    fla_update = pytest.importorskip("fla.modules.causal_conv1d").causal_conv1d_update
    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    reference = inspect.unwrap(mq.causal_conv1d_update)
    step = ops.make_conv_update(fla_update, reference)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for batch, dim in ((1, 64), (5, 6144)):  # one row; Qwen3.5-0.8B's conv width
            for activation in ("silu", None):
                hidden, state, weight, bias = _conv_update_case("cuda", dtype, batch, dim)
                ours, theirs = state.clone(), state.clone()
                out = step(hidden, ours, weight, bias, activation)
                expected = reference(hidden, theirs, weight, bias, activation)
                torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
                torch.testing.assert_close(ours.float(), theirs.float(), atol=tol, rtol=tol)


# --- Gated DeltaNet decode: the recurrent state written over the cache's buffer -----------------------------
def _written_out_recurrence(q, k, v, g, beta, initial_state=None, output_final_state=False,
                            use_qk_l2norm_in_kernel=False):
    """The gated delta rule, one token at a time, in float32: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, g and
    beta ``[B, T, HV]``, state ``[B, HV, K, V]``; returns (output in v's dtype, final state or None)."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    # a key head serves consecutive value heads
    q, k = (t.repeat_interleave(v.shape[2] // k.shape[2], 2) for t in (q, k))
    if use_qk_l2norm_in_kernel:
        q, k = (t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    q = q * q.shape[-1] ** -0.5
    batch, length, v_heads, k_dim = k.shape
    h = torch.zeros(batch, v_heads, k_dim, v.shape[-1]) if initial_state is None else initial_state.float().clone()
    out = torch.empty(batch, length, v_heads, v.shape[-1])
    for t in range(length):
        h = h * g[:, t].exp()[..., None, None]
        delta = (v[:, t] - (h * k[:, t, ..., None]).sum(-2)) * beta[:, t, :, None]
        h = h + k[:, t, ..., None] * delta[..., None, :]
        out[:, t] = (h * q[:, t, ..., None]).sum(-2)
    return out.to(v.dtype), (h if output_final_state else None)


class _RecurrentKernelStandIn:
    """fla's fused recurrent kernel for CPU tests: its argument names, and what one launch computes written out
    (transformers' recurrence into ``o`` and ``ht``); remembers each launch's ``h0`` and ``ht``."""

    def __init__(self, arg_names=tuple(kernels._STEP_KERNEL_ARGS)):
        self.fn = types.SimpleNamespace(arg_names=list(arg_names))
        self.launches = []

    def __getitem__(self, grid):
        def launch(**kw):
            self.launches.append((kw["h0"], kw["ht"]))
            o, final = _written_out_recurrence(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], kw["h0"], True,
                                               kw["USE_QK_L2NORM_IN_KERNEL"])
            kw["o"].copy_(o)
            kw["ht"].copy_(final)
        return launch


def _fla_recurrent_stand_in(q, k, v, g=None, beta=None, initial_state=None, output_final_state=False,
                            use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    return _written_out_recurrence(q, k, v, g, beta, initial_state, output_final_state, use_qk_l2norm_in_kernel)


def _recurrent_case(batch=3, heads=2, v_heads=4, k_dim=8, v_dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(batch, 1, heads, k_dim, generator=g) for _ in range(2))  # key heads: fewer than value heads
    v = torch.randn(batch, 1, v_heads, v_dim, generator=g)
    gate = -torch.rand(batch, 1, v_heads, generator=g)
    beta = torch.rand(batch, 1, v_heads, generator=g)
    state = torch.randn(batch, v_heads, k_dim, v_dim, generator=g).to(dtype)
    return q, k, v, gate, beta, state


def test_gdn_decode_step_overwrites_the_state_it_is_handed_only_where_that_is_safe():
    """Inside the static decode step, a forward-only call with a float32 state gets transformers' output and final
    state, the final state written over the state handed in and that same tensor returned (the cache's copy then
    copies a tensor onto itself: nothing); every other call, and every call outside that step (a caller that may
    still need the state it handed in), keeps fla's own call, which leaves the state alone."""
    from hybridlora.fast.state import static_decode_step

    kernel = _RecurrentKernelStandIn()
    step = ops.make_gdn_recurrent(_fla_recurrent_stand_in, ops.make_gdn_step_in_place(kernel))
    assert "in place" in step.__hybridlora_kernel__
    q, k, v, gate, beta, state = _recurrent_case()
    expected_out, expected_state = _written_out_recurrence(q, k, v, gate, beta, state, True, True)
    handed = state.clone()
    with static_decode_step():
        out, final = step(q, k, v, gate, beta, initial_state=handed, output_final_state=True,
                          use_qk_l2norm_in_kernel=True)
    assert final is handed and len(kernel.launches) == 1 and kernel.launches[0][0] is kernel.launches[0][1] is handed
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(final, expected_state)
    assert not torch.equal(final, state)  # the state moved on: the test compares something
    before = handed.clone()
    handed.copy_(final)  # what transformers' update_recurrent_state then does: a copy onto itself
    torch.testing.assert_close(handed, before)

    def kept(in_decode_step=True, **overrides):
        case = dict(zip(("query", "key", "value", "g", "beta", "initial_state"), _recurrent_case()))
        case.update(output_final_state=True, use_qk_l2norm_in_kernel=True)
        case.update(overrides)
        launches, given = len(kernel.launches), case["initial_state"]
        copy = None if given is None else given.detach().clone()
        with static_decode_step() if in_decode_step else contextlib.nullcontext():
            out = step(**case)
        assert len(kernel.launches) == launches, f"launched in place for {overrides}"
        if given is not None:
            assert out[1] is not given and torch.equal(given.detach(), copy)  # the handed state left alone

    state = _recurrent_case()[5]
    kept(initial_state=state.to(torch.bfloat16))
    kept(initial_state=state[:1].expand(3, -1, -1, -1))  # rows sharing one memory
    kept(initial_state=state.clone().requires_grad_())
    kept(initial_state=None)
    kept(output_final_state=False)
    kept(cu_seqlens=torch.tensor([0, 1, 2, 3]))
    kept(in_decode_step=False)  # e.g. transformers 5.25's assisted decoding, which clones the buffer afterwards


def test_gdn_decode_in_place_binds_when_asked_for_and_decodes_transformers_tokens(monkeypatch):
    """Bound into Qwen3.5's module by default (fla's kernel taking the arguments the launch passes), a greedy decode
    on the static cache launches it on the cache's own state buffers and gives the tokens of the pure PyTorch path;
    with $HYBRIDLORA_GDN_STATE_IN_PLACE=0, or with a kernel taking other arguments, fla's own call stays."""
    from hybridlora.fast.decode import greedy_generate

    probe = {k: {"fn": None, "reason": "absent"} for k in fast.KERNEL_PURPOSE}
    probe["fla.fused_recurrent_gated_delta_rule"] = {"fn": _fla_recurrent_stand_in, "reason": "stand-in"}
    kernel = _RecurrentKernelStandIn()
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_on_cuda", lambda args, kwargs: True)
    monkeypatch.setattr(kernels, "_fla_recurrent_kernel", lambda: kernel)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.delenv(kernels.STATE_IN_PLACE_ENV, raising=False)
    model = build_model(tiny_config_for("qwen3_5_text"), seed=3)
    ids = torch.randint(1, 200, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    try:
        monkeypatch.setenv(kernels.STATE_IN_PLACE_ENV, "0")
        assert "in place" not in fast.use("fast")["modeling_qwen3_5.torch_recurrent_gated_delta_rule"]
        monkeypatch.delenv(kernels.STATE_IN_PLACE_ENV)
        bound = fast.use("fast")
        assert "Gated DeltaNet decode state in place=on" in fast.describe()
        assert bound["modeling_qwen3_5.torch_recurrent_gated_delta_rule"].endswith("(decode state updated in place)")
        ours = greedy_generate(model, ids, mask, max_new_tokens=6, pad_token_id=0).tokens
        buffers = {id(h0) for h0, ht in kernel.launches if h0 is ht}
        assert len(kernel.launches) == 5 * len(buffers) and len(buffers) == model.config.layer_types.count(
            "linear_attention")  # every recurrent layer, every step after the prefill, on one buffer each
        monkeypatch.setattr(kernels, "_fla_recurrent_kernel",
                            lambda: _RecurrentKernelStandIn(kernels._STEP_KERNEL_ARGS - {"ht"}))
        assert "in place" not in fast.use("fast")["modeling_qwen3_5.torch_recurrent_gated_delta_rule"]
    finally:
        monkeypatch.undo()  # before restore: with _on_cuda still faked, CPU tensors would reach a real fla kernel
        kernels.restore()
    reference = greedy_generate(model, ids, mask, max_new_tokens=6, pad_token_id=0).tokens
    assert torch.equal(ours, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need a GPU")
@pytest.mark.parametrize("heads, v_heads", [(16, 16), (16, 32)])  # Qwen3.5-0.8B; the larger Qwen3.5 models
def test_gdn_decode_in_place_is_bitwise_fla_on_cuda(heads, v_heads):
    recurrent = pytest.importorskip("fla.ops.gated_delta_rule").fused_recurrent_gated_delta_rule
    step_in_place = kernels._gdn_step_in_place()
    assert step_in_place is not None, "this fla's fused recurrent kernel takes other arguments than the launch"
    step = ops.make_gdn_recurrent(recurrent, step_in_place)
    q, k, v, gate, beta, state = (t.cuda() for t in _recurrent_case(64, heads, v_heads, 128, 128))
    q, k, v, beta = (t.to(torch.bfloat16) for t in (q, k, v, beta))
    from hybridlora.fast.state import static_decode_step

    with torch.inference_mode(), static_decode_step():
        expected_out, expected_state = recurrent(q, k, v, g=gate, beta=beta, initial_state=state.clone(),
                                                 output_final_state=True, use_qk_l2norm_in_kernel=True)
        handed = state.clone()
        out, final = step(q, k, v, gate, beta, initial_state=handed, output_final_state=True,
                          use_qk_l2norm_in_kernel=True)
    assert final is handed
    assert torch.equal(out, expected_out) and torch.equal(final, expected_state)


def test_unfused_stand_in_sends_falcon_down_the_module_path():
    assert ops.unfused_split_conv1d_scan(torch.zeros(1), outproj_weight=torch.zeros(1)) is None


# --- loss -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, preset, head_trainable", [
    ("qwen3_5_text", "all_layers", False),   # frozen (tied) head: the fused chunk function
    ("falcon_h1", "all_eligible", True),     # LoRA on lm_head: checkpointed module calls, x lm_head_multiplier
])
def test_chunked_loss_equals_full_logits_loss(monkeypatch, model_type, preset, head_trainable):
    from hybridlora.fast import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 256 * 7)  # several chunks even for a tiny vocab
    model = _lora_model(model_type, preset)
    head = loss_mod.head_and_scale(model)[1]
    assert any(p.requires_grad for p in head.parameters()) == head_trainable
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 20))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 12:] = -100
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(input_ids=ids).logits[:, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    got, count = fast.causal_lm_loss_sum(model, ids, labels)
    got_grads = torch.autograd.grad(got, params)
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    calls = {"exp": 0}
    real_exp = torch.exp

    def counting_exp(*args, **kwargs):  # the frozen head's softmax gradient is the only torch.exp in the loss
        calls["exp"] += 1
        return real_exp(*args, **kwargs)

    monkeypatch.setattr(torch, "exp", counting_exp)
    fast.causal_lm_loss_sum(model, ids, labels)
    with_grad, calls["exp"] = calls["exp"], 0
    with torch.no_grad():  # validation loss: same value, and no gradient work for a frozen head
        no_grad_loss, _ = fast.causal_lm_loss_sum(model, ids, labels)
    torch.testing.assert_close(no_grad_loss, ref.detach(), rtol=1e-5, atol=1e-4)
    if not head_trainable:
        assert with_grad > 0 and calls["exp"] == 0


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "falcon_h1"])  # tied head; untied head with a logit scale
def test_a_fully_trained_head_gets_its_gradient_from_the_fused_pass(monkeypatch, model_type):
    """Full-parameter training (the lab's pretraining): the head's weight gradient comes from the same chunked
    pass as the hidden states' (the head is not run again in the backward), equal to full logits' autograd for
    every parameter, the head (tied to the embeddings or not) included."""
    from hybridlora.fast import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 256 * 7)  # several chunks even for a tiny vocab
    model = build_model(tiny_config_for(model_type), seed=0).eval()
    head = loss_mod.head_and_scale(model)[1]
    assert type(head) is torch.nn.Linear and head.weight.requires_grad
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 20))
    labels = ids.clone()
    labels[0, :5] = -100
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(input_ids=ids).logits[:, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    monkeypatch.setattr(loss_mod, "_trainable_head_ce", None)  # the checkpointed module path must not be taken
    got, _ = fast.causal_lm_loss_sum(model, ids, labels)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    head_grad = got_grads[[i for i, p in enumerate(params) if p is head.weight][0]]
    assert head_grad.abs().sum() > 0
    asked = []
    real_chunk_ce = loss_mod._chunk_ce

    def recording_chunk_ce(*args, want_grad, **kwargs):
        asked.append(want_grad)
        return real_chunk_ce(*args, want_grad=want_grad, **kwargs)

    monkeypatch.setattr(loss_mod, "_chunk_ce", recording_chunk_ce)
    with torch.no_grad():  # a validation loss: the trained weight still requires grad, but no gradient work
        no_grad_loss, _ = fast.causal_lm_loss_sum(model, ids, labels)
    assert asked and not any(asked)
    torch.testing.assert_close(no_grad_loss, ref.detach(), rtol=1e-5, atol=1e-4)
    fast.causal_lm_loss_sum(model, ids, labels)
    assert all(asked[len(asked) // 2:])  # with grad mode on, the same chunks do compute their gradient


def test_a_frozen_lora_head_runs_as_its_module(monkeypatch):
    """An adapter with LoRA on lm_head loaded frozen (evaluation): the loss must include the adapter's delta, so
    the head runs as its module, not as its base weight."""
    from hybridlora.fast import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 256 * 7)
    model = _lora_model("falcon_h1", "all_eligible")  # LoRA on lm_head, random non-zero B
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        got, _ = fast.causal_lm_loss_sum(model, ids, ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_skip_input_upcast_toggles_every_lora_layer():
    model = _lora_model("qwen3_5_text", "all_layers")
    n = fast.skip_input_upcast(model)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert n == len(layers) > 0 and not any(m.cast_input_dtype_enabled for m in layers)
    fast.skip_input_upcast(model, False)
    assert all(m.cast_input_dtype_enabled for m in layers)


# --- packing --------------------------------------------------------------------------------------------
def test_pack_layout():
    exs = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    p = fast.pack(exs)
    assert p["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert p["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert p["cu_seq_lens_q"].tolist() == [0, 3, 5] and p["cu_seq_lens_q"].dtype == torch.int32
    assert p["max_length_q"] == 3
    assert fast.pack_order([3, 4, 2, 9, 1], max_tokens=7) == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError):
        fast.pack([{"input_ids": [1], "labels": [1, 2]}])


def _per_segment(fn):
    """A reference mixer run separately on each packed example (what a boundary-aware kernel computes)."""
    def run(*args, **kwargs):
        cu = kwargs.pop("cu_seqlens", None)
        cu = kwargs.pop("cu_seq_lens_q", None) if cu is None else cu
        for key in ("cu_seq_lens_k", "seq_idx", "max_length_q", "max_length_k", "position_ids"):
            kwargs.pop(key, None)
        if cu is None:
            return fn(*args, **kwargs)
        length = args[0].shape[1]

        def cut(x, a, b):
            return x[:, a:b] if torch.is_tensor(x) and x.dim() >= 2 and x.shape[1] == length else x

        outs = [fn(*[cut(x, a, b) for x in args], **{k: cut(v, a, b) for k, v in kwargs.items()})
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        if isinstance(outs[0], tuple):
            return torch.cat([o[0] for o in outs], 1), None
        return torch.cat(outs, 1)
    return run


@pytest.mark.parametrize("model_type, module, mixer", [
    ("qwen3_5_text", "transformers.models.qwen3_5.modeling_qwen3_5", "torch_chunk_gated_delta_rule"),
    ("falcon_h1", "transformers.models.falcon_h1.modeling_falcon_h1", "mamba2_chunk_scan"),
])
def test_packed_row_equals_separate_rows(model_type, module, mixer):
    """Packing metadata reaches every layer: attention gets a block-diagonal mask from position_ids, the
    convolution and the mixer get the boundaries (here a per-example reference mixer stands in for the
    kernel), so the packed logits equal the separately computed ones."""
    model = build_model(tiny_config_for(model_type), seed=0)
    fast.use("reference")
    mod = importlib.import_module(module)
    setattr(mod, mixer, _per_segment(getattr(mod, mixer)))
    mod.causal_conv1d_fn = ops.causal_conv1d
    torch.manual_seed(2)
    exs = [{"input_ids": torch.randint(0, 256, (n,)).tolist(), "labels": [0] * n} for n in (7, 12, 5)]
    p = fast.pack(exs)
    with torch.no_grad():
        packed = model(**{k: v for k, v in p.items() if k != "labels"}, use_cache=False).logits
        separate = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits
                              for e in exs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_packing_refused_on_the_reference_path():
    model = build_model(tiny_config_for("falcon_h1"), seed=0)
    ok, why = fast.packing_supported(model)  # nothing bound yet
    assert not ok and "boundaries" in why
    fast.use("reference")
    ok, why = fast.packing_supported(model)
    assert not ok and "boundaries" in why
    fast.use("fast")
    assert fast.packing_supported(model) == (True, "")


def test_train_log_and_eval_summaries_name_the_kernels(tmp_path, data_dir):
    """Every run log and evaluation summary says which mixer kernels ran: without CUDA the reference; on a GPU
    machine `train` runs on CUDA (kernels named) while `eval` keeps its default CPU device (the torch path)."""
    import json

    from hybridlora.cli import main

    out = tmp_path / "run"
    assert main(["train", "falcon-h1-0.5b", "--tiny", "--placement", "attention_only", "--data", "gsm8k",
                 "--data-dir", str(data_dir), "--max-examples", "4", "--val-examples", "1", "--epochs", "1",
                 "--micro-batch-size", "4", "--grad-accum", "1", "--no-progress", "--output", str(out)]) == 0
    start = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    if torch.cuda.is_available():  # `train --tiny` keeps its random tiny model on the CPU: the torch path, said so
        assert start["kernels"] == "kernels: reference (model on cpu, not CUDA)"
    else:
        assert start["kernels"] == "kernels: reference (no CUDA)"
    assert main(["eval", "falcon-h1-0.5b", "--tiny", "--adapter", str(out / "adapter"), "--data-dir", str(data_dir),
                 "--benchmarks", "mmlu", "--limit", "2", "--output", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "mmlu.summary.json").read_text())
    assert summary["settings"]["kernels"] == ("kernels: reference (model on cpu, not CUDA)" if torch.cuda.is_available()
                                              else "kernels: reference (no CUDA)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton cross-entropy needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cross_entropy_equals_the_torch_path(dtype, monkeypatch):
    """Frozen-head loss and hidden-state gradient: Triton kernel vs torch ops, ignored rows and a logit scale."""
    from hybridlora.fast import ce_kernel
    from hybridlora.fast.loss import IGNORE, _HeadCE

    assert ce_kernel.available()
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", dtype=dtype)
    weight = torch.randn(5003, 64, device="cuda", dtype=dtype) * 0.3  # vocab not a multiple of the block
    targets = torch.randint(0, 5003, (300,), device="cuda")
    targets[::7] = IGNORE
    results = []
    for torch_ce in ("1", "0"):
        monkeypatch.setenv("HYBRIDLORA_TORCH_CE", torch_ce)
        h = hidden.clone().requires_grad_()
        w = weight.float().clone().requires_grad_()  # a trained head (float32 master weight, as under autocast)
        loss = _HeadCE.apply(h, w, targets, 0.7, 128, dtype, True)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results[1][0], results[0][0], rtol=tol, atol=tol)
    torch.testing.assert_close(results[1][1].float(), results[0][1].float(), rtol=tol, atol=tol)
    assert results[1][1][::7].abs().max() == 0  # ignored rows: no gradient
    scale = results[0][2].abs().max()  # the head's gradient sums 300 rows: compared relative to its size
    torch.testing.assert_close(results[1][2] / scale, results[0][2] / scale, rtol=tol, atol=tol)


def _rms_norm_stand_in(x, weight, bias, eps):
    """CPU stand-in with fla's rms_norm contract: float32 inside, output in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rms_norm_gated_stand_in(x, g, weight, bias, activation, eps):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (normed * torch.nn.functional.silu(g.float())).to(x.dtype)


def test_norm_methods_bind_on_the_class_and_restore(monkeypatch):
    """Qwen3.5's two norms are bound as methods of their modeling classes (every built model uses them), their
    fla versions compute what transformers' do, and restore() puts transformers' methods back."""
    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    before = (mq.Qwen3_5RMSNorm.forward, mq.Qwen3_5RMSNormGated.forward)
    torch.manual_seed(0)
    norm, gated = mq.Qwen3_5RMSNorm(32), mq.Qwen3_5RMSNormGated(16)
    torch.nn.init.normal_(norm.weight, std=0.1)
    torch.nn.init.normal_(gated.weight, mean=1.0, std=0.1)
    x, h, g = torch.randn(5, 32), torch.randn(7, 16), torch.randn(7, 16)
    expected = (norm(x), gated(h, g))
    probe = {k: {"fn": lambda *a, **k: None, "reason": "fake"} for k in fast.KERNEL_PURPOSE}
    probe["fla.rms_norm"] = {"fn": _rms_norm_stand_in, "reason": "stand-in"}
    probe["fla.rms_norm_gated"] = {"fn": _rms_norm_gated_stand_in, "reason": "stand-in"}
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_gdn_backward_blocked", lambda *a: None)
    try:
        bound = fast.use("fast")
        assert bound["modeling_qwen3_5.Qwen3_5RMSNorm.forward"] == "fla.rms_norm"
        assert bound["modeling_qwen3_5.Qwen3_5RMSNormGated.forward"] == "fla.rms_norm_gated"
        assert mq.Qwen3_5RMSNorm.forward is not before[0]
        torch.testing.assert_close(norm(x), expected[0])  # CPU tensors: transformers' own forward
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the kernel branch on CPU
        torch.testing.assert_close(norm(x), expected[0])
        torch.testing.assert_close(gated(h, g), expected[1])
    finally:
        monkeypatch.undo()
        kernels.restore()  # no stand-in stays bound for later tests, pass or fail
    assert (mq.Qwen3_5RMSNorm.forward, mq.Qwen3_5RMSNormGated.forward) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton norms need a GPU")
def test_fla_norms_equal_transformers_on_cuda():
    pytest.importorskip("fla.modules.norm.layernorm")
    from fla.modules.norm.fused_norm_gate import rms_norm_gated
    from fla.modules.norm.layernorm import rms_norm

    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    plain, gate = kernels._state["originals"].get(("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5RMSNorm.forward"),
                                                 mq.Qwen3_5RMSNorm.forward), \
        kernels._state["originals"].get(("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5RMSNormGated.forward"),
                                        mq.Qwen3_5RMSNormGated.forward)
    fast_plain, fast_gate = ops.make_rms_norm(rms_norm, plain), ops.make_rms_norm_gated(rms_norm_gated, gate)
    torch.manual_seed(0)
    norm = mq.Qwen3_5RMSNorm(1024).cuda().to(torch.bfloat16)
    gated = mq.Qwen3_5RMSNormGated(128).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, std=0.1)
    torch.nn.init.normal_(gated.weight, mean=1.0, std=0.1)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    h, g = torch.randn(2, 4096, 128, device="cuda", dtype=torch.bfloat16).unbind(0)
    for module, ref_fn, fast_fn, inputs in ((norm, plain, fast_plain, (x,)), (gated, gate, fast_gate, (h, g))):
        a = [t.clone().requires_grad_() for t in inputs]
        b = [t.clone().requires_grad_() for t in inputs]
        out, ref = fast_fn(module, *a), ref_fn(module, *b)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        for ta, tb in zip(a, b):
            torch.testing.assert_close(ta.grad.float(), tb.grad.float(), atol=3e-2, rtol=2e-2)


def test_reference_mode_and_env_switch_the_triton_cross_entropy_off(monkeypatch):
    from hybridlora.fast import ce_kernel
    from hybridlora.fast.loss import _use_ce_kernel

    monkeypatch.setattr(ce_kernel, "available", lambda: True)
    monkeypatch.setitem(kernels._state, "mode", "fast")
    monkeypatch.delenv("HYBRIDLORA_TORCH_CE", raising=False)
    assert _use_ce_kernel()
    monkeypatch.setenv("HYBRIDLORA_TORCH_CE", "1")
    assert not _use_ce_kernel()
    monkeypatch.delenv("HYBRIDLORA_TORCH_CE")
    monkeypatch.setitem(kernels._state, "mode", "reference")  # the study's path: torch arithmetic throughout
    assert not _use_ce_kernel()


def test_describe_says_off_for_kernels_switched_to_torch(monkeypatch):
    model = _qwen_on_fake_cuda(monkeypatch)
    monkeypatch.setitem(kernels._state, "mode", "fast")
    assert "fla.rms_norm=on" in fast.describe(model)
    monkeypatch.setenv("HYBRIDLORA_TORCH_NORM", "1")
    line = fast.describe(model)
    assert "fla.rms_norm=off" in line and "fla.rms_norm_gated=off" in line and "fla.causal_conv1d=on" in line


def test_describe_names_the_slower_packed_conv_correction(monkeypatch):
    model = _qwen_on_fake_cuda(monkeypatch)
    monkeypatch.setitem(kernels._state, "mode", "fast")
    fast_conv = ops.make_conv(_channel_last_conv, fwd_bwd=(_fwd_stand_in, _bwd_stand_in)).__hybridlora_kernel__
    monkeypatch.setitem(kernels._state, "bound", {"modeling_qwen3_5.causal_conv1d_fn": fast_conv})
    assert "autograd ops" not in fast.describe(model)
    slow_conv = ops.make_conv(_channel_last_conv).__hybridlora_kernel__
    monkeypatch.setitem(kernels._state, "bound", {"modeling_qwen3_5.causal_conv1d_fn": slow_conv})
    assert "packed-row conv correction=autograd ops" in fast.describe(model)


def test_autograd_correction_switch_withholds_fla_conv_internals(monkeypatch):
    monkeypatch.setenv("HYBRIDLORA_CONV_AUTOGRAD_CORRECTION", "1")
    assert kernels._fla_conv_kernels() is None
