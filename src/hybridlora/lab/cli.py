"""``hybridlora lab``: build, pretrain, probe and report matched hybrid architectures (docs/LAB.md)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..atomic import replace_dir
from ..errors import CliError


def register(subparsers) -> None:
    lab = subparsers.add_parser("lab", help="the architecture lab: matched sequential/parallel hybrids (docs/LAB.md)")
    sub = lab.add_subparsers(dest="lab_command", required=True)

    p = sub.add_parser("build", help="solve a spec's width for its parameter target; write model directories")
    p.add_argument("spec", help="architecture spec YAML (docs/LAB.md)")
    p.add_argument("--variants", action="store_true",
                   help="also the matched siblings: the other topology and the all-attention / all-recurrent controls")
    p.add_argument("--output", help="write one randomly initialised model directory per architecture under DIR")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_build)

    _register_more(sub)


def _register_more(sub) -> None:
    """Sub-commands of the later stages (pretrain, probe, report, demo-models) register here when importable."""
    import importlib

    for name in ("pretrain", "probes", "report", "demo_models"):
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        module.register_cli(sub)


def load_spec_or_fail(path: str):
    from .spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as exc:
        raise CliError(str(exc)) from None


def solve_or_fail(spec):
    from .solve import solve
    from .spec import SpecError

    try:
        return solve(spec)
    except SpecError as exc:
        raise CliError(str(exc)) from None


def architectures(spec, with_variants: bool) -> dict:
    from .spec import variants

    if not with_variants:
        return {spec.name: spec}
    return {v.name: v for v in variants(spec).values()}


def cmd_build(args) -> int:
    spec = load_spec_or_fail(args.spec)
    archs = architectures(spec, args.variants)
    solved = {name: solve_or_fail(s) for name, s in archs.items()}  # every spec checked before anything is written
    if args.output:
        out = Path(args.output)
        if out.is_file():
            raise CliError(f"--output {out} is a file; give a directory")
        for name, (config, _) in solved.items():
            save_model_dir(_init_model(config, args.seed), out / name)
    rows = [{"name": name, "topology": _topology(cfg), "schedule": cfg.mixer_schedule, **_match_dict(match)}
            for name, (cfg, match) in solved.items()]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<28} {r['topology']:<10} {r['achieved']:>12,} params  target {r['target']:,} "
              f"({100 * r['relative_error']:+.2f}%)  width {r['width']}  MLP {r['intermediate_size']}  "
              f"layers {_schedule_line(r['schedule'])}")
    if args.output:
        print(f"model directories written under {args.output}/<name>/")
    return 0


def _match_dict(match) -> dict:
    return {"target": match.target, "achieved": match.achieved, "relative_error": round(match.relative_error, 6),
            "width": match.width, "intermediate_size": match.intermediate_size}


def _topology(config) -> str:
    return "parallel" if any(len(m) > 1 for m in config.layer_mixers) else "sequential"


def _schedule_line(schedule: list[str]) -> str:
    short = {"attention": "A", "gdn": "G", "mamba2": "M", "short_conv": "C"}
    return " ".join("".join(short[m] for m in layer.split("+")) for layer in schedule)


def _init_model(config, seed: int):
    import warnings

    import torch

    from .model import LabForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LabForCausalLM(config)


def save_model_dir(model, directory: Path, tokenizer=None) -> Path:
    """save_pretrained into a temporary sibling, then rename into place (never a half-written model dir)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, directory)
    return directory
