"""The trainer itself on one GPU: padded vs packed rows, GPU checks of the packed path, the study projection.

Where ``bench_gpu.py`` times hand-written training steps, this script runs ``hybridlora.train.train`` — the loop
a study job runs — on the full-size architectures (catalog configs, random weights seed 0, bf16, LoRA r=16 /
alpha 32 / dropout 0.05, the study's placements ``all_layers`` / ``all_eligible``) and reads the rates from its
own run log. Sections (each model in turn):

* ``packing``: a packed row of four examples vs the same examples run separately (logits, fast kernels, bf16),
  beside the bf16-vs-float32 distance of the separate run as the yardstick; for Gated DeltaNet also the op-level
  comparison of the gate-reset boundaries with fla's own ``cu_seqlens`` path and with per-example calls,
  forward and gradients.
* ``fixed``: 1024-token examples, 16 per optimizer step (the issue's setting): padded micro-batches vs packed
  rows of 8192 tokens.
* ``real``: examples with the *lengths* of the study's training data (GSM8K train, CodeAlpaca 2k, HH-RLHF chat
  from a data folder) under an assumed characters-per-token ratio (no tokenizer can be loaded offline), loss on
  the response tokens; 16 examples per step, padded 4 x 4 vs packed. Gives seconds per optimizer step, from
  which the ``paper`` study's training time follows (375 steps per cell: 2000 examples / 16 x 3 epochs).

Usage (GPU machine, fla-core / mamba-ssm wheels on PYTHONPATH)::

    python bench/bench_train_loop.py --data DATA_DIR --out OUT [--models qwen,falcon] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HYBRIDLORA_LIFT_FLA_HOPPER_GUARD", "1")  # the opt-in of docs/PERFORMANCE.md

from hybridlora import fast  # noqa: E402
from hybridlora.data.formatting import TokenizedExample  # noqa: E402

MODELS = {"qwen": ("qwen3.5-0.8b", "all_layers"), "falcon": ("falcon-h1-0.5b", "all_eligible")}
STEPS_PER_CELL = math.ceil(2000 / 16) * 3
CELLS_PER_MODEL = 18
RESULTS: dict = {}
T0 = time.perf_counter()


def log(*args) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *args, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(name: str):
    from hybridlora.components import build_component_map
    from hybridlora.families import family_named
    from hybridlora.models import build_model, resolve_model, text_config
    from hybridlora.placement import named_preset, resolve

    spec, preset = MODELS[name]
    config = text_config(resolve_model(spec).config)
    with torch.device("cuda"):
        model = build_model(config, seed=0, dtype=torch.bfloat16)
    cmap = build_component_map(model)
    return model, resolve(named_preset(preset, family_named(cmap.family)), cmap)


# --- data ------------------------------------------------------------------------------------------------
def fixed_examples(n: int, length: int, vocab: int, seed: int) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append(TokenizedExample(f"fixed-{i}", ids, [-100] + ids[1:]))
    return out


def study_lengths(data: Path, chars_per_token: float) -> dict[str, list[tuple[int, int]]]:
    """(prompt tokens, response tokens) per example of the three study domains, from character counts; the
    chat template's markers are counted as 12 prompt tokens and 2 response tokens per turn pair."""
    tok = lambda text: max(1, math.ceil(len(text) / chars_per_token))
    out: dict[str, list[tuple[int, int]]] = {}
    gsm = [json.loads(x) for x in (data / "gsm8k" / "train.jsonl").read_text().splitlines()[:2000]]
    out["gsm8k"] = [(tok(r["question"]) + 12, tok(r["answer"]) + 2) for r in gsm]
    ca = json.loads((data / "codealpaca" / "code_alpaca_2k.json").read_text())[:2000]
    out["codealpaca"] = [(tok(r["instruction"] + r["input"]) + 12, tok(r["output"]) + 2) for r in ca]
    chat = [json.loads(x) for x in (data / "hh-rlhf" / "hh_rlhf_helpful_base_test_chosen.jsonl").read_text().splitlines()[:2000]]
    out["chat"] = [(sum(tok(m["content"]) + 12 for m in r["messages"] if m["role"] == "user"),
                    sum(tok(m["content"]) + 2 for m in r["messages"] if m["role"] == "assistant")) for r in chat]
    return out


def length_examples(pairs: list[tuple[int, int]], n: int, vocab: int, max_length: int, seed: int):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = pairs[rng.randrange(len(pairs))]
        p, r = min(p, max_length - 1), min(r, max_length - min(p, max_length - 1))
        ids = [rng.randrange(vocab) for _ in range(p + r)]
        out.append(TokenizedExample(f"len-{i}", ids, [-100] * p + ids[p:]))
    return out


# --- the trainer, timed from its own log -------------------------------------------------------------------
def run_trainer(model, resolved, examples, *, micro: int, accum: int, packing: str, pack_tokens: int = 0,
                cuda_graphs: str = "off", warmup_steps: int = 2, compile: str = "off") -> dict:
    from hybridlora.train import TrainConfig, train

    cfg = TrainConfig(epochs=1, micro_batch_size=micro, grad_accum=accum, max_length=1024, save_every=0,
                      norm_every=0, progress=False, packing=packing, pack_tokens=pack_tokens, warmup_ratio=0.0,
                      cuda_graphs=cuda_graphs, compile=compile)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = train(model, resolved, examples, tmp, cfg, pad_id=0)
        wall = time.perf_counter() - t
        records = [json.loads(x) for x in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    start = next(r for r in records if r["event"] == "start")
    end = next((r for r in records if r["event"] == "end"), {})
    steps = [r for r in records if r["event"] == "step"][warmup_steps:]
    capture_steps = [r for r in steps if r.get("graphs_captured")]
    steps = [r for r in steps if not r.get("graphs_captured")] or steps  # steady state: no capture in the step
    seconds = [r["tokens"] / r["tokens_per_s"] for r in steps]
    out = {"micro": micro, "accum": accum, "packing": start["packing"], "batching": start["batching"],
           "kernels": start["kernels"], "cuda_graphs": end.get("cuda_graphs", start.get("cuda_graphs")),
           "compile": compile, "steps_timed": len(steps), "capture_steps_excluded": len(capture_steps),
           "capture_step_s": [round(r["tokens"] / r["tokens_per_s"], 2) for r in capture_steps], "peak_gb": round(peak, 2), "wall_s": round(wall, 1),
           "s_per_step_median": round(statistics.median(seconds), 4),
           "tokens_per_s": round(sum(r["tokens"] for r in steps) / sum(seconds)),
           "computed_tokens_per_step": round(statistics.mean(r["computed_tokens"] for r in steps)),
           "real_tokens_per_step": round(statistics.mean(r["tokens"] for r in steps)),
           "forwards_per_step": round(statistics.mean(r["forwards"] for r in steps), 2),
           "final_loss": result.final_loss}
    model_base = result.peft_model.unload()  # give the base back, without LoRA, for the next run
    del result
    return out, model_base


# --- GPU checks of the packed path ---------------------------------------------------------------------------
@torch.no_grad()
def packing_check(model, name: str) -> dict:
    from hybridlora.fast.attention import packed_attention

    fast.use("fast")
    model.eval()
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    exs = [{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist(), "labels": [0] * n}
           for n in (300, 1000, 45, 700)]
    row = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in fast.pack(exs).items() if k != "labels"}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with packed_attention(model):
            packed = model(**row, use_cache=False).logits.float()
        separate = torch.cat([model(input_ids=torch.tensor([e["input_ids"]], device="cuda"), use_cache=False).logits
                              for e in exs], 1).float()
    model.float()
    fp32 = torch.cat([model(input_ids=torch.tensor([e["input_ids"]], device="cuda"), use_cache=False).logits
                      for e in exs], 1).float()
    model.to(torch.bfloat16)
    model.train()
    out = {"packed_vs_separate_rel": rel(packed, separate), "separate_bf16_vs_fp32_rel": rel(separate, fp32),
           "packed_vs_fp32_rel": rel(packed, fp32), "kernels": fast.describe(model)}
    if name == "qwen":
        out["gdn_op"] = gdn_boundary_check()
    return out


def compile_layers(peft) -> int:
    """Every decoder layer of the PEFT model compiled in place, as the trainer's ``compile: layers`` does."""
    from hybridlora.fast.compile import compile_regions, decoder_layers

    compile_regions(peft, "layers")
    return len(decoder_layers(peft))


def graph_check(model, resolved, lengths, compile: bool = False) -> dict:
    """One packed step (16 real-length GSM8K-like examples, LoRA dropout off, B non-zero, bf16): the CUDA-graph
    replay vs the eager packed step on the same weights — loss and LoRA gradients — and both timed."""
    from hybridlora.fast.graphs import PackedStepGraphs
    from hybridlora.fast.loss import causal_lm_loss_sum
    from hybridlora.train.loop import attach_lora

    fast.use("fast")
    peft = attach_lora(model, resolved, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    peft.train()
    compiled = compile_layers(peft) if compile else 0
    exs = length_examples(lengths["gsm8k"], 16, model.config.vocab_size, 1024, seed=5)
    row = fast.pack([{"input_ids": e.input_ids, "labels": e.labels} for e in exs])
    n_tokens = int((row["labels"][:, 1:] != -100).sum())
    cuda_row = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in row.items()}
    params = [p for p in peft.parameters() if p.requires_grad]

    def eager():
        with torch.autocast("cuda", dtype=torch.bfloat16), fast.packed_attention(peft):
            loss, _ = causal_lm_loss_sum(peft, cuda_row["input_ids"], cuda_row["labels"],
                                         **{k: v for k, v in cuda_row.items() if k not in ("input_ids", "labels")})
            loss = loss / n_tokens
            loss.backward()
        return float(loss)

    def timed(fn, reps=10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    peft.zero_grad(set_to_none=True)
    eager_loss = eager()
    eager_grads = [p.grad.clone() for p in params]
    runner = PackedStepGraphs(peft, max_segments=16, pad_id=0, autocast_dtype=torch.bfloat16)
    runner.zero_grad()
    t = time.perf_counter()
    graph_loss = float(runner.forward_backward(row, 1.0 / n_tokens))
    capture_s = time.perf_counter() - t
    graph_grads = [p.grad.clone() for p in params]
    runner.zero_grad()
    replay_loss = float(runner.forward_backward(row, 1.0 / n_tokens))  # a second replay: same numbers
    replay_grads = [p.grad.clone() for p in params]
    all_rel = lambda a, b: rel(torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b]))
    out = {"tokens": int(row["input_ids"].shape[1]), "loss_tokens": n_tokens, "graphs": runner.describe(),
           "compiled_layers": compiled,
           "capture_s": round(capture_s, 1), "eager_loss": eager_loss, "graph_loss": graph_loss,
           "replay_loss": replay_loss, "grads_rel_graph_vs_eager": all_rel(graph_grads, eager_grads),
           "worst_tensor_rel": max(rel(a, b) for a, b in zip(graph_grads, eager_grads)),
           "grads_rel_replay_vs_replay": all_rel(replay_grads, graph_grads)}

    def eager_step():
        peft.zero_grad(set_to_none=True)
        eager()

    def graph_step():
        runner.zero_grad()
        runner.forward_backward(row, 1.0 / n_tokens)

    out["eager_s_per_step"] = round(timed(eager_step), 4)
    out["graph_s_per_step"] = round(timed(graph_step), 4)
    out["speedup"] = round(out["eager_s_per_step"] / out["graph_s_per_step"], 2)
    runner._graphs.clear()  # free the graphs' memory pool before the trainer runs
    peft.zero_grad(set_to_none=True)
    peft.unload()
    torch.cuda.empty_cache()
    return out


def gdn_boundary_check() -> dict:
    """fla chunk GDN: gate-reset boundaries vs fla's cu_seqlens vs per-example calls (bf16 inputs)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from hybridlora.fast import ops

    torch.manual_seed(0)
    lengths = [300, 1000, 45, 700]
    t, h, d = sum(lengths), 16, 128
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    def inputs():
        q, k, v = (torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        gate = (-torch.rand(1, t, h, device="cuda") * 0.5)
        beta = torch.rand(1, t, h, device="cuda", dtype=torch.bfloat16)
        return [x.requires_grad_() for x in (q, k, v, gate, beta)]

    base = inputs()
    do = torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16)

    def run(kind):
        xs = [x.detach().clone().requires_grad_() for x in base]
        q, k, v, gate, beta = xs
        if kind == "reset":
            o, _ = ops.make_gdn_chunk(chunk_gated_delta_rule)(q, k, v, g=gate, beta=beta, cu_seqlens=cu,
                                                             use_qk_l2norm_in_kernel=True)
        elif kind == "cu_seqlens":
            o, _ = chunk_gated_delta_rule(q, k, v, g=gate, beta=beta, cu_seqlens=cu.long(), use_qk_l2norm_in_kernel=True)
        else:
            parts, s = [], 0
            for n in lengths:
                sl = slice(s, s + n)
                parts.append(chunk_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g=gate[:, sl], beta=beta[:, sl],
                                                    use_qk_l2norm_in_kernel=True)[0])
                s += n
            o = torch.cat(parts, 1)
        (o.float() * do.float()).sum().backward()
        return o, [x.grad for x in xs]

    with torch.enable_grad():
        ref_o, ref_g = run("separate")
        out = {}
        for kind in ("reset", "cu_seqlens"):
            o, grads = run(kind)
            out[kind] = {"out_rel": rel(o, ref_o), **{f"d{n}_rel": rel(a, b) for n, a, b in
                                                      zip(("q", "k", "v", "g", "beta"), grads, ref_g)}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with gsm8k/, codealpaca/, hh-rlhf/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run (2 more are warm-up)")
    ap.add_argument("--chars-per-token", type=float, default=4.0)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: packing,graph_check,fixed,real")
    ap.add_argument("--compile-check", action="store_true",
                    help="also run graph_check with the decoder layers compiled (leaves them compiled: run it alone)")
    ap.add_argument("--compile", default="",
                    help="comma list of compile scopes (off,lora,layers): packed graph runs of 4096 / 8192-token "
                         "rows of 1024-token examples with each, side by side")
    ap.add_argument("--compile-sections", default="fixed", help="where --compile runs: fixed,real")
    ap.add_argument("--domains", default="gsm8k,codealpaca,chat", help="real-length domains for --compile runs")
    ap.add_argument("--modes", default="padded,packed,graphs",
                    help="which trainer runs: padded, packed (eager), graphs (packed, CUDA graphs)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    RESULTS["env"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "args": vars(args) | {
        "data": str(args.data), "out": str(args.out)}}
    lengths = study_lengths(args.data, args.chars_per_token)
    RESULTS["lengths"] = {k: {"mean_total": statistics.mean(p + r for p, r in v),
                              "mean_response": statistics.mean(r for _, r in v)} for k, v in lengths.items()}
    n_steps = args.steps + 2
    for name in args.models.split(","):
        res = RESULTS.setdefault(name, {})
        model, resolved = build(name)
        vocab = model.config.vocab_size
        log(name, "built", MODELS[name])
        for section, fn in (
            ("packing", lambda m: packing_check(m, name)),
            ("graph_check", lambda m: graph_check(m, resolved, lengths)),
            ("graph_check_compiled", lambda m: graph_check(m, resolved, lengths, compile=True)),
        ):
            if section in skip or (section == "graph_check_compiled" and not args.compile_check):
                continue
            try:
                res[section] = fn(model)
            except Exception as exc:  # keep going: one failed section must not cost the others
                res[section] = {"error": f"{type(exc).__name__}: {exc}"}
            log(name, section, json.dumps(res[section]))
        runs = []
        if "fixed" not in skip:
            exs = fixed_examples(16 * n_steps, 1024, vocab, seed=1)
            runs += [("fixed", "padded 8x2", exs, dict(micro=8, accum=2, packing="off")),
                     ("fixed", "packed 8192", exs, dict(micro=8, accum=2, packing="auto")),
                     ("fixed", "graphs 8192", exs, dict(micro=8, accum=2, packing="auto", cuda_graphs="auto"))]
        scopes = list(filter(None, args.compile.split(",")))
        for scope in scopes if "fixed" in args.compile_sections else []:  # graph runs per compile scope
            exs = fixed_examples(16 * n_steps, 1024, vocab, seed=1)
            runs += [("fixed", f"graphs {rows} compile={scope}", exs,
                      dict(micro=rows // 1024, accum=16 * 1024 // rows, packing="auto", cuda_graphs="auto",
                           compile=scope)) for rows in (4096, 8192)]
        for scope in scopes if "real" in args.compile_sections else []:
            for domain in args.domains.split(","):
                exs = length_examples(lengths[domain], 16 * n_steps, vocab, 1024, seed=2)
                runs.append(("real", f"{domain} graphs compile={scope}", exs,
                             dict(micro=4, accum=4, packing="auto", cuda_graphs="auto", compile=scope)))
        if "real" not in skip:
            for domain, pairs in lengths.items():
                exs = length_examples(pairs, 16 * n_steps, vocab, 1024, seed=2)
                runs += [("real", f"{domain} padded 4x4", exs, dict(micro=4, accum=4, packing="off")),
                         ("real", f"{domain} packed", exs, dict(micro=4, accum=4, packing="auto")),
                         ("real", f"{domain} graphs", exs, dict(micro=4, accum=4, packing="auto", cuda_graphs="auto"))]
        modes = set(args.modes.split(","))
        for section, label, exs, kw in runs:
            mode = "padded" if kw["packing"] == "off" else ("graphs" if kw.get("cuda_graphs") == "auto" else "packed")
            if mode not in modes:
                continue
            try:
                row, model = run_trainer(model, resolved, exs, **kw)
            except Exception as exc:
                row = {"error": f"{type(exc).__name__}: {exc}"}
                torch.cuda.empty_cache()
            res.setdefault(section, {})[label] = row
            log(name, section, label, json.dumps(row))
            (args.out / "train_loop_bench.json").write_text(json.dumps(RESULTS, indent=1))
        del model
        torch.cuda.empty_cache()
    projection()
    (args.out / "train_loop_bench.json").write_text(json.dumps(RESULTS, indent=1))
    return 0


def projection() -> None:
    """Training hours of the ``paper`` preset from the measured seconds per step (real-length examples)."""
    out = {}
    for name in MODELS:
        real = RESULTS.get(name, {}).get("real", {})
        for mode in ("padded 4x4", "packed", "graphs"):
            per_domain = [real.get(f"{d} {mode}", {}).get("s_per_step_median") for d in ("gsm8k", "codealpaca", "chat")]
            if all(per_domain):
                # 6 placements x 3 domains: each domain's cells run at that domain's rate
                hours = sum(6 * STEPS_PER_CELL * s for s in per_domain) / 3600
                out.setdefault(name, {})[mode] = round(hours, 3)
    RESULTS["projection_train_h"] = out
    log("projection (training hours, paper preset)", json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
