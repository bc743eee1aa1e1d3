"""Why does an ablated model's decode step look 2-3x slower than the intact one's? (issue 17)

On the H200 (2026-12-04) bench_ablation.py timed Qwen3.5-0.8B's ablated decode step at 256 rows at 11.0 ms, its
intact step at 3.65 ms (with the model's end ids kept: rows may have ended early) and bench_decode.py the intact
step at 4.24 ms; for Falcon-H1 13.0 ms ablated against 8.81 ms intact in bench_decode.py. Generation is half of an
ablation condition's time, so if the ablated step could run at the intact rate the 20-minute target comes within
reach for Qwen3.5. This times, in one process and in alternation (so that neither order nor warm-up favours one),
the decode step of the intact model, of the model with every attention unit removed, and of the model with the
ablation's hooks attached but nothing removed (the hooks' own cost), each with the end ids cleared and the steps
actually decoded printed; then the intact model on bench_decode.py's left-padded prompts; then a profile of three
eager decode steps of the intact and the ablated model (the CUDA graph replays exactly these kernels), whose
kernel tables go to ``OUT/ablated_decode_profile_MODEL.txt``.

    python bench/diag_ablated_decode.py --models qwen,falcon --out OUT      # GPU, full-size architectures, bf16
    python bench/diag_ablated_decode.py --tiny --models qwen               # CPU check of the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_ablation  # noqa: E402  (its builder, its representative removal and its decode timing)
import bench_decode  # noqa: E402  (its left-padded prompts)
from hybridlora.ablation.methods import Ablation  # noqa: E402


def variants(model, mu):
    """name -> a context manager putting the model in that state."""
    import contextlib

    return {"intact": contextlib.nullcontext,
            "hooks, nothing removed": lambda: Ablation(model, [], "skip", mu.layers_path),
            "ablated": lambda: bench_ablation.ablation_of(model, mu)}


def step_profile(model, ids, mask, steps: int = 3) -> str:
    """Kernel table of ``steps`` eager decode steps of the project's static-cache loop (after the prefill and two
    warm-up steps), sorted by device time; the table's footer has the totals."""
    from hybridlora.fast.decode import _Batch

    cuda = ids.is_cuda
    batch = _Batch(model, ids, mask, steps + 3, 0, [])
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        batch.prefill()
        batch.step()
        batch.step()
        if cuda:
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                batch.step()
            if cuda:
                torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=20, max_name_column_width=70)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the variants")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.batch, args.prompt, args.new = 4, 16, 8
    else:
        from hybridlora import fast

        fast.use("fast")
    settings = SimpleNamespace(tiny=args.tiny, device=device, dtype=torch.float32 if args.tiny else torch.bfloat16,
                               gen_len=args.prompt, check_new=0)
    results = {}
    for name in args.models.split(","):
        model, _, mu = bench_ablation.build(name, settings)
        rows = results[name] = []
        for round_ in range(args.rounds):
            for label, state in variants(model, mu).items():
                with state():
                    t = bench_ablation.decode(model, settings, args.batch, args.new, check=False)
                rows.append({"round": round_, "variant": label, "ms_per_step": 1e3 * t["s_per_step"],
                             "fixed_s": t["fixed_s"], "steps": t["steps"], "timing": t["timing"]})
                print(f"{name:>7} round {round_} {label:<24} {1e3 * t['s_per_step']:7.2f} ms/step + "
                      f"{t['fixed_s']:.2f} s per call ({t['timing']})", flush=True)
        ids, mask = bench_decode.prompts(args.batch, args.prompt, model.config.vocab_size, device=device)
        from hybridlora.fast.decode import time_decode_step

        model.generation_config.eos_token_id = None
        with torch.inference_mode():
            t = time_decode_step(model, ids, mask, args.new, graphs=device == "cuda")
        rows.append({"variant": "intact, padded prompts", "ms_per_step": 1e3 * t["s_per_step"],
                     "fixed_s": t["fixed_s"], "steps": t["steps"], "timing": t["timing"]})
        print(f"{name:>7} intact, bench_decode's padded prompts {1e3 * t['s_per_step']:7.2f} ms/step + "
              f"{t['fixed_s']:.2f} s per call ({t['timing']})", flush=True)
        if args.out:
            tables = []
            for label in ("intact", "ablated"):
                with variants(model, mu)[label]():
                    tables.append(f"== {name}, {label}: 3 eager decode steps at {args.batch} rows ==\n"
                                  + step_profile(model, ids, mask))
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"ablated_decode_profile_{name}.txt").write_text("\n\n".join(tables))
            print(f"{name:>7} kernel tables: {Path(args.out) / f'ablated_decode_profile_{name}.txt'}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ablated_decode.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
