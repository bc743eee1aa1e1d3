"""Where a lab model's training step spends its GPU time (issue 19's MFU gap): one profiled step per variant.

``bench_lab.py`` measures the step; this says what it is made of. For each variant of the spec (random weights,
the plain loop of ``hybridlora.lab.efficiency.training_profile``: bf16 autocast over float32 weights, the
chunked cross-entropy, fused AdamW, fast kernels bound) it runs three steps unprofiled (autotuning, allocator
growth), then profiles one and writes

* a summary: device time per kind of work — matmuls, Gated DeltaNet / Mamba-2 kernels, attention, the
  cross-entropy, the optimizer, norms, element-wise and copy kernels, the rest — with each kind's share of the
  step and the step's MFU if nothing but the matmuls ran (how far fusing the rest could go);
* ``OUT/<variant>_kernels.txt``: the top kernels, forward time per module kind and self time per source.

Usage::

    python bench/profile_lab_step.py --spec gpu-120m-gdn --out OUT                 # GPU
    python bench/profile_lab_step.py --tiny --out /tmp/prof                         # CPU: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HYBRIDLORA_LIFT_FLA_HOPPER_GUARD", "1")

from profile_steps import kernel_table, label_table, labelled_forwards, source_table  # noqa: E402

# first match wins; kernel names (CUDA) or operator names (CPU smoke run)
KINDS = (
    ("matmul", r"gemm|matmul|mm_|addmm|\bmm\b|sm90_xmma|cutlass|cublas|nvjet|linear"),
    ("attention", r"flash|fmha|attention|sdpa|attn"),
    ("recurrent mixer", r"chunk|delta|gated|ssd|mamba|state_passing|bmm_chunk|scan|causal_conv|conv1d|fused_recurrent"),
    ("cross-entropy", r"cross_entropy|log_softmax|nll|logsumexp|softmax"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("norm", r"norm|rms"),
    # not "cast": PyTorch's element-wise kernels are named ...gpu_kernel_impl_nocast<...>; its casts are copies
    ("copy / cast", r"copy|convert|\bcat\b|cat_|contiguous|index_select|gather|scatter|fill|zero_"),
    ("element-wise", r"elementwise|vectorized|unrolled|mul|add|silu|sigmoid|exp|div|sub|neg|pow|where|reduce|sum"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def device_time_by_kind(prof, device: bool) -> dict[str, float]:
    """Milliseconds per kind: CUDA kernels' own time on the GPU, or (CPU run) operators' self CPU time."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    for e in prof.events():
        if device and e.device_type != DeviceType.CUDA:
            continue
        if not device and (e.device_type != DeviceType.CPU or e.name.startswith(("hl:", "autograd::", "Profiler"))):
            continue
        us = e.device_time if device else e.self_cpu_time_total
        if us and us > 0:
            totals[kind_of(e.name)] = totals.get(kind_of(e.name), 0.0) + us / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_variant(model, batch: int, seq_len: int, peak_tflops: float) -> tuple[dict, str]:
    from torch.profiler import ProfilerActivity, profile

    from hybridlora.lab.efficiency import plain_training_step

    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    step, _, _ = plain_training_step(model, batch=batch, seq_len=seq_len)  # the step bench_lab.py times
    for _ in range(3):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof, labelled_forwards(model):
        step()
        if on_gpu:
            torch.cuda.synchronize()
    kinds = device_time_by_kind(prof, on_gpu)
    step_ms = sum(kinds.values())
    params = sum(p.numel() for p in model.parameters())
    flop = 6 * params * batch * seq_len
    summary = {"params": params, "tokens": batch * seq_len, "timed": "GPU kernels" if on_gpu else "CPU operators",
               "step_ms": round(step_ms, 2), "ms_by_kind": {k: round(v, 2) for k, v in kinds.items()},
               "share_by_kind": {k: round(v / step_ms, 3) for k, v in kinds.items()} if step_ms else {},
               "mfu_of_kernel_time": flop / (step_ms / 1e3) / (peak_tflops * 1e12) if step_ms else None,
               "mfu_if_only_matmuls_ran": (flop / (kinds["matmul"] / 1e3) / (peak_tflops * 1e12)
                                           if kinds.get("matmul") else None)}
    table, _, _ = kernel_table(prof, n=40)
    text = table + "\n\n" + label_table(prof) + "\n\n" + source_table(prof, device=on_gpu)
    return summary, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="gpu-120m-gdn")
    ap.add_argument("--archs", default="sequential,parallel,all_attention,all_recurrent")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--tiny", action="store_true", help="CPU: tiny-gdn, batch 2 x 64 (checks the script only)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.tiny:
        args.spec, args.batch, args.seq_len = "tiny-gdn", 2, 64
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from hybridlora.lab.solve import build
    from hybridlora.lab.spec import load_spec, variants

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    found = variants(load_spec(args.spec))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"spec": args.spec, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "archs": {}}
    for key in args.archs.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = build(found[key], seed=0)
        summary, text = profile_variant(model.to(device), args.batch, args.seq_len, args.peak_tflops)
        results["archs"][key] = summary
        (args.out / f"{key}_kernels.txt").write_text(text)
        shares = "  ".join(f"{k} {100 * v:.0f}%" for k, v in summary["share_by_kind"].items())
        print(f"{key:<14} step {summary['step_ms']:8.1f} ms ({summary['timed']})  {shares}", flush=True)
        if summary["mfu_if_only_matmuls_ran"]:
            print(f"{'':<14} MFU of the kernel time {100 * summary['mfu_of_kernel_time']:.1f} %, if only the matmuls "
                  f"ran {100 * summary['mfu_if_only_matmuls_ran']:.1f} %", flush=True)
        (args.out / "profile_lab_step.json").write_text(json.dumps(results, indent=1))
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
