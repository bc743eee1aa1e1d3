"""``hybridlora study [CONFIG]``: run (or resume) a placement study and write its report."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    from .backends import add_backend_options
    from .config import preset_names

    p = subparsers.add_parser(
        "study", help="run a placement study (model × placement × domain × seed) and write its report",
        description="Run every cell of a study config, resumably, then build the report. With no CONFIG: the "
                    "demo preset (tiny models, generated data, CPU, a few minutes).")
    p.add_argument("config", nargs="?", default=None,
                   help=f"a study YAML file or a preset ({', '.join(preset_names())}); default: demo")
    p.add_argument("--output", help="study directory (default: the config's `output`, else studies/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the grid, the number of runs and a rough cost")
    p.add_argument("--only", metavar="KEY=PATTERN,...",
                   help="run only matching cells, e.g. placement=softmax_only,domain=gsm8k (keys: model, placement, "
                        "domain, seed, kind); base evaluations of the matching models are kept")
    p.add_argument("--seeds", help="override the config's seeds, e.g. 3407,42,1234")
    p.add_argument("--no-report", action="store_true", help="run the jobs but do not build the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_options(p)
    p.set_defaults(func=cmd_study)


def _config(args):
    from ..errors import CliError
    from .config import StudyConfigError, load_study_config

    config = load_study_config(args.config)
    update = {}
    if args.output:
        update["output"] = args.output
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise CliError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 3407,42") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise CliError(f"--seeds {args.seeds!r}: give distinct integers, e.g. 3407,42")
        update["seeds"] = seeds
    if update:
        from .config import study_config_from_dict

        data = config.model_dump(mode="json")
        data.update(update)
        try:
            config = study_config_from_dict(data, "command line")
        except StudyConfigError as exc:
            raise CliError(str(exc)) from None
    return config


def cmd_study(args) -> int:
    from ..errors import CliError
    from ..analysis.report import ReportError
    from ..placement import PlacementError
    from .backends import BackendError, backend_from_args, check_backend
    from .config import StudyConfigError
    from .runner import dry_run, run_study, summary_line
    from .store import StoreError

    try:
        config = _config(args)
        if args.dry_run:
            dry_run(config, only=args.only)
            return 0
        backend = backend_from_args(args, config.backend)
        check_backend(backend)  # Ray missing or the cluster unreachable: say so before any work
        run = run_study(config, only=args.only, progress=not args.quiet, report=not args.no_report, backend=backend)
    except (StudyConfigError, StoreError, PlacementError, ReportError, BackendError) as exc:
        raise CliError(str(exc)) from None
    print(summary_line(run))
    if run.failed:
        for job_id, message in run.failed.items():
            print(f"failed {job_id}: {message}", file=sys.stderr)
        return 1
    return 0
