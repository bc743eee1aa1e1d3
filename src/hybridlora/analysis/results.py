"""The single input of the study report: :class:`StudyResults`.

Everything the report shows is derived from one ``StudyResults`` object: the per-example
records, the run list (with trainable parameter counts where known) and optional training
traces. The study runner builds it from a study directory
(``hybridlora.study.results.load_study_results``); ``hybridlora report --import`` builds it
from imported per-instance results (:func:`from_result_set`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..synthetic import TASKS as SYNTHETIC_TASKS
from .contract import InstanceRecord, RunInfo, RunKey

__all__ = ["StudyResults", "DEFAULT_TARGET_BENCHMARKS", "default_target_benchmarks", "from_result_set"]

DEFAULT_TARGET_BENCHMARKS: Dict[str, List[str]] = {"gsm8k": ["gsm8k"], "codealpaca": ["humaneval"], "chat": [],
                                                   **{name: [name] for name in SYNTHETIC_TASKS}}
"""train_domain -> benchmarks of its own domain (the study's three training sets; each synthetic task is its own
benchmark)."""


def default_target_benchmarks() -> Dict[str, List[str]]:
    """A fresh copy of :data:`DEFAULT_TARGET_BENCHMARKS` (lists are not shared)."""
    return {domain: list(benches) for domain, benches in DEFAULT_TARGET_BENCHMARKS.items()}


@dataclass
class StudyResults:
    """Everything a study report is computed from.

    Fields (names are a contract with the study runner):

    * ``records`` — every evaluated example, ``list[InstanceRecord]``.
    * ``runs`` — ``list[RunInfo]``, one per run, with ``trainable_params`` where known.
    * ``title`` — report title.
    * ``notes`` — lines shown prominently at the top of every report format (e.g. "demo
      numbers carry no scientific meaning").
    * ``full_placement`` — ``{model: placement}`` naming each model's all-components
      placement, the reference of the practitioner recipe and of the "vs full" tests. When a
      model is missing, the placement with the most trainable parameters is used, and the
      report says so.
    * ``target_benchmarks`` — ``{train_domain: [benchmark, ...]}``: the benchmarks of each
      training domain's own domain; every other benchmark is "non-target" for that domain.
    * ``curves`` — ``{RunKey: [{"step": int, "loss": float, ...} or {"step": int, "val_loss": float}, ...]}`` training log rows
      (a row may also carry ``"val_loss"``).
    * ``norms`` — ``{RunKey: [{"step": int, "norms": {component_type: float}}, ...]}``:
      ``‖B·A‖`` summed per component type over training.
    * ``params_by_component`` — ``{(model, placement): {component_type: trainable_params}}``.
    * ``model_tags`` — ``{model: {"topology": "sequential"|"parallel"|..., "mixer": str}}``: what
      kind of hybrid each model is, for the topology-effect section (:mod:`.topology`); empty =
      no such section.
    * ``metadata`` — free-form facts (config, versions, dates) shown in the report appendix.
    * ``advisor_track_record`` — the record ``hybridlora advise --validate`` wrote for this study
      (``<study>/advisor/track_record.json``), shown as the "Advisor track record" section
      (:mod:`.advisor`); ``None`` = none.
    """

    records: List[InstanceRecord]
    runs: List[RunInfo]
    title: str = "LoRA placement study"
    notes: List[str] = field(default_factory=list)
    full_placement: Dict[str, str] = field(default_factory=dict)
    target_benchmarks: Dict[str, List[str]] = field(default_factory=default_target_benchmarks)
    curves: Dict[RunKey, List[dict]] = field(default_factory=dict)
    norms: Dict[RunKey, List[dict]] = field(default_factory=dict)
    params_by_component: Dict[Tuple[str, str], Dict[str, int]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    model_tags: Dict[str, Dict[str, str]] = field(default_factory=dict)
    advisor_track_record: Optional[dict] = None


def from_result_set(result_set, **fields) -> StudyResults:
    """Wrap an importer ``ResultSet(runs, records)`` as :class:`StudyResults`.

    ``fields`` are passed through (``title``, ``notes``, ``full_placement``...). Runs that
    have records but are missing from ``result_set.runs`` are added with unknown parameter
    counts, so the run list always covers the records.
    """
    runs: List[RunInfo] = list(result_set.runs)
    known = {r.key for r in runs}
    for rec in result_set.records:
        key = (rec.model, rec.placement, rec.train_domain, rec.seed)
        if key not in known:
            known.add(key)
            runs.append(RunInfo(*key))
    return StudyResults(records=list(result_set.records), runs=runs, **fields)

