"""The data contract every analysis function consumes.

One evaluated example of one run on one benchmark is an :class:`InstanceRecord`. A *run* is
one model state: the un-fine-tuned base model, or the base model plus one LoRA adapter
placed by ``placement``, trained on ``train_domain`` with ``seed``. :class:`RunInfo`
carries the run-level facts that are not per example (trainable parameter count).

Conventions
-----------
* The un-fine-tuned model has ``placement == "base"`` and ``train_domain == "base"``
  (both or neither; enforced). Its ``seed`` is normally ``None``.
* ``example_id`` is always a ``str``. Ids are shared across runs of the same benchmark, so
  two runs are compared on the ids they have in common.
* ``correct`` is ``True``/``False`` for a scored example and ``None`` when the example was
  produced but never scored (e.g. HumanEval completions that were not executed).

Cells
-----
A *cell* is everything one run produced on one benchmark. :func:`group_cells` turns a flat
list of records into ``{CellKey: {example_id: correct}}`` where
``CellKey = (model, placement, train_domain, seed, benchmark)``; the inner dict is what the
paired tests in :mod:`hybridlora.analysis.stats` take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = [
    "BASE",
    "CellKey",
    "RunKey",
    "InstanceRecord",
    "RunInfo",
    "cell_key",
    "run_key",
    "group_cells",
    "scored_only",
    "cell_accuracy",
    "runs_of",
]

BASE = "base"
"""Value of both ``placement`` and ``train_domain`` for the un-fine-tuned model."""

RunKey = Tuple[str, str, str, Optional[int]]
"""``(model, placement, train_domain, seed)`` — identifies one run."""

CellKey = Tuple[str, str, str, Optional[int], str]
"""``(model, placement, train_domain, seed, benchmark)`` — identifies one cell."""


def _check_identity(model: object, placement: object, train_domain: object, seed: object) -> None:
    for name, value in (("model", model), ("placement", placement), ("train_domain", train_domain)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if (placement == BASE) != (train_domain == BASE):
        raise ValueError(
            f"placement={placement!r}, train_domain={train_domain!r}: the un-fine-tuned model "
            f"must have both set to {BASE!r}, a fine-tuned run neither"
        )


@dataclass(frozen=True)
class InstanceRecord:
    """One example of one run on one benchmark.

    Fields: ``model`` (readable model name, e.g. ``"Qwen/Qwen3.5-0.8B-Base"``),
    ``placement`` (where the LoRA adapter went, or ``"base"``), ``train_domain`` (what it
    was trained on, or ``"base"``), ``seed`` (``int`` or ``None``), ``benchmark``,
    ``example_id`` (``str``), ``correct`` (``bool``, or ``None`` = not scored).
    """

    model: str
    placement: str
    train_domain: str
    seed: Optional[int]
    benchmark: str
    example_id: str
    correct: Optional[bool]

    def __post_init__(self) -> None:
        _check_identity(self.model, self.placement, self.train_domain, self.seed)
        if not isinstance(self.benchmark, str) or not self.benchmark:
            raise ValueError(f"benchmark must be a non-empty string, got {self.benchmark!r}")
        if not isinstance(self.example_id, str):
            raise ValueError(f"example_id must be a str, got {self.example_id!r}")
        if self.correct is not None and not isinstance(self.correct, bool):
            raise ValueError(f"correct must be a bool or None, got {self.correct!r}")


@dataclass(frozen=True)
class RunInfo:
    """Run-level facts: identity plus ``trainable_params`` (``int``, or ``None`` if unknown;
    0 or ``None`` for the base model)."""

    model: str
    placement: str
    train_domain: str
    seed: Optional[int]
    trainable_params: Optional[int] = None

    def __post_init__(self) -> None:
        _check_identity(self.model, self.placement, self.train_domain, self.seed)
        tp = self.trainable_params
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 0):
            raise ValueError(f"trainable_params must be a non-negative int or None, got {tp!r}")

    @property
    def key(self) -> RunKey:
        return (self.model, self.placement, self.train_domain, self.seed)


def run_key(record: InstanceRecord) -> RunKey:
    """``(model, placement, train_domain, seed)`` of a record."""
    return (record.model, record.placement, record.train_domain, record.seed)


def cell_key(record: InstanceRecord) -> CellKey:
    """``(model, placement, train_domain, seed, benchmark)`` of a record."""
    return (record.model, record.placement, record.train_domain, record.seed, record.benchmark)


def group_cells(records: Iterable[InstanceRecord]) -> Dict[CellKey, Dict[str, Optional[bool]]]:
    """Group records into cells.

    Input: any iterable of :class:`InstanceRecord`.
    Output: ``{CellKey: {example_id: correct}}`` with ``correct`` in ``{True, False, None}``;
    cells and ids appear in first-seen order.
    Raises ``ValueError`` if one cell holds the same ``example_id`` twice.
    """
    cells: Dict[CellKey, Dict[str, Optional[bool]]] = {}
    for rec in records:
        key = cell_key(rec)
        cell = cells.setdefault(key, {})
        if rec.example_id in cell:
            raise ValueError(f"duplicate example_id {rec.example_id!r} in cell {key}")
        cell[rec.example_id] = rec.correct
    return cells


def scored_only(cell: Mapping[str, Optional[bool]]) -> Dict[str, bool]:
    """Drop the unscored (``None``) entries of a cell: ``{example_id: bool}``."""
    return {eid: bool(v) for eid, v in cell.items() if v is not None}


def cell_accuracy(cell: Mapping[str, Optional[bool]]) -> Tuple[int, int]:
    """``(n_correct, n_scored)`` of a cell; unscored examples count in neither."""
    scored = scored_only(cell)
    return sum(scored.values()), len(scored)


def runs_of(records: Iterable[InstanceRecord]) -> List[RunInfo]:
    """Distinct runs among ``records`` (first-seen order), with ``trainable_params=None``.

    Use the importer's run list instead when parameter counts are known.
    """
    seen: Dict[RunKey, RunInfo] = {}
    for rec in records:
        key = run_key(rec)
        if key not in seen:
            seen[key] = RunInfo(*key)
    return list(seen.values())
