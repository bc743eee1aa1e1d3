"""Optional report sections: the report's one extension point.

A *section builder* is a pure function ``(results, *, resamples, seed) -> ReportSection | None``
(``None``: the section does not apply to these results). :mod:`.report` calls every builder in its
``SECTION_BUILDERS`` list and shows each section it gets after the forgetting table of the Markdown
and HTML reports, with its table in ``tables/<name>.csv`` / ``.tex``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

__all__ = ["ReportSection"]


@dataclass(frozen=True)
class ReportSection:
    """``name`` (file stem of its table), ``title``, ``intro`` (a paragraph), ``columns``
    ``[(key, kind)]`` with the report's display kinds, ``rows`` (``list[dict]``), ``findings``
    (plain sentences shown as a list) and ``caveats`` (shown emphasised)."""

    name: str
    title: str
    intro: str
    columns: Sequence[Tuple[str, str]]
    rows: Sequence[dict]
    findings: List[str] = field(default_factory=list)
    caveats: List[str] = field(default_factory=list)
