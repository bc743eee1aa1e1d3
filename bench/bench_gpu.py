"""Reference vs fast path on the studied hybrid models, in one run: correctness, training, evaluation, projection.

    PYTHONPATH=src python bench/bench_gpu.py --out results/   # on a CUDA machine (full-size models)
    PYTHONPATH=src python bench/bench_gpu.py --tiny           # CPU smoke test of the script itself

Models: Qwen3.5-0.8B (placement ``all_layers``) and Falcon-H1-0.5B (``all_eligible``), full size from the
catalog configs, random weights (seed 0), bf16 weights and bf16 autocast, LoRA r=16 / alpha 32 / dropout 0.05.
"reference" is the published study's path: transformers' pure-PyTorch mixer kernels, full logits + float32
cross-entropy, right-padded rows. "fast" is :mod:`hybridlora.fast`: fla / mamba-ssm kernels, no KV cache in
training, cross-entropy over labelled positions in chunks (no full logits tensor).

Sections (each guarded; a failure is recorded and the run goes on): op-level kernel checks, and per model:
correctness (loss, logits, LoRA gradients, packed vs separate), training tokens/s and peak memory, MC
evaluation questions/s, greedy generation tokens/s, a torch.profiler table of one fast training step.
Last, a projection of the ``paper`` study and the targets of issue 6. Results go to ``OUT/bench.json``.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hybridlora import fast  # noqa: E402
from hybridlora.fast import ops  # noqa: E402

MODELS = {
    "qwen": {"spec": "qwen3.5-0.8b", "preset": "all_layers", "study_mc_s": 0.44, "study_gen_s": 3.3},
    "falcon": {"spec": "falcon-h1-0.5b", "preset": "all_eligible", "study_mc_s": 1.2, "study_gen_s": 4.6},
}
TARGETS = {"train_tok_s": {"qwen": 80_000, "falcon": 120_000}, "peak_gb": 24.0, "mc_speedup": 50.0,
           "gen_speedup": 30.0, "paper_hours": 1.0}
# The ``paper`` study: 36 trained cells (18 per model) + 1 base model each, 2000 examples x 3 epochs per cell.
STUDY = {"cells_per_model": 18, "base_per_model": 1, "examples": 2000, "epochs": 3,
         "mc_questions": 512 + 299 + 512, "gen": {"gsm8k": (256, 256), "humaneval": (164, 512)}}

RESULTS: dict = {"sections": {}, "errors": {}}
T0 = time.perf_counter()


def log(*args) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *args, flush=True)


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            log(f"== {name}")
            try:
                out = fn(*args, **kwargs)
                RESULTS["sections"][name] = out
                RESULTS["errors"].pop(name, None)  # a --merge recomputes what an earlier run failed at
                log(f"   {name}: {json.dumps(out, default=str)[:1500]}")
                return out
            except Exception as exc:  # keep going: one broken section must not lose the others
                RESULTS["errors"][name] = f"{type(exc).__name__}: {exc}"
                log(f"   {name} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                return None
            finally:
                free()
                save()
        return run
    return wrap


def save() -> None:
    if OUT_DIR:
        RESULTS["elapsed_s"] = time.perf_counter() - T0
        (Path(OUT_DIR) / "bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))


OUT_DIR = None


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# --- op-level checks -------------------------------------------------------------------------------------
def _grads(fn, inputs: dict, dout: torch.Tensor):
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = fn(**leaves)
    out = out[0] if isinstance(out, tuple) else out
    (out.float() * dout).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


@section("op_gdn")
def op_gdn(args):
    """fla chunk_gated_delta_rule (bf16) and the torch reference (bf16) against the torch reference in fp32."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as mq

    info = fast.active_kernels()["kernels"]["fla.chunk_gated_delta_rule"]
    if not info["usable"]:
        return {"skipped": info["reason"]}
    fast.use("fast", lift_fla_hopper_guard=True)
    fla_fn = ops.make_gdn_chunk(__import__("fla.ops.gated_delta_rule", fromlist=["x"]).chunk_gated_delta_rule)
    ref_fn = inspect.unwrap(fast.kernels._state["originals"][(mq.__name__, "torch_chunk_gated_delta_rule")])
    torch.manual_seed(1)
    b, t, h, k = 2, 1024, 16, 128
    dev = "cuda"
    x = {"query": torch.randn(b, t, h, k, device=dev), "key": torch.randn(b, t, h, k, device=dev),
         "value": torch.randn(b, t, h, k, device=dev),
         "g": -F.softplus(torch.randn(b, t, h, device=dev)) * 0.5,
         "beta": torch.rand(b, t, h, device=dev)}
    dout = torch.randn(b, t, h, k, device=dev)
    kw = dict(use_qk_l2norm_in_kernel=True)
    low = {n: (v.bfloat16() if n != "g" else v) for n, v in x.items()}
    o32, g32 = _grads(lambda **a: ref_fn(**a, **kw), x, dout)
    o16, g16 = _grads(lambda **a: ref_fn(**a, **kw), low, dout)
    of, gf = _grads(lambda **a: fla_fn(**a, **kw), low, dout)
    out = {"shape": [b, t, h, k], "fla_bf16_vs_fp32": {"o": rel(of, o32)},
           "torch_bf16_vs_fp32": {"o": rel(o16, o32)}}
    for n in g32:
        out["fla_bf16_vs_fp32"]["d" + n] = rel(gf[n], g32[n])
        out["torch_bf16_vs_fp32"]["d" + n] = rel(g16[n], g32[n])
    # packed: two sequences in one row with cu_seqlens == the two run separately
    cu = torch.tensor([0, 300, 1024], device=dev, dtype=torch.int32)
    one = {n: v[:1] for n, v in low.items()}
    packed = fla_fn(**one, cu_seqlens=cu, **kw)[0]
    sep = torch.cat([fla_fn(**{n: v[:, 0:300] for n, v in one.items()}, **kw)[0],
                     fla_fn(**{n: v[:, 300:] for n, v in one.items()}, **kw)[0]], 1)
    out["packed_vs_separate"] = rel(packed, sep)
    worst = max(out["fla_bf16_vs_fp32"].values())
    floor = max(out["torch_bf16_vs_fp32"].values())
    out["ok"] = bool(worst < max(3 * floor, 2e-2)) and out["packed_vs_separate"] < 1e-2
    return out


@section("op_ssd")
def op_ssd(args):
    """mamba-ssm mamba_chunk_scan_combined (bf16) and the torch reference (bf16) against the reference in fp32."""
    import transformers.models.falcon_h1.modeling_falcon_h1 as mf

    info = fast.active_kernels()["kernels"]["mamba_ssm.mamba_chunk_scan_combined"]
    if not info["usable"]:
        return {"skipped": info["reason"]}
    fast.use("fast", lift_fla_hopper_guard=True)
    ssd = ops.make_ssd_chunk(fast.kernels._probe()["mamba_ssm.mamba_chunk_scan_combined"]["fn"])
    ref_fn = inspect.unwrap(fast.kernels._state["originals"][(mf.__name__, "mamba2_chunk_scan")])
    torch.manual_seed(2)
    b, t, h, p, n, dev = 2, 1024, 24, 64, 128, "cuda"
    x = {"hidden_states": torch.randn(b, t, h, p, device=dev), "dt": torch.randn(b, t, h, device=dev) - 2,
         "A": -torch.rand(h, device=dev) * 4 - 0.5, "B": torch.randn(b, t, 1, n, device=dev),
         "C": torch.randn(b, t, 1, n, device=dev), "D": torch.randn(h, device=dev),
         "dt_bias": torch.randn(h, device=dev) * 0.1}
    kw = dict(chunk_size=128, dt_softplus=True)
    dout = torch.randn(b, t, h, p, device=dev)
    low = {k: (v.bfloat16() if k in ("hidden_states", "dt", "B", "C") else v) for k, v in x.items()}
    o32, g32 = _grads(lambda **a: ref_fn(**a, **kw), x, dout)
    o16, g16 = _grads(lambda **a: ref_fn(**a, **kw), low, dout)
    of, gf = _grads(lambda **a: ssd(**a, **kw), low, dout)
    out = {"shape": [b, t, h, p, n], "mamba_bf16_vs_fp32": {"o": rel(of, o32)},
           "torch_bf16_vs_fp32": {"o": rel(o16, o32)}}
    for k in g32:
        out["mamba_bf16_vs_fp32"]["d" + k] = rel(gf[k], g32[k])
        out["torch_bf16_vs_fp32"]["d" + k] = rel(g16[k], g32[k])
    one = {k: (v[:1] if v.dim() > 1 else v) for k, v in low.items()}
    cu = torch.tensor([0, 300, 1024], device=dev, dtype=torch.int32)
    packed = ssd(**one, cu_seq_lens_q=cu, **kw)
    sep = torch.cat([ssd(**{k: (v[:, :300] if v.dim() > 1 else v) for k, v in one.items()}, **kw),
                     ssd(**{k: (v[:, 300:] if v.dim() > 1 else v) for k, v in one.items()}, **kw)], 1)
    out["packed_vs_separate"] = rel(packed, sep)
    worst = max(out["mamba_bf16_vs_fp32"].values())
    floor = max(out["torch_bf16_vs_fp32"].values())
    out["ok"] = bool(worst < max(3 * floor, 2e-2)) and out["packed_vs_separate"] < 1e-2
    return out


# --- models ----------------------------------------------------------------------------------------------
class _Tok:
    """The few tokenizer attributes CausalLM needs when rows are given as token ids."""
    pad_token_id = 0
    eos_token = "</s>"


def build(name: str, args):
    from hybridlora.components import build_component_map
    from hybridlora.families import family_named
    from hybridlora.models import build_model, resolve_model, text_config, tiny_config
    from hybridlora.placement import named_preset, resolve
    from hybridlora.train.loop import attach_lora

    spec = MODELS[name]
    config = text_config(resolve_model(spec["spec"]).config)
    if args.tiny:
        from hybridlora.families import family_for
        config = tiny_config(config, family_for(config.model_type))
    with torch.device(args.device):
        model = build_model(config, seed=0, dtype=args.dtype)
    cmap = build_component_map(model)
    resolved = resolve(named_preset(spec["preset"], family_named(cmap.family)), cmap)
    peft_model = attach_lora(model, resolved)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():  # non-zero B so that every adapter changes the output and A gets gradients
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    info = {"model": spec["spec"], "placement": spec["preset"], "lora_hosts": len(resolved.hosts),
            "trainable_params": resolved.trainable_params, "params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "vocab": model.config.vocab_size}
    return peft_model, info


def autocast(args):
    return torch.autocast(args.device_type, dtype=torch.bfloat16) if args.device_type == "cuda" else nullcontext()


def ref_loss(model, ids, labels, mask):
    """The study's loss: full logits, float32 cross-entropy (train/loop.py _sum_loss)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels[:, 1:] != -100).sum())


def fast_loss(model, ids, labels, mask):
    return fast.causal_lm_loss_sum(model, ids, labels, attention_mask=mask)


def set_mode(model, mode: str) -> None:
    """Bind the kernels of ``mode``; the fast path also skips PEFT's float32 upcast of LoRA inputs."""
    fast.use(mode, lift_fla_hopper_guard=True)
    fast.skip_input_upcast(model, mode == "fast")


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def correctness(model, info, args):
    torch.manual_seed(3)
    vocab = info["vocab"]
    ids = torch.randint(0, vocab, (2, args.check_seq), device=args.device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.check_seq // 4] = -100  # prompt tokens carry no loss, as with loss_on=assistant
    model.eval()  # dropout off: both paths see the same function
    res = {}
    # float32 reference (weights upcast, no autocast): the yardstick for both bf16 paths
    dtypes = {n: t.dtype for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    set_mode(model, "reference")
    model.float()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits32 = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    loss, n = ref_loss(model, ids, labels, mask)
    (loss / n).backward()
    res32 = {"loss": float(loss / n), "grads": lora_grads(model)}
    model.zero_grad(set_to_none=True)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t.data = t.data.to(dtypes[name])
    free()
    for mode, lossf in (("reference", ref_loss), ("fast", fast_loss)):
        set_mode(model, mode)
        model.zero_grad(set_to_none=True)
        with autocast(args):
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            loss, n = lossf(model, ids, labels, mask)
            loss = loss / n
        loss.backward()
        res[mode] = {"loss": float(loss), "logits": logits, "grads": lora_grads(model)}
        model.zero_grad(set_to_none=True)
        del logits
        free()
    r, f = res["reference"], res["fast"]
    grads_r = torch.cat([g.flatten() for g in r["grads"].values()])
    grads_f = torch.cat([f["grads"][k].flatten() for k in r["grads"]])
    per = sorted(((rel(f["grads"][k], g), k) for k, g in r["grads"].items() if g.norm() > 0), reverse=True)
    by_comp: dict[str, float] = {}
    for err, k in per:
        comp = next((c for c in ("linear_attn", "self_attn", "mamba", "mlp", "feed_forward", "lm_head") if c in k), "other")
        by_comp[comp] = max(by_comp.get(comp, 0.0), err)
    out = {"loss_reference": r["loss"], "loss_fast": f["loss"], "loss_abs_diff": abs(r["loss"] - f["loss"]),
           "logits_rel_err": rel(f["logits"], r["logits"]),
           "logits_max_abs_diff": float((f["logits"] - r["logits"]).abs().max()),
           "lora_grad_rel_err": rel(grads_f, grads_r), "lora_grad_worst_tensor": per[0] if per else None,
           "lora_grad_worst_by_component": by_comp, "lora_tensors_with_grad": len(r["grads"])}
    g32 = torch.cat([res32["grads"][k].flatten() for k in r["grads"]])
    out["float32_yardstick"] = {
        "loss": res32["loss"],
        "reference_bf16": {"loss_abs_diff": abs(r["loss"] - res32["loss"]), "logits_rel_err": rel(r["logits"], logits32),
                           "lora_grad_rel_err": rel(grads_r, g32)},
        "fast_bf16": {"loss_abs_diff": abs(f["loss"] - res32["loss"]), "logits_rel_err": rel(f["logits"], logits32),
                      "lora_grad_rel_err": rel(grads_f, g32)}}
    y = out["float32_yardstick"]
    # fast must be as close to float32 as the bf16 reference is (1.5x + a small absolute slack)
    out["ok"] = bool(all(y["fast_bf16"][k] <= 1.5 * y["reference_bf16"][k] + 2e-3 for k in y["fast_bf16"]))
    # packed rows == separate rows (fast path only)
    ok, why = fast.packing_supported(model)
    if ok:
        lens = [args.seq // 3, args.seq // 2, args.seq - args.seq // 3 - args.seq // 2]
        exs = [{"input_ids": torch.randint(0, vocab, (n,)).tolist(), "labels": [0] * n} for n in lens]
        p = fast.pack(exs)
        kw = {k: (v.to(args.device) if torch.is_tensor(v) else v) for k, v in p.items() if k != "labels"}
        with torch.no_grad(), autocast(args):
            packed = model(**kw, use_cache=False).logits.float()
            sep = torch.cat([model(input_ids=torch.tensor([e["input_ids"]], device=args.device),
                                   use_cache=False).logits.float() for e in exs], 1)
        out["packed_vs_separate_logits_rel_err"] = rel(packed, sep)
    else:
        out["packed_vs_separate_logits_rel_err"] = f"not run: {why}"
    return out


def compile_layers(model, on: bool) -> None:
    """Regional torch.compile: each decoder layer's forward (compiled once per layer type, reused)."""
    for layer in fast.loss._causal_lm(model).model.layers:
        if on:
            layer.compile()
        else:
            layer._compiled_call_impl = None


def train_rate(model, info, args, mode: str, micro: int, steps: int, compiled: bool = False):
    """Tokens/s of full optimizer steps of args.tokens_per_step tokens (micro-batch x accumulation)."""
    set_mode(model, mode)
    compile_layers(model, compiled)
    lossf = fast_loss if mode == "fast" else ref_loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    accum = max(1, args.tokens_per_step // (micro * args.seq))
    torch.manual_seed(4)
    ids = torch.randint(0, info["vocab"], (micro, args.seq), device=args.device)
    mask = torch.ones_like(ids)

    def micro_step():
        with autocast(args):
            loss, n = lossf(model, ids, ids, mask)
            loss = loss / (n * accum)
        loss.backward()
        return float(loss.detach())

    def opt_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    if mode == "reference" and args.ref_micro_only:
        # The reference is slow: time micro-steps and one optimizer update, and add them up per step.
        micro_step()
        opt_step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            micro_step()
        sync()
        t_micro = (time.perf_counter() - t) / steps
        t = time.perf_counter()
        opt_step()
        sync()
        t_step = t_micro * accum + (time.perf_counter() - t)
        timed = f"{steps} micro-steps x {accum} + 1 update"
    else:
        for _ in range(accum):  # warm-up step (kernel compilation, autotuning)
            micro_step()
        opt_step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            for _ in range(accum):
                micro_step()
            opt_step()
        sync()
        t_step = (time.perf_counter() - t) / steps
        timed = f"{steps} optimizer steps"
    tokens = micro * args.seq * accum
    model.zero_grad(set_to_none=True)
    compile_layers(model, False)
    return {"mode": mode + ("+compile" if compiled else ""), "micro_batch": micro, "accum": accum, "grad_ckpt": False,
            "tokens_per_s": round(tokens / t_step), "step_s": round(t_step, 4), "peak_gb": round(peak_gb(), 2),
            "timed": timed}


def training(model, info, args):
    rows = []
    ref_row = None
    try:
        ref_row = train_rate(model, info, args, "reference", 4, args.ref_steps)
        rows.append(ref_row)
    except torch.OutOfMemoryError as exc:
        rows.append({"mode": "reference", "micro_batch": 4, "error": f"OOM: {str(exc)[:120]}"})
    free()
    log("   ", rows[-1])
    for micro in args.micro:
        try:
            rows.append(train_rate(model, info, args, "fast", micro, args.steps))
        except torch.OutOfMemoryError as exc:
            rows.append({"mode": "fast", "micro_batch": micro, "error": f"OOM: {str(exc)[:120]}"})
        free()
        log("   ", rows[-1])
    # off CUDA (--tiny) no peak is measured (NaN): every row "fits", so the projection arithmetic still runs
    fits = [r for r in rows if r["mode"] == "fast" and "tokens_per_s" in r
            and not r["peak_gb"] > TARGETS["peak_gb"]]
    best = max(fits, key=lambda r: r["tokens_per_s"]) if fits else None
    return {"rows": rows, "best_fast_under_24gb": best,
            "speedup_vs_reference": (best["tokens_per_s"] / ref_row["tokens_per_s"]) if best and ref_row and
            "tokens_per_s" in ref_row else None}


def training_compile(model, info, args):
    """Fast path plus regional torch.compile of the decoder layers (compile time reported separately)."""
    rows = []
    for micro in args.compile_micro:
        t = time.perf_counter()
        try:
            row = train_rate(model, info, args, "fast", micro, args.steps, compiled=True)
            row["first_step_incl_compile_s"] = round(time.perf_counter() - t, 1)
            rows.append(row)
        except Exception as exc:
            rows.append({"mode": "fast+compile", "micro_batch": micro, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            compile_layers(model, False)
        free()
        log("   ", rows[-1])
    return {"rows": rows}


def mc_eval(model, info, args):
    """Study style (reference kernels, one full forward per answer letter, unbatched) vs CausalLM's batched
    one-forward scoring (fast kernels, logits only at the read positions)."""
    from hybridlora.evaluate.lm import CausalLM

    model.eval()
    torch.manual_seed(5)
    n_fast = args.mc_questions
    prompts = torch.randint(0, info["vocab"], (n_fast, args.mc_len), device="cpu").tolist()
    letters = [10, 11, 12, 13]
    out = {"prompt_tokens": args.mc_len}
    set_mode(model, "reference")
    with torch.inference_mode(), autocast(args):
        def study_question(row):
            for letter in letters:
                model(input_ids=torch.tensor([row + [letter]], device=args.device)).logits.float()
        study_question(prompts[0])
        sync()
        t = time.perf_counter()
        for row in prompts[1:1 + args.ref_questions]:
            study_question(row)
        sync()
        out["study_style_s_per_question"] = (time.perf_counter() - t) / args.ref_questions
        lm = CausalLM(model, _Tok(), batch_size=args.mc_batch, device=args.device)
        set_mode(model, "reference")  # CausalLM binds the fast kernels on CUDA: rebind the reference after it
        check = prompts[:4]
        ref_lp = lm._forward_positions(check, [[len(r) - 1] for r in check])
        set_mode(model, "fast")
        fast_lp = lm._forward_positions(check, [[len(r) - 1] for r in check])
        out["letter_logprob_max_abs_diff"] = max(float((a[-1][letters] - b[-1][letters]).abs().max())
                                                 for a, b in zip(ref_lp, fast_lp))
        for variant, batch in (("adapter", args.mc_batch), ("merged", args.mc_batch), ("merged", 2 * args.mc_batch)):
            if variant == "merged":
                model.merge_adapter()
            lm.batch_size = batch
            lm._forward_positions(prompts[:batch], [[len(r) - 1] for r in prompts[:batch]])
            sync()
            t = time.perf_counter()
            for s in range(0, n_fast, batch):
                rows = prompts[s: s + batch]
                lm._forward_positions(rows, [[len(r) - 1] for r in rows])
            sync()
            out[f"fast_{variant}_b{batch}_s_per_question"] = (time.perf_counter() - t) / n_fast
            if variant == "merged":
                model.unmerge_adapter()
        out["fast_adapter_s_per_question"] = out[f"fast_adapter_b{args.mc_batch}_s_per_question"]
        out["fast_merged_s_per_question"] = min(v for k, v in out.items() if k.startswith("fast_merged_b"))
    out["batch"] = args.mc_batch
    study = MODELS[args.current]["study_mc_s"]
    out["speedup_vs_study_figure"] = study / out["fast_adapter_s_per_question"]
    out["speedup_vs_measured_study_style"] = out["study_style_s_per_question"] / out["fast_adapter_s_per_question"]
    out["merged_speedup_vs_study_figure"] = study / out["fast_merged_s_per_question"]
    return out


def generation(model, info, args):
    model.eval()
    torch.manual_seed(6)
    new = args.gen_new
    prompts = torch.randint(0, info["vocab"], (max(args.gen_batches), args.gen_len), device=args.device)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, temperature=None,
              top_p=None, top_k=None)
    out = {"prompt_tokens": args.gen_len, "new_tokens": new}
    with torch.inference_mode(), autocast(args):
        set_mode(model, "reference")
        one = prompts[:1]
        model.generate(input_ids=one[:, :16], attention_mask=torch.ones_like(one[:, :16]), **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        sync()
        t = time.perf_counter()
        ref_tokens = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)[:, args.gen_len:]
        sync()
        out["reference_unbatched_s_per_question"] = time.perf_counter() - t
        set_mode(model, "fast")
        fast_tokens = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)[:, args.gen_len:]
        agree = (ref_tokens == fast_tokens).float()
        first_diff = int((agree[0] == 0).nonzero()[0]) if (agree == 0).any() else new
        out["greedy_tokens_identical_before_first_difference"] = first_diff
        out["first_difference_margin"] = divergence_margin(model, one, kw)
        variants = [("adapter", args.gen_batches[0])] + [("merged", b) for b in args.gen_batches]
        for variant, batch in variants:
            if variant == "merged":
                model.merge_adapter()
            rows = prompts[:batch]
            model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
            sync()
            t = time.perf_counter()
            model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), **kw)
            sync()
            dt = time.perf_counter() - t
            tag = f"{variant}_b{batch}"
            out[f"fast_{tag}_s_per_question"] = dt / batch
            out[f"fast_{tag}_new_tokens_per_s"] = batch * new / dt
            if variant == "merged":
                model.unmerge_adapter()
    best = min((f"{v}_b{b}" for v, b in variants), key=lambda tag: out[f"fast_{tag}_s_per_question"])
    out["best_batch"] = best
    out["speedup_vs_study_figure"] = MODELS[args.current]["study_gen_s"] / out[f"fast_{best}_s_per_question"]
    out["speedup_vs_measured_reference"] = out["reference_unbatched_s_per_question"] / out[f"fast_{best}_s_per_question"]
    return out


def divergence_margin(model, prompt: torch.Tensor, generate_kw: dict) -> dict:
    """Where greedy decoding on the reference and the fast path first differ, were the reference's top two logits
    a near tie? Both paths are re-run with the logits generate decided on; up to the first difference the
    prefixes are identical, so the step there is the same decision on both paths. A tie: the reference's top-2
    gap is no larger than the largest logit difference between the paths at that step (numerics can flip it).
    Without a difference the same figures are given for the first generated token (so --tiny runs the code)."""
    steps = {}
    for mode in ("reference", "fast"):
        set_mode(model, mode)
        result = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), output_logits=True,
                                return_dict_in_generate=True, **generate_kw)
        steps[mode] = (result.sequences[0, prompt.shape[1]:], [step[0].float() for step in result.logits])
    (ref_tokens, ref_logits), (fast_tokens, fast_logits) = steps["reference"], steps["fast"]
    n = min(len(ref_tokens), len(fast_tokens))
    differ = (ref_tokens[:n] != fast_tokens[:n]).nonzero()
    first = int(differ[0]) if len(differ) else None
    at = 0 if first is None else first
    ref, fst = ref_logits[at], fast_logits[at]
    top2 = ref.topk(2)
    gap = float(top2.values[0] - top2.values[1])
    noise = float((fst - ref).abs().max())
    a, b = int(ref_tokens[at]), int(fast_tokens[at])
    out = {"first_difference": first, "at_step": at, "reference_top2_gap": gap,
           "fast_top2_gap": float(fst.topk(2).values.diff().abs()), "max_abs_logit_diff_paths": noise,
           "reference_token": a, "fast_token": b,
           "reference_margin_ref_token_over_fast_token": float(ref[a] - ref[b]),
           "fast_margin_fast_token_over_ref_token": float(fst[b] - fst[a]),
           "logit_scale_std": float(ref.std())}
    if first is not None:
        out["verdict"] = ("near tie: the paths' logits differ by more than the reference's top-2 gap" if gap <= noise
                          else "NOT a tie: the top-2 gap exceeds the paths' logit difference (look for a wrong path)")
    return out


def profile(model, info, args, micro: int):
    from torch.profiler import ProfilerActivity, profile as tprofile

    set_mode(model, "fast")
    model.train()
    ids = torch.randint(0, info["vocab"], (micro, args.seq), device=args.device)
    mask = torch.ones_like(ids)

    def step():
        with autocast(args):
            loss, n = fast_loss(model, ids, ids, mask)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)

    step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device_type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        step()
        sync()
    key = "self_cuda_time_total" if args.device_type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    if args.out:
        (Path(args.out) / f"profile_{args.current}.txt").write_text(table)
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)]
    total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    top = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))[:12]
    totals = {line.split(":")[0].strip(): line.split(":")[1].strip() for line in table.splitlines()
              if line.startswith("Self ") and "time total" in line}
    return {"micro_batch": micro, "step_totals": totals, "compiled": False,
            "top": [(e.key[:80], round(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1000, 2),
                     round(100 * getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / max(total, 1), 1))
                    for e in top]}


def model_sections(name: str, args):
    args.current = name
    log(f"## {name}: building")
    model, info = build(name, args)
    log("  ", info)
    fast.use("fast", lift_fla_hopper_guard=True)
    info["describe"] = fast.describe(model)
    info["missing_kernels"] = fast.warn_missing_kernels(model)
    log("  ", info["describe"])
    RESULTS["sections"][f"{name}_model"] = info
    section(f"{name}_correctness")(correctness)(model, info, args)
    section(f"{name}_training")(training)(model, info, args)
    section(f"{name}_mc_eval")(mc_eval)(model, info, args)
    section(f"{name}_generation")(generation)(model, info, args)
    best = (RESULTS["sections"].get(f"{name}_training") or {}).get("best_fast_under_24gb") or {"micro_batch": 4}
    section(f"{name}_profile")(profile)(model, info, args, best["micro_batch"])
    if args.compile_micro:
        section(f"{name}_training_compile")(training_compile)(model, info, args)
    del model
    free()


# --- projection and targets ------------------------------------------------------------------------------
def projection(args):
    out = {"assumptions": {**STUDY, "tokens_per_example": args.seq,
                           "note": "every example padded/packed to the full sequence length (upper bound); "
                                   "generation always runs to max_new_tokens (no early stop); evaluation with the adapter "
                                   "unmerged, as the study runs it; MC prompts "
                                   f"{args.mc_len} tokens, generation prompts {args.gen_len} tokens"}}
    total = {"reference": 0.0, "fast": 0.0}
    for name in MODELS:
        tr = RESULTS["sections"].get(f"{name}_training") or {}
        mc = RESULTS["sections"].get(f"{name}_mc_eval") or {}
        ge = RESULTS["sections"].get(f"{name}_generation") or {}
        ref_row = next((r for r in tr.get("rows", []) if r.get("mode") == "reference" and "tokens_per_s" in r), None)
        best = tr.get("best_fast_under_24gb")
        # a section run with --skip holds {"skipped": true}: as incomplete as one never run
        if not (ref_row and best and "study_style_s_per_question" in mc
                and "reference_unbatched_s_per_question" in ge):
            out[name] = "incomplete measurements"
            continue
        tokens = STUDY["cells_per_model"] * STUDY["examples"] * STUDY["epochs"] * args.seq
        evals = STUDY["cells_per_model"] + STUDY["base_per_model"]
        gen_q = sum(n for n, _ in STUDY["gen"].values())
        gen_tokens = sum(n * m for n, m in STUDY["gen"].values())
        ref_gen_tok_s = args.gen_new / ge["reference_unbatched_s_per_question"]
        # the study evaluates with the adapter unmerged (PEFT modules in place), so the projection uses the
        # unmerged rates; the merged ones are reported beside them, not projected
        fast_gen_tok_s = ge[f"fast_adapter_b{args.gen_batches[0]}_new_tokens_per_s"]
        row = {
            "reference": {"train_h": tokens / ref_row["tokens_per_s"] / 3600,
                          "mc_h": evals * STUDY["mc_questions"] * mc["study_style_s_per_question"] / 3600,
                          "gen_h": evals * gen_tokens / ref_gen_tok_s / 3600},
            "fast": {"train_h": tokens / best["tokens_per_s"] / 3600,
                     "mc_h": evals * STUDY["mc_questions"] * mc["fast_adapter_s_per_question"] / 3600,
                     "gen_h": evals * gen_tokens / fast_gen_tok_s / 3600},
            "gen_questions_per_eval": gen_q,
        }
        for mode in ("reference", "fast"):
            row[mode]["total_h"] = sum(row[mode].values())
            total[mode] += row[mode]["total_h"]
        out[name] = row
    out["total_h"] = total
    return out


def targets(args):
    s = RESULTS["sections"]
    out = {}
    for name in MODELS:
        best = (s.get(f"{name}_training") or {}).get("best_fast_under_24gb")
        tgt = TARGETS["train_tok_s"][name]
        out[f"{name}_train"] = {"target_tok_s": tgt, "measured": best and best["tokens_per_s"],
                                "peak_gb": best and best["peak_gb"],
                                "met": bool(best and best["tokens_per_s"] >= tgt)}
        mc = s.get(f"{name}_mc_eval") or {}
        out[f"{name}_mc"] = {"target_x": TARGETS["mc_speedup"], "measured_x": mc.get("speedup_vs_study_figure"),
                             "measured_x_merged": mc.get("merged_speedup_vs_study_figure"),
                             "met": bool((mc.get("speedup_vs_study_figure") or 0) >= TARGETS["mc_speedup"]),
                             "met_merged": bool((mc.get("merged_speedup_vs_study_figure") or 0) >= TARGETS["mc_speedup"])}
        ge = s.get(f"{name}_generation") or {}
        out[f"{name}_gen"] = {"target_x": TARGETS["gen_speedup"], "measured_x": ge.get("speedup_vs_study_figure"),
                              "met": bool((ge.get("speedup_vs_study_figure") or 0) >= TARGETS["gen_speedup"])}
    proj = (s.get("projection") or {}).get("total_h", {})
    out["paper_projection"] = {"target_h": TARGETS["paper_hours"], "measured_h": proj.get("fast"),
                               "met": bool(proj.get("fast") is not None and 0 < proj["fast"] <= TARGETS["paper_hours"])}
    return out


def env_report(args):
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    for pkg in ("triton", "fla", "mamba_ssm", "causal_conv1d", "tilelang", "peft"):
        try:
            from importlib.metadata import version
            out[pkg] = version({"fla": "fla-core", "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}.get(pkg, pkg))
        except Exception:
            out[pkg] = None
    out["active_kernels"] = fast.active_kernels()
    out["bound"] = fast.use("fast", lift_fla_hopper_guard=True)
    out["active_kernels_after_use"] = {k: v["usable"] for k, v in fast.active_kernels()["kernels"].items()}
    out["notes"] = fast.active_kernels()["notes"]
    return out


def print_table():
    s = RESULTS["sections"]
    lines = ["", "=" * 100, "SUMMARY (reference = study path, fast = hybridlora.fast)"]
    for name in MODELS:
        tr = s.get(f"{name}_training") or {}
        for r in tr.get("rows", []) + (s.get(f"{name}_training_compile") or {}).get("rows", []):
            lines.append(f"{name:7s} train {r.get('mode'):12s} mb={r.get('micro_batch'):>2} "
                         f"tok/s={r.get('tokens_per_s', r.get('error'))} peak_GB={r.get('peak_gb', '-')}")
        c = s.get(f"{name}_correctness") or {}
        if "loss_reference" in c:
            lines.append(f"{name:7s} correctness ok={c.get('ok')} loss {c.get('loss_reference'):.5f} vs "
                         f"{c.get('loss_fast'):.5f} logits_rel={c.get('logits_rel_err'):.2e} "
                         f"lora_grad_rel={c.get('lora_grad_rel_err'):.2e} packed={c.get('packed_vs_separate_logits_rel_err')}")
            lines.append(f"{name:7s}   vs float32: {json.dumps(c.get('float32_yardstick'))}")
        mc = s.get(f"{name}_mc_eval") or {}
        if "study_style_s_per_question" in mc:
            lines.append(f"{name:7s} MC s/q: study-style {mc['study_style_s_per_question']:.4f}, fast "
                         f"{mc['fast_adapter_s_per_question']:.5f} (merged {mc['fast_merged_s_per_question']:.5f}); "
                         f"x{mc['speedup_vs_study_figure']:.1f} (merged x{mc['merged_speedup_vs_study_figure']:.1f}) vs study figure")
        ge = s.get(f"{name}_generation") or {}
        if "best_batch" in ge:
            b = ge["best_batch"]
            lines.append(f"{name:7s} gen s/q: reference {ge['reference_unbatched_s_per_question']:.3f}, fast {b} "
                         f"{ge[f'fast_{b}_s_per_question']:.4f} ({ge[f'fast_{b}_new_tokens_per_s']:.0f} tok/s); "
                         f"x{ge['speedup_vs_study_figure']:.1f} vs study figure")
        m = ge.get("first_difference_margin") or {}
        if "reference_top2_gap" in m:
            lines.append(f"{name:7s} greedy fast vs reference: first difference at step {m['first_difference']}; "
                         f"reference top-2 gap there {m['reference_top2_gap']:.4g} vs max |logit diff| between paths "
                         f"{m['max_abs_logit_diff_paths']:.4g} -> {m.get('verdict', 'no difference')}")
    for k in ("op_gdn", "op_ssd"):
        if s.get(k):
            lines.append(f"{k}: ok={s[k].get('ok')} {json.dumps({a: b for a, b in s[k].items() if a != 'shape'}, default=str)[:300]}")
    if s.get("projection"):
        lines.append(f"paper projection (h): {json.dumps(s['projection'].get('total_h'))}")
    if s.get("targets"):
        lines.append("targets: " + json.dumps({k: v['met'] for k, v in s['targets'].items()}))
    if RESULTS["errors"]:
        lines.append("ERRORS: " + json.dumps(RESULTS["errors"])[:1500])
    print("\n".join(lines), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU: tests the script, measures nothing")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--check-seq", type=int, default=512)
    ap.add_argument("--tokens-per-step", type=int, default=16384)
    ap.add_argument("--micro", default="4,8,16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--ref-steps", type=int, default=2)
    ap.add_argument("--mc-len", type=int, default=896)
    ap.add_argument("--mc-batch", type=int, default=32)
    ap.add_argument("--mc-questions", type=int, default=128)
    ap.add_argument("--ref-questions", type=int, default=2)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--gen-new", type=int, default=64)
    ap.add_argument("--gen-batches", default="128,256")
    ap.add_argument("--compile-micro", default="", help="micro-batches to also time with regional torch.compile")
    ap.add_argument("--merge", nargs="*", help="bench.json files of earlier runs (e.g. one per model): "
                    "combine them and print projection, targets and summary only")
    ap.add_argument("--skip", default="", help="comma list of: ops,correctness,training,mc,generation,profile")
    args = ap.parse_args(argv)
    args.micro = [int(x) for x in args.micro.split(",") if x]
    args.compile_micro = [int(x) for x in args.compile_micro.split(",") if x]
    args.gen_batches = [int(x) for x in args.gen_batches.split(",")]  # the projection reads it, --merge too
    if args.merge:
        for path in args.merge:
            data = json.loads(Path(path).read_text())
            # a section one run skipped must not hide the same section measured by another run
            RESULTS["sections"].update({k: v for k, v in data["sections"].items()
                                        if not (isinstance(v, dict) and v.get("skipped"))})
            RESULTS["errors"].update(data.get("errors", {}))
        section("projection")(projection)(args)
        section("targets")(targets)(args)
        print_table()
        return
    args.ref_micro_only = True
    if args.tiny:
        args.device, args.dtype = "cpu", torch.float32
        args.seq, args.check_seq, args.tokens_per_step, args.micro = 32, 24, 128, [2, 4]
        args.mc_len, args.mc_batch, args.mc_questions, args.ref_questions = 24, 4, 8, 1
        args.gen_len, args.gen_new, args.gen_batches = 8, 4, [2, 4]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for a CPU smoke test")
        args.device, args.dtype = "cuda", torch.bfloat16
    args.device_type = torch.device(args.device).type
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        global OUT_DIR
        OUT_DIR = args.out
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
    section("env")(env_report)(args)
    if "ops" not in args.skip and args.device_type == "cuda":
        op_gdn(args)
        op_ssd(args)
    skip = set(args.skip.split(","))
    global correctness, training, mc_eval, generation, profile
    noop = lambda *a, **k: {"skipped": True}  # noqa: E731
    correctness = noop if "correctness" in skip else correctness
    training = noop if "training" in skip else training
    mc_eval = noop if "mc" in skip else mc_eval
    generation = noop if "generation" in skip else generation
    profile = noop if "profile" in skip else profile
    for name in args.models.split(","):
        try:
            model_sections(name, args)
        except Exception as exc:
            RESULTS["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        free()
    section("projection")(projection)(args)
    section("targets")(targets)(args)
    RESULTS["elapsed_s"] = time.perf_counter() - T0
    if args.out:
        (Path(args.out) / "bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print_table()


if __name__ == "__main__":
    main()
