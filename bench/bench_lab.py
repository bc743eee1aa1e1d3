"""Efficiency of a lab spec's matched architectures: training tokens/s, MFU and memory; prefill and decode
against sequence length (hybridlora.lab.efficiency).

Every variant of the spec is built (sequential, parallel, all-attention, all-recurrent; matched to the spec's
parameter target), randomly initialised (seed 0), run in bf16 on CUDA with the fast kernels bound. Writes
``OUT/efficiency.json`` (read by ``hybridlora lab report``) and prints one table.

GPU (the issue's target: ~120M matched pair at >= 35% MFU of 790 TFLOP/s, batch 16 x 2,048)::

    python bench/bench_lab.py --spec gpu-120m-gdn --out bench/results/lab-gdn
    python bench/bench_lab.py --spec gpu-120m-mamba2 --out bench/results/lab-mamba2
    python bench/bench_lab.py --spec gpu-120m-gdn --loop trainer --compile layers --out bench/results/lab-gdn-compile

A rerun into the same ``--out`` with the same settings skips the architectures already measured (``--fresh``:
all again). Both loops are timed by default: ``plain`` (hand-written bf16 steps, fused AdamW, no packing /
graphs / compile: the issue's reference setting) and ``trainer`` (hybridlora's trainer as ``lab pretrain`` runs
it).

CPU smoke run (tiny spec, short sequences; checks the script, says nothing about speed)::

    python bench/bench_lab.py --tiny --out /tmp/lab-bench
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
# fla's Gated DeltaNet backward is guarded off on Hopper with Triton < 3.7.1 (fla #640); the documented opt-in
# (docs/PERFORMANCE.md) narrows the guard to key head dim <= 64, and the GPU specs use 128-dim heads
os.environ.setdefault("HYBRIDLORA_LIFT_FLA_HOPPER_GUARD", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="gpu-120m-gdn", help="spec file or shipped name (default gpu-120m-gdn)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke sizes: tiny-gdn, batch 2 x 64, lengths 64,128")
    parser.add_argument("--archs", default="sequential,parallel,all_attention,all_recurrent")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--loop", choices=["plain", "trainer", "both", "none"], default="both",
                        help="plain: hand-written bf16 steps (no packing/graphs/compile, as the issue's reference); "
                             "trainer: hybridlora's trainer as lab pretrain runs it (packed rows, CUDA graphs); "
                             "none: no training, only prefill / decode at --lengths")
    parser.add_argument("--compile", choices=["off", "layers"], default="off",
                        help="torch.compile regions in the trainer loop (layers: decoder layers between kernels)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--fresh", action="store_true",
                        help="measure every architecture again (default: a rerun into the same --out with the same "
                             "settings skips the architectures its efficiency.json already holds)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.spec, args.batch, args.seq_len, args.steps, args.lengths, args.decode_tokens = \
            "tiny-gdn", 2, 64, 2, "64,128", 4
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from hybridlora.lab.efficiency import inference_profile, trainer_profile, training_profile
    from hybridlora.lab.solve import build
    from hybridlora.lab.spec import load_spec, variants

    device = "cuda" if torch.cuda.is_available() else "cpu"
    found = variants(load_spec(args.spec))
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]  # '' skips prefill / decode
    settings = {k: getattr(args, k) for k in ("batch", "seq_len", "steps", "lengths", "decode_tokens", "peak_tflops",
                                              "loop", "compile")}
    results = {"spec": args.spec, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "settings": settings, "archs": {}}
    if not args.fresh:
        results["archs"] = earlier_results(Path(args.out), results)
    for key in args.archs.split(","):
        spec = found[key]
        if spec.name in results["archs"]:
            print(f"-- {spec.name}: measured already ({Path(args.out) / 'efficiency.json'}; --fresh measures again)",
                  flush=True)
            continue
        print(f"-- {spec.name}: building and timing", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, match = build(spec, seed=0)
        model.to(device)
        entry = {"variant": key, "schedule": model.config.mixer_schedule, "params": match.achieved,
                 "target": match.target}
        if args.loop in ("plain", "both"):
            entry["training"] = training_profile(model, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                                                 peak_tflops=args.peak_tflops)
            model.zero_grad(set_to_none=True)
        if args.loop in ("trainer", "both"):
            entry["training_trainer"] = trainer_profile(model, batch=args.batch, seq_len=args.seq_len,
                                                        steps=args.steps, compile=args.compile,
                                                        peak_tflops=args.peak_tflops)
            model.zero_grad(set_to_none=True)
        if args.loop != "none":
            entry["training"] = entry.get("training") or entry["training_trainer"]
        results["archs"][spec.name] = entry
        print_training(spec.name, match.achieved, entry, args.loop)
        entry["complete"] = False  # a rerun measures this architecture again unless its inference finishes
        entry["inference"] = []
        write_results(results, Path(args.out))  # before inference: a time-limited run keeps the training figures

        def keep(row, entry=entry):  # each length printed and written as it finishes
            entry["inference"].append(row)
            print_inference(row)
            write_results(results, Path(args.out))

        inference_profile(model, lengths, decode_tokens=args.decode_tokens, on_row=keep)
        entry["complete"] = True
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        write_results(results, Path(args.out))  # after every architecture: a time-limited run keeps what finished
    print(f"written: {Path(args.out) / 'efficiency.json'}")
    return 0


def print_inference(row: dict) -> None:
    if "error" in row:
        print(f"    L={row['length']:>6}: {row['error']}", flush=True)
    else:
        print(f"    L={row['length']:>6}: prefill {row['prefill_tokens_per_s']:>12,.0f} tok/s  decode "
              f"{row['decode_tokens_per_s']:>8,.1f} tok/s ({row['decode_path']})  peak "
              f"{row['decode_peak_mem_gib'] or 0:.2f} GiB", flush=True)


def print_training(name: str, params: int, entry: dict, loop: str) -> None:
    for label in ("training", "training_trainer"):
        if label in entry and (label != "training" or loop != "trainer"):
            t = entry[label]
            print(f"{name:<30} {params:>12,} params  {label:<16} {t['tokens_per_s']:>12,.0f} tok/s"
                  f"  MFU {100 * t['mfu']:5.1f}%  peak {t['peak_mem_gib'] or 0:.1f} GiB", flush=True)
    if "training_trainer" in entry:
        t = entry["training_trainer"]
        print(f"    trainer: {t['batching']}; cuda graphs: {t['cuda_graphs']}; compile: {t['compile']}", flush=True)


def earlier_results(out: Path, now: dict) -> dict:
    """The finished architectures of an earlier run into ``out`` with the same spec, device, torch and settings
    (a run cut short by a time limit continues where it stopped); none if anything differs."""
    try:
        earlier = json.loads((out / "efficiency.json").read_text())
    except (OSError, ValueError):
        return {}
    if any(earlier.get(k) != now[k] for k in ("spec", "device", "torch", "settings")):
        return {}
    return {name: entry for name, entry in earlier.get("archs", {}).items() if entry.get("complete")}


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".efficiency.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "efficiency.json")


if __name__ == "__main__":
    sys.exit(main())
