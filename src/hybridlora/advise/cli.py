"""``hybridlora advise``: propose a placement and per-host ranks from signals measured on the user's data, or
(``--validate STUDY_DIR``) measure the advisor's track record against a study whose full grid is known."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .allocate import UNITS
from .propose import DEFAULT_EXAMPLES, DEFAULT_MAX_LENGTH
from .signals import SIGNALS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "advise", help="propose where LoRA should go and at which ranks, from signals measured on your data",
        description="Measure per-host signals on a few hundred examples, allocate a trainable-parameter budget "
                    "over hosts and ranks, and write the proposal as a placement YAML and a PEFT config. "
                    "--validate STUDY_DIR instead measures how well the advisor predicts a finished study.")
    p.add_argument("model", nargs="?", help="catalog name, hub id, local model directory or config.json")
    p.add_argument("--data", metavar="gsm8k|codealpaca|chat|PATH", help="the domain or data file to advise for")
    p.add_argument("--data-dir", help="the shared data folder (local copies of the domains; needed offline)")
    p.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN", help="field mapping, as in train")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, metavar="N", help="trainable LoRA parameters to allocate")
    size.add_argument("--rank", type=int, metavar="R",
                      help="budget = every eligible attention/recurrent/MLP host at rank R (default 16)")
    p.add_argument("--signal", choices=SIGNALS, default="probe",
                   help="probe: spectra of a short all-host LoRA run (default; the demo does not settle the choice, "
                        "see docs/ADVISE.md); grad: LoRA-GA gradient spectra (one backward pass, no training)")
    p.add_argument("--unit", choices=UNITS, default="host",
                   help="host: a rank per module (layers chosen by the signal); component: one rank per component.role")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="examples the signal is measured on")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="longer examples are skipped")
    p.add_argument("--seed", type=int, default=3407, help="data subset and probe seed")
    p.add_argument("--tiny", action="store_true", help="random-weight tiny same-family model and byte tokenizer")
    p.add_argument("--output", metavar="DIR", help="write placement.yaml, adapter_config.json and advice.json here")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--validate", metavar="STUDY_DIR",
                   help="measure the advisor against a finished study (Spearman, rank of its pick, regret, cost)")
    p.add_argument("--signals", default=",".join(("grad", "probe", "probe_loss")),
                   help="with --validate: signals to score (grad, probe, probe_loss); default all")
    p.set_defaults(func=cmd_advise)


def cmd_advise(args) -> int:
    from ..data import DataError
    from ..errors import CliError
    from ..study.store import StoreError
    from ..train import TrainingError

    try:
        if args.validate:
            return _validate(args)
        return _advise(args)
    except (DataError, TrainingError, StoreError) as exc:
        raise CliError(str(exc)) from None


def _check_args(args) -> None:
    from ..errors import CliError

    if not args.model:
        raise CliError("advise needs MODEL (e.g. `hybridlora advise qwen3.5-0.8b --data gsm8k`) or --validate DIR")
    if not args.data:
        raise CliError("advise needs --data DOMAIN|PATH: the signals are measured on your data")
    for flag, value in (("--budget", args.budget), ("--rank", args.rank), ("--examples", args.examples)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be a positive integer, got {value}")
    if args.max_length < 16:
        raise CliError(f"--max-length must be at least 16, got {args.max_length}")


def _load(args):
    """(model source, model, tokenizer) as `train` loads them, then on the GPU when there is one (tiny too)."""
    import torch

    from ..train.cli import load_model_and_tokenizer

    source, model, tokenizer = load_model_and_tokenizer(args.model, tiny=args.tiny)
    if torch.cuda.is_available():
        model = model.cuda()
    return source, model, tokenizer


def _advise(args) -> int:
    from ..components import build_component_map
    from ..data import pad_id_of
    from ..train.cli import _fields
    from .propose import advice_examples, budget_of_rank, propose, write_outputs

    _check_args(args)
    source, model, tokenizer = _load(args)
    cmap = build_component_map(model)
    if args.budget is not None:
        budget, budget_source = args.budget, f"--budget {args.budget}"
    else:
        rank = args.rank or 16
        budget, budget_source = budget_of_rank(cmap, rank), f"every eligible host at rank {rank} (--rank {rank})"
    _check_budget_affords_one_rank(cmap, budget)  # before minutes of measuring, not after
    train_examples, held_out, manifest = advice_examples(
        args.data, tokenizer, data_dir=args.data_dir, examples=args.examples, seed=args.seed,
        max_length=args.max_length, fields=_fields(args.field))
    proposal = propose(model, cmap, train_examples, held_out, pad_id_of(tokenizer), budget, signal=args.signal,
                       unit=args.unit, seed=args.seed, budget_source=budget_source)
    written = write_outputs(proposal, args.output, source.name) if args.output else {}
    if args.format == "json":
        print(json.dumps({"model": source.name, "data": args.data, "data_origin": manifest.get("origin"),
                          **proposal.to_dict(), "written": written}, indent=2))
        return 0
    _print_proposal(source.name, args, proposal, written)
    return 0


def _check_budget_affords_one_rank(cmap, budget: int) -> None:
    """A budget below one rank on every candidate host can buy nothing: say so before any signal is measured."""
    from ..placement import PlacementError
    from .signals import candidate_hosts

    cheapest = min(h.lora_params // h.rank for h in candidate_hosts(cmap, rank=1).hosts)
    if budget < cheapest:
        raise PlacementError(f"budget {budget:,} is below one rank on the cheapest host ({cheapest:,} parameters); "
                             "raise --budget or --rank")


def _print_proposal(model_name: str, args, proposal, written: dict) -> None:
    from ..cli import _table

    d = proposal.to_dict()
    b = d["budget"]
    m = d["measured_on"]
    print(f"{model_name}: advice for {args.data} from the {d['signal']} signal on {m['examples']} examples "
          f"({m['tokens']:,} tokens, {m['signal_wall_s']:.1f} s); proposal {d['fingerprint']}")
    print(f"budget     requested {b['requested']:,} ({b['source']}), achieved {b['achieved']:,} "
          f"({100 * b['relative_error']:+.3f}%)")
    print("signal share by component (one rank-16 update per host): "
          + ", ".join(f"{c} {100 * v:.1f}%" for c, v in d["signal_share_at_rank_16"].items()))
    rows = [[key, s["hosts"], _layers_text(s["layers"]), f"{s['rank_min']}/{s['rank_median']:g}/{s['rank_max']}",
             f"{s['params']:,}"] for key, s in d["ranks_by_component_role"].items()]
    print(_table(["component.role", "hosts", "layers", "rank min/median/max", "params"], rows))
    print("parameter share: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in d["component_share"].items()))
    for why, n in d["excluded"].items():
        print(f"  excluded {n} × {why}")
    if written:
        print(f"written: {written['placement']} (train --placement / study {{file: ...}}), {written['peft_config']} "
              f"(PEFT rank_pattern), {written['advice']}")


def _layers_text(layers: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5'."""
    if not layers:
        return "-"
    spans, start, prev = [], layers[0], layers[0]
    for cur in layers[1:] + [None]:
        if cur is not None and cur == prev + 1:
            prev = cur
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cur
    return ",".join(spans)


def _rebuild_study_report(study_dir) -> Path | None:
    """The study's report again, now with its "Advisor track record" section (only where a report exists: a study
    built with --no-report stays without one)."""
    from ..study.runner import build_study_report

    if not (Path(study_dir) / "report").is_dir():
        return None
    return build_study_report(Path(study_dir))


def _validate(args) -> int:
    from ..errors import CliError
    from .validate import track_record, write_track_record

    if args.model or args.data or args.output or args.budget or args.rank:
        raise CliError("--validate STUDY_DIR takes no MODEL, --data, --output, --budget or --rank: the study's "
                       "cells give the models, data and placements")
    wanted = [s.strip() for s in args.signals.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ("grad", "probe", "probe_loss")]
    if unknown or not wanted:
        raise CliError(f"--signals {args.signals!r}: choose from grad, probe, probe_loss (comma-separated)")
    record = track_record(args.validate, signals=wanted, examples=args.examples, seed=args.seed,
                          max_length=args.max_length, chosen=args.signal)
    paths = write_track_record(record, args.validate)
    report = _rebuild_study_report(args.validate)
    if args.format == "json":
        print(json.dumps({**record, "written": paths, "report": str(report) if report else None}, indent=2))
    else:
        from .validate import track_record_text

        print(track_record_text(record))
        print(f"written: {paths['json']}, {paths['markdown']}" + (f"; report (with the track record): {report}"
                                                                   if report else ""))
    sys.stdout.flush()
    return 0
