"""``hybridlora study [CONFIG]``: run (or resume) a placement study and write its report."""
from __future__ import annotations

import sys

from ..threads import add_option as add_threads_option


def register(subparsers) -> None:
    from .backends import add_backend_options
    from .config import preset_names

    p = subparsers.add_parser(
        "study", help="run a placement study (model × placement × domain × seed) and write its report",
        description="Run every cell of a study config, resumably, then build the report. With no CONFIG: the "
                    "demo preset (a small synthetic world: pretrained 250k-parameter lab hybrids, synthetic "
                    "domains, CPU, no data or network needed). Ctrl-C stops it; the same command resumes it.")
    p.add_argument("config", nargs="?", default=None,
                   help=f"a study YAML file or a preset ({', '.join(preset_names())}); default: demo. With "
                        "--status: also a study directory")
    p.add_argument("--output", help="study directory (default: the config's `output`, else studies/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the grid, the number of runs and a rough cost")
    p.add_argument("--only", metavar="KEY=PATTERN,...",
                   help="run only matching cells, e.g. placement=study/softmax_only,domain=gsm8k (keys: model, placement, "
                        "domain, seed, kind); base evaluations of the matching models are kept")
    p.add_argument("--seeds", help="override the config's seeds, e.g. 3407,42,1234")
    p.add_argument("--add-cells", action="store_true",
                   help="the --output directory holds a study of another config: add this config's cells to it "
                        "(its report then covers both); without it such a directory is refused")
    p.add_argument("--no-report", action="store_true", help="run the jobs but do not build the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes: only the result line")
    p.add_argument("--status", action="store_true",
                   help="show the progress of the study (running or stopped) cell by cell and exit; runs nothing")
    add_threads_option(p)
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


def _small_model_runners(args, config, backend):
    """Both cores for a study of small models (tiny configs, the demo's lab models) on a machine without a GPU."""
    from ..builtin_models import BUILTIN_PREFIX
    from .backends import jobs_left, small_cpu_runners
    from .grid import expand_grid, filter_jobs, parse_only

    small = all(m.tiny or m.model.startswith(BUILTIN_PREFIX) for m in config.models)
    if not small:
        return backend
    ids = [j.id for j in filter_jobs(expand_grid(config), parse_only(args.only))]
    return small_cpu_runners(backend, jobs_left(config.output_dir(), ids), small=True, what="cells",
                             say=not args.quiet)


def cmd_study(args) -> int:
    from ..errors import CliError
    from ..analysis.report import ReportError
    from ..placement import PlacementError
    from .backends import BackendError, backend_from_args, check_backend
    from .config import StudyConfigError
    from .runner import dry_run, run_study, summary_line
    from .store import StoreError

    try:
        if args.status:
            return _status(args)
        config = _config(args)
        if args.dry_run:
            dry_run(config, only=args.only)
            return 0
        backend = backend_from_args(args, config.backend)
        check_backend(backend)  # Ray missing or the cluster unreachable: say so before any work
        backend = _small_model_runners(args, config, backend)
        notice = None if args.quiet else (lambda: _start_notices(args, config))
        try:
            run = run_study(config, only=args.only, progress=not args.quiet, report=not args.no_report,
                            add_cells=args.add_cells, on_start=notice, backend=backend)
        except KeyboardInterrupt:
            return _interrupted(args, config)
    except (StudyConfigError, StoreError, PlacementError, ReportError, BackendError) as exc:
        raise CliError(str(exc)) from None
    if not args.quiet:
        _end_summary(run)
    print(summary_line(run))
    if run.failed:
        for job_id, message in run.failed.items():
            print(f"failed {job_id}: {message}", file=sys.stderr)
        return 1
    return 0


def _status(args) -> int:
    from pathlib import Path

    from .store import DB_NAME
    from .summary import status_lines

    if args.output:
        study_dir = Path(args.output)
    elif args.config and (Path(args.config).is_dir() or not Path(args.config).suffix and "/" in args.config):
        study_dir = Path(args.config)  # a study directory (or what was meant to be one)
    else:
        study_dir = _config(args).output_dir()
    if not (study_dir / DB_NAME).is_file():
        from ..errors import CliError

        raise CliError(f"{study_dir}: no study here yet (no {DB_NAME}); start it with `hybridlora study CONFIG "
                       f"--output {study_dir}`")
    for line in status_lines(study_dir):
        print(line)
    return 0


def _start_notices(args, config) -> None:
    """The config's notes (the demo: a small synthetic world, not a claim about large models), then the
    code-execution notice; printed once the inputs are known good, before any job runs."""
    for note in config.notes:
        print(f"NOTE: {note}", file=sys.stderr)
    _code_execution_notice(args, config)


def _code_execution_notice(args, config) -> None:
    """The study runs model-generated code (as `eval --confirm-run-unsafe-code` does): say so before it starts."""
    if config.eval.allow_code_execution and "humaneval" in config.eval.benchmarks:
        print(f"NOTE: this study RUNS MODEL-GENERATED CODE (HumanEval) in the sandbox, because its config sets "
              f"eval.allow_code_execution: true ({args.config or 'demo'}); set it to false to leave HumanEval "
              "unscored (docs/EVALUATION.md: the sandbox)", file=sys.stderr)


def _interrupted(args, config) -> int:
    from .summary import resume_command

    print(f"\ninterrupted: the cells finished so far are kept in {config.output_dir()}; resume with:\n  "
          f"{resume_command(args.config, config.output_dir(), args.only)}", file=sys.stderr)
    return 130


def _end_summary(run) -> None:
    """Notes of the cells, once (stderr), then the headline of the report (stdout, above the result line)."""
    from .summary import cell_notes, headline_lines

    for line in cell_notes(run.study_dir, [j.id for j in run.jobs]):
        print(line, file=sys.stderr)
    if run.report:
        lines = headline_lines(run.report)
        if lines:
            print("recommended placement per model and training domain (smallest within 95% of the full "
                  "placement; gain vs base on the domain's own benchmark, pp, 95% paired-bootstrap interval):")
            for line in lines:
                print("  " + line)
