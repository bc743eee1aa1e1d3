"""Ablation cost on the GPU: the reference paper's full condition set, projected from measured rates.

For each model (full-size architecture, random weights, bf16 on CUDA; ``--tiny``: tiny config, fp32, CPU — checks
the script, measures nothing meaningful) it

1. counts the conditions of the reference's set on our units (``ablate --plan reference``,
   ``plans.reference_conditions``) — groups (each mixer type), every (mixer, layer), progressive first / last /
   random N (N in 1, 2, 4, 6, 8, 12, 18 up to the pool size), early / middle / late thirds of each mixer type, 5
   random matched-count controls per group (the reference's controls) — and the distinct removals left after
   sharing identical ones;
2. measures, intact and with a representative ablation attached (every attention unit removed), the rates of the
   three kinds of work one condition does: strided perplexity (tokens/s, windows of ``--window``), one-forward
   multiple choice (s per question at ``--mc-len`` prompt tokens, batch ``--mc-batch``) and greedy decoding on
   the static cache with the CUDA-graph decode step (s per step at batch ``--gen-batch``);
3. checks that the hooks survive graph capture: the graph-replayed decode of the ablated model gives the same
   tokens as the eager static loop, and differs from the intact model's;
4. measures the levers ``hybridlora ablate`` has for the GPU: decoding at ``--small-gen-batch`` (8, the
   ``--batch-size`` default, what ``--gen-batch-size 256`` replaces), perplexity at ``--ppl-batch-large``
   windows a forward, and ``--workers`` runner processes sharing the GPU (``--workers-per-gpu N``): each builds
   the model, attaches the ablation and warms up, then all run the same scaled-down condition (``--unit-scale``
   of one condition's perplexity, multiple-choice and generation work, two decode batches) at once; the
   throughput gain is N × (one runner's time) / (the wall time of N at once), with ``--runner-share K`` for
   runners whose unit holds K conditions a forward (the gain then projects only that K); and ``--share K`` conditions in
   each forward (``ablate --conditions-per-batch K``): the hooks of K one-unit removals attached at once, every
   multiple-choice row repeated K times, decoding at K times each generation benchmark's rows;
5. projects one condition (perplexity over ``--ppl-tokens`` tokens + MMLU 512 + ARC 299 + HellaSwag 512 questions +
   GSM8K 256 × 256 and HumanEval 164 × 512 new tokens, each benchmark one decode batch, decoded to the budget) and
   the whole set, with and without the measured runner gain.

Decoding to the budget is the worst case, and the measured one: the decode loop stops a batch once every row has
ended (end-of-sequence or stop string, checked every 16 steps), but rows of a random-weight model never end. A
trained model's GSM8K and HumanEval answers end well before 256 / 512 tokens, so real runs decode less.

Progress lines go to stdout as each measurement ends, and ``OUT/bench_ablation.json`` is rewritten after each, so a
run stopped by a time limit keeps what it measured.

Usage::

    python bench/bench_ablation.py --models qwen,falcon --out OUT      # GPU: both models, about 5 min
    python bench/bench_ablation.py --tiny --out /tmp/abl               # CPU check of the script
"""
from __future__ import annotations

import argparse
import warnings
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hybridlora.ablation.methods import Ablation, collect_means, model_units  # noqa: E402
from hybridlora.ablation.perplexity import plan_windows, strided_nll  # noqa: E402
from hybridlora.ablation.plans import Condition, mixer_units, reference_conditions  # noqa: E402

MODELS = {"qwen": "qwen3.5-0.8b", "falcon": "falcon-h1-0.5b"}
STUDY_MC = 512 + 299 + 512  # MMLU, ARC-Challenge, HellaSwag at the study's sizes
# MMLU's few-shot examples are per subject: its 512-question subset forms 52 shared-prefix groups (median 7
# questions) and 40 rows scored whole (the evaluator's grouping of the data folder's subset); ARC-Challenge and
# HellaSwag share one prefix across all their questions
STUDY_MMLU, MMLU_GROUP_ROWS = 512, 7
STUDY_GEN = {"gsm8k": (256, 256), "humaneval": (164, 512)}  # questions, new tokens
START = time.perf_counter()
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamings, once per runner process
# WikiText-2 test with a GPT-2-style BPE is 287,644 tokens (transformers' perplexity guide); the models' own
# tokenizers are not on this offline machine, so the projection uses this order of magnitude unless told.
PPL_TOKENS = 290_000


class _Tok:
    pad_token_id = 0
    eos_token = "</s>"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def ablation_of(model, mu):
    """The representative removal: every attention unit (every mixer of an attention-free model)."""
    attention = mu.of("softmax_attention") or mixer_units(mu)
    return Ablation(model, attention, "zero" if mu.topology == "parallel" else "skip", mu.layers_path)


def ppl_rate(model, args, batch: int | None = None) -> float:
    vocab = model.config.vocab_size
    n = args.window + args.stride * (args.windows - 1)
    ids = torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = plan_windows(len(ids), args.window, args.stride)
    batch = batch or args.ppl_batch
    strided_nll(model, ids, windows[:batch], batch_size=batch)  # warm-up at the measured shape
    sync(args.device)
    t = time.perf_counter()
    records = strided_nll(model, ids, windows, batch_size=batch)
    sync(args.device)
    return sum(r["tokens"] for r in records) / (time.perf_counter() - t)


def mc_seconds(model, args, questions: int | None = None, copies: int = 1) -> float:
    """Seconds per question (per condition and question with ``copies`` conditions sharing each forward: every
    row repeated, ``--mc-batch`` questions a forward)."""
    from hybridlora.evaluate.lm import CausalLM

    batch_size = args.mc_batch * copies
    lm = CausalLM(model, _Tok(), batch_size=batch_size, device=args.device, copies=copies)
    g = torch.Generator().manual_seed(1)
    shape = (questions or args.mc_questions, args.mc_len)
    rows = [r for r in torch.randint(1, model.config.vocab_size, shape, generator=g).tolist() for _ in range(copies)]
    with torch.inference_mode():
        lm._forward_positions(rows[:batch_size], [[len(r) - 1] for r in rows[:batch_size]])
        sync(args.device)
        t = time.perf_counter()
        for s in range(0, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            lm._forward_positions(batch, [[len(r) - 1] for r in batch])
        sync(args.device)
    return (time.perf_counter() - t) / len(rows)


def mc_seconds_prefix_reuse(model, args, group_rows: int | None = None,
                            copies: int = 1) -> tuple[float, str | None, int, int | None]:
    """Seconds per question with ``--prefix-reuse``: rows of ``--mc-len`` tokens whose first ``--mc-shared`` share
    is a few-shot block (the study's MC prompts: 86-96 %), the rest random; one block for every row (ARC-Challenge,
    HellaSwag), or with ``group_rows`` a different block for each ``group_rows`` rows (MMLU's per-subject shots: each
    group costs its own prefix forward and continuation forwards). Returns (s/question, why reuse was off or None,
    rows reused, the cut that passed: 1 = the whole shared prefix, N = cut to a multiple of N tokens). The
    evaluator's own check compares the first reused row with its whole-row score. ``copies``: conditions sharing
    each forward (every row repeated; the seconds are per condition and question)."""
    from hybridlora.evaluate.lm import CausalLM

    lm = CausalLM(model, _Tok(), batch_size=args.mc_batch * copies, device=args.device, prefix_reuse=True,
                  copies=copies)
    g = torch.Generator().manual_seed(1)
    shared = round(args.mc_len * args.mc_shared)
    n_blocks = -(-args.mc_questions // group_rows) if group_rows else 1
    blocks = [torch.randint(1, model.config.vocab_size, (round(shared * scale),), generator=g).tolist()
              for scale in block_scales(n_blocks)]
    tails = torch.randint(1, model.config.vocab_size, (args.mc_questions, args.mc_len - shared), generator=g)
    prepared = [(blocks[i * n_blocks // args.mc_questions] + t, [], [1, 2, 3, 4]) for i, t in enumerate(tails.tolist())
                for _ in range(copies)]
    # warm-up over every row: the check, and each chunk's shapes once (an ablation run scores the same rows for
    # every condition, so only its first condition meets them new)
    lm.score_choices(prepared)
    sync(args.device)
    t = time.perf_counter()
    lm.score_choices(prepared)
    sync(args.device)
    return ((time.perf_counter() - t) / len(prepared), lm.prefix_reuse_note, lm.prefix_reused_rows // copies,
            lm.prefix_reuse_align)


def block_scales(n: int) -> list[float]:
    """Relative lengths of ``n`` few-shot blocks, mean 1: one block as is; several spread evenly over 0.6-1.4 in a
    fixed shuffled order, as MMLU's per-subject shots differ (the data folder's 512-question subset: 56 subjects,
    prefixes of 718 / 1,275 / 1,626 / 2,205 / 11,617 characters at min / quartiles / max), so that grouping
    prefixes of similar length (``evaluate.prefix._next_chunk``) is measured with the cut it loses, not at one
    length shared by every group."""
    if n == 1:
        return [1.0]
    scales = [0.6 + 0.8 * i / (n - 1) for i in range(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    return [scales[i] for i in order]


def decode(model, args, batch: int, new: int, *, check: bool = True):
    """Greedy decoding of ``batch`` random prompts: the marginal seconds per decode step and the fixed seconds of a
    call (prefill, static cache, graph capture), from timed calls of ``new // 4`` and ``new`` steps
    (:func:`hybridlora.fast.decode.time_decode_step`) — one call divided by its steps would charge the prefill
    and the capture to every step. ``new`` is 256 by default: the fixed cost (about 0.5 s for the full-size
    models) varies by tens of milliseconds between calls, which over the 48 steps between calls of 16 and 64
    tokens moved the step by milliseconds (Falcon-H1's intact step read 23 ms on 2026-12-04, its ablated one
    13 ms, where bench_decode.py timed 8.8 ms over 252 steps). The graph-against-eager check decodes
    ``--check-new`` tokens both ways (an eager loop of 256 steps would cost more than the timing)."""
    from hybridlora.fast.decode import greedy_generate, time_decode_step

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, model.config.vocab_size, (batch, args.gen_len), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    graphs = args.device == "cuda"
    # every row decoded to the budget, as the projection assumes: a random-weight model may pick its end token.
    # Until 2026-12-04 the end ids were kept, and the intact Qwen3.5's step read 3.65 ms against 11.0 ms ablated;
    # whether its rows had ended early was not recorded (the timing now counts the steps decoded and says so)
    saved_eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.inference_mode():
            t = time_decode_step(model, ids, mask, new, graphs=graphs)
            result = t["result"]
            out = {"s_per_step": t["s_per_step"], "fixed_s": t["fixed_s"], "steps": t["steps"],
                   "timing": t["timing"], "path": result.graph, "tokens": result.tokens.cpu()}
            if check:
                n = min(new, args.check_new)
                replayed = greedy_generate(model, ids, mask, max_new_tokens=n, pad_token_id=0, graphs=graphs).tokens
                eager = greedy_generate(model, ids, mask, max_new_tokens=n, pad_token_id=0, graphs=False).tokens
                out["graph_equals_eager"] = bool(torch.equal(replayed.cpu(), eager.cpu()))
    finally:
        model.generation_config.eos_token_id = saved_eos
    return out


def rates(model, args, label: str, note) -> dict:
    out = {"ppl_tokens_per_s": ppl_rate(model, args)}
    note(f"{label}: perplexity {out['ppl_tokens_per_s'] / 1e3:.1f}k tokens/s (batch {args.ppl_batch})")
    out["mc_s_per_question"] = mc_seconds(model, args)
    note(f"{label}: multiple choice {out['mc_s_per_question'] * 1e3:.2f} ms/question (batch {args.mc_batch})")
    if args.mc_shared > 0:
        s_q, off, reused, align = mc_seconds_prefix_reuse(model, args)
        out.update(mc_s_per_question_prefix_reuse=s_q, prefix_reuse_off=off, prefix_reused_rows=reused,
                   prefix_reuse_cut_to_multiple_of=align)
        cut = "whole shared prefix" if align == 1 else f"prefix cut to a multiple of {align} tokens"
        note(f"{label}: multiple choice with --prefix-reuse {s_q * 1e3:.2f} ms/question ({args.mc_shared:.0%} of "
             f"each row shared; {off or f'{reused} rows on the cache, {cut}'})")
        s_g, off_g, reused_g, _ = mc_seconds_prefix_reuse(model, args, MMLU_GROUP_ROWS)
        out.update(mc_s_per_question_prefix_reuse_grouped=s_g, prefix_reuse_grouped_off=off_g)
        note(f"{label}: multiple choice with --prefix-reuse, a prefix per {MMLU_GROUP_ROWS} questions (MMLU's "
             f"subjects) {s_g * 1e3:.2f} ms/question ({off_g or f'{reused_g} rows on the cache'})")
    gen = decode(model, args, args.gen_batch, args.gen_new)
    out.update(gen_s_per_step=gen["s_per_step"], gen_fixed_s=gen["fixed_s"], gen_timing=gen["timing"],
               decode_path=gen["path"],
               graph_equals_eager=gen["graph_equals_eager"], _tokens=gen["tokens"])
    note(f"{label}: decode {gen['s_per_step'] * 1e3:.2f} ms/step + {gen['fixed_s']:.2f} s per call (prefill, "
         f"capture; batch {args.gen_batch}, {gen['path']}, equal to eager: {gen['graph_equals_eager']}; "
         f"{gen['timing']})")
    return out


def measure(model, mu, args, entry: dict, note) -> None:
    """Rates intact and ablated, the graph checks and the single-process levers, into ``entry["rates"]``."""
    out = entry.setdefault("rates", {})
    if not args.no_intact:
        out["intact"] = rates(model, args, "intact", note)
    with ablation_of(model, mu):
        out["ablated"] = rates(model, args, "ablated", note)
        ablated_tokens = out["ablated"].pop("_tokens")
        if not args.no_intact:
            out["ablated_decode_differs_from_intact"] = not torch.equal(out["intact"].pop("_tokens"), ablated_tokens)
        small = decode(model, args, args.small_gen_batch, args.gen_new, check=False)
        out["ablated"]["gen_s_per_step_small_batch"] = small["s_per_step"]
        out["ablated"]["gen_fixed_s_small_batch"] = small["fixed_s"]
        note(f"ablated: decode {small['s_per_step'] * 1e3:.2f} ms/step + {small['fixed_s']:.2f} s per call at batch "
             f"{args.small_gen_batch}")
        for rows in _benchmark_rows(args):  # HumanEval's 164 prompts: one batch of 164 rows
            at = decode(model, args, rows, args.gen_new, check=False)
            out["ablated"].setdefault("gen_at_rows", {})[rows] = {"s_per_step": at["s_per_step"],
                                                                  "fixed_s": at["fixed_s"]}
            note(f"ablated: decode {at['s_per_step'] * 1e3:.2f} ms/step + {at['fixed_s']:.2f} s per call at batch "
                 f"{rows} (a benchmark's own row count)")
        out["ablated"]["ppl_tokens_per_s_large_batch"] = ppl_rate(model, args, args.ppl_batch_large)
        note(f"ablated: perplexity {out['ablated']['ppl_tokens_per_s_large_batch'] / 1e3:.1f}k tokens/s at batch "
             f"{args.ppl_batch_large}")
    for k in args.share:
        measure_sharing(model, mu, args, k, out.setdefault("shared", {}).setdefault(k, {}), note)
    # mean ablation inside the decode graph: stored vectors (here from random tokens) replayed like zeros
    attention = mu.of("softmax_attention") or mixer_units(mu)
    rows = torch.randint(1, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3)).tolist()
    means = collect_means(model, attention, mu.layers_path, rows)
    with Ablation(model, attention, "mean", mu.layers_path, means=means):
        small = decode(model, args, min(8, args.gen_batch), min(16, args.gen_new))
    out["mean_ablation_decode"] = {"path": small["path"], "graph_equals_eager": small["graph_equals_eager"]}
    note(f"mean ablation: decode {small['path']}, equal to eager: {small['graph_equals_eager']}")


def sharing_conditions(mu, k: int) -> list[tuple[list, str]]:
    """``k`` different one-unit removals, as a group of ``ablate --conditions-per-batch k`` holds in a layer sweep."""
    pool = mixer_units(mu)
    return [([pool[i % len(pool)]], "zero" if pool[i % len(pool)].parallel else "skip") for i in range(k)]


def measure_sharing(model, mu, args, k: int, out: dict, note) -> None:
    """The rates per condition with ``k`` conditions in each forward (``ablate --conditions-per-batch k``): the
    hooks of ``k`` removals attached at once, every row repeated ``k`` times; multiple choice whole and with
    --prefix-reuse, and decoding at ``k`` times each benchmark's rows (the step time of the whole batch)."""
    from hybridlora.ablation.methods import SharedAblation

    with SharedAblation(model, sharing_conditions(mu, k), mu.layers_path):
        out["mc_s_per_question"] = mc_seconds(model, args, copies=k)
        note(f"{k} conditions a batch: multiple choice {out['mc_s_per_question'] * 1e3:.2f} ms per condition and "
             f"question")
        if args.mc_shared > 0:
            s_q, off, reused, _ = mc_seconds_prefix_reuse(model, args, copies=k)
            s_g, off_g, _, _ = mc_seconds_prefix_reuse(model, args, MMLU_GROUP_ROWS, copies=k)
            out.update(mc_s_per_question_prefix_reuse=s_q, prefix_reuse_off=off, prefix_reused_rows=reused,
                       mc_s_per_question_prefix_reuse_grouped=s_g, prefix_reuse_grouped_off=off_g)
            note(f"{k} conditions a batch: multiple choice with --prefix-reuse {s_q * 1e3:.2f} ms, a prefix per "
                 f"{MMLU_GROUP_ROWS} questions {s_g * 1e3:.2f} ms per condition and question ({off or off_g or 'on'})")
        for rows in sorted({min(q, args.gen_batch) for q, _ in STUDY_GEN.values()}):
            d = decode(model, args, rows * k, args.gen_new, check=False)
            out.setdefault("gen_at_rows", {})[rows] = {"s_per_step": d["s_per_step"], "fixed_s": d["fixed_s"]}
            note(f"{k} conditions a batch: decode {d['s_per_step'] * 1e3:.2f} ms/step + {d['fixed_s']:.2f} s per call "
                 f"at {rows * k} rows ({rows} per condition)")


def generation_s(step_s: float, batch: int, fixed_s: float = 0.0, at_rows: dict | None = None) -> float:
    """Seconds of one condition's generation: each benchmark's prompts in batches of ``batch``, each batch one call
    (``fixed_s``: prefill, cache, capture) decoded to the budget (random weights never stop). ``at_rows``:
    ``{rows: {"s_per_step", "fixed_s"}}`` measured at a benchmark's own row count (HumanEval's 164 prompts are one
    batch of 164 rows, whose step costs less than 256 rows': the recurrent states are most of a step)."""
    total = 0.0
    for questions, new in STUDY_GEN.values():
        rate = (at_rows or {}).get(min(questions, batch)) or {"s_per_step": step_s, "fixed_s": fixed_s}
        total += -(-questions // batch) * (rate["fixed_s"] + new * rate["s_per_step"])
    return total


def _benchmark_rows(args) -> list[int]:
    """Decode batch sizes the study's generation benchmarks run at, other than ``--gen-batch`` itself."""
    return sorted({min(q, args.gen_batch) for q, _ in STUDY_GEN.values()} - {args.gen_batch})


def project(rates: dict, conditions: list[Condition], args, gain: float = 1.0) -> dict:
    """Minutes for ``conditions`` at ``rates``; ``gain``: the runner-process gain, measured with
    ``args.runner_share`` conditions a batch, so applied to that projection only (1: the unshared ones)."""
    r = rates["ablated"]
    share_measured = getattr(args, "runner_share", 1)
    plain_gain, gain = (gain, 1.0) if share_measured == 1 else (1.0, gain)
    ppl = args.ppl_tokens / r["ppl_tokens_per_s"]
    mc = STUDY_MC * r["mc_s_per_question"]
    # decode steps cost about the same at batch 164-256 on the GPU (memory-bound): one batch per benchmark
    gen = generation_s(r["gen_s_per_step"], args.gen_batch, r.get("gen_fixed_s", 0.0), r.get("gen_at_rows"))
    per = ppl + mc + gen
    n_removals = len({c.removal for c in conditions}) + 1  # + intact
    # Lighter split: perplexity for every removal, benchmarks only for groups, progressive and the intact model
    benched = len({c.removal for c in conditions if c.plan in ("group", "progressive")}) + 1
    light = (n_removals * ppl + benched * (mc + gen)) / 60 / plain_gain
    total = n_removals * per / 60 / plain_gain
    mc_reuse = mc_with_prefix_reuse(r)
    extra = {} if mc_reuse is None else {"with_prefix_reuse_min": n_removals * (per - mc + mc_reuse) / 60 / plain_gain,
                                         "mc_with_prefix_reuse_s": mc_reuse}
    out = {**extra, "per_condition_s": {"perplexity": ppl, "mc": mc, "generation": gen, "total": per},
           "removals": n_removals, "runner_gain": plain_gain, "total_min": total,
           "perplexity_everywhere_benchmarks_on_groups_progressive_min": light, "benchmarked_removals": benched,
           "target_min": 20, "target_met": total <= 20, "decoded_to_budget": True}
    if "gen_s_per_step_small_batch" in r:
        out["generation_s_in_batches_of_small"] = generation_s(r["gen_s_per_step_small_batch"], args.small_gen_batch,
                                                               r.get("gen_fixed_s_small_batch", 0.0))
    if "ppl_tokens_per_s_large_batch" in r:
        out["perplexity_s_at_large_batch"] = args.ppl_tokens / r["ppl_tokens_per_s_large_batch"]
        # what `ablate` does on the GPU with every opt-in lever it names (--gen-batch-size 256, --batch-size 64 for
        # perplexity, --prefix-reuse where its check passed and it is faster) and the runner gain given
        # --prefix-reuse only where it pays: with MMLU's per-subject groups it can cost more forwards than it saves
        reuse_pays = extra.get("mc_with_prefix_reuse_s", mc) < mc
        levers = out["perplexity_s_at_large_batch"] + (extra["mc_with_prefix_reuse_s"] if reuse_pays else mc) + gen
        out["with_every_lever"] = {"per_condition_s": levers, "total_min": n_removals * levers / 60 / plain_gain,
                                   "prefix_reuse": reuse_pays}
        for k, shared in rates.get("shared", {}).items():
            # a runner gain counts only where it was measured with the same conditions a batch
            k_gain = gain if int(k) == share_measured else 1.0
            out.setdefault("with_every_lever_sharing", {})[k] = project_sharing(
                shared, int(k), out["perplexity_s_at_large_batch"], n_removals, args, k_gain)
    return out


def mc_with_prefix_reuse(r: dict) -> float | None:
    """Seconds of one condition's multiple choice with --prefix-reuse (None unless the cache path really ran): MMLU
    at the rate of its per-subject groups where measured, ARC-Challenge and HellaSwag at one prefix's."""
    if not r.get("prefix_reused_rows") or r.get("prefix_reuse_off"):
        return None
    grouped = r.get("mc_s_per_question_prefix_reuse_grouped", r["mc_s_per_question_prefix_reuse"])
    return (STUDY_MC - STUDY_MMLU) * r["mc_s_per_question_prefix_reuse"] + STUDY_MMLU * grouped


def project_sharing(shared: dict, k: int, perplexity_s: float, n_removals: int, args, gain: float = 1.0) -> dict:
    """Every lever with ``k`` conditions in each forward (``ablate --conditions-per-batch k``): perplexity at the
    large batch's rate (its forwards are full already; sharing leaves their cost per window), multiple choice at
    the shared rates (whole rows or --prefix-reuse, whichever is faster), generation at the step time of ``k``
    times each benchmark's rows, divided among the ``k`` conditions. The removals run in whole groups (the last
    filled with intact rows); ``gain``: the runner gain measured with ``k`` conditions a batch (1: none)."""
    mc_whole = STUDY_MC * shared["mc_s_per_question"]
    mc_reuse = mc_with_prefix_reuse(shared)
    mc = min(mc_whole, mc_reuse) if mc_reuse is not None else mc_whole
    at_rows = shared["gen_at_rows"]
    full = at_rows.get(args.gen_batch) or next(iter(at_rows.values()))
    gen = generation_s(full["s_per_step"], args.gen_batch, full["fixed_s"], at_rows) / k
    per = perplexity_s + mc + gen
    groups = -(-n_removals // k)
    return {"per_condition_s": {"perplexity": perplexity_s, "mc": mc, "generation": gen, "total": per},
            "prefix_reuse": mc_reuse is not None and mc_reuse < mc_whole, "groups": groups,
            "runner_gain": gain, "total_min": groups * k * per / 60 / gain}


# ------------------------------------------------------------------------------------------ several runners
def unit_work(args) -> dict:
    """One condition's work mix scaled by ``--unit-scale``: perplexity windows, MC questions, two decode batches."""
    scale = args.unit_scale
    batches = max(1, round(args.ppl_tokens / args.stride * scale / args.ppl_batch))  # whole batches: measured shapes
    return {"windows": batches * args.ppl_batch,
            "mc_questions": max(args.mc_batch, round(STUDY_MC * scale)),
            "decode": [(min(q, args.gen_batch), max(4, round(new * scale))) for q, new in STUDY_GEN.values()]}


def run_unit(model, args, work: dict, copies: int = 1) -> None:
    """The unit of work, each row ``copies`` times (conditions sharing each forward, as ``--runner-share``)."""
    from hybridlora.ablation.perplexity import strided_nll_copies
    from hybridlora.fast.decode import greedy_generate

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, vocab, (args.window + args.stride * work["windows"],), generator=g).tolist()
    windows = plan_windows(len(ids), args.window, args.stride)[:work["windows"]]
    # perplexity keeps about its unshared rows a forward, as ablate does (batch / K windows, each K times)
    strided_nll_copies(model, ids, windows, copies=copies, batch_size=max(1, args.ppl_batch // copies))
    mc_seconds(model, args, work["mc_questions"], copies=copies)
    model.generation_config.eos_token_id = None  # decoded to the budget, as in decode() (the runner's own model)
    for batch, new in work["decode"]:
        prompt = torch.randint(1, vocab, (batch, args.gen_len), generator=g).to(args.device)
        prompt = prompt.repeat_interleave(copies, 0)
        greedy_generate(model, prompt, torch.ones_like(prompt), max_new_tokens=new, pad_token_id=0,
                        graphs=args.device == "cuda")
    sync(args.device)


def runner_process(name: str, settings: dict, barrier, results) -> None:
    """One of N concurrent runners: build, ablate and warm up, wait for the others, run the unit, report."""
    args = argparse.Namespace(**settings)
    args.dtype = getattr(torch, args.dtype_name)
    # one share of the cores for every runner of every round (as ablate's runners share them), so that the rounds
    # differ only in how many run at once
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(args.workers)))
    if not args.tiny:
        from hybridlora import fast

        fast.use("fast")
    model, _, mu = build(name, args)
    work = unit_work(args)
    k = args.runner_share
    if k > 1:
        from hybridlora.ablation.methods import SharedAblation

        removal = SharedAblation(model, sharing_conditions(mu, k), mu.layers_path)
    else:
        removal = ablation_of(model, mu)
    with removal:
        run_unit(model, args, work, k)  # warm-up: kernels, graph capture paths, allocator
        barrier.wait()
        t = time.perf_counter()
        run_unit(model, args, work, k)
        results.put(time.perf_counter() - t)


def concurrent_wall(name: str, args, n: int) -> dict:
    """Wall time of ``n`` runner processes running the unit at once (after all warmed up)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(n + 1), context.Queue()
    settings = {k: v for k, v in vars(args).items() if k != "dtype"} | {"dtype_name": str(args.dtype).split(".")[-1]}
    procs = [context.Process(target=runner_process, args=(name, settings, barrier, results)) for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=args.runner_timeout)
        t = time.perf_counter()
        walls = [results.get(timeout=args.runner_timeout) for _ in range(n)]
        return {"wall_s": time.perf_counter() - t, "runner_s": walls}
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def measure_runners(name: str, args, entry: dict, conditions, note) -> None:
    out = entry.setdefault("runners", {"work": unit_work(args), "mps": mps_status()})
    for n in args.workers:
        try:
            out[str(n)] = concurrent_wall(name, args, n)
        except Exception as exc:  # noqa: BLE001 - a timed-out round keeps the rounds before it
            out[str(n)] = {"error": f"{type(exc).__name__}: {exc}"}
            note(f"{n} runners: {out[str(n)]['error']}")
            break
        one = out.get("1", {}).get("wall_s")
        if one:
            out[str(n)]["gain"] = n * one / out[str(n)]["wall_s"]
        note(f"{n} runner(s) at once: {out[str(n)]['wall_s']:.2f} s for {n} units" +
             (f", throughput gain {out[str(n)]['gain']:.2f}x" if one else ""))
    gains = [v["gain"] for v in out.values() if isinstance(v, dict) and "gain" in v]
    if gains and "rates" in entry:
        best = max(gains)
        entry["projection_with_runners"] = project(entry["rates"], conditions, args, gain=best)
        if args.runner_share == 1:
            note(f"projection with the best runner count (gain {best:.2f}x): "
                 f"{entry['projection_with_runners']['total_min']:.1f} min")
        if "with_every_lever" in entry["projection_with_runners"] and args.runner_share == 1:
            note(f"projection with every lever and the runner gain: "
                 f"{entry['projection_with_runners']['with_every_lever']['total_min']:.1f} min")
        shared = entry["projection_with_runners"].get("with_every_lever_sharing", {})
        k = next((key for key in shared if int(key) == args.runner_share), None)
        if k is not None:
            note(f"projection with every lever, {k} conditions a batch and the runner gain measured with them "
                 f"({best:.2f}x): {shared[k]['total_min']:.1f} min")


def mps_status() -> str:
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    return "on" if (pipe / "control").exists() else "off: kernels of different processes take turns on the GPU"


# ------------------------------------------------------------------------------------------ driver
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--no-intact", action="store_true", help="skip the intact model's rates (the projection reads "
                    "only the ablated ones; a short device call)")
    ap.add_argument("--reproject", metavar="JSON", help="no measurement: the rates of an earlier run's "
                    "bench_ablation.json projected over the current plan's conditions (CPU, meta-device counts)")
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU: checks the script, measures nothing")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--ppl-batch", type=int, default=4, help="windows a forward (ablate: --batch-size / 2)")
    ap.add_argument("--ppl-batch-large", type=int, default=32, help="ablate --batch-size 64")
    ap.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS)
    ap.add_argument("--mc-len", type=int, default=896)
    ap.add_argument("--mc-batch", type=int, default=64)
    ap.add_argument("--mc-questions", type=int, default=256)
    ap.add_argument("--mc-shared", type=float, default=0.9,
                    help="share of each MC row that is one few-shot block, for the --prefix-reuse rate (0 skips it)")
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--small-gen-batch", type=int, default=8)
    ap.add_argument("--share", default="2,4", help="conditions in each forward (ablate --conditions-per-batch), "
                    "measured in turn: multiple choice and decoding with that many removals' hooks and every row "
                    "repeated ('' skips)")
    ap.add_argument("--gen-new", type=int, default=256, help="new tokens of the longer timed decode call")
    ap.add_argument("--check-new", type=int, default=64, help="new tokens of the graph-against-eager check")
    ap.add_argument("--workers", default="1,2,4", help="runner processes at once, measured in turn ('' skips)")
    ap.add_argument("--unit-scale", type=float, default=0.125, help="share of one condition each runner does")
    ap.add_argument("--runner-share", type=int, default=1, help="conditions in each forward of the runners' unit "
                    "(ablate --workers-per-gpu N with --conditions-per-batch K); its gain then projects that K")
    ap.add_argument("--runner-timeout", type=float, default=240.0, help="seconds a round of runners may take")
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.share = [int(k) for k in args.share.split(",") if k.strip() and int(k) > 1]
    args.device = "cpu" if args.tiny else "cuda"
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.window, args.stride, args.windows, args.ppl_batch, args.ppl_batch_large = 128, 64, 4, 2, 4
        args.mc_len, args.mc_batch, args.mc_questions = 160, 4, 8  # 144 shared: enough for reuse
        args.gen_len, args.gen_batch, args.small_gen_batch, args.gen_new = 16, 4, 2, 8
        args.ppl_tokens, args.unit_scale = 2048, 0.01
    return args


def main() -> None:
    args = parse_args()
    if args.reproject:
        return reproject(Path(args.reproject), args)
    if not args.tiny:
        from hybridlora.study.backends.worker import use_node_kernel_caches

        use_node_kernel_caches()  # before the first kernel: the runner processes reuse what this one autotunes
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device; run with --tiny to check the script on CPU")
        from hybridlora import fast

        fast.use("fast")
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.device == "cuda"
               else "cpu (tiny: not a measurement)", "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    conditions = {}
    for name in names:  # single-process rates of every model first: the part a short run must not miss
        conditions[name] = measure_model(name, args, results)
    for name in names:
        if args.workers:
            measure_runners(name, args, results["models"][name], conditions[name], _noter(name, results, args))
    log("done")


def say_projection(pr: dict, args, say: Callable[[str], None]) -> None:
    """The lines of a :func:`project` result: bench defaults, --prefix-reuse, every lever, K conditions a batch."""
    per = pr["per_condition_s"]
    small = (f"; in batches of {args.small_gen_batch}: {pr['generation_s_in_batches_of_small']:.1f}"
             if "generation_s_in_batches_of_small" in pr else "")
    say(f"projection: {per['total']:.1f} s per condition (perplexity {per['perplexity']:.1f}, MC {per['mc']:.1f}, "
        f"generation {per['generation']:.1f}{small}) x {pr['removals']} removals = {pr['total_min']:.1f} min")
    if "with_prefix_reuse_min" in pr:
        say(f"projection with --prefix-reuse: MC {pr['mc_with_prefix_reuse_s']:.1f} s per condition, whole set "
            f"{pr['with_prefix_reuse_min']:.1f} min")
    if "with_every_lever" in pr:
        levers = pr["with_every_lever"]
        say(f"projection with every lever (perplexity at batch {args.ppl_batch_large}"
            f"{', --prefix-reuse' if levers['prefix_reuse'] else ''}): {levers['per_condition_s']:.1f} s per "
            f"condition, whole set {levers['total_min']:.1f} min (runner gain not included)")
    for k, shared in pr.get("with_every_lever_sharing", {}).items():
        c = shared["per_condition_s"]
        say(f"projection with every lever and {k} conditions a batch: {c['total']:.1f} s per condition (perplexity "
            f"{c['perplexity']:.1f}, MC {c['mc']:.1f}{' with reuse' if shared['prefix_reuse'] else ''}, generation "
            f"{c['generation']:.1f}), whole set {shared['total_min']:.1f} min in {shared['groups']} groups (runner "
            f"gain {'x%.2f' % shared['runner_gain'] if shared.get('runner_gain', 1) != 1 else 'not included'})")


def reproject(path: Path, args) -> None:
    """Project the rates measured by an earlier run (``path``: its bench_ablation.json) over the conditions the
    current ``plans.reference_conditions`` builds on the full-size architecture (meta device: counts only). The
    measured rates are not touched; only the count of removals can differ from the run's."""
    from hybridlora.components import build_component_map
    from hybridlora.models import build_meta_model, resolve_model

    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: --reproject {path}: {exc}; give a bench_ablation.json written by this bench")
    saved = argparse.Namespace(**{**vars(args), **{k: _number(v) for k, v in earlier["args"].items()}})
    log(f"rates measured {earlier['date']} on {earlier['device']} ({path}); counts of the current plan")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        entry = earlier["models"].get(name)
        if not entry or "rates" not in entry:
            log(f"{name}: no rates in {path}; skipped")
            continue
        mu = model_units(build_component_map(build_meta_model(resolve_model(MODELS[name]).config)))
        conditions = reference_conditions(mu, trials=5, seed=0)
        pr = project(_int_keys(entry["rates"]), conditions, saved)
        log(f"{name}: {len(conditions)} reference conditions, {pr['removals']} removals (the run counted "
            f"{entry.get('conditions')} conditions)")
        say_projection(pr, saved, lambda message: log(f"{name}: {message}"))


def _int_keys(value):
    """JSON's string keys back to the row counts they were (``gen_at_rows``: {rows: rate}); shares stay text."""
    if isinstance(value, dict):
        return {int(k) if k.isdigit() and isinstance(v, dict) and "s_per_step" in v else k: _int_keys(v)
                for k, v in value.items()}
    return value


def _number(text: str):
    """A saved argument back to the number it was (the results file stores arguments as text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def measure_model(name: str, args, results: dict) -> list[Condition]:
    note = _noter(name, results, args)
    model, cmap, mu = build(name, args)
    entry = results["models"].setdefault(name, {"model": MODELS[name], "units": len(mu.units)})
    if args.device == "cuda":
        from hybridlora import fast

        fast.warn_missing_kernels(model)
        results.setdefault("kernels", {})[name] = fast.describe(model)
    conditions = reference_conditions(mu, trials=5, seed=0)  # what `ablate --plan reference` runs
    entry["conditions"] = len(conditions)
    note(f"built {MODELS[name]}: {len(mu.units)} units, {len(conditions)} reference conditions")
    measure(model, mu, args, entry, note)
    entry["projection"] = project(entry["rates"], conditions, args)
    say_projection(entry["projection"], args, note)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return conditions


def _noter(name: str, results: dict, args):
    """Log a line and rewrite the results file (partial results survive a time limit)."""
    def note(message: str) -> None:
        log(f"{name}: {message}")
        if args.out:
            out = Path(args.out) / "bench_ablation.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
            os.replace(tmp, out)
    return note


if __name__ == "__main__":
    main()
