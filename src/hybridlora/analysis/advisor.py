"""The report's "Advisor track record" section: how well ``hybridlora advise`` predicted this study's grid.

The numbers are computed by ``hybridlora advise --validate STUDY_DIR`` (:mod:`hybridlora.advise.validate`), which
writes ``<study>/advisor/track_record.json``; the study's results carry that record
(``StudyResults.advisor_track_record``) and this section only lays it out — one row per model × domain × signal,
plus the attention-only baseline — with the record's own summary and verdict as findings.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from .results import StudyResults
from .sections import ReportSection

__all__ = ["ADVISOR_COLUMNS", "advisor_section"]

ADVISOR_COLUMNS: List[Tuple[str, str]] = [
    ("model", "text"), ("train_domain", "text"), ("advisor", "text"), ("spearman", "text"), ("pick", "text"),
    ("rank", "text"), ("regret_pp", "pp"), ("regret_ci_low", "pp"), ("regret_ci_high", "pp"), ("seeds", "text"),
    ("cost_of_grid", "ratio"),
]

_INTRO = ("How well the advisor's signals, measured on a few hundred training examples before any cell ran, "
          "predicted this grid: Spearman correlation of each signal's score with the measured accuracy per "
          "placement, the rank of the placement it picks, its regret (best accuracy minus the pick's, pp, interval "
          "over seeds) and its cost as a share of the grid's recorded time; the attention-only row is the baseline "
          "an advisor has to beat. Measured by `hybridlora advise --validate` on {date} ({device}; {examples} "
          "examples, seed {seed}); run it again after adding cells.")


def _row(group: dict, advisor: str, pick: Optional[dict], spearman: Optional[float], cost: Optional[float]) -> dict:
    pick = pick or {}
    rank = f"{pick['rank']}/{pick['of']}" if pick.get("rank") is not None else None
    return {"model": group["model"], "train_domain": group["train_domain"], "advisor": advisor,
            "spearman": None if spearman is None else f"{spearman:+.2f}", "pick": pick.get("placement"),
            "rank": rank, "regret_pp": pick.get("regret_pp"), "regret_ci_low": pick.get("ci_low"),
            "regret_ci_high": pick.get("ci_high"), "seeds": str(pick["seeds"]) if pick.get("seeds") else None,
            "cost_of_grid": cost}


def _rows(record: dict) -> List[dict]:
    rows = []
    for group in record.get("groups", []):
        for signal, s in group.get("signals", {}).items():
            cost = (group.get("cost") or {}).get(signal, {}).get("fraction_of_grid")
            rows.append(_row(group, f"{signal} signal", s.get("select"), s.get("spearman"), cost))
        if group.get("attention_only"):
            rows.append(_row(group, "attention only (baseline)", group["attention_only"], None, None))
    return rows


def _findings(record: dict) -> List[str]:
    summary = record.get("summary") or {}
    lines = []
    for signal, v in (summary.get("signals") or {}).items():
        mean = v.get("mean_spearman")
        regret = v.get("mean_regret_pp")
        lines.append(f"{signal} signal: mean Spearman {'n/a' if mean is None else f'{mean:+.2f}'}, best pick in "
                     f"{v.get('picked_best')}/{v.get('groups')} groups, mean regret "
                     f"{'n/a' if regret is None else f'{regret:.2f}'} pp.")
    base = summary.get("attention_only") or {}
    if base:
        regret = base.get("mean_regret_pp")
        lines.append(f"attention only: best pick in {base.get('picked_best')}/{base.get('groups')} groups, mean "
                     f"regret {'n/a' if regret is None else f'{regret:.2f}'} pp.")
    if summary.get("verdict"):
        lines.append(f"Verdict: {summary['verdict']}.")
    return lines


def advisor_section(results: StudyResults, *, resamples: int = 10_000, seed: int = 0) -> Optional[ReportSection]:
    """The section, or ``None`` when the study has no advisor track record (``advise --validate`` not run)."""
    record = results.advisor_track_record
    if not record or not record.get("groups"):
        return None
    settings = record.get("settings") or {}
    intro = _INTRO.format(date=record.get("date", "?"), device=record.get("device", "?"),
                          examples=settings.get("examples", "?"), seed=settings.get("seed", "?"))
    caveats = []
    verdict = (record.get("summary") or {}).get("verdict", "")
    if "NOT shown better" in verdict:
        caveats.append("The advisor is not shown better than always choosing attention only on this study.")
    return ReportSection(name="advisor_track_record", title="Advisor track record", intro=intro,
                         columns=ADVISOR_COLUMNS, rows=_rows(record), findings=_findings(record), caveats=caveats)
