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


def study_preset(family: Family, name: str) -> Placement:
    roles_by_component = family.study_presets[name]
    targets = tuple(
        Target(components=(component,), roles=None if roles == ["*"] else tuple(roles))
        for component, roles in roles_by_component.items()
    )
    return Placement(name=name, targets=targets, description=f"study condition ({family.name})")


def preset_names(family: Family | None) -> list[str]:
    return list(GENERIC_PRESETS) + (list(family.study_presets) if family else [])


def named_preset(name: str, family: Family | None) -> Placement:
    if family is not None and name in family.study_presets:
        return study_preset(family, name)
    if name in GENERIC_PRESETS:
        return generic_preset(name)
    raise PlacementError(
        f"unknown placement {name!r}; presets for this model: {', '.join(preset_names(family))} "
        "(or pass a placement YAML file)"
    )


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
