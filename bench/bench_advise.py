"""How long ``hybridlora advise`` takes on the full-size models (random weights, GPU), per signal.

Target (issue 21): advising Qwen3.5-0.8B and Falcon-H1-0.5B takes ≤ 2 minutes each. Each model is built at
full size with random bf16 weights directly on the GPU; the signals are measured on ``--examples`` examples of
the generated demo data (or ``--data-dir``) tokenized with the offline byte tokenizer and cut at ``--max-length``
tokens, exactly as ``hybridlora advise`` does, and the budget (every eligible host at rank 16) is allocated.
The wall time reported per signal covers data, signal and allocation (model construction is reported apart,
since ``advise`` on real weights loads a checkpoint instead).

Usage::

    python bench/bench_advise.py                     # GPU, full size, both models, grad and probe signals
    python bench/bench_advise.py --tiny              # CPU check of the same code path on tiny configs
    python bench/bench_advise.py --out results.json  # also write the figures as JSON

Each timed call is preceded by a short warm-up call on a fresh copy of the model (``--no-warmup`` times the
cold call instead); the warm-up's wall time is printed and recorded as ``warmup_s``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HYBRIDLORA_LIFT_FLA_HOPPER_GUARD", "1")  # the opt-in of docs/PERFORMANCE.md

MODELS = ("qwen3.5-0.8b", "falcon-h1-0.5b")
TARGET_S = 120.0


def build(name: str, tiny: bool):
    from hybridlora.families import family_for
    from hybridlora.models import build_model, resolve_model, text_config, tiny_config

    config = text_config(resolve_model(name).config)
    if tiny:
        return build_model(tiny_config(config, family_for(config.model_type)), seed=0)
    with torch.device("cuda"):
        return build_model(config, seed=0, dtype=torch.bfloat16)


def advise_once(model, data_dir: str, signal: str, examples: int, max_length: int, seed: int) -> dict:
    from hybridlora.components import build_component_map
    from hybridlora.advise.propose import advice_examples, budget_of_rank, propose
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    cmap = build_component_map(model)
    tokenizer = byte_tokenizer()
    tr, held_out, _ = advice_examples("gsm8k", tokenizer, data_dir=data_dir, examples=examples, seed=seed,
                                      max_length=max_length)
    proposal = propose(model, cmap, tr, held_out, tokenizer.pad_token_id or 0, budget_of_rank(cmap, 16),
                       signal=signal, seed=seed)
    sync()
    wall = time.perf_counter() - start
    d = proposal.to_dict()
    return {"signal": signal, "wall_s": round(wall, 2), "signal_wall_s": d["measured_on"]["signal_wall_s"],
            "examples": d["measured_on"]["examples"], "tokens": d["measured_on"]["tokens"],
            "hosts_measured": len(proposal.signal.gains), "budget": d["budget"],
            "component_share": d["component_share"], "kernels": d["measured_on"].get("kernels"),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "fingerprint": d["fingerprint"], "within_target": wall <= TARGET_S}


def warm_up(model, data_dir: str, signal: str, args) -> float:
    """One short advise call first, so the timed one excludes Triton's autotuning and compilation (a one-time
    cost per machine and kernel shape, kept in Triton's on-disk cache); returns its wall time, printed."""
    start = time.perf_counter()
    advise_once(model, data_dir, signal, min(16, args.examples), args.max_length, args.seed)
    wall = round(time.perf_counter() - start, 2)
    print(f"  warm-up ({signal}, 16 examples): {wall:.1f} s", flush=True)
    return wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (checks the code path)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--signals", default="grad,probe")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--data-dir", help="shared/data layout; default: the generated demo data")
    parser.add_argument("--out", help="write the results as JSON here (rewritten after every run)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time the first call too (it includes Triton's one-time autotuning on a fresh machine)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny on the CPU", file=sys.stderr)
        return 2
    from hybridlora.study.demo_data import write_demo_data

    tmp = tempfile.TemporaryDirectory(prefix="bench-advise-")
    data_dir = args.data_dir or str(Path(tmp.name) / "data")
    if not args.data_dir:
        write_demo_data(data_dir)
    device = "CPU (tiny configs)" if args.tiny else torch.cuda.get_device_name(0)
    results = {"device": device, "torch": torch.__version__, "examples": args.examples,
               "max_length": args.max_length, "target_s": TARGET_S, "runs": []}
    for name in args.models.split(","):
        for signal in args.signals.split(","):
            t = time.perf_counter()
            model = build(name, args.tiny)  # fresh weights per signal: the probe trains adapters on the model
            built = time.perf_counter() - t
            warmup = None if args.no_warmup else warm_up(model, data_dir, signal, args)
            if warmup is not None:
                del model  # the warm-up trained adapters on it
                model = build(name, args.tiny)
            row = {"model": name, "build_s": round(built, 2), "warmup_s": warmup,
                   **advise_once(model, data_dir, signal, args.examples, args.max_length, args.seed)}
            results["runs"].append(row)
            print(f"{name:<16} {signal:<6} {row['wall_s']:7.1f} s (signal {row['signal_wall_s']:.1f} s; build "
                  f"{built:.1f} s) on {row['examples']} examples / {row['tokens']:,} tokens, {row['hosts_measured']} "
                  f"hosts; budget {row['budget']['requested']:,} -> {row['budget']['achieved']:,}; "
                  f"{'within' if row['within_target'] else 'OVER'} the {TARGET_S:.0f} s target", flush=True)
            if args.out:  # a time-limited run still leaves every finished row
                Path(args.out).write_text(json.dumps(results, indent=2))
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
