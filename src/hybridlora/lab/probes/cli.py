"""``hybridlora lab probe``: the probe suite for one spec (or its matched set of architectures)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ...errors import CliError

GPU_WORKERS = 8  # default runs at once on CUDA (see default_workers)


def register(sub) -> None:
    from . import PROBE_MODULES

    p = sub.add_parser("probe", help="MAD synthetic probes + MQAR + long-context retrieval, trained from scratch")
    p.add_argument("spec", help="architecture spec YAML or shipped spec name")
    p.add_argument("--archs", default="as-written",
                   help="as-written, or a comma list of the spec's variants: sequential, parallel, all_attention, "
                        "all_recurrent (default: as written)")
    p.add_argument("--probes", default="all", help=f"comma list or all ({', '.join(PROBE_MODULES)})")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (default 0,1)")
    p.add_argument("--settings", choices=["tiny", "mad"], default="tiny",
                   help="tiny: CPU-sized tasks and models; mad: MAD's baseline task settings (GPU)")
    p.add_argument("--output", required=True, help="results directory (probes.jsonl, probes_summary.json)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="probe runs at once, each in its own process; on a GPU several small probe models share it "
                        f"(default there: {GPU_WORKERS}, or the usable cores if fewer), on CPU they share the cores "
                        "(default there: 1)")
    p.add_argument("--warm-up-steps", type=int, default=None, metavar="N",
                   help="before the runs, N training steps of each (architecture, probe) in one process, so that a "
                        "fresh GPU autotunes each kernel shape once instead of in every worker at the same time "
                        "(default: 2 on CUDA with --workers > 1, else 0)")
    p.add_argument("--no-progress", action="store_true")
    from ...threads import add_option as add_threads_option

    add_threads_option(p)
    p.set_defaults(func=cmd_probe)


def _list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise CliError(f"--{what} is empty")
    return items


def cmd_probe(args) -> int:
    from ..cli import load_spec_or_fail, solve_or_fail
    from ..spec import variants
    from . import PROBE_MODULES, Settings, probe_spec, run_suite, summarize

    spec = load_spec_or_fail(args.spec)
    probes = list(PROBE_MODULES) if args.probes == "all" else _list(args.probes, "probes")
    unknown = sorted(set(probes) - set(PROBE_MODULES))
    if unknown:
        raise CliError(f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(PROBE_MODULES)}")
    try:
        seeds = [int(s) for s in _list(args.seeds, "seeds")]
    except ValueError:
        raise CliError(f"--seeds {args.seeds!r}: give integers, e.g. 0,1,2") from None
    found = variants(spec)
    names = _list(args.archs, "archs")
    if names == ["as-written"]:
        specs = {spec.name: spec}
    else:
        missing = [n for n in names if n not in found]
        if missing:
            raise CliError(f"--archs: {', '.join(missing)} not among this spec's variants ({', '.join(found)})")
        specs = {found[n].name: found[n] for n in names}
    if args.workers is not None and args.workers < 1:
        raise CliError(f"--workers {args.workers}: give at least 1")
    if args.warm_up_steps is not None and args.warm_up_steps < 0:
        raise CliError(f"--warm-up-steps {args.warm_up_steps}: give 0 or more")
    workers = args.workers if args.workers is not None else default_workers()
    warm = args.warm_up_steps if args.warm_up_steps is not None else _default_warm_up(workers)
    settings = Settings.tiny() if args.settings == "tiny" else Settings.mad()
    for arch in specs.values():  # every probe architecture must solve before anything runs
        for probe in probes:
            solve_or_fail(probe_spec(arch, probe, settings))
    out = Path(args.output)
    if out.is_file():
        raise CliError(f"--output {out} is a file; give a directory")
    note = workload_note(len(specs) * len(probes) * len(seeds), settings)
    if note:
        print(note, file=sys.stderr, flush=True)
    records = [r for r in run_suite(specs, probes, seeds, settings, out, progress=not args.no_progress,
                                    workers=workers, warm_up_steps=warm)
               if r["arch"] in specs and r["probe"] in probes and r["seed"] in seeds]
    rows = summarize(records)
    from ...train.loop import write_atomic

    write_atomic(out / "probes_summary.json", json.dumps(rows, indent=1))
    print(_table(rows))
    print(f"records: {out / 'probes.jsonl'}; summary: {out / 'probes_summary.json'}")
    return 0


def workload_note(runs: int, settings, cuda: bool | None = None) -> str | None:
    """A warning line before a long suite on a machine without CUDA (MAD's settings: 20,000 steps a run)."""
    import torch

    if (torch.cuda.is_available() if cuda is None else cuda) or settings.name != "mad":
        return None
    return (f"warning: {runs} runs of {settings.steps:,} training steps each at MAD's settings on a machine without CUDA: "
            "expect many hours; --settings tiny is the CPU-sized protocol")


def default_workers(cuda: bool | None = None) -> int:
    """Runs at once when ``--workers`` is not given. On CUDA several: 8 MAD-size runs sharing one H200 finished
    a run every 53 s, where one probe's run alone took 106 s (2026-12-04, docs/LAB.md), each worker needing a
    core to launch from. On CPU one: the runs would only split the same cores."""
    import torch

    from ... import threads

    if not (torch.cuda.is_available() if cuda is None else cuda):
        return 1
    return max(1, min(GPU_WORKERS, threads.usable_cores()))


def _default_warm_up(workers: int) -> int:
    import torch

    return 2 if workers > 1 and torch.cuda.is_available() else 0  # only GPUs autotune kernels


def _fmt(x: float) -> str:
    return "  -  " if x is None or math.isnan(x) else f"{x:.3f}"


def _table(rows: list[dict]) -> str:
    lines = [f"{'architecture':<28} {'probe':<18} {'test':<5} {'acc':>6}  {'Wilson 95%':<15} {'seeds':>5}  "
             f"{'seed mean [t 95%]'}"]
    for r in rows:
        lo, hi = r["wilson95"]
        slo, shi = r["seed_t95"]
        lines.append(f"{r['arch']:<28} {r['probe']:<18} {r['test']:<5} {r['accuracy']:>6.3f}  "
                     f"[{lo:.3f}, {hi:.3f}] {len(r['seeds']):>5}  {r['seed_mean']:.3f} [{_fmt(slo)}, {_fmt(shi)}]")
    return "\n".join(lines)
