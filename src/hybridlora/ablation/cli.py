"""``hybridlora ablate MODEL``: remove components, measure what breaks (perplexity, benchmarks, diagnostics).

Every condition is a job (id = hash of its spec) registered in the ablation directory's SQLite store and run
through the study runner's one dispatch loop, so a re-run resumes and every condition runs exactly once.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .plans import PLANS

SPEC_VERSION = 1
DEFAULT_BENCHMARKS = "mmlu,arc_challenge,hellaswag,gsm8k,humaneval"
TINY_NEW_TOKENS = 32
TRIALS = 5  # the reference's perplexity controls (5 trials; 3 for its benchmarks)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="component ablation: remove attention / recurrent mixers / MLPs and measure what breaks",
        description="Builds conditions from the component map (any family), runs each as a resumable job "
                    "(strided perplexity, the five benchmarks, per-layer diagnostics) and writes the report "
                    "(HTML, Markdown, CSV). See docs/ABLATION.md.")
    p.add_argument("model", metavar="MODEL", help="catalog name, hub id or local model directory")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter, merged into the model before ablating")
    p.add_argument("--tiny", action="store_true", help="a random tiny model of MODEL's family, byte tokenizer (CPU)")
    p.add_argument("--plan", default="groups", metavar="PLAN|FILE",
                   help=f"one of {', '.join(PLANS)} or a YAML file (default groups)")
    p.add_argument("--remove", action="append", default=[], metavar="SPEC",
                   help="one condition removing COMPONENT[@LAYERS] items joined by + (e.g. softmax_attention, "
                        "ssm@0-5, linear_attention@3+mlp@3); repeatable; replaces --plan")
    p.add_argument("--method", default="auto",
                   help="comma list of skip, zero, skip_layer, mean, or auto (zero in parallel blocks, skip "
                        "elsewhere, plus skip_layer for sequential groups); default auto")
    p.add_argument("--trials", type=int, default=TRIALS, help=f"random controls per condition (default {TRIALS})")
    p.add_argument("--seed", type=int, default=0, help="seed of random draws (default 0)")
    p.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, help=f"comma list or `none` (default "
                                                                    f"{DEFAULT_BENCHMARKS})")
    p.add_argument("--limit", type=int, metavar="N",
                   help="quick look: the first N items of each benchmark and the first N perplexity windows")
    p.add_argument("--data-dir", metavar="DIR", help="data laid out like shared/data (benchmarks, WikiText-2)")
    p.add_argument("--text", metavar="FILE|wikitext-2[:valid]|HUB_ID",
                   help="perplexity text (default wikitext-2 test: from --data-dir, else the hub's "
                        "Salesforce/wikitext); `none` skips perplexity")
    p.add_argument("--window", type=int, help="perplexity window in tokens (default min(model context, 2048))")
    p.add_argument("--stride", type=int, help="perplexity stride (default window/2)")
    p.add_argument("--reference-windows", type=int, default=8,
                   help="windows of the WikiText-2 valid split (or --text) for mean vectors and diagnostics "
                        "(default 8; diagnostics use the first 2)")
    p.add_argument("--max-new-tokens", type=int, help="override the generation budget of GSM8K/HumanEval")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch (default 8; perplexity: half)")
    p.add_argument("--gen-batch-size", type=int, metavar="N",
                   help="prompts per greedy-decoding batch of GSM8K/HumanEval (default: --batch-size); on a GPU 256 "
                        "decodes each benchmark in one batch at about the cost of one small batch")
    p.add_argument("--prefix-reuse", action="store_true",
                   help="multiple choice: run each benchmark's shared few-shot prefix once and score the questions "
                        "on its cache (checked against whole rows first; docs/EVALUATION.md)")
    p.add_argument("--conditions-per-batch", type=int, default=1, metavar="K",
                   help="run K conditions in each forward, each row once per condition (the numbers a condition "
                        "gets alone at that batch size; docs/ABLATION.md); default 1")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--decode", choices=["auto", "static", "hf"], default="auto",
                   help="greedy decoding path (auto: the static-cache loop where it reproduces transformers' "
                        "generate, its step a CUDA graph on CUDA; hf: transformers' generate)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true", help="run HumanEval code in the sandbox")
    p.add_argument("--study", metavar="DIR", help="a placement study of the same model: rank-correlate component "
                                                  "importance with the benefit of adapting it")
    p.add_argument("--output", metavar="DIR", help="ablation directory (default ablations/<model>)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--dry-run", action="store_true", help="list the conditions; run nothing")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from ..study.backends import add_backend_options
    from ..threads import add_option as add_threads_option

    add_threads_option(p)
    add_backend_options(p)  # the conditions are jobs: the same backends as `study` (docs/RAY.md)
    p.set_defaults(func=cmd_ablate)


def _model_spec(args) -> dict[str, Any]:
    name = args.model + (" [tiny random]" if args.tiny else "")
    return {"model": args.model, "name": name, "tiny": args.tiny, "dtype": args.dtype,
            "model_seed": 0 if args.tiny else None}


def _units(args):
    """Component map and units of MODEL, on the meta device (the tiny config with --tiny)."""
    from ..components import build_component_map
    from ..errors import CliError
    from ..families import family_for
    from ..models import build_meta_model, resolve_model, text_config, tiny_config
    from .methods import model_units

    source = resolve_model(args.model)
    config = text_config(source.config)
    if not args.tiny and not args.dry_run and source.kind == "catalog":  # a dry run needs no weights
        from ..models import hub_reachable

        if not hub_reachable():
            raise CliError(f"{args.model}: the weights are not here and the hub is unreachable; give the "
                           "checkpoint's local directory as MODEL (or --tiny for a pipeline check)")
    if args.tiny:
        family = family_for(config.model_type)
        if family is None:
            raise CliError(f"{args.model}: unknown family, so no tiny config; drop --tiny")
        config = tiny_config(config, family)
    cmap = build_component_map(build_meta_model(config))
    return config, cmap, model_units(cmap)


def _conditions(args, mu):
    from .plans import build_plan, remove_conditions

    methods = [m.strip() for m in args.method.split(",") if m.strip()] or ["auto"]
    if args.remove:
        return remove_conditions(args.remove, mu, methods)
    return build_plan(mu, args.plan, methods=methods, trials=args.trials, seed=args.seed)


def _benchmarks(args) -> dict[str, int | None]:
    from ..evaluate.runner import parse_benchmarks

    if args.benchmarks.strip().lower() == "none":
        return {}
    return {name: None for name in parse_benchmarks(args.benchmarks)}


def _validate(args) -> None:
    from ..errors import CliError

    for flag, value in (("--limit", args.limit), ("--window", args.window), ("--stride", args.stride),
                        ("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--gen-batch-size", args.gen_batch_size),
                        ("--conditions-per-batch", args.conditions_per_batch)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be at least 1")
    if args.trials < 0 or args.reference_windows < 1:
        raise CliError("--trials must be >= 0 and --reference-windows >= 1")
    if args.adapter and not Path(args.adapter, "adapter_config.json").is_file():
        raise CliError(f"--adapter {args.adapter}: no adapter_config.json there; pass a PEFT adapter directory")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise CliError(f"--data-dir {args.data_dir}: no such folder")
    if args.study and not Path(args.study, "study.db").is_file():
        raise CliError(f"--study {args.study}: no study.db there; give a study directory made by `hybridlora study`")


def build_jobs(args) -> tuple[Path, list, Any, list]:
    """(ablation dir, jobs, units, conditions); validates everything before anything is written."""
    from ..evaluate.data import SUBSET_SEED
    from ..study.grid import Job, job_id
    from .perplexity import text_source
    from .plans import unit_names

    _validate(args)
    config, cmap, mu = _units(args)
    conditions = _conditions(args, mu)
    benchmarks = _benchmarks(args)
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else os.environ.get("HYBRIDLORA_DATA")
    context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    window = args.window or min(context, 2048)
    stride = args.stride or max(1, window // 2)
    if window > context:
        from ..errors import CliError

        raise CliError(f"--window {window} exceeds the model's context ({context} tokens)")
    no_text = (args.text or "").lower() == "none"
    source = None if no_text else text_source(args.text, data_dir)
    reference = text_source("wikitext-2:valid", data_dir) if (args.text in (None, "wikitext-2", "wikitext-2:test")
                                                              ) else source
    if reference is None:
        reference = text_source("wikitext-2:valid", data_dir)
    _check_data(benchmarks, data_dir, [s for s in (source, reference) if s])
    model = _model_spec(args)
    common = {
        "version": SPEC_VERSION, "kind": "ablation", "model": model,
        "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
        "perplexity": {"enabled": source is not None, "source": source, "window": window, "stride": stride,
                       "max_windows": args.limit, "batch_size": max(1, args.batch_size // 2)},
        "reference": {"source": reference, "windows": args.reference_windows, "length": min(window, 512)},
        "diagnostics": {"windows": min(2, args.reference_windows)},
        "eval": {"benchmarks": benchmarks, "limit": args.limit, "data_dir": data_dir, "subset_seed": SUBSET_SEED,
                 "batch_size": args.batch_size, "max_length": None, "max_new_tokens": args.max_new_tokens,
                 "allow_code_execution": args.confirm_run_unsafe_code, "decode": args.decode},
    }
    if args.gen_batch_size:  # in the spec only when given: the job ids of earlier ablations stay
        common["eval"]["generate_batch_size"] = args.gen_batch_size
    if args.prefix_reuse:  # likewise
        common["eval"]["prefix_reuse"] = True
    if args.conditions_per_batch > 1:  # likewise
        from .shared import SPEC_KEY

        common[SPEC_KEY] = args.conditions_per_batch
    if args.tiny and args.max_new_tokens is None and benchmarks.keys() & {"gsm8k", "humaneval"}:
        common["eval"]["max_new_tokens"] = TINY_NEW_TOKENS
        print(f"note: --tiny: GSM8K/HumanEval generate at most {TINY_NEW_TOKENS} new tokens (a random model's text "
              "is noise; --max-new-tokens N to change)", file=sys.stderr)
    jobs: dict[tuple, Job] = {}
    rows = []
    for c in conditions:
        if c.removal not in jobs:
            spec = dict(common, removal={"method": c.method, "units": list(c.removal[1])},
                        removed=unit_names(c, mu))
            jobs[c.removal] = Job(job_id("ablation", spec), "ablation", model["name"], c.name, c.method, None, spec)
        rows.append({**c.as_dict(), "job": jobs[c.removal].id, "removed": jobs[c.removal].spec["removed"]})
    output = Path(args.output) if args.output else Path("ablations") / _slug(model["name"])
    _say_gpu_levers(args, benchmarks, len(jobs))
    if args.conditions_per_batch > len(jobs):
        print(f"note: --conditions-per-batch {args.conditions_per_batch} exceeds the {len(jobs)} distinct removals: "
              f"each forward carries {args.conditions_per_batch - len(jobs)} intact fillers; "
              f"--conditions-per-batch {len(jobs)} does the same work with less", file=sys.stderr)
    return output, list(jobs.values()), mu, rows


def _say_gpu_levers(args, benchmarks: dict, removals: int) -> None:
    """On a GPU, name the opt-in levers a full-size ablation should use. They are not the default because they
    change a job's spec (earlier ablations would be run again) and the batches' composition (the last bits of
    bf16 scores)."""
    import torch

    if args.tiny or not torch.cuda.is_available():
        return
    levers = []
    if not args.gen_batch_size and args.batch_size < 256 and benchmarks.keys() & {"gsm8k", "humaneval"}:
        levers.append("--gen-batch-size 256 (each generation benchmark decoded in one batch)")
    if not args.prefix_reuse and benchmarks.keys() & {"mmlu", "arc_challenge", "hellaswag"}:
        levers.append("--prefix-reuse (multiple choice scored on the few-shot prefix's cache, checked first)")
    if args.batch_size < 64:  # perplexity at 32 windows a forward ran 1.6-1.9x faster than at 4 on the H200
        levers.append("--batch-size 64 (perplexity 32 windows a forward, multiple choice 64 questions; a 248k "
                      "vocabulary's logits take ~17 GB at that size)")
    if args.conditions_per_batch == 1 and removals >= 16:  # a handful of removals leaves little to share
        levers.append("--conditions-per-batch 4 (four conditions share each forward; 8 took Falcon-H1-0.5B's "
                      "--plan reference under 20 minutes on one H200)")
    if levers:
        print(f"note: on a GPU, {', '.join(levers)} cut the time per condition several-fold (docs/ABLATION.md, "
              "\"Cost\"); they are opt-in so that earlier ablations keep their job ids", file=sys.stderr)


def _check_data(benchmarks: dict, data_dir: str | None, texts: list[dict]) -> None:
    """Missing data fails here, in one line, before a model is built or a job registered."""
    from ..errors import CliError
    from ..evaluate.lmeval_bridge import data_source
    from ..models import hub_reachable

    for name in benchmarks:
        data_source(name, data_dir)
    if any(t["kind"] == "hub" for t in texts) and not hub_reachable():
        raise CliError("the perplexity text needs the hub, which is unreachable; give --data-dir (a folder laid out "
                       "like shared/data) or --text FILE")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def condition_object(condition: dict, metrics: dict[str, dict]) -> dict[str, Any]:
    """The --format json object of one condition."""
    out: dict[str, Any] = {}
    for bench, s in metrics.items():
        if bench == "perplexity":
            out[bench] = {"tokens": s["tokens"], "nll_sum": s["nll_sum"], "ppl": s["ppl"]}
        elif bench != "diagnostics":
            out[bench] = {"n": s["n"], "correct": s.get("correct"), "accuracy": s.get("accuracy")}
    c = condition
    return {"name": c["name"], "method": c["method"], "removed": c["removed"], "units": c["units"],
            "plan": c["plan"], "detail": c["detail"], "job": c["job"], "metrics": out}


def cmd_ablate(args) -> int:
    from ..errors import CliError
    from ..evaluate.data import BenchmarkError
    from ..study.runner import run_jobs
    from ..study.store import Store, StoreError
    from .methods import AblationError

    from ..study.backends import BackendError, backend_from_args, check_backend, jobs_left, small_cpu_runners

    try:
        backend = None if args.dry_run else backend_from_args(args, None)
        if backend is not None:
            check_backend(backend)  # Ray missing or the cluster unreachable: say so before any work
        output, jobs, mu, conditions = build_jobs(args)
        backend = small_cpu_runners(backend, jobs_left(output, [j.id for j in jobs]), small=args.tiny,
                                    what="removals")
    except (AblationError, BenchmarkError, StoreError, BackendError) as exc:
        raise CliError(str(exc)) from None
    if args.dry_run:
        for c in conditions:
            print(f"{c['job']}  {c['name']:<40} {c['method']:<10} {len(c['units']):>3} units  "
                  f"{' '.join(c['units'])[:80]}")
        count = -(-len(jobs) // args.conditions_per_batch)
        groups = (f" in {count} group{'s' if count > 1 else ''} of {args.conditions_per_batch} sharing each forward"
                  if args.conditions_per_batch > 1 else "")
        print(f"{len(conditions)} conditions of {args.model}" + (" [tiny]" if args.tiny else "") +
              f", {len(jobs)} distinct removals to run{groups}")
        return 0
    try:
        store = Store(output)
        store.register(jobs, {"tool": "ablate", "model": jobs[0].spec["model"], "units": [u.key for u in mu.units],
                              "num_layers": mu.num_layers, "topology": mu.topology, "family": mu.family,
                              "study": str(Path(args.study).resolve()) if args.study else None,
                              "conditions": conditions})
        store.close()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    run = run_jobs(output, jobs, progress=not args.quiet and args.format != "json", desc="ablate", backend=backend)
    report_path = None
    if not args.no_report and run.counts.get("complete"):
        from .report import build_ablation_report

        report_path = build_ablation_report(output, study_dir=args.study)
    _print_results(output, conditions, args.format)
    summary = f"{run.counts.get('complete', 0)}/{len(jobs)} conditions complete, {len(run.ran)} run now"
    if run.counts.get("failed"):
        summary += f", {run.counts['failed']} failed (re-run to retry)"
    print(summary + (f"; report: {report_path}" if report_path else ""), file=sys.stderr)
    for job_id, message in run.failed.items():
        print(f"failed {job_id}: {message}", file=sys.stderr)
    return 1 if run.failed else 0


def _print_results(output: Path, conditions: list[dict], fmt: str) -> None:
    from ..study.store import Store

    store = Store(output)
    try:
        metrics_of = {c["job"]: store.metrics(c["job"]) for c in conditions}
    finally:
        store.close()
    for c in conditions:
        metrics = metrics_of[c["job"]]
        if not metrics:
            continue
        if fmt == "json":
            print(json.dumps(condition_object(c, metrics), sort_keys=True))
            continue
        parts = [f"{c['name']:<40} {c['method']:<10}"]
        if "perplexity" in metrics:
            parts.append(f"ppl {metrics['perplexity']['ppl']:>10.3f}")
        for bench, s in metrics.items():
            if bench not in ("perplexity", "diagnostics") and isinstance(s.get("accuracy"), (int, float)):
                parts.append(f"{bench} {s['accuracy']:.3f}")
        print("  ".join(parts))
