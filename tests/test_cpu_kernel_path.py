"""A model on the CPU takes the torch path whatever kernel packages are installed (issue 16, section 6).

On a GPU machine with fla installed, transformers binds fla's Triton kernels into its Qwen3.5 modeling module at
import time, for every model of the process; a CPU model then crashed in Triton. Here "fla importable" is
simulated by stand-in modules whose kernels raise, so the tests run (and would fail without the guard) on CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from hybridlora import fast
from hybridlora.fast import kernels
from hybridlora.models import build_model, tiny_config_for

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs in a fresh interpreter: the stand-in packages must be in sys.modules before transformers imports its
# Qwen3.5 / Falcon-H1 modeling code, exactly as a real fla / mamba-ssm / causal-conv1d would be.
_FRESH_PROCESS = textwrap.dedent("""
    import importlib, json, sys, types

    calls = []

    def stand_in_package(name, functions):
        module = types.ModuleType(name)
        for fn_name in functions:
            def kernel(*args, _name=f"{name}.{fn_name}", **kwargs):
                calls.append(_name)
                raise RuntimeError(f"stand-in {_name}: a Triton kernel cannot read CPU tensors")
            setattr(module, fn_name, kernel)
        sys.modules[name] = module

    stand_in_package("fla", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
    stand_in_package("causal_conv1d", ["causal_conv1d_fn", "causal_conv1d_update"])
    stand_in_package("mamba_ssm", ["mamba_chunk_scan_combined", "selective_state_update",
                                   "mamba_split_conv1d_scan_combined"])

    import torch
    mq = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    # the simulation holds: transformers itself bound the stand-in. Called without tensors, because
    # transformers >= 5.25 routes calls on CPU tensors to its torch path itself (before that it did not), and
    # with no tensor argument every version hands the call to the bound package function
    try:
        mq.torch_chunk_gated_delta_rule(None, None, None, g=None, beta=None)
        bound_stand_in = False
    except Exception as exc:
        bound_stand_in = isinstance(exc, RuntimeError) and "stand-in" in str(exc)
    calls.clear()

    from hybridlora.models import build_model, tiny_config_for
    result = {"bound_stand_in": bound_stand_in}
    # lab models first (no other model has touched the modeling modules yet): they borrow Qwen3.5's Gated DeltaNet
    # and Falcon-H1's Mamba-2 mixer, and must get the same guard as those models
    from hybridlora.lab.solve import build
    from hybridlora.lab.spec import load_spec, variants
    for name in ("tiny-gdn", "tiny-mamba2"):
        model, _ = build(variants(load_spec(name))["parallel"], seed=0)
        ids = torch.randint(0, 200, (2, 12))
        try:
            with torch.no_grad():
                model(input_ids=ids)
            result[name] = "ok"
        except Exception as exc:
            result[name] = f"{type(exc).__name__}: {exc}"
    for model_type in ("qwen3_5_text", "falcon_h1"):
        model = build_model(tiny_config_for(model_type), seed=0)
        ids = torch.randint(0, 200, (2, 12))
        try:
            with torch.no_grad():
                model(input_ids=ids)
                out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            result[model_type] = "ok" if out.shape == (2, 15) else f"shape {tuple(out.shape)}"
        except Exception as exc:
            result[model_type] = f"{type(exc).__name__}: {exc}"
    result["kernel_calls"] = calls
    print(json.dumps(result))
""")


def test_cpu_model_ignores_kernels_transformers_bound_at_import():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bound_stand_in"], "transformers did not bind the stand-in fla: the test simulates nothing"
    assert result["qwen3_5_text"] == "ok"
    assert result["falcon_h1"] == "ok"
    assert result["tiny-gdn"] == "ok" and result["tiny-mamba2"] == "ok"
    assert result["kernel_calls"] == []


def _raising(name):
    def kernel(*args, **kwargs):
        raise RuntimeError(f"stand-in {name} called with CPU tensors")
    return kernel


@pytest.fixture()
def fake_gpu_machine(monkeypatch):
    """CUDA "available" and every fast kernel importable, as stand-ins that raise; undone afterwards."""
    monkeypatch.setattr(kernels, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    probe = {k: {"fn": _raising(k), "reason": "stand-in"} for k in fast.KERNEL_PURPOSE}
    monkeypatch.setattr(kernels, "_probe", lambda: probe)
    monkeypatch.setattr(kernels, "_gdn_backward_blocked", lambda *a: None)
    monkeypatch.setattr(kernels, "_fla_conv_kernels", lambda: None)
    yield
    kernels.restore()


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "falcon_h1"])
def test_use_fast_on_a_gpu_machine_keeps_cpu_models_on_the_torch_path(fake_gpu_machine, model_type):
    bound = fast.use("fast")
    assert bound["modeling_qwen3_5.torch_chunk_gated_delta_rule"] == "fla.chunk_gated_delta_rule"
    assert bound["modeling_falcon_h1.mamba2_chunk_scan"] == "mamba_ssm.mamba_chunk_scan_combined"
    model = build_model(tiny_config_for(model_type), seed=0)
    ids = torch.randint(0, 200, (1, 16))
    row = fast.pack([{"input_ids": ids[0, :9].tolist(), "labels": ids[0, :9].tolist()},
                     {"input_ids": ids[0, 9:].tolist(), "labels": ids[0, 9:].tolist()}])
    kwargs = {k: v for k, v in row.items() if k not in ("input_ids", "labels")}
    with torch.no_grad(), fast.packed_attention(model):  # packed rows: the packing-aware CPU references
        loss, count = fast.causal_lm_loss_sum(model, row["input_ids"], row["labels"], **kwargs)
    assert count > 0 and torch.isfinite(loss)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # decode steps too
    assert fast.describe(model) == "kernels: reference (model on cpu, not CUDA)"
    assert fast.missing_kernels(model) == {}


def test_torch_path_refuses_packed_rows_instead_of_mixing_examples():
    def reference(x, **kwargs):
        return x

    def transformers_binding(*args, **kwargs):  # stands for transformers' wrapper around a package kernel
        raise AssertionError("the package kernel must not run on CPU tensors")

    transformers_binding.__wrapped__ = reference
    module = types.ModuleType("hybridlora_test_modeling")
    module.torch_chunk_gated_delta_rule = transformers_binding
    sys.modules[module.__name__] = module
    try:
        assert kernels.guard_cpu_path(module.__name__) == ["hybridlora_test_modeling.torch_chunk_gated_delta_rule"]
        assert kernels.guard_cpu_path(module.__name__) == []  # idempotent
        x = torch.ones(2)
        assert module.torch_chunk_gated_delta_rule(x) is x
        with pytest.raises(ValueError, match="packed"):
            module.torch_chunk_gated_delta_rule(x, cu_seqlens=torch.tensor([0, 1, 2]))
    finally:
        del sys.modules[module.__name__]
