"""Ablation cost on the GPU: the reference paper's full condition set, projected from measured rates.

For each model (full-size architecture, random weights, bf16 on CUDA; ``--tiny``: tiny config, fp32, CPU — checks
the script, measures nothing meaningful) it

1. counts the conditions of the reference's set on our units — groups (each mixer type), every (mixer, layer),
   progressive first / last / random N (N in 1, 2, 4, 6, 8, 12, 18 below the pool size), 5 random matched-count
   controls per group and first/last condition — and the distinct removals left after sharing identical ones;
2. measures, intact and with a representative ablation attached (every attention unit removed), the rates of the
   three kinds of work one condition does: strided perplexity (tokens/s, windows of ``--window``), one-forward
   multiple choice (s per question at ``--mc-len`` prompt tokens, batch ``--mc-batch``) and greedy decoding on
   the static cache with the CUDA-graph decode step (s per step at each generation shape of the study);
3. checks that the hooks survive graph capture: the graph-replayed decode of the ablated model gives the same
   tokens as the eager static loop, and differs from the intact model's;
4. projects one condition (perplexity over ``--ppl-tokens`` tokens + MMLU 512 + ARC 299 + HellaSwag 512 questions +
   GSM8K 256 × 256 and HumanEval 164 × 512 new tokens, decoded to the budget: an upper bound) and the whole set.

Usage::

    python bench/bench_ablation.py --out OUT              # GPU: both models, ~5 min
    python bench/bench_ablation.py --tiny --out /tmp/abl  # CPU check of the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hybridlora.ablation.methods import Ablation, collect_means, model_units  # noqa: E402
from hybridlora.ablation.perplexity import plan_windows, strided_nll  # noqa: E402
from hybridlora.ablation.plans import (Condition, group_conditions, layer_conditions, mixer_units,  # noqa: E402
                                       progressive_pool, random_controls)

MODELS = {"qwen": "qwen3.5-0.8b", "falcon": "falcon-h1-0.5b"}
REFERENCE_N = (1, 2, 4, 6, 8, 12, 18)
STUDY_MC = 512 + 299 + 512  # MMLU, ARC-Challenge, HellaSwag at the study's sizes
STUDY_GEN = {"gsm8k": (256, 256), "humaneval": (164, 512)}  # questions, new tokens
# WikiText-2 test with a GPT-2-style BPE is 287,644 tokens (transformers' perplexity guide); the models' own
# tokenizers are not on this offline machine, so the projection uses this order of magnitude unless told.
PPL_TOKENS = 290_000


class _Tok:
    pad_token_id = 0
    eos_token = "</s>"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reference_conditions(mu) -> list[Condition]:
    """The reference's set on our units (its methods: whole-layer skip for sequential, zero for parallel)."""
    method = "zero" if mu.topology == "parallel" else "skip_layer"
    groups = [c for c in group_conditions(mu, [method]) if c.detail["component"] not in ("mlp", "moe")]
    layers = [c for c in layer_conditions(mu, ["zero" if mu.topology == "parallel" else "skip"])
              if c.detail["component"] in {u.component for u in mixer_units(mu)}]
    label, pool = progressive_pool(mu)
    progressive = []
    import random

    for n in [n for n in REFERENCE_N if n <= len(pool)]:
        rng = random.Random(f"0:progressive-random:{n}")
        for order, units in (("first", pool[:n]), ("last", pool[-n:]), ("random", rng.sample(pool, n))):
            progressive.append(Condition(f"{order}_{n}", method, [u.key for u in units], "progressive",
                                         {"order": order, "n": n, "component": label}))
    controls = random_controls(groups + progressive, mu, trials=5, seed=0)
    return groups + layers + progressive + controls


def build(name: str, args):
    from hybridlora.components import build_component_map
    from hybridlora.families import family_for
    from hybridlora.models import build_model, resolve_model, text_config, tiny_config

    config = text_config(resolve_model(MODELS[name]).config)
    if args.tiny:
        config = tiny_config(config, family_for(config.model_type))
    with torch.device(args.device):
        model = build_model(config, seed=0, dtype=args.dtype)
    model.eval()
    cmap = build_component_map(model)
    return model, cmap, model_units(cmap)


def ppl_rate(model, args) -> float:
    vocab = model.config.vocab_size
    n = args.window + args.stride * (args.windows - 1)
    ids = torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = plan_windows(len(ids), args.window, args.stride)
    strided_nll(model, ids, windows[:2], batch_size=args.ppl_batch)  # warm-up
    sync(args.device)
    t = time.perf_counter()
    records = strided_nll(model, ids, windows, batch_size=args.ppl_batch)
    sync(args.device)
    return sum(r["tokens"] for r in records) / (time.perf_counter() - t)


def mc_seconds(model, args) -> float:
    from hybridlora.evaluate.lm import CausalLM

    lm = CausalLM(model, _Tok(), batch_size=args.mc_batch, device=args.device)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, model.config.vocab_size, (args.mc_questions, args.mc_len), generator=g).tolist()
    with torch.inference_mode():
        lm._forward_positions(rows[:args.mc_batch], [[len(r) - 1] for r in rows[:args.mc_batch]])
        sync(args.device)
        t = time.perf_counter()
        for s in range(0, len(rows), args.mc_batch):
            batch = rows[s:s + args.mc_batch]
            lm._forward_positions(batch, [[len(r) - 1] for r in batch])
        sync(args.device)
    return (time.perf_counter() - t) / len(rows)


def decode(model, args, batch: int, new: int):
    from hybridlora.fast.decode import greedy_generate

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, model.config.vocab_size, (batch, args.gen_len), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    graphs = args.device == "cuda"
    with torch.inference_mode():
        greedy_generate(model, ids[:, :8], mask[:, :8], max_new_tokens=4, pad_token_id=0, graphs=graphs)
        sync(args.device)
        t = time.perf_counter()
        result = greedy_generate(model, ids, mask, max_new_tokens=new, pad_token_id=0, graphs=graphs)
        sync(args.device)
        wall = time.perf_counter() - t
        eager = greedy_generate(model, ids, mask, max_new_tokens=new, pad_token_id=0, graphs=False).tokens
    return {"s_per_step": wall / new, "path": result.graph, "tokens": result.tokens.cpu(),
            "graph_equals_eager": bool(torch.equal(result.tokens.cpu(), eager.cpu()))}


def measure(model, mu, args) -> dict:
    out = {}
    attention = mu.of("softmax_attention") or mixer_units(mu)
    method = "zero" if mu.topology == "parallel" else "skip"
    for label in ("intact", "ablated"):
        ablation = Ablation(model, attention, method, mu.layers_path) if label == "ablated" else None
        try:
            rates = {"ppl_tokens_per_s": ppl_rate(model, args), "mc_s_per_question": mc_seconds(model, args)}
            gen = decode(model, args, args.gen_batch, args.gen_new)
            rates.update(gen_s_per_step=gen["s_per_step"], decode_path=gen["path"],
                         graph_equals_eager=gen["graph_equals_eager"])
            rates["_tokens"] = gen["tokens"]
        finally:
            if ablation is not None:
                ablation.remove()
        out[label] = rates
    out["ablated_decode_differs_from_intact"] = not torch.equal(out["intact"].pop("_tokens"),
                                                                out["ablated"].pop("_tokens"))
    # mean ablation inside the decode graph: stored vectors (here from random tokens) replayed like zeros
    rows = torch.randint(1, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3)).tolist()
    means = collect_means(model, attention, mu.layers_path, rows)
    with Ablation(model, attention, "mean", mu.layers_path, means=means):
        small = decode(model, args, min(8, args.gen_batch), min(16, args.gen_new))
    out["mean_ablation_decode"] = {"path": small["path"], "graph_equals_eager": small["graph_equals_eager"]}
    return out


def project(rates: dict, conditions: list[Condition], args) -> dict:
    r = rates["ablated"]
    ppl = args.ppl_tokens / r["ppl_tokens_per_s"]
    mc = STUDY_MC * r["mc_s_per_question"]
    # decode steps cost about the same at batch 164-256 on the GPU (memory-bound): one batch per benchmark
    gen = sum(new * r["gen_s_per_step"] for _, new in STUDY_GEN.values())
    per = ppl + mc + gen
    n_removals = len({c.removal for c in conditions}) + 1  # + intact
    # Lighter split: perplexity for every removal, benchmarks only for groups, progressive and the intact model
    benched = len({c.removal for c in conditions if c.plan in ("group", "progressive")}) + 1
    light = (n_removals * ppl + benched * (mc + gen)) / 60
    return {"per_condition_s": {"perplexity": ppl, "mc": mc, "generation": gen, "total": per},
            "removals": n_removals, "total_min": n_removals * per / 60,
            "perplexity_everywhere_benchmarks_on_groups_progressive_min": light, "benchmarked_removals": benched,
            "target_min": 20, "target_met": n_removals * per / 60 <= 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU: checks the script, measures nothing")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--ppl-batch", type=int, default=4)
    ap.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS)
    ap.add_argument("--mc-len", type=int, default=896)
    ap.add_argument("--mc-batch", type=int, default=64)
    ap.add_argument("--mc-questions", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--gen-new", type=int, default=64)
    args = ap.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.window, args.stride, args.windows, args.ppl_batch = 128, 64, 4, 2
        args.mc_len, args.mc_batch, args.mc_questions = 64, 4, 8
        args.gen_len, args.gen_batch, args.gen_new = 16, 4, 8
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run with --tiny to check the script on CPU")
    if args.device == "cuda":
        from hybridlora import fast

        fast.use("fast")
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.device == "cuda"
               else "cpu (tiny: not a measurement)", "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, cmap, mu = build(name, args)
        if args.device == "cuda":
            from hybridlora import fast

            fast.warn_missing_kernels(model)
            results.setdefault("kernels", {})[name] = fast.describe(model)
        conditions = reference_conditions(mu)
        rates = measure(model, mu, args)
        entry = {"model": MODELS[name], "units": len(mu.units), "conditions": len(conditions), "rates": rates,
                 "projection": project(rates, conditions, args)}
        results["models"][name] = entry
        print(json.dumps({name: entry}, indent=1, default=str), flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_ablation.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
