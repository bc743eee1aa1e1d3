"""Placement specs: which component types, roles and layers get LoRA, at which rank.

A placement is data (YAML or a preset), independent of any one model:

    name: attn_qv_late
    rank: 16          # default rank / alpha for every target
    alpha: 32
    targets:
      - components: [softmax_attention]
        roles: [q, v]          # omit or "*" for every eligible role
        layers: "12-23"        # "a-b" ranges, comma lists, or a YAML list; omit for all layers
        rank: 8                # optional per-target override
      - components: [mlp]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..families import COMPONENT_TYPES


class PlacementError(ValueError):
    """A placement that is malformed or cannot be applied; the message says what to do."""


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    components: tuple[str, ...]
    roles: tuple[str, ...] | None = None  # None = every eligible role
    layers: tuple[int, ...] | None = None  # None = every layer (and modules outside layers, e.g. lm_head)
    rank: int | None = Field(default=None, ge=1)
    alpha: float | None = Field(default=None, gt=0)

    @field_validator("components", mode="before")
    @classmethod
    def _known_components(cls, value: Any) -> tuple[str, ...]:
        value = (value,) if isinstance(value, str) else tuple(value)
        unknown = [c for c in value if c not in COMPONENT_TYPES]
        if unknown:
            raise ValueError(f"unknown component type(s) {unknown}; choose from {', '.join(COMPONENT_TYPES)}")
        if not value:
            raise ValueError("components must name at least one component type")
        return value

    @field_validator("roles", mode="before")
    @classmethod
    def _roles(cls, value: Any) -> tuple[str, ...] | None:
        if value is None or value == "*" or value == ["*"]:
            return None
        return (value,) if isinstance(value, str) else tuple(value)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> tuple[int, ...] | None:
        if value is None or value == "*":
            return None
        if isinstance(value, int):
            return (value,)
        if isinstance(value, str):
            return parse_layer_ranges(value)
        return tuple(int(v) for v in value)

    def rank_or(self, default: int) -> int:
        return self.rank if self.rank is not None else default

    def alpha_or(self, default: float) -> float:
        return self.alpha if self.alpha is not None else default


class Placement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    targets: tuple[Target, ...] = Field(min_length=1)
    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    description: str = ""

    def with_defaults(self, rank: int | None = None, alpha: float | None = None) -> "Placement":
        """The same placement with another default rank/alpha (per-target overrides are kept)."""
        update = {}
        if rank is not None:
            update["rank"] = rank
        if alpha is not None:
            update["alpha"] = alpha
        return self.model_copy(update=update)


def parse_layer_ranges(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    layers: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            start, stop = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad layer range {part!r}; use forms like '0-11' or '3,7,11'") from None
        if stop < start:
            raise ValueError(f"bad layer range {part!r}: end before start")
        layers.extend(range(start, stop + 1))
    return tuple(sorted(set(layers)))


def first_error(exc: ValidationError) -> str:
    """pydantic's first complaint as ``field.path: message`` (one line, for one-line CLI errors)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "top level"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def placement_from_dict(data: Any, source: str = "placement") -> Placement:
    if not isinstance(data, dict):
        raise PlacementError(f"{source}: expected a mapping with name/targets, got {type(data).__name__}")
    try:
        return Placement.model_validate(data)
    except ValidationError as exc:
        raise PlacementError(f"{source}: {first_error(exc)}") from None


def load_placement_file(path: str | Path) -> Placement:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PlacementError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise PlacementError(f"{path}: cannot read ({exc.strerror})") from None
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    return placement_from_dict(data, str(path))
