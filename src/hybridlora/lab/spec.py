"""The architecture spec: a small YAML that describes one hybrid (and, from it, its matched siblings).

A spec fixes everything but the width; :mod:`.solve` chooses the width (and trims the MLP) so the model meets
``target_params``. Fields (defaults in :class:`ArchSpec`)::

    name: gdn-hybrid
    vocab_size: 4096            # or tokenizer: DIR|tokenizer.json (its vocabulary size is used)
    depth: 8
    target_params: 20000000
    mlp_ratio: 3.0              # MLP width ≈ mlp_ratio × width before the solver's trim
    head_dim: 64                # attention and recurrent heads (128 on Hopper for GDN training, see docs/LAB.md)
    mixers: [attention, gdn]    # attention | gdn | mamba2 | short_conv
    topology: sequential        # or parallel
    # sequential: a repeating pattern, or a ratio recurrent:attention with the placement rule
    pattern: [gdn, gdn, gdn, attention]
    ratio: "3:1"
    attention_first: false      # the placement rule never puts attention first unless this asks for it
    # parallel: every layer runs all mixers on the same input
    split: 0.5                  # share of the heads given to attention
    fusion: normalized          # sum | normalized (each branch RMS-normalised, summed, projected)

The spec is validated on load; every problem is a :class:`SpecError` with one line that says what to change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIXERS = ("attention", "gdn", "mamba2", "short_conv")
RECURRENT = ("gdn", "mamba2", "short_conv")
TOPOLOGIES = ("sequential", "parallel")
FUSIONS = ("sum", "normalized")
SPECS_DIR = Path(__file__).parent / "specs"  # shipped specs, loadable by name (tiny-gdn, gpu-120m-gdn, ...)


class SpecError(ValueError):
    """A spec that cannot be built; the message says what to change."""


@dataclass(frozen=True)
class ArchSpec:
    name: str = "lab"
    vocab_size: int = 256
    tokenizer: str | None = None
    depth: int = 4
    target_params: int = 0  # 0: no target, use ``width`` as given
    width: int = 64  # the starting point (and the result when there is no target)
    mlp_ratio: float = 3.0
    head_dim: int = 16
    kv_group: int = 2  # attention query heads per key/value head, where the head count allows
    mixers: tuple[str, ...] = ("attention", "gdn")
    topology: str = "sequential"
    pattern: tuple[str, ...] | None = None
    ratio: str | None = None
    attention_first: bool = False
    split: float = 0.5
    fusion: str = "normalized"
    mamba_d_state: int = 16
    mamba_expand: int = 2
    mamba_chunk_size: int = 64
    conv_kernel: int = 4
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    initializer_range: float = 0.02

    # --- derived -------------------------------------------------------------------------------------
    @property
    def recurrent(self) -> tuple[str, ...]:
        return tuple(m for m in self.mixers if m in RECURRENT)

    def layer_mixers(self) -> list[tuple[str, ...]]:
        """The mixers of each layer, in order."""
        if self.topology == "parallel":
            return [tuple(self.mixers)] * self.depth
        if self.pattern:
            return [(self.pattern[i % len(self.pattern)],) for i in range(self.depth)]
        if len(self.mixers) == 1:
            return [(self.mixers[0],)] * self.depth
        return [(m,) for m in _ratio_schedule(self)]

    def with_(self, **changes: Any) -> "ArchSpec":
        return dataclasses.replace(self, **changes)


def _ratio_schedule(spec: ArchSpec) -> list[str]:
    """Spread attention layers evenly; the last of each span is attention (so the first layer is recurrent),
    unless ``attention_first``. 2510.04800 finds attention first in a sequential stack hurts."""
    (recurrent,) = spec.recurrent
    r, a = _parse_ratio(spec.ratio or "3:1")
    n_attn = 0 if a == 0 else max(1, round(spec.depth * a / (r + a)))
    n_attn = min(n_attn, spec.depth)
    if n_attn == 0:
        return [recurrent] * spec.depth
    offset = 0 if spec.attention_first else 1
    where = {(i + offset) * spec.depth // n_attn - offset for i in range(n_attn)}
    return ["attention" if i in where else recurrent for i in range(spec.depth)]


def _parse_ratio(text: str) -> tuple[int, int]:
    try:
        r, a = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise SpecError(f"ratio {text!r} is not RECURRENT:ATTENTION (e.g. \"3:1\")") from None
    if r < 0 or a < 0 or r + a == 0:
        raise SpecError(f"ratio {text!r} needs non-negative parts that are not both zero")
    return r, a


# --- loading and validation ------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(ArchSpec)}


def spec_from_dict(data: dict[str, Any], where: str = "spec") -> ArchSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of spec fields")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    values = dict(data)
    for key in ("mixers", "pattern"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
        if values.get(key) is not None:
            values[key] = tuple(str(m) for m in values[key])
    spec = ArchSpec(**values)
    _check_types(spec, where)
    validate(spec, where)
    return spec


def load_spec(path: str | Path) -> ArchSpec:
    import yaml

    path = Path(path)
    if not path.is_file() and (SPECS_DIR / f"{path}.yaml").is_file():  # a shipped spec by name
        path = SPECS_DIR / f"{path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
        raise SpecError(f"spec file {path} not found (shipped specs: {shipped})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    spec = spec_from_dict(data or {}, str(path))
    if spec.tokenizer and not Path(spec.tokenizer).is_absolute():  # relative to the spec file
        spec = spec.with_(tokenizer=str(path.parent / spec.tokenizer))
    return spec


def _check_types(spec: ArchSpec, where: str) -> None:
    ints = ("vocab_size", "depth", "target_params", "width", "head_dim", "kv_group", "mamba_d_state",
            "mamba_expand", "mamba_chunk_size", "conv_kernel", "max_position_embeddings")
    for name in ints:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: {name} must be an integer, got {value!r}")
    for name in ("mlp_ratio", "split", "rope_theta", "initializer_range"):
        if isinstance(getattr(spec, name), bool) or not isinstance(getattr(spec, name), (int, float)):
            raise SpecError(f"{where}: {name} must be a number, got {getattr(spec, name)!r}")


def validate(spec: ArchSpec, where: str = "spec") -> None:
    checks = [
        (spec.depth >= 1, "depth must be at least 1"),
        (spec.vocab_size >= 2, "vocab_size must be at least 2"),
        (spec.width >= 8, "width must be at least 8"),
        (spec.head_dim >= 4 and spec.head_dim % 2 == 0, "head_dim must be an even number >= 4"),
        (spec.target_params >= 0, "target_params must be >= 0 (0: no target)"),
        (spec.mlp_ratio > 0, "mlp_ratio must be positive"),
        (spec.kv_group >= 1, "kv_group must be at least 1"),
        (bool(spec.mixers), "mixers must name at least one of " + ", ".join(MIXERS)),
        (spec.topology in TOPOLOGIES, f"topology must be one of {', '.join(TOPOLOGIES)}, got {spec.topology!r}"),
        (spec.fusion in FUSIONS, f"fusion must be one of {', '.join(FUSIONS)}, got {spec.fusion!r}"),
        (0 < spec.split < 1, "split (attention's share of the heads in a parallel layer) must be in (0, 1)"),
        (spec.mamba_chunk_size >= 1 and spec.conv_kernel >= 2 and spec.mamba_expand >= 1,
         "mamba_chunk_size >= 1, mamba_expand >= 1 and conv_kernel >= 2 needed"),
    ]
    for ok, message in checks:
        if not ok:
            raise SpecError(f"{where}: {message}")
    bad = [m for m in spec.mixers if m not in MIXERS]
    if bad:
        raise SpecError(f"{where}: unknown mixer(s) {', '.join(bad)}; choose from {', '.join(MIXERS)}")
    if len(set(spec.mixers)) != len(spec.mixers):
        raise SpecError(f"{where}: mixers lists a mixer twice")
    if spec.topology == "parallel":
        _validate_parallel(spec, where)
    else:
        _validate_sequential(spec, where)


def _validate_parallel(spec: ArchSpec, where: str) -> None:
    # transformers' hybrid cache layer holds one attention KV cache and one recurrent state per layer
    if len(spec.mixers) != 2 or "attention" not in spec.mixers:
        raise SpecError(f"{where}: a parallel layer runs attention beside one recurrent mixer; set mixers to "
                        "[attention, gdn|mamba2|short_conv]")
    if spec.pattern or spec.ratio:
        raise SpecError(f"{where}: pattern/ratio describe sequential stacks; drop them for topology parallel")


def _validate_sequential(spec: ArchSpec, where: str) -> None:
    if spec.pattern:
        stray = sorted(set(spec.pattern) - set(spec.mixers))
        if stray:
            raise SpecError(f"{where}: pattern uses {', '.join(stray)}, which mixers does not list")
        if spec.ratio:
            raise SpecError(f"{where}: give either pattern or ratio, not both")
        if spec.pattern[0] == "attention" and not spec.attention_first and len(set(spec.pattern)) > 1:
            raise SpecError(f"{where}: the pattern starts with attention; start with a recurrent layer, or set "
                            "attention_first: true to ask for it")
        return
    if len(spec.mixers) > 2 or (len(spec.mixers) == 2 and "attention" not in spec.mixers):
        raise SpecError(f"{where}: with more than one recurrent mixer give an explicit pattern")
    if spec.ratio:
        _parse_ratio(spec.ratio)


# --- matched siblings ------------------------------------------------------------------------------
def variants(spec: ArchSpec) -> dict[str, ArchSpec]:
    """The matched set from one spec: both topologies over the same mixers, and the two controls.

    Keys: ``sequential``, ``parallel`` (when the mixers allow a parallel layer), ``all_attention``,
    ``all_recurrent`` (one per recurrent mixer when there are several). All keep depth, vocabulary, head size,
    MLP ratio and ``target_params``, so the solver matches their sizes."""
    out: dict[str, ArchSpec] = {}
    base = dict(pattern=None, ratio=None)
    seq = spec if spec.topology == "sequential" else spec.with_(topology="sequential", **base)
    out["sequential"] = seq
    if len(spec.mixers) == 2 and "attention" in spec.mixers:
        out["parallel"] = spec.with_(topology="parallel", **base) if spec.topology == "sequential" else spec
    out["all_attention"] = spec.with_(name=f"{spec.name}-all-attention", mixers=("attention",),
                                      topology="sequential", **base)
    recurrent = spec.recurrent
    for m in recurrent:
        key = "all_recurrent" if len(recurrent) == 1 else f"all_{m}"
        out[key] = spec.with_(name=f"{spec.name}-all-{m}", mixers=(m,), topology="sequential", **base)
    for key in ("sequential", "parallel"):
        if key in out and not out[key].name.endswith(key):
            out[key] = out[key].with_(name=f"{spec.name}-{key}")
    return out


def heads_for(spec: ArchSpec, width: int) -> dict[str, int]:
    """Head counts at ``width``: a sequential layer gives each mixer all ``width / head_dim`` heads; a parallel
    layer splits them (``split`` to attention, the rest to the recurrent branch), so that one parallel layer
    holds about as many mixer parameters as one sequential layer."""
    total = max(1, round(width / spec.head_dim))
    if spec.topology == "parallel":
        attn = min(max(1, round(total * spec.split)), max(1, total - 1)) if total > 1 else 1
        rec = max(1, total - attn)
    else:
        attn = rec = total
    kv = attn // spec.kv_group if attn % spec.kv_group == 0 else attn
    return {"attention": attn, "kv": kv, "recurrent": rec}
