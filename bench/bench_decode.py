"""Greedy generation on the GPU: transformers' generate vs the static-cache loop, eager and as a CUDA graph.

For each full-size model (random weights, bf16) and each evaluation shape of the study — GSM8K (batch 256,
256 new tokens) and HumanEval (batch 164, 512 new tokens) — it prints seconds per decode step for the three
paths of ``CausalLM.generate_until`` (``decode="hf"``, the static loop without graphs, and with graphs), the
time of one batch's prefill + warm-up + capture, peak memory, and token agreement: graph vs eager static loop
(same kernels: expected identical) and static vs transformers (random weights give near-uniform logits whose
argmax flips with bf16 rounding differences, so agreement there is reported, not asserted). Where a variant of
the graph path (the opt-in one-token convolution, or the layers compiled by Inductor) parts from the graph path's
tokens, the earliest parting is checked for a near tie.

Usage (GPU machine, fla-core / mamba-ssm wheels on PYTHONPATH)::

    python bench/bench_decode.py --out OUT [--models qwen,falcon] [--new 64]
    python bench/bench_decode.py --out OUT --paths graph,graph_conv   # fla's one-token convolution, side by side
    python bench/bench_decode.py --out OUT --paths graph,graph_compiled --models falcon  # Inductor-compiled layers
    python bench/bench_decode.py --out OUT --paths graph,graph_state_in_place --models qwen  # GDN state in place
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HYBRIDLORA_LIFT_FLA_HOPPER_GUARD", "1")

import bench_train_loop as btl  # noqa: E402
from hybridlora import fast  # noqa: E402
from hybridlora.fast.decode import greedy_generate  # noqa: E402

SHAPES = {"gsm8k": (256, 256, 256), "humaneval": (164, 384, 512)}  # batch, longest prompt, new tokens


def prompts(batch: int, longest: int, vocab: int, seed: int = 0,
            device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts, lengths spread over [longest/2, longest] like a sorted evaluation batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, longest), generator=g)
    lengths = torch.randint(longest // 2, longest + 1, (batch,), generator=g)
    lengths[0] = longest
    mask = (torch.arange(longest)[None, :] >= (longest - lengths)[:, None]).long()
    return (ids * mask).to(device), mask.to(device)


def run(model, ids, mask, new: int, path: str) -> tuple[torch.Tensor, float, str]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        if path == "hf":
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                 pad_token_id=0, temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
            how = "transformers generate"
        else:
            res = greedy_generate(model, ids, mask, max_new_tokens=new, pad_token_id=0, graphs=path == "graph")
            out, how = res.tokens, res.graph
    torch.cuda.synchronize()
    return out.cpu(), time.perf_counter() - t, how


def step_seconds(model, ids, mask, new: int, path: str) -> dict:
    """Seconds per decode step: a run of ``new`` tokens minus a run of 4 (prefill, capture and setup cancel);
    and the 4-token run itself (prefill + setup; for graphs two eager warm-up steps and the capture)."""
    tokens, _, how = run(model, ids, mask, new, path)  # warm-up: Triton autotuning, allocator growth
    # the 4-token call has its own cache length, whose first call pays one-time costs (attention plans): warm it
    # too, or they land in `short` and the step reads too cheap (4.24 ms for Qwen3.5 on 2026-12-03, really 10-11)
    run(model, ids, mask, 4, path)
    short = run(model, ids, mask, 4, path)[1]
    long = run(model, ids, mask, new, path)[1]
    return {"s_per_step": (long - short) / (new - 4), "setup_s": short, "how": how, "tokens": tokens}


def _graph_with_opt_in(variable: str, model, ids, mask, new: int, record: tuple[str, str]) -> dict:
    """The graph path with the environment ``variable`` set to 1 and the kernels bound again; ``record``:
    (result key, suffix of the bound attributes whose bindings it lists). The binding is put back afterwards."""
    before = os.environ.get(variable)
    os.environ[variable] = "1"
    try:
        bound = fast.use("fast")
        result = step_seconds(model, ids, mask, new, "graph")
        key, suffix = record
        result[key] = sorted({v for k, v in bound.items() if k.endswith(suffix)})
        return result
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before
        fast.use("fast")


def _with_conv_update(model, ids, mask, new: int) -> dict:
    """The graph path with fla's one-token convolution bound (the opt-in $HYBRIDLORA_FLA_CONV_UPDATE=1) instead of
    transformers' PyTorch fallback."""
    from hybridlora.fast.kernels import CONV_UPDATE_ENV

    return _graph_with_opt_in(CONV_UPDATE_ENV, model, ids, mask, new, ("conv_update", "causal_conv1d_update"))


def _with_compiled_layers(model, ids, mask, new: int) -> dict:
    """The graph path with every decoder layer compiled by Inductor (``fast.compile``'s ``layers`` scope, as
    ``train --compile layers`` does; the bound kernels stay opaque): Falcon-H1's decode step is hundreds of small
    element-wise kernels around its Mamba-2 state update, which Inductor can fuse. Static shapes: the prefill and
    the step each compile once per batch shape, and that compilation lands in ``setup_s`` and the warm-up run,
    not in the step. The model is put back uncompiled afterwards."""
    from hybridlora.fast.compile import compile_regions, uncompile

    line = compile_regions(model, "layers", dynamic=False)
    try:
        result = step_seconds(model, ids, mask, new, "graph")
        result["compile"] = line
        return result
    finally:
        uncompile(model)


def _with_state_in_place(model, ids, mask, new: int) -> dict:
    """The graph path with the Gated DeltaNet decode state written in place ($HYBRIDLORA_GDN_STATE_IN_PLACE=1, the
    default since 2026-12-05), against "graph" run with the variable at 0 (``main`` sets it for this comparison):
    fla's recurrent call returning a new final state that the cache copies into its buffer. Same kernel, so the
    same tokens; the difference is the copy."""
    from hybridlora.fast.kernels import STATE_IN_PLACE_ENV

    return _graph_with_opt_in(STATE_IN_PLACE_ENV, model, ids, mask, new,
                              ("recurrent_step", "recurrent_gated_delta_rule"))


# each set against "graph"
VARIANTS = {"graph_conv": _with_conv_update, "graph_compiled": _with_compiled_layers,
            "graph_state_in_place": _with_state_in_place}


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n] == b[:, :n])
    first_diff = [int((~row).nonzero()[0]) if (~row).any() else n for row in same]
    return {"identical": bool(torch.equal(a, b)), "token_agreement": round(float(same.float().mean()), 4),
            "median_first_difference": sorted(first_diff)[len(first_diff) // 2]}


def first_difference_margin(model, ids: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict | None:
    """Two greedy runs of the same prompts that disagree: at the earliest step where a row's tokens part, were the
    two tokens a near tie? The row's prompt and the tokens both runs share are run through one full forward (a
    third path, no cache), and the logit gap between the two tokens there is set against bf16's spacing at that
    logit: within a few spacings, rounding differences between the paths can flip the argmax. None: no difference."""
    n = min(a.shape[1], b.shape[1])
    differ = a[:, :n] != b[:, :n]
    if not differ.any():
        return None
    first = [int(row.nonzero()[0]) if row.any() else n for row in differ]
    r = min(range(len(first)), key=first.__getitem__)
    step = first[r]
    prompt = ids[r][mask[r].bool()].cpu()
    prefix = torch.cat([prompt, a[r, :step].cpu()]).to(ids.device)
    with torch.inference_mode():
        logits = model(input_ids=prefix[None]).logits[0, -1].float().cpu()
    ta, tb = int(a[r, step]), int(b[r, step])
    top2 = logits.topk(2).values
    a_minus_b = float(logits[ta] - logits[tb])
    spacing = 2.0 ** (torch.floor(torch.log2(logits[ta].abs().clamp_min(1e-30))).item() - 7)  # bf16: 8-bit mantissa
    tie = abs(a_minus_b) <= 4 * spacing
    return {"row": r, "step": step, "token_a": ta, "token_b": tb, "top2_gap": float(top2[0] - top2[1]),
            "logit_a_minus_b": a_minus_b, "bf16_spacing_at_a": spacing,
            "verdict": "near tie: the two tokens' logits are within 4 bf16 spacings" if tie
            else "NOT a tie: the two tokens' logits differ by more than 4 bf16 spacings (look for a wrong path)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--shapes", default="gsm8k,humaneval")
    ap.add_argument("--new", type=int, default=0, help="new tokens per timing (default: the benchmark's own)")
    ap.add_argument("--paths", default="hf,eager,graph",
                    help="comma list of hf, eager, graph, graph_conv (graph with fla's one-token convolution), "
                    "graph_compiled (graph with the decoder layers compiled by Inductor), graph_state_in_place "
                    "(graph with the Gated DeltaNet decode state written in place)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    if "graph_state_in_place" in args.paths.split(","):
        from hybridlora.fast.kernels import STATE_IN_PLACE_ENV

        os.environ[STATE_IN_PLACE_ENV] = "0"  # the other paths with the state copied, as before 2026-12-05
    fast.use("fast")
    for name in args.models.split(","):
        model, _ = btl.build(name)
        model.eval()
        model.generation_config.eos_token_id = None  # timings run every row to the end
        res = results.setdefault(name, {"kernels": fast.describe(model)})
        for shape in args.shapes.split(","):
            batch, longest, new = SHAPES[shape]
            new = args.new or new
            ids, mask = prompts(batch, longest, model.config.vocab_size)
            row: dict = {"batch": batch, "longest_prompt": longest, "new_tokens": new}
            tokens = {}
            for path in args.paths.split(","):
                torch.cuda.reset_peak_memory_stats()
                try:
                    r = VARIANTS[path](model, ids, mask, new) if path in VARIANTS else \
                        step_seconds(model, ids, mask, new, path)
                except Exception as exc:  # recorded, the other paths still run
                    row[path] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    torch.cuda.empty_cache()
                    continue
                tokens[path] = r.pop("tokens")
                r["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
                r["s_per_step"] = round(r["s_per_step"], 5)
                r["setup_s"] = round(r["setup_s"], 3)
                row[path] = r
                btl.log(name, shape, path, json.dumps(r))
            if "graph" in tokens and "eager" in tokens:
                row["graph_vs_eager"] = agreement(tokens["graph"], tokens["eager"])
            for variant in VARIANTS:
                if "graph" not in tokens or variant not in tokens:
                    continue
                row[f"{variant}_vs_graph"] = agreement(tokens[variant], tokens["graph"])
                row[f"{variant}_vs_graph"]["first_difference_margin"] = first_difference_margin(
                    model, ids, mask, tokens["graph"], tokens[variant])
                if "s_per_step" in row.get("graph", {}) and "s_per_step" in row.get(variant, {}):
                    row[f"{variant}_speedup"] = round(row["graph"]["s_per_step"] / row[variant]["s_per_step"], 2)
            if "hf" in tokens:
                for path in ("eager", "graph"):
                    if path in tokens:
                        row[f"{path}_vs_hf"] = agreement(tokens[path], tokens["hf"])
            for path in ("eager", "graph"):
                if "s_per_step" in row.get(path, {}) and "s_per_step" in row.get("hf", {}):
                    row[f"{path}_speedup_vs_hf"] = round(row["hf"]["s_per_step"] / row[path]["s_per_step"], 2)
            res[shape] = row
            btl.log(name, shape, json.dumps({k: v for k, v in row.items() if k not in ("hf", "eager", "graph")}))
            (args.out / "bench_decode.json").write_text(json.dumps(results, indent=1))
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
