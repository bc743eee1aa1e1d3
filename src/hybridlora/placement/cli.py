"""``hybridlora presets [MODEL]``: the named placements, generic and the published study's, with what they target."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "presets", help="list the named placements (generic presets and the study's conditions) and their targets",
        description="Generic presets work on every model. The published study's conditions are named study/<name> "
                    "and exist for the families the study covered. With MODEL: only the names that model takes.")
    p.add_argument("model", nargs="?", help="a catalog name, hub id, local model directory or config.json")
    p.set_defaults(func=cmd_presets)


def _generic_rows() -> list[list[str]]:
    from .presets import GENERIC_DESCRIPTIONS, GENERIC_PRESETS

    rows = []
    for name, targets in GENERIC_PRESETS.items():
        what = "; ".join(f"{'/'.join(c)} {'all roles' if r is None else ', '.join(r)}" for c, r in targets)
        rows.append([name, "generic", what, GENERIC_DESCRIPTIONS[name]])
    return rows


def _study_rows(family) -> list[list[str]]:
    from .presets import study_preset

    rows = []
    for name in family.study_presets:
        placement = study_preset(family, name)
        rows.append([placement.name, f"study ({family.name})", placement.description.split(": ", 1)[1],
                     "a condition of the published study"])
    return rows


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_presets(args) -> int:
    from ..errors import CliError
    from ..families import FAMILIES, family_for
    from ..models import ModelError, resolve_model, text_config

    if args.model:
        try:
            family = family_for(text_config(resolve_model(args.model).config).model_type)
        except ModelError as exc:
            raise CliError(str(exc)) from None
        families = [family] if family is not None and family.study_presets else []
    else:
        families = [f for f in FAMILIES if f.study_presets]
    rows = _generic_rows() + [row for family in families for row in _study_rows(family)]
    print(_text_table(["name", "group", "targets (component roles)", "about"], rows))
    print("\nUse a name with `plan`/`verify`/`train --placement NAME`, a group with `plan --preset generic|study`, "
          "or a placement YAML file (README, Placements).")
    return 0
