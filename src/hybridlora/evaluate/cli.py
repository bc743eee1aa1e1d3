"""``hybridlora eval``: the study's benchmarks on a model (+ optional LoRA adapter).

Wire in with ``from hybridlora.evaluate.cli import register; register(subparsers)``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_BENCHMARKS = "mmlu,arc_challenge,hellaswag,gsm8k,humaneval"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model on the study's benchmarks",
        description="Few-shot MMLU/ARC-Challenge/HellaSwag (letter log-probs), GSM8K and HumanEval (greedy). "
                    "Writes <output>/<benchmark>.jsonl, <benchmark>.summary.json and summary.json.")
    p.add_argument("model", metavar="MODEL", help="catalog name, hub id or local model directory")
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter directory to load on top of MODEL")
    p.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, help=f"comma list (default {DEFAULT_BENCHMARKS})")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items of each fixed subset")
    p.add_argument("--data-dir", metavar="DIR", help="local data laid out like shared/data (else $HYBRIDLORA_DATA, "
                                                    "else the Hugging Face hub)")
    p.add_argument("--output", metavar="DIR", default="eval_results", help="results folder (default eval_results)")
    p.add_argument("--tiny", action="store_true", help="a random tiny model of MODEL's family with a byte tokenizer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="context limit in tokens (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, help="override the generation budget of GSM8K/HumanEval")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", help="torch device (default: the model's, i.e. cpu)")
    p.add_argument("--perplexity-text", metavar="FILE",
                   help="also report mean token log-likelihood / perplexity of this held-out text file "
                        "(documents separated by blank lines)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="execute HumanEval completions (in the sandbox); without it HumanEval pass@1 is 'not run'")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from hybridlora.cli import CliError

    from .data import BenchmarkError
    from .lm import load_lm
    from .runner import evaluate, parse_benchmarks, perplexity

    try:
        names = parse_benchmarks(args.benchmarks)
        if args.limit is not None and args.limit < 0:
            raise BenchmarkError("--limit must be >= 0")
        texts = None
        if args.perplexity_text:
            path = Path(args.perplexity_text)
            if not path.is_file():
                raise BenchmarkError(f"--perplexity-text {path}: no such file")
            texts = [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
        if args.adapter and not Path(args.adapter, "adapter_config.json").is_file():
            raise BenchmarkError(f"--adapter {args.adapter}: no adapter_config.json there")
        import torch

        lm = load_lm(args.model, adapter=args.adapter, tiny=args.tiny, device=args.device, dtype=getattr(torch, args.dtype),
                     batch_size=args.batch_size, max_length=args.max_length)
        results = evaluate(lm, names, output_dir=args.output, data_dir=args.data_dir, limit=args.limit,
                           max_new_tokens=args.max_new_tokens, allow_code_execution=args.confirm_run_unsafe_code,
                           progress=not args.no_progress)
        if texts is not None:
            ppl = perplexity(lm, texts, output_dir=args.output)
    except BenchmarkError as exc:
        raise CliError(str(exc)) from exc
    width = max(len(n) for n in results)
    for name, summary in results.items():
        acc = summary["accuracy"]
        shown = f"{acc:.4f}" if isinstance(acc, float) else str(acc)
        print(f"{name:<{width}}  {summary['metric']:<8}  {shown:<8}  n={summary['n']}  "
              f"{summary['examples_per_s'] or 0:.2f} ex/s")
    if texts is not None:
        print(f"perplexity {ppl['perplexity']:.3f}  (mean token log-prob {ppl['mean_token_logprob']:.4f}, "
              f"{ppl['tokens']} tokens)")
    print(f"results in {args.output}", file=sys.stderr)
    return 0
