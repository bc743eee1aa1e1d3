"""Placements: specs, presets, resolution against a component map, budgets, PEFT configs, verification."""
from .budget import BudgetReport, match_budget
from .peft_config import exact_targets, lora_config, save_adapter_config
from .presets import looks_like_placement_file, named_preset, preset_group, preset_names
from .resolve import Host, ResolvedPlacement, resolve
from .spec import Placement, PlacementError, Target, load_placement_file, placement_from_dict

__all__ = [
    "BudgetReport", "exact_targets", "Host", "Placement", "PlacementError", "ResolvedPlacement", "Target", "load_placement_file",
    "looks_like_placement_file", "lora_config", "match_budget", "named_preset", "placement_from_dict", "preset_group", "preset_names",
    "resolve", "save_adapter_config",
]
