"""``hybridlora report``: the study report from a study directory or from imported results.

Wire in with ``from hybridlora.analysis.cli import register; register(subparsers)``.

    hybridlora report STUDY_DIR [--output OUT]        # a study made by hybridlora (default OUT: STUDY_DIR/report)
    hybridlora report --import DIR --output OUT       # published or generic per-instance results
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
from pathlib import Path
from typing import Dict

DEFAULT_RESAMPLES = 10_000


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="statistics, figures and tables of a placement study (HTML, Markdown, CSV, LaTeX)",
        description="Builds OUT/report.html (self-contained), OUT/report.md, OUT/tables/*.csv|.tex and "
                    "OUT/figures/*.png from a study directory, or from per-instance results with --import "
                    "(the generic manifest layout or the published lora-placement-hybrid folder; see "
                    "docs/RESULTS_FORMAT.md). An earlier report in OUT is replaced only once the new one is "
                    "complete.")
    p.add_argument("study_dir", nargs="?", metavar="STUDY_DIR", help="a study directory made by hybridlora")
    p.add_argument("--import", dest="import_dir", metavar="DIR", help="per-instance results to import instead")
    p.add_argument("--output", metavar="OUT", help="report folder (default STUDY_DIR/report; required with --import)")
    p.add_argument("--title", help="report title")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a note shown at the top of the report; repeatable")
    p.add_argument("--full-placement", action="append", default=[], metavar="MODEL=PLACEMENT",
                   help="the all-components placement of MODEL (reference of the recipe); repeatable")
    p.add_argument("--params", metavar="FILE",
                   help="JSON {model: {placement: trainable_params}} for results that lack parameter counts")
    p.add_argument("--plan-params", type=int, metavar="RANK",
                   help="fill missing parameter counts by planning each placement (a preset name of the model's "
                        "family) at this LoRA rank on the model's exact architecture, e.g. 16 for the published study")
    p.add_argument("--model-tag", action="append", default=[], metavar="MODEL=TOPOLOGY:MIXER",
                   help="what kind of hybrid MODEL is (topology sequential|parallel|all_attention|all_recurrent, "
                        "mixer e.g. gdn, mamba2); with a sequential and a parallel model the report adds the "
                        "topology-effect section (docs/REPORT.md); repeatable")
    p.add_argument("--score-code", action="store_true",
                   help="with --import: execute the HumanEval completions the results left unscored (in the "
                        "sandbox, cut at the standard stop sequences) and report their pass@1, labelled as scored "
                        "by hybridlora; this runs model-written code")
    p.add_argument("--data-dir", metavar="DIR",
                   help="with --score-code: local data laid out like shared/data, for the HumanEval problems "
                        "(else $HYBRIDLORA_DATA, else the Hugging Face hub)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"paired-bootstrap resamples (default {DEFAULT_RESAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_report)


def _load_imported(path: Path, args: argparse.Namespace):
    """(StudyResults, extra report files) of imported results; with --score-code, HumanEval executed."""
    from hybridlora.errors import CliError

    from .importer import ResultsFormatError, detect_format, load_results
    from .results import from_result_set

    if not path.is_dir():
        raise CliError(f"--import {path}: no such directory")
    try:
        layout = detect_format(path)
        result_set = load_results(path)
    except ResultsFormatError as exc:
        raise CliError(str(exc)) from None
    metadata = {"source": str(path.resolve()), "layout": layout,
                "imported": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    if not args.score_code:
        return from_result_set(result_set, metadata=metadata), {}
    from .code_scoring import SCORED_FILE, CodeScoringError, relabel_targets, score_imported_humaneval

    try:
        result_set, outcomes, note = score_imported_humaneval(result_set, data_dir=args.data_dir,
                                                              progress=not args.no_progress)
    except CodeScoringError as exc:
        raise CliError(str(exc)) from None
    metadata["humaneval_scored_by"] = "hybridlora report --score-code"
    results = from_result_set(result_set, metadata=metadata, notes=[note])
    results.target_benchmarks = relabel_targets(results.target_benchmarks)
    extra = {SCORED_FILE: "".join(json.dumps(row) + "\n" for row in outcomes).encode("utf-8")}
    return results, extra


def _load_study(path: Path):
    from hybridlora.errors import CliError

    if not path.is_dir():
        raise CliError(f"{path}: no such study directory")
    try:
        from hybridlora.study import results, store
    except ImportError as exc:
        raise CliError(f"reading a study directory needs hybridlora.study ({exc})") from None
    # the store's own error (not a study, corrupt database) plus plain I/O and format errors
    expected = (OSError, ValueError) + tuple(
        e for e in (getattr(store, "StoreError", None),) if isinstance(e, type) and issubclass(e, Exception))
    try:
        return results.load_study_results(path)
    except expected as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CliError(first if str(path) in first else f"{path}: {first}") from None


def _full_placements(items) -> Dict[str, str]:
    from hybridlora.errors import CliError

    out = {}
    for item in items:
        model, sep, placement = item.rpartition("=")
        if not sep or not model or not placement:
            raise CliError(f"--full-placement {item!r}: expected MODEL=PLACEMENT")
        out[model] = placement
    return out


_TOPOLOGIES = ("sequential", "parallel", "all_attention", "all_recurrent")


def _model_tags(items, models) -> Dict[str, Dict[str, str]]:
    """``--model-tag MODEL=TOPOLOGY:MIXER`` items as ``{model: {"topology": ..., "mixer": ...}}``."""
    from hybridlora.errors import CliError

    out: Dict[str, Dict[str, str]] = {}
    for item in items:
        model, sep, tag = item.rpartition("=")
        topology, colon, mixer = tag.partition(":")
        if not sep or not model or not colon or not mixer:
            raise CliError(f"--model-tag {item!r}: expected MODEL=TOPOLOGY:MIXER, e.g. "
                           "'tiiuae/Falcon-H1-0.5B-Base=parallel:mamba2'")
        if topology not in _TOPOLOGIES:
            raise CliError(f"--model-tag {item!r}: topology must be one of {', '.join(_TOPOLOGIES)}")
        if model not in models:
            raise CliError(f"--model-tag {item!r}: no model {model!r} in these results "
                           f"(models: {', '.join(sorted(models))})")
        out[model] = {"topology": topology, "mixer": mixer}
    return out


def _read_params(path: str) -> Dict[tuple, int]:
    from hybridlora.errors import CliError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"--params {path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"--params {path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    out = {}
    ok = isinstance(data, dict) and all(isinstance(v, dict) for v in data.values())
    for model, places in (data.items() if ok else []):
        for placement, n in places.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                ok = False
            out[(model, placement)] = n
    if not ok:
        raise CliError(f"--params {path}: expected {{model: {{placement: non-negative int}}}}")
    return out


def _apply_options(results, args):
    """Command-line overrides on top of what the study or the import provides."""
    if args.title:
        results.title = args.title
    results.notes = list(results.notes) + list(args.note)
    results.full_placement = {**results.full_placement, **_full_placements(args.full_placement)}
    results.model_tags = {**results.model_tags,
                          **_model_tags(args.model_tag, {r.model for r in results.runs})}
    if args.params:
        params = _read_params(args.params)
        results.runs = [dataclasses.replace(r, trainable_params=params[(r.model, r.placement)])
                        if (r.model, r.placement) in params else r for r in results.runs]
    if args.plan_params is not None:
        planned = _planned_params(results.runs, args.plan_params)
        results.runs = [dataclasses.replace(r, trainable_params=planned[(r.model, r.placement)])
                        if not r.trainable_params and (r.model, r.placement) in planned else r for r in results.runs]
        if planned:
            results.notes.append(f"Trainable parameter counts of {len(planned)} placement(s) were planned by hybridlora "
                                 f"(rank {args.plan_params}, the preset of that name on the model's exact "
                                 "architecture), not read from the results.")
    return results


def _planned_params(runs, rank: int) -> Dict[tuple, int]:
    """(model, placement) -> trainable params for runs whose placement is a preset of the model's family."""
    from hybridlora.errors import CliError
    from hybridlora.components import build_component_map
    from hybridlora.families import family_named
    from hybridlora.models import ModelError, build_meta_model, resolve_model
    from hybridlora.placement import PlacementError, named_preset, resolve

    if rank < 1:
        raise CliError("--plan-params: the rank must be at least 1")
    out: Dict[tuple, int] = {}
    maps: Dict[str, object] = {}
    for run in runs:
        key = (run.model, run.placement)
        if run.placement == "base" or run.trainable_params or key in out:
            continue
        if run.model not in maps:
            try:
                maps[run.model] = build_component_map(build_meta_model(resolve_model(run.model).config))
            except ModelError as exc:
                raise CliError(f"--plan-params: {exc}") from None
        cmap = maps[run.model]
        family = family_named(cmap.family) if cmap.family else None
        try:
            # imported runs of the published study name its conditions without the study/ prefix
            study_name = f"study/{run.placement}"
            name = study_name if family and run.placement in family.study_presets else run.placement
            placement = named_preset(name, family).with_defaults(rank, 2 * rank)
        except PlacementError:
            continue  # not a preset name: its count stays unknown (and the report says so)
        out[key] = resolve(placement, cmap).trainable_params
    return out


def run_report(args: argparse.Namespace) -> int:
    from hybridlora.errors import CliError

    from .report import ReportError, build_report

    if bool(args.study_dir) == bool(args.import_dir):
        raise CliError("report: give either STUDY_DIR or --import DIR (exactly one)")
    if args.resamples < 1:
        raise CliError("--resamples must be >= 1")
    if args.seed < 0:
        raise CliError("--seed must be >= 0")
    if args.import_dir:
        if not args.output:
            raise CliError("report --import needs --output OUT")
        source = Path(args.import_dir)
        results, extra_files = _load_imported(source, args)
        output = Path(args.output)
    else:
        if args.score_code:
            raise CliError("--score-code works with --import DIR (a study made by hybridlora scores HumanEval itself)")
        extra_files = {}
        source = Path(args.study_dir)
        from hybridlora.ablation.report import build_ablation_report, is_ablation_dir

        if is_ablation_dir(source):  # an ablation directory (hybridlora ablate) has its own report
            print(build_ablation_report(source, args.output, resamples=min(args.resamples, 2000), seed=args.seed))
            return 0
        results = _load_study(source)
        output = Path(args.output) if args.output else source / "report"
    if not results.records:
        raise CliError(f"{source}: no evaluation records found")
    results = _apply_options(results, args)
    try:
        paths = build_report(results, output, resamples=args.resamples, seed=args.seed,
                             progress=not args.no_progress, extra_files=extra_files)
    except ReportError as exc:
        raise CliError(str(exc)) from None
    print(paths["report.html"])
    return 0
