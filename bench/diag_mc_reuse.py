"""Where does a multiple-choice batch scored on a copied prefix cache spend its time? (issue 17)

On the H200 (2026-12-04) `--prefix-reuse` scored Falcon-H1-0.5B's questions at 2.81 ms each against 4.35 ms for
whole rows, and Qwen3.5-0.8B's at 1.97 against 3.04 ms, although only a tenth of each row is computed on the
cache: at the whole rows' throughput a reused question would take about 0.4 ms. This times the parts of one
batch of ``--batch`` questions (``--len`` tokens, ``--shared`` of them one prefix), each between device
synchronisations and averaged over ``--repeats``: the prefix's forward, copying its cache to the batch
(``prefix.batch_cache``), the continuation's forward with the log-probs read (``prefix.logprobs_at``; and, beside
it, with the head and the softmax at every continuation token, as before 2026-12-04), and the scores' host reads;
the same batch scored whole for comparison; then a profile of one reused batch as a kernel table sorted by device
time and one sorted by host time (``OUT/mc_reuse_profile_MODEL.txt``). The model is the bench's full-size
random-weight architecture with every attention unit removed, as an ablation condition runs.

    python bench/diag_mc_reuse.py --models qwen,falcon --out OUT      # GPU, full-size architectures, bf16
    python bench/diag_mc_reuse.py --tiny --models qwen               # CPU check of the script
    python bench/diag_mc_reuse.py --device cpu --models qwen --batch 2 --len 448 --repeats 1   # full size, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_ablation  # noqa: E402  (its builder, tokenizer stand-in and representative removal)
from hybridlora.evaluate import prefix  # noqa: E402
from hybridlora.fast.decode import cache_argument  # noqa: E402


def rows_sharing_a_prefix(vocab: int, batch: int, length: int, shared: float) -> tuple[list[list[int]], int]:
    """``batch`` random rows of ``length`` tokens whose first ``round(length * shared)`` are one block."""
    g = torch.Generator().manual_seed(1)
    cut = round(length * shared)
    block = torch.randint(1, vocab, (cut,), generator=g).tolist()
    tails = torch.randint(1, vocab, (batch, length - cut), generator=g).tolist()
    return [block + t for t in tails], cut


def timed(device: str, fn, repeats: int) -> tuple[float, object]:
    """Mean seconds of ``fn()`` between device synchronisations (after one untimed call), and its last result."""
    result = fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    sync()
    return (time.perf_counter() - start) / repeats, result


def phases(model, rows: list[list[int]], cut: int, device: str, repeats: int) -> dict[str, float]:
    """Seconds of each part of one reused batch, and of the same rows scored whole."""
    positions = [[len(r) - 1] for r in rows]  # the letter's position, as a study row with one shared token
    out = {}
    out["prefix forward (once per group)"], cache = timed(
        device, lambda: prefix.run_prefix(model, rows[0][:cut], device), repeats)
    out["copy the cache to the batch"], batched = timed(
        device, lambda: prefix.batch_cache(cache, len(rows)), repeats)
    ids = torch.tensor([r[cut:] for r in rows], device=device)
    mask = torch.ones((len(rows), len(rows[0])), dtype=torch.long, device=device)

    def continuation():  # a fresh copy each time: the forward moves the cache on
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": True,
                  cache_argument(model): prefix.batch_cache(cache, len(rows))}
        return prefix.logprobs_at(model, inputs, [[p - cut for p in ps] for ps in positions])

    out["copy + continuation forward + log-probs"], logps = timed(device, continuation, repeats)
    out["continuation alone (the two above, subtracted)"] = (out["copy + continuation forward + log-probs"]
                                                            - out["copy the cache to the batch"])

    def every_position():  # how the continuation ran before 2026-12-04: the head and softmax at every token
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": True,
                  cache_argument(model): prefix.batch_cache(cache, len(rows))}
        logp = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
        return [logp[i, [p - cut for p in ps]] for i, ps in enumerate(positions)]

    out["copy + continuation, head at every position"], _ = timed(device, every_position, repeats)
    letters = torch.tensor([1, 2, 3, 4], device=logps[0].device)  # what the evaluator reads of each row
    out["host reads of the scores (one per row)"], _ = timed(
        device, lambda: [lp[-1, letters].tolist() for lp in logps], repeats)
    whole_ids = torch.tensor(rows, device=device)
    out["the same rows scored whole"], _ = timed(
        device, lambda: prefix.logprobs_at(model, {"input_ids": whole_ids, "attention_mask": mask}, positions),
        repeats)
    del batched
    return out


def profile_tables(model, rows: list[list[int]], device: str) -> str:
    """Kernel tables of one reused batch scored by the evaluator (``CausalLM.score_choices``)."""
    from hybridlora.evaluate.lm import CausalLM

    lm = CausalLM(model, bench_ablation._Tok(), batch_size=len(rows), device=device, prefix_reuse=True)
    prepared = [(r, [], [1, 2, 3, 4]) for r in rows]
    lm.score_choices(prepared)  # warm-up and the evaluator's own check
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        lm.score_choices(prepared)
        if device == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    tables = []
    for key in (["self_cuda_time_total"] if device == "cuda" else []) + ["self_cpu_time_total", "cpu_time_total"]:
        tables.append(f"-- sorted by {key} --\n" + averages.table(sort_by=key, row_limit=25, max_name_column_width=70))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--batch", type=int, default=64, help="questions a forward (bench_ablation's --mc-batch)")
    ap.add_argument("--len", type=int, default=896, help="tokens per row (bench_ablation's --mc-len)")
    ap.add_argument("--shared", type=float, default=0.9, help="share of each row that is the one prefix")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu: the full-size architectures on the CPU "
                    "(slow; for side-by-side ratios, with a small --batch and --len)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else (args.device or "cuda")
    if args.tiny:
        args.batch, args.len, args.repeats = 4, 160, 2
    elif device == "cuda":
        from hybridlora import fast

        fast.use("fast")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    settings = SimpleNamespace(tiny=args.tiny, device=device, dtype=dtype)
    results = {}
    for name in args.models.split(","):
        model, _, mu = bench_ablation.build(name, settings)
        rows, cut = rows_sharing_a_prefix(model.config.vocab_size, args.batch, args.len, args.shared)
        with torch.inference_mode(), bench_ablation.ablation_of(model, mu):
            results[name] = phases(model, rows, cut, device, args.repeats)
            for part, seconds in results[name].items():
                per_question = seconds * 1e3 / args.batch
                print(f"{name:>7} {part:<48} {seconds * 1e3:9.2f} ms  ({per_question:.3f} ms/question)", flush=True)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                path = Path(args.out) / f"mc_reuse_profile_{name}.txt"
                head = (f"== {name}: one reused batch of {args.batch} questions ({args.len} tokens, {cut} shared), "
                        "every attention unit removed ==\n")
                path.write_text(head + profile_tables(model, rows, device))
                print(f"{name:>7} kernel tables: {path}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        (Path(args.out) / "mc_reuse.json").write_text(json.dumps(
            {"args": vars(args), "seconds_per_batch": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
