"""Named placements: generic presets over component types, and the published study's conditions.

Generic presets work on every model; the ``study`` group holds, for the families the study covered, the
exact conditions of "Where Should LoRA Go? Component-Type Placement in Hybrid Language Models" under the
names the study used (they are declared in the family modules).
"""
from __future__ import annotations

from ..families import RECURRENT_MIXERS, Family
from .spec import Placement, PlacementError, Target

_ATTENTION = ("softmax_attention",)
_RECURRENT = RECURRENT_MIXERS
_MLP = ("mlp", "moe")

GENERIC_PRESETS: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...] | None], ...]] = {
    "attention_only": ((_ATTENTION, None),),
    "recurrent_only": ((_RECURRENT, None),),
    "mlp_only": ((_MLP, None),),
    "attention_mlp": ((_ATTENTION + _MLP, None),),
    "recurrent_mlp": ((_RECURRENT + _MLP, None),),
    "all": ((_ATTENTION + _RECURRENT + _MLP, None),),
    "value_only": ((_ATTENTION, ("v",)),),
}
GENERIC_DESCRIPTIONS = {
    "attention_only": "every eligible projection of softmax attention",
    "recurrent_only": "every eligible projection of the recurrent mixers (GDN / SSM / short conv)",
    "mlp_only": "every eligible projection of the feed-forward path (dense MLP and MoE)",
    "attention_mlp": "softmax attention + feed-forward",
    "recurrent_mlp": "recurrent mixers + feed-forward",
    "all": "attention + recurrent mixers + feed-forward (not embeddings or lm_head)",
    "value_only": "attention v projections only",
}
PRESET_GROUPS = ("generic", "study")


def generic_preset(name: str) -> Placement:
    targets = tuple(Target(components=c, roles=r) for c, r in GENERIC_PRESETS[name])
    return Placement(name=name, targets=targets, description=GENERIC_DESCRIPTIONS[name])


STUDY_PREFIX = "study/"
"""Study conditions are named ``study/<name>``: a generic preset and a study condition never share a name
(Falcon-H1's study ``attention_only`` adapts q, k, v; the generic one q, k, v, o)."""


def looks_like_placement_file(item: str) -> bool:
    """A command-line placement that names a file rather than a preset (``study/x`` is a preset)."""
    import os

    return item.endswith((".yaml", ".yml")) or (os.sep in item and not item.startswith(STUDY_PREFIX))


def study_preset(family: Family, name: str) -> Placement:
    """The study condition ``name`` (with or without the ``study/`` prefix), named ``study/<name>``."""
    name = name.removeprefix(STUDY_PREFIX)
    roles_by_component = family.study_presets[name]
    targets = tuple(
        Target(components=(component,), roles=None if roles == ["*"] else tuple(roles))
        for component, roles in roles_by_component.items()
    )
    return Placement(name=STUDY_PREFIX + name, targets=targets,
                     description=f"study condition ({family.name}): {_describe(roles_by_component)}")


def _describe(roles_by_component: dict[str, list[str]]) -> str:
    return "; ".join(f"{c} {'all roles' if r == ['*'] else ', '.join(r)}" for c, r in roles_by_component.items())


def study_names(family: Family | None) -> list[str]:
    return [STUDY_PREFIX + n for n in family.study_presets] if family else []


def preset_names(family: Family | None) -> list[str]:
    """Every name a placement may be given for this family, each once: generic presets, then study conditions."""
    return list(GENERIC_PRESETS) + study_names(family)


def named_preset(name: str, family: Family | None) -> Placement:
    """A generic preset, or a study condition (``study/<name>``; a study-only name such as ``softmax_only`` is
    accepted without the prefix, since it cannot mean anything else)."""
    if name in GENERIC_PRESETS:
        return generic_preset(name)
    bare = name.removeprefix(STUDY_PREFIX)
    if family is not None and bare in family.study_presets:
        return study_preset(family, bare)
    raise PlacementError(_unknown_message(name, family))


def _unknown_message(name: str, family: Family | None) -> str:
    import difflib

    candidates = preset_names(family) + ([n for n in family.study_presets if n not in GENERIC_PRESETS]
                                         if family else [])
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    study = (f"; study conditions ({family.name}): {', '.join(study_names(family))}"
             if family and family.study_presets else "")
    return (f"unknown placement {name!r}; {hint}generic presets: {', '.join(GENERIC_PRESETS)}{study} "
            "(or pass a placement YAML file; `hybridlora presets` lists them)")


def preset_group(group: str, family: Family | None) -> list[Placement]:
    if group == "generic":
        return [generic_preset(n) for n in GENERIC_PRESETS]
    if group == "study":
        if family is None or not family.study_presets:
            raise PlacementError(
                f"the study preset group exists for Qwen3.5 and Falcon-H1 only, not for "
                f"{family.name if family else 'this unknown family'}; use --preset generic"
            )
        return [study_preset(family, n) for n in family.study_presets]
    raise PlacementError(f"unknown preset group {group!r}; choose from {', '.join(PRESET_GROUPS)}")
