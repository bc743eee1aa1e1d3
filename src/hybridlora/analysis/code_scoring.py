"""Score imported HumanEval completions that their source left unscored (``report --import DIR --score-code``).

The published study stored its HumanEval completions untrimmed and never executed them. Here each unscored
HumanEval record that has its completion is cut at the standard stop sequences and executed in hybridlora's
sandbox (the candidate sandboxed, the tests in a trusted process: :func:`hybridlora.evaluate.sandbox.run_humaneval`).
The scored cells get the benchmark name :data:`SCORED_BENCHMARK`, so every table, figure and test of the
report says who scored them; the per-instance outcomes (raw and executed completion, status, reason) are
returned for the report folder.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from .contract import InstanceRecord
from .importer import ResultSet

SCORED_BENCHMARK = "humaneval (scored by hybridlora)"
SCORED_FILE = "scored/humaneval.jsonl"


class CodeScoringError(ValueError):
    """The completions cannot be scored (no problems data, unknown task ids); one-line message."""


def score_imported_humaneval(result_set: ResultSet, *, data_dir: Optional[str] = None,
                             workers: Optional[int] = None, timeout_s: float = 10.0,
                             progress: bool = True) -> Tuple[ResultSet, List[dict], str]:
    """(result set with the HumanEval cells scored, per-instance outcome rows, a note for the report).

    Only records with ``correct is None`` and a stored completion are executed; others are left as they are.
    """
    from hybridlora.evaluate import humaneval
    from hybridlora.evaluate.data import BenchmarkError

    todo = [(i, r) for i, r in enumerate(result_set.records)
            if r.benchmark == humaneval.NAME and r.correct is None and _key(r) in result_set.completions]
    if not todo:
        raise CodeScoringError("--score-code: these results have no unscored HumanEval completions to execute")
    try:
        items, _ = humaneval.load(data_dir)
    except BenchmarkError as exc:
        raise CodeScoringError(f"--score-code needs the HumanEval problems: {exc}") from None
    problems = {item["task_id"]: item for item in items}
    rows = [dict(result_set.completions[_key(r)], example_id=r.example_id) for _, r in todo]
    if progress:
        import sys

        print(f"--score-code: executing {len(rows)} HumanEval completions in the sandbox ...", file=sys.stderr)
    try:
        outcomes = humaneval.score_completions(rows, problems, trim=True, workers=workers, timeout_s=timeout_s)
    except BenchmarkError as exc:
        raise CodeScoringError(f"--score-code: {exc}") from None
    records = list(result_set.records)
    outcome_rows = []
    for (index, record), outcome in zip(todo, outcomes):
        records[index] = dataclasses.replace(record, benchmark=SCORED_BENCHMARK, correct=bool(outcome["correct"]))
        outcome_rows.append({"model": record.model, "placement": record.placement,
                             "train_domain": record.train_domain, "seed": record.seed, **outcome,
                             "benchmark": SCORED_BENCHMARK})
    runs = len({(r.model, r.placement, r.train_domain, r.seed) for _, r in todo})
    passed = sum(o["correct"] for o in outcomes)
    note = (f"HumanEval was scored by hybridlora, not by the results' source: {len(outcomes)} stored completions "
            f"of {runs} run(s) ({passed} passed) were {humaneval.STANDARD_TRIM} and executed in hybridlora's "
            "sandbox, the tests running in a trusted process (docs/EVALUATION.md). The benchmark is labelled "
            f"'{SCORED_BENCHMARK}'; raw and executed completions with each outcome are in {SCORED_FILE}.")
    return dataclasses.replace(result_set, records=records), outcome_rows, note


def relabel_targets(targets: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """Target benchmarks with HumanEval also under its scored label (so codealpaca still targets it)."""
    return {domain: benches + ([SCORED_BENCHMARK] if "humaneval" in benches and SCORED_BENCHMARK not in benches
                               else []) for domain, benches in targets.items()}


def _key(record: InstanceRecord) -> tuple:
    return (record.model, record.placement, record.train_domain, record.seed, record.benchmark, record.example_id)
