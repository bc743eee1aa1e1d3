"""The ``hybridlora`` command line.

Every user error ends as one line on stderr starting with ``error:`` and exit status 2; nothing is written
before the inputs have been validated.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__, threads

from .errors import EXIT_FAILED_CHECK, EXIT_USAGE, CliError  # noqa: F401  (re-exported for callers)
from .errors import check_output_folder
from .quiet import quiet_libraries


# --- shared steps -----------------------------------------------------------------------------------
def _source_and_map(spec: str):
    from .components import build_component_map
    from .models import build_meta_model, resolve_model

    source = resolve_model(spec)
    model = build_meta_model(source.config)
    return source, model, build_component_map(model)


def _family(cmap):
    from .families import family_named

    return family_named(cmap.family) if cmap.family else None


MAX_RANK = 65_536  # wider than any layer of the supported models: a larger rank only asks for memory


def check_rank_alpha(args) -> None:
    """--rank / --alpha / --budget that would plan nonsense (0 or negative trainable parameters) or allocate
    petabytes in verify: refused before anything is built."""
    import math

    if args.rank is not None and not 1 <= args.rank <= MAX_RANK:
        raise CliError(f"--rank {args.rank}: give a LoRA rank between 1 and {MAX_RANK:,} (typical: 8-64)")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        raise CliError(f"--alpha {args.alpha}: give a positive scaling (typical: twice the rank)")
    if args.budget is not None and args.budget < 1:
        raise CliError(f"--budget {args.budget}: give a positive number of trainable parameters")


def _placements(args, cmap) -> list:
    from .placement import load_placement_file, looks_like_placement_file, named_preset, preset_group

    family = _family(cmap)
    if args.preset:
        chosen = preset_group(args.preset, family)
    else:
        chosen = []
        for item in args.placement:
            looks_like_file = looks_like_placement_file(item)
            if looks_like_file and not Path(item).is_file():
                raise CliError(f"placement file {item} not found")
            chosen.append(load_placement_file(item) if looks_like_file else named_preset(item, family))
    return [p.with_defaults(args.rank, args.alpha) for p in chosen]


def _plan_row(resolved, budget_report=None) -> dict[str, Any]:
    row = {
        "name": resolved.name,
        "trainable_params": resolved.trainable_params,
        "pct_trainable": round(resolved.pct_trainable, 4),
        "num_target_modules": len(resolved.hosts),
        "target_modules": [h.name for h in resolved.hosts],
        "rank_pattern": {h.name: h.rank for h in resolved.hosts},
        "alpha_pattern": {h.name: h.alpha for h in resolved.hosts},
        "modules_by_component": resolved.components(),
        "skipped": resolved.skipped,
    }
    if budget_report is not None:
        row["budget"] = {"requested": budget_report.requested, "achieved": budget_report.achieved,
                         "relative_error": round(budget_report.relative_error, 6)}
    return row


# --- commands ---------------------------------------------------------------------------------------
def cmd_catalog(args) -> int:
    from .models import catalog

    rows = [
        {"name": e["name"], "hub_id": e.get("hub_id"), "model_type": e["config"]["model_type"]}
        for e in sorted(catalog().values(), key=lambda e: e["name"])
    ]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(_table(["name", "hub_id", "model_type"], [[r["name"], r["hub_id"], r["model_type"]] for r in rows]))
    return 0


def cmd_inspect(args) -> int:
    source, _, cmap = _source_and_map(args.model)
    if args.format == "json":
        print(json.dumps({"model": source.name, "source": source.kind, **cmap.to_dict()}, indent=2))
        return 0
    print(f"model      {source.name}  ({source.kind}; {cmap.model_type}; built on the meta device)")
    print(f"family     {cmap.family or 'unknown'}  (classified by {cmap.classifier})")
    print(f"topology   {cmap.topology}  ({cmap.topology_source})")
    print(f"parameters {cmap.total_params:,}  (tied weights counted once)")
    print("\nschedule")
    print(_schedule_text(cmap.schedule))
    print("\nparameters by component")
    totals = cmap.totals_by_component()
    print(_table(["component", "params", "%"], [[c, f"{n:,}", f"{100 * n / cmap.total_params:.2f}"] for c, n in totals.items()]))
    print("\nmodules (one row per component.role; counts over all layers)")
    print(_table(["component", "role", "modules", "params", "LoRA", "example / reason"], _role_rows(cmap)))
    if cmap.unclassified:
        print(f"\nUNCLASSIFIED ({len(cmap.unclassified)}): " + ", ".join(cmap.unclassified[:20]))
    if cmap.notes:
        print(f"\nnote: {cmap.notes}")
    return 0


def cmd_plan(args) -> int:
    from .placement import match_budget, resolve, save_adapter_config

    check_rank_alpha(args)
    if args.save_config:
        check_output_folder(args.save_config, "--save-config")
    source, _, cmap = _source_and_map(args.model)
    rows, resolved_all = [], []
    for placement in _placements(args, cmap):
        resolved = resolve(placement, cmap)
        report = None
        if args.budget is not None:
            resolved, report = match_budget(resolved, args.budget)
        rows.append(_plan_row(resolved, report))
        resolved_all.append(resolved)
    if args.save_config:
        try:
            for resolved in resolved_all:
                save_adapter_config(resolved, Path(args.save_config) / resolved.name, base_model=source.name)
        except OSError as exc:
            raise CliError(f"--save-config {args.save_config}: cannot write ({exc.strerror or exc}); choose a "
                           "folder you can write to") from None
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{source.name}: {cmap.total_params:,} parameters, {cmap.topology} {cmap.family or 'unknown-family'} model")
    headers = ["placement", "modules", "trainable", "% of base", "by component"]
    if args.budget is not None:
        headers.append("budget error")
    table = []
    for r in rows:
        comp = ", ".join(f"{c}:{n}" for c, n in r["modules_by_component"].items())
        line = [r["name"], r["num_target_modules"], f"{r['trainable_params']:,}", f"{r['pct_trainable']:.3f}", comp]
        if args.budget is not None:
            line.append(f"{100 * r['budget']['relative_error']:+.3f}%")
        table.append(line)
    print(_table(headers, table))
    skipped = {k: v for r in rows for k, v in r["skipped"].items()}
    for why, n in skipped.items():
        print(f"  skipped {n} × {why}")
    if args.save_config:
        print(f"adapter_config.json written under {args.save_config}/<placement>/")
    return 0


def cmd_verify(args) -> int:
    from .models import load_pretrained
    from .placement.verify import verify_placement

    check_rank_alpha(args)
    source, _, cmap = _source_and_map(args.model)
    if args.load_weights and source.kind not in ("local", "hub"):
        raise CliError("--load-weights needs a local model directory or a reachable hub id")
    failed = False
    reports = []
    for placement in _placements(args, cmap):
        # PEFT wraps the model in place: each placement gets freshly loaded weights.
        model = load_pretrained(source) if args.load_weights else None
        report, _ = verify_placement(source.config, placement, budget=args.budget, model=model)
        reports.append(report.to_dict())
        failed |= not report.ok
        if args.format == "table":
            _print_verify(report)
    if args.format == "json":
        print(json.dumps(reports, indent=2))
    return EXIT_FAILED_CHECK if failed else 0


def _print_verify(report) -> None:
    status = "OK" if report.ok else "FAILED"
    print(f"[{status}] {report.placement}: {report.actual_hosts}/{report.expected_hosts} hosts, trainable "
          f"{report.peft_trainable:,} (planned {report.planned_trainable:,}); liveness on "
          f"{report.liveness_checked_on}: {len(report.live)} live, {len(report.dead)} dead")
    for label, items in (("missing", report.missing), ("unexpected", report.unexpected),
                         ("forbidden", report.forbidden), ("rank mismatch", report.rank_mismatch)):
        for item in items:
            print(f"    {label}: {item}")
    for name, why in report.dead.items():
        print(f"    dead: {name}: {why}")


# --- formatting -------------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _schedule_text(schedule) -> str:
    """Run-length summary: '0-2 linear_attention [linear_attention]'."""
    out, start = [], 0
    for i in range(1, len(schedule) + 1):
        if i == len(schedule) or (schedule[i].kind, schedule[i].mixers) != (schedule[start].kind, schedule[start].mixers):
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            layer = schedule[start]
            out.append(f"  {span:>7}  {layer.kind or '?':<18} mixers: {', '.join(layer.mixers) or '-'}")
            start = i
    return "\n".join(out)


def _role_rows(cmap) -> list[list[Any]]:
    groups: dict[tuple[str, str], list] = {}
    for m in cmap.modules:
        groups.setdefault((m.component, m.role), []).append(m)
    rows = []
    for (component, role), ms in groups.items():
        eligible = all(m.eligible for m in ms)
        detail = ms[0].name if eligible else ms[0].reason
        rows.append([component, role, len(ms), f"{sum(m.params for m in ms):,}", "yes" if eligible else "no", detail])
    return rows


# --- parser -----------------------------------------------------------------------------------------
def _placement_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--placement", action="append", metavar="NAME|FILE",
                       help="a preset name (see `hybridlora presets`) or a placement YAML file; repeatable")
    group.add_argument("--preset", metavar="GROUP", help="a preset group: generic | study")
    p.add_argument("--rank", type=int, default=None, help="default LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="default LoRA alpha (default 32)")
    p.add_argument("--budget", type=int, default=None, metavar="N",
                   help="choose ranks so each placement trains about N parameters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlora", description="Component-aware LoRA placement for hybrid LMs")
    parser.add_argument("--version", action="version", version=f"hybridlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("catalog", help="list the architectures available offline")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("inspect", help="component map: schedule, topology, parameters per component")
    p.add_argument("model", help="catalog name, hub id, local model directory or config.json")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="exact LoRA placements and their trainable parameters")
    p.add_argument("model")
    _placement_args(p)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--save-config", metavar="DIR", help="write PEFT adapter_config.json per placement under DIR")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("verify", help="attach with PEFT, check hosts and counts, prove every adapter is live")
    p.add_argument("model")
    _placement_args(p)
    p.add_argument("--load-weights", action="store_true",
                   help="load the real weights and check liveness on them (default: a tiny same-family model)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    threads.add_option(p)
    p.set_defaults(func=cmd_verify)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module, __package__).register(sub)
    return parser


# Each capability package owns its sub-commands through a ``register(subparsers)`` function: one line here each.
SUBCOMMAND_MODULES = (
    ".study.cli",
    ".train.cli",
    ".evaluate.cli",
    ".analysis.cli",
    ".placement.cli",
    ".ablation.cli",
    ".lab.cli",
    ".advise.cli",
)


def _configure_threads(args) -> None:
    """Commands that compute (those with ``--threads``) size their CPU threads before any work; each says what
    was chosen once its inputs are validated (``threads.current()``), so that bad input stays one line."""
    if not hasattr(args, "threads") or getattr(args, "dry_run", False):
        return
    try:
        threads.configure(args.threads)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    from .models import ModelError
    from .placement import PlacementError

    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        _configure_threads(args)
        return args.func(args)
    except (CliError, ModelError, PlacementError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
