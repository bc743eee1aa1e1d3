"""Where the time goes now: kernel tables for the packed training step and for a greedy decode step.

After CUDA graphs took the host out of the packed training step, the GPU kernels set its pace; this prints
which kernels those are (the graph replays exactly the kernels of the eager static step profiled here). For
generation it profiles ``model.generate`` at the evaluation batch size: host (CPU) time against kernel time,
and the top operators, to say what bounds a decode step.

Usage (GPU machine, fla-core / mamba-ssm wheels on PYTHONPATH)::

    python bench/profile_steps.py --data DATA_DIR --out OUT [--models qwen,falcon]
"""
from __future__ import annotations

import argparse
import contextlib
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


def kernel_table(prof, n: int = 18) -> tuple[str, float, float]:
    """(table of the top CUDA kernels, total CUDA ms, total CPU ms) from a finished profiler; the totals are the
    profiler's own footer figures (summing the rows would count an operator and its kernels twice)."""
    import re

    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=n, max_name_column_width=70)

    def total(kind: str) -> float:
        m = re.search(rf"Self {kind} time total: ([0-9.]+)(ms|us|s)", table)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"ms": 1.0, "us": 1e-3, "s": 1e3}[m.group(2)]

    return table, total("CUDA"), total("CPU")


LABEL = "hl:"


@contextlib.contextmanager
def labelled_forwards(model):
    """Every module's forward inside a profiler range named ``hl:<class>`` (LoRA layers, norms, mixers,
    attention, MLPs …), so the kernels a forward launches are summed per kind of module (the stack-grouped
    table of the fourth session came out without source lines). Backward kernels run outside these ranges."""
    from torch.autograd.profiler import record_function

    open_ranges: dict[int, list] = {}

    def enter(module, args):
        kind = type(module)
        rf = record_function(f"{LABEL}{kind.__module__.split('.')[0]}.{kind.__name__}")  # peft.Linear vs torch.Linear
        rf.__enter__()
        open_ranges.setdefault(id(module), []).append(rf)

    def leave(module, args, output):
        open_ranges[id(module)].pop().__exit__(None, None, None)

    wanted = [m for m in model.modules() if not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))]
    handles = [h for m in wanted for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def label_table(prof) -> str:
    """Forward device time per kind of module (ranges nest: a decoder layer includes its mixer and LoRA layers)."""
    rows = []
    for e in prof.key_averages():
        if e.key.startswith(LABEL):
            device_us = getattr(e, "device_time_total", None)
            if device_us is None:
                device_us = getattr(e, "cuda_time_total", 0.0)
            rows.append((device_us, e.key[len(LABEL):], e.count))
    rows.sort(reverse=True)
    lines = ["forward device time per module kind (nested: totals include children)",
             f"{'module':<40} {'calls':>7} {'device ms':>10}"]
    lines += [f"{name:<40} {count:>7} {us / 1e3:>10.2f}" for us, name, count in rows[:40]]
    return "\n".join(lines)


def _self_time(e, device: bool) -> float:
    if not device:
        return e.self_cpu_time_total
    t = getattr(e, "self_device_time_total", None)
    return t if t is not None else getattr(e, "self_cuda_time_total", 0.0)


def source_table(prof, device: bool = True, n: int = 45) -> str:
    """Self time (device, or CPU when ``device`` is False) and calls per (source, operator chain): the source of a
    forward op is its innermost ``hl:`` module range, of a backward op the autograd node that ran it; the chain
    is the operators from the outermost one under that source down to the op that did the work. Says which
    module's code a copy or an element-wise kernel comes from (the stack-grouped table had no source lines)."""
    from collections import defaultdict

    from torch.autograd import DeviceType

    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != DeviceType.CPU:  # kernels: their time is the launching operator's self time
            continue
        t = _self_time(e, device)
        if t <= 0 or e.name.startswith(LABEL) or e.name.startswith("autograd::engine"):
            continue
        chain, source, parent = [e.name], "(outside)", e.cpu_parent
        while parent is not None:
            if parent.name.startswith(LABEL):
                source = parent.name[len(LABEL):]
                break
            if parent.name.startswith("autograd::engine::evaluate_function: "):
                source = "backward " + parent.name.split(": ", 1)[1]
                break
            chain.append(parent.name)
            parent = parent.cpu_parent
        key = (source, " < ".join(chain[:3]) + (" < …" if len(chain) > 3 else ""))
        totals[key][0] += t
        totals[key][1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    unit = "device" if device else "cpu"
    lines = [f"self {unit} time per (source, operator chain); source = innermost module range (forward) or "
             "autograd node (backward)", f"{unit + ' ms':>9} {'calls':>6}  {'source':<42} chain (op < caller)"]
    lines += [f"{t / 1e3:>9.2f} {c:>6}  {src:<42} {chain}" for (src, chain), (t, c) in rows[:n]]
    return "\n".join(lines)


def train_step_profile(model, resolved, lengths, out: Path, name: str, fixed: int = 0, compile: str = "off") -> dict:
    """Kernel table of one static packed step: 16 examples with GSM8K lengths, or (``fixed``) 1024-token
    examples packed into one row of ``fixed`` tokens, with a second table grouped by input shapes. ``compile``:
    a torch.compile scope of the trainer (``hybridlora.fast.compile``)."""
    from hybridlora.fast.compile import compile_regions, uncompile

    from torch.profiler import ProfilerActivity, profile

    from hybridlora.fast.graphs import PackedStepGraphs
    from hybridlora.train.loop import attach_lora

    fast.use("fast")
    peft = attach_lora(model, resolved)
    peft.train()
    fast.skip_input_upcast(peft)  # as the trainer runs bf16 steps
    compile_regions(peft, compile)
    if fixed:
        exs = btl.fixed_examples(fixed // 1024, 1024, model.config.vocab_size, seed=5)
    else:
        exs = btl.length_examples(lengths["gsm8k"], 16, model.config.vocab_size, 1024, seed=5)
    row = fast.pack([{"input_ids": e.input_ids, "labels": e.labels} for e in exs])
    runner = PackedStepGraphs(peft, max_segments=16, pad_id=0, autocast_dtype=torch.bfloat16, capture=False)
    for _ in range(3):  # autotune outside the profile
        runner.forward_backward(row, 1e-3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=bool(fixed)) as prof, \
            (labelled_forwards(peft) if fixed else contextlib.nullcontext()):
        runner.forward_backward(row, 1e-3)
        torch.cuda.synchronize()
    table, cuda_ms, cpu_ms = kernel_table(prof, n=40 if fixed else 18)
    if fixed:
        table += "\n\n" + prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=40, max_shapes_column_width=100)
        table += "\n\n" + label_table(prof) + "\n\n" + source_table(prof)
    suffix = "" if compile == "off" else f"_compile_{compile}"
    (out / f"{name}_train_step{fixed or ''}{suffix}_kernels.txt").write_text(table)
    runner.zero_grad()
    uncompile(peft)
    peft.unload()
    torch.cuda.empty_cache()
    return {"tokens": runner.row_length(row), "compile": compile, "cuda_ms": round(cuda_ms, 1),
            "cpu_ms": round(cpu_ms, 1)}


def _decode_step_ms(gen, new: int) -> float:
    """Milliseconds per decode step: generating ``new`` tokens minus generating 1 (the prefill cancels out)."""
    timings = {}
    for n in (1, new):
        t = time.perf_counter()
        gen(n)
        timings[n] = time.perf_counter() - t
    return (timings[new] - timings[1]) / (new - 1) * 1e3


def decode_profile(model, out: Path, name: str, batch: int = 256, prompt: int = 256, new: int = 32,
                   cache: str | None = None) -> dict:
    """Greedy decode step time at the evaluation batch size (after a full-length warm-up, best of 3) and a
    profile of ``new + 1`` generated tokens. ``cache="static"``: transformers' static cache (its generate may
    then compile the decode step; both tiny families give the same tokens with it on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    fast.use("fast")
    model.eval()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).cuda()
    kw = dict(do_sample=False, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    if cache:
        kw["cache_implementation"] = cache

    def gen(n):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), max_new_tokens=n,
                           min_new_tokens=n, **kw)
        torch.cuda.synchronize()

    gen(new)  # full-length warm-up: allocator growth and kernel compilation stay out of the timings
    times = [_decode_step_ms(gen, new) for _ in range(3)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        gen(new + 1)  # mostly decode steps: the prefill is one of them
    table, cuda_ms, cpu_ms = kernel_table(prof)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70)
    # which tensors the big copies move: operators grouped by input shapes, by GPU time
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=40,
                                                                max_name_column_width=40, max_shapes_column_width=90)
    (out / f"{name}_decode_kernels.txt").write_text(table + "\n\n" + cpu_table + "\n\n" + shapes)
    model.train()
    return {"batch": batch, "prompt": prompt, "cache": cache or "default", "decode_step_ms": round(min(times), 1),
            "decode_step_ms_all": [round(t, 1) for t in times],
            f"profile_{new + 1}_tokens_cuda_ms": round(cuda_ms, 1), f"profile_{new + 1}_tokens_cpu_ms": round(cpu_ms, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--skip", default="", help="comma list: train,decode,fixed")
    ap.add_argument("--train-row", type=int, default=0,
                    help="profile the training step on one packed row of this many tokens of 1024-token examples")
    ap.add_argument("--compile", default="off", help="comma list of compile scopes for the training profile")
    ap.add_argument("--decode-cache", default=None, choices=["static"],
                    help="time generation with transformers' static cache (default: its dynamic cache)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    lengths = btl.study_lengths(args.data, 4.0)
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    for name in args.models.split(","):
        model, resolved = btl.build(name)
        res = results.setdefault(name, {})
        profiles = [(f"train_step{'' if scope == 'off' else ' compile=' + scope}", train_step_profile,
                     (model, resolved, lengths, args.out, name, args.train_row, scope))
                    for scope in args.compile.split(",")]
        for section, fn, fn_args in (*profiles,
                                     ("decode", decode_profile, (model, args.out, name, 256, 256, 32,
                                                                 args.decode_cache))):
            if section.split("_")[0] in skip:
                continue
            try:
                res[section] = fn(*fn_args)
            except Exception as exc:
                res[section] = {"error": f"{type(exc).__name__}: {exc}"}
            btl.log(name, section, json.dumps(res[section]))
        if "fixed" not in skip:
            exs = btl.fixed_examples(16 * 6, 1024, model.config.vocab_size, seed=1)
            graphs = dict(micro=8, accum=2, packing="auto", cuda_graphs="auto")
            session4 = ("HYBRIDLORA_TORCH_CONV", "HYBRIDLORA_TORCH_CE", "HYBRIDLORA_TORCH_NORM")
            for label, kw in (("graphs 4096, torch conv + CE + norms", dict(graphs, pack_tokens=4096, torch_ops=session4)),
                              ("graphs 4096, torch norms", dict(graphs, pack_tokens=4096,
                                                                torch_ops=("HYBRIDLORA_TORCH_NORM",))),
                              ("graphs 4096", dict(graphs, pack_tokens=4096)),
                              ("graphs 8192", dict(graphs, pack_tokens=8192))):
                torch_ops = kw.pop("torch_ops", ())
                for var in session4:  # the session-4 torch ops, side by side with the Triton kernels
                    os.environ[var] = "1" if var in torch_ops else "0"
                try:
                    row, model = btl.run_trainer(model, resolved, exs, **kw)
                except Exception as exc:
                    row = {"error": f"{type(exc).__name__}: {exc}"}
                    torch.cuda.empty_cache()
                res.setdefault("fixed", {})[label] = row
                btl.log(name, "fixed", label, json.dumps({k: v for k, v in row.items() if k not in ("kernels", "batching")}))
        (args.out / "profile_steps.json").write_text(json.dumps(results, indent=1))
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
