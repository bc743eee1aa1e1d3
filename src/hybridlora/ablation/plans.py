"""Ablation plans: the conditions to run, built from a model's units (so every family in ``families/`` works).

Plans: ``groups`` (every unit of one component type; ``recurrent`` = every recurrent mixer, when that differs),
``layers`` (each unit alone), ``progressive`` (first / last / random N of the recurrent mixers — attention for
an all-attention model — with N from 1, 2, 4, 6, 8, 12, 18, … below the count, and early / middle / late
thirds of each mixer type), ``random`` (matched-count controls of every group and progressive condition:
``trials`` draws of as many units from all mixer units — from all units for targets holding MLPs — seeded,
never the targeted set), ``all`` (every plan), ``reference`` (the reference paper's set with its methods,
:func:`reference_conditions`), a YAML file, or ``--remove`` specs (``softmax_attention``, ``ssm@0-5``,
``linear_attention@3+mlp@3``).

Method ``auto``: ``zero`` for units of parallel blocks, ``skip`` otherwise; group and progressive conditions of
sequential layers also get the whole-layer variant (``skip_layer``) the reference used.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..families import COMPONENT_TYPES, RECURRENT_MIXERS, SEQUENCE_MIXERS
from .methods import METHODS, AblationError, ModelUnits, Unit, default_method

PLANS = ("groups", "layers", "progressive", "random", "all", "reference")
PROGRESSIVE_N = (1, 2, 4, 6, 8, 12, 18, 24, 32, 48, 64)
# The reference paper's progressive sizes (arXiv 2603.22473: first / last / random N recurrent layers)
REFERENCE_N = (1, 2, 4, 6, 8, 12, 18)
ALIASES = {"recurrent": RECURRENT_MIXERS, "attention": ("softmax_attention",), "mixers": SEQUENCE_MIXERS}


@dataclass
class Condition:
    name: str
    method: str  # "none" for the intact model
    units: list[str]  # unit keys, e.g. "ssm@3"
    plan: str  # intact | group | layer | progressive | random | custom
    detail: dict[str, Any] = field(default_factory=dict)  # component, order, n, control_of, trial

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def removal(self) -> tuple[str, tuple[str, ...]]:
        """What the condition computes: conditions with the same removal share one job (a random control that
        happens to draw a single layer is the same computation as that layer's own condition)."""
        return self.method, tuple(sorted(self.units))


def intact() -> Condition:
    return Condition("intact", "none", [], "intact")


def _auto_method(units: Sequence[Unit]) -> str:
    methods = {default_method(u) for u in units}
    return "zero" if methods == {"zero"} else "skip"


def _methods_for(units: Sequence[Unit], methods: Sequence[str], whole_layer_variant: bool) -> list[str]:
    if list(methods) != ["auto"]:
        return list(methods)
    out = [_auto_method(units)]
    if whole_layer_variant and not any(u.parallel for u in units):
        out.append("skip_layer")
    return out


def _conditions(name: str, units: Sequence[Unit], plan: str, methods: Sequence[str], detail: dict,
                whole_layer_variant: bool = True) -> list[Condition]:
    keys = [u.key for u in units]
    return [Condition(name, m, keys, plan, dict(detail)) for m in _methods_for(units, methods, whole_layer_variant)]


def mixer_units(mu: ModelUnits) -> list[Unit]:
    return [u for u in mu.units if u.component in SEQUENCE_MIXERS]


def group_conditions(mu: ModelUnits, methods: Sequence[str]) -> list[Condition]:
    out: list[Condition] = []
    present = [c for c in SEQUENCE_MIXERS if mu.of(c)]
    for component in present:
        out += _conditions(f"no_{component}", mu.of(component), "group", methods, {"component": component})
    recurrent = [u for u in mu.units if u.component in RECURRENT_MIXERS]
    if len({u.component for u in recurrent}) > 1:
        out += _conditions("no_recurrent", recurrent, "group", methods, {"component": "recurrent"})
    for component in [c for c in ("mlp", "moe") if mu.of(c)]:
        # the feed-forward groups complete the component types a placement study adapts (softmax / GDN / MLP);
        # no whole-layer variant: it would remove every layer of the model
        out += _conditions(f"no_{component}", mu.of(component), "group", methods, {"component": component},
                           whole_layer_variant=False)
    return out


def layer_conditions(mu: ModelUnits, methods: Sequence[str]) -> list[Condition]:
    out = []
    for unit in mu.units:
        out += _conditions(f"only_{unit.key}", [unit], "layer", methods,
                           {"component": unit.component, "layer": unit.layer}, whole_layer_variant=False)
    return out


def progressive_pool(mu: ModelUnits) -> tuple[str, list[Unit]]:
    recurrent = [u for u in mu.units if u.component in RECURRENT_MIXERS]
    if recurrent:
        return "recurrent", recurrent
    return "softmax_attention", mu.of("softmax_attention")


def progressive_conditions(mu: ModelUnits, methods: Sequence[str], seed: int) -> list[Condition]:
    label, pool = progressive_pool(mu)
    out: list[Condition] = []
    count = len(pool)
    sizes = [n for n in PROGRESSIVE_N if n < count]
    for n in sizes:
        rng = random.Random(f"{seed}:progressive-random:{n}")
        chosen = sorted(rng.sample(pool, n), key=lambda u: (u.layer, u.component))
        for order, units in (("first", pool[:n]), ("last", pool[-n:]), ("random", chosen)):
            out += _conditions(f"{order}_{n}_{label}", units, "progressive", methods,
                               {"component": label, "order": order, "n": n})
    for component in [c for c in SEQUENCE_MIXERS if len(mu.of(c)) >= 3]:
        units = mu.of(component)
        thirds = _thirds(len(units))
        for bucket, (lo, hi) in zip(("early", "middle", "late"), thirds):
            out += _conditions(f"{bucket}_{component}", units[lo:hi], "progressive", methods,
                               {"component": component, "order": bucket, "n": hi - lo})
    return out


def reference_conditions(mu: ModelUnits, trials: int, seed: int) -> list[Condition]:
    """The reference paper's condition set on this model's units, with its methods: the whole layer removed
    (``skip_layer``) in sequential models, the branch zeroed (``zero``) in parallel blocks. Each mixer type as a
    group; every (mixer, layer); the first / last / random N of the recurrent pool (attention for an
    all-attention model) for N in :data:`REFERENCE_N` up to the pool's size; early / middle / late thirds of each
    mixer type (the reference's Falcon-H1 buckets, here for every model); ``trials`` matched-count random
    controls of each group. No MLP units (the reference removed none).

    The controls are the reference's: its published results (``random_control_perplexity.csv``,
    ``experiment1_summary.csv``) hold random controls of the groups only, its "random N" progressive arm being
    the control of the first / last N. ``--plan all`` adds controls of every progressive condition (the bands of
    the report's progressive curves)."""
    method = "zero" if mu.topology == "parallel" else "skip_layer"
    mixers = [c for c in SEQUENCE_MIXERS if mu.of(c)]
    groups = [Condition(f"no_{c}", method, [u.key for u in mu.of(c)], "group", {"component": c}) for c in mixers]
    layers = [Condition(f"only_{u.key}", method, [u.key], "layer", {"component": u.component, "layer": u.layer})
              for u in mixer_units(mu)]
    label, pool = progressive_pool(mu)
    ordered = []
    for n in [n for n in REFERENCE_N if n <= len(pool)]:
        rng = random.Random(f"{seed}:progressive-random:{n}")
        chosen = sorted(rng.sample(pool, n), key=lambda u: (u.layer, u.component))
        for order, units in (("first", pool[:n]), ("last", pool[-n:]), ("random", chosen)):
            ordered.append(Condition(f"{order}_{n}_{label}", method, [u.key for u in units], "progressive",
                                     {"component": label, "order": order, "n": n}))
    buckets = []
    for component in [c for c in mixers if len(mu.of(c)) >= 3]:
        units = mu.of(component)
        for bucket, (lo, hi) in zip(("early", "middle", "late"), _thirds(len(units))):
            buckets.append(Condition(f"{bucket}_{component}", method, [u.key for u in units[lo:hi]], "progressive",
                                     {"component": component, "order": bucket, "n": hi - lo}))
    return groups + layers + ordered + buckets + random_controls(groups, mu, trials, seed)


def _thirds(n: int) -> list[tuple[int, int]]:
    cuts = [round(i * n / 3) for i in range(4)]
    return [(cuts[i], cuts[i + 1]) for i in range(3)]


def random_controls(targets: Iterable[Condition], mu: ModelUnits, trials: int, seed: int) -> list[Condition]:
    """``trials`` matched-count controls per target: as many units drawn from every mixer unit (for a
    ``skip_layer`` target: as many layers), seeded by (seed, target, trial), never the targeted set."""
    out = []
    by_key = mu.by_key()
    for target in targets:
        if target.plan not in ("group", "progressive") or target.method == "none":
            continue
        if target.detail.get("order") == "random":
            continue  # already a random draw (within the recurrent pool); its control is the plan itself
        if target.method == "skip_layer":
            firsts: dict[int, Unit] = {}
            for u in mixer_units(mu):
                firsts.setdefault(u.layer, u)
            pool = list(firsts.values())
            chosen_of = lambda keys: frozenset(by_key[k].layer for k in keys)  # noqa: E731
            as_set = lambda units: frozenset(u.layer for u in units)  # noqa: E731
        else:  # mixer targets draw from the mixers; a target holding MLP/MoE units draws from every unit
            mixers_only = all(by_key[k].component in SEQUENCE_MIXERS for k in target.units)
            pool = mixer_units(mu) if mixers_only else list(mu.units)
            chosen_of = frozenset
            as_set = lambda units: frozenset(u.key for u in units)  # noqa: E731
        k = len(target.units)
        taboo = chosen_of(target.units)
        if k >= len(pool):
            continue  # the only draw of that size is the target itself: no control exists
        for trial in range(trials):
            rng = random.Random(f"{seed}:control:{target.name}:{target.method}:{trial}")
            for _ in range(1000):
                units = rng.sample(pool, k)
                if as_set(units) != taboo:
                    break
            else:
                continue
            units.sort(key=lambda u: (u.layer, u.component))
            out.append(Condition(f"random_{k}#{trial}~{target.name}", target.method, [u.key for u in units],
                                 "random", {"control_of": target.name, "control_method": target.method,
                                            "trial": trial, "n": k}))
    return out


def build_plan(mu: ModelUnits, plan: str, *, methods: Sequence[str] = ("auto",), trials: int = 5,
               seed: int = 0) -> list[Condition]:
    if plan not in PLANS:
        path = Path(plan)
        if path.suffix in (".yaml", ".yml"):
            return [intact()] + load_plan_file(path, mu, trials=trials, seed=seed)
        raise AblationError(f"--plan {plan}: choose from {', '.join(PLANS)} or give a YAML file")
    if plan == "reference":
        if list(methods) != ["auto"]:
            raise AblationError("--plan reference uses the reference's methods (skip_layer in sequential models, "
                                "zero in parallel blocks); drop --method")
        return _dedupe([intact()] + reference_conditions(mu, trials, seed))
    _check_methods(methods, mu)
    out = [intact()]
    if plan in ("groups", "all", "random"):
        out += group_conditions(mu, methods)
    if plan in ("layers", "all"):
        out += layer_conditions(mu, methods)
    if plan in ("progressive", "all", "random"):
        out += progressive_conditions(mu, methods, seed)
    if plan in ("random", "all"):
        out += random_controls(list(out), mu, trials, seed)
    return _dedupe(out)


def _dedupe(conditions: list[Condition]) -> list[Condition]:
    seen, out = set(), []
    for c in conditions:
        key = (c.name, c.method)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _check_methods(methods: Sequence[str], mu: ModelUnits) -> None:
    for m in methods:
        if m != "auto" and m not in METHODS:
            raise AblationError(f"--method {m}: choose from auto, {', '.join(METHODS)}")
    if "auto" in methods and len(methods) > 1:
        raise AblationError("--method auto cannot be combined with other methods")


# ---------------------------------------------------------------------------------------------- --remove
def parse_remove(spec: str, mu: ModelUnits) -> list[Unit]:
    """``COMPONENT[@LAYERS]`` items joined by ``+``; LAYERS like ``3``, ``0-5``, ``0,4,8-11``."""
    chosen: list[Unit] = []
    for item in [s.strip() for s in spec.split("+") if s.strip()]:
        component, _, layers = item.partition("@")
        components = _components(component, mu, item)
        units = [u for u in mu.units if u.component in components]
        if layers:
            wanted = _layers(layers, mu.num_layers, item)
            units = [u for u in units if u.layer in wanted]
            if not units:
                where = sorted({u.layer for u in mu.units if u.component in components})
                raise AblationError(f"--remove {item}: no {component} at layer(s) {layers}; it is at layers "
                                    f"{_ranges(where)}")
        chosen += [u for u in units if u not in chosen]
    if not chosen:
        raise AblationError(f"--remove {spec!r}: nothing to remove; use COMPONENT[@LAYERS], e.g. ssm@0-5")
    return sorted(chosen, key=lambda u: (u.layer, u.component))


def _components(name: str, mu: ModelUnits, item: str) -> tuple[str, ...]:
    if name in ALIASES:
        present = tuple(c for c in ALIASES[name] if mu.of(c))
        if not present:
            raise AblationError(f"--remove {item}: this model has no {name} mixer (it has {', '.join(mu.components)})")
        return present
    if name not in COMPONENT_TYPES:
        raise AblationError(f"--remove {item}: unknown component {name!r}; use one of {', '.join(mu.components)} "
                            f"(or {', '.join(ALIASES)})")
    if not mu.of(name):
        raise AblationError(f"--remove {item}: this model has no {name} (it has {', '.join(mu.components)})")
    return (name,)


def _layers(text: str, num_layers: int, item: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise AblationError(f"--remove {item}: bad layer list {text!r}; use e.g. 3, 0-5 or 0,4,8-11") from None
        for layer in (a, b):
            if not 0 <= layer < num_layers:
                raise AblationError(f"--remove {item}: layer {layer} out of range; this model has layers "
                                    f"0-{num_layers - 1}")
        if b < a:
            raise AblationError(f"--remove {item}: empty range {part!r}")
        out.update(range(a, b + 1))
    return out


def _ranges(values: Sequence[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts) or "none"


def remove_conditions(specs: Sequence[str], mu: ModelUnits, methods: Sequence[str]) -> list[Condition]:
    _check_methods(methods, mu)
    out = [intact()]
    for spec in specs:
        units = parse_remove(spec, mu)
        out += _conditions(spec, units, "custom", methods, {"spec": spec}, whole_layer_variant=False)
    return _dedupe(out)


def load_plan_file(path: Path, mu: ModelUnits, *, trials: int, seed: int) -> list[Condition]:
    """YAML: ``conditions: [{remove: SPEC, name: NAME?, method: METHOD?, controls: K?}, ...]``."""
    import yaml

    if not path.is_file():
        raise AblationError(f"--plan {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AblationError(f"--plan {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise AblationError(f"--plan {path}: not UTF-8 text (at byte {exc.start}); save the YAML as UTF-8") from None
    items = data.get("conditions") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise AblationError(f"--plan {path}: expected `conditions:` with a list of {{remove: SPEC, ...}} entries")
    out: list[Condition] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("remove"), str):
            raise AblationError(f"--plan {path}: condition {i + 1} needs `remove: COMPONENT[@LAYERS]`")
        unknown = set(item) - {"remove", "name", "method", "controls"}
        if unknown:
            raise AblationError(f"--plan {path}: condition {i + 1}: unknown key(s) {', '.join(sorted(unknown))}")
        method = item.get("method", "auto")
        _check_methods([method], mu)
        units = parse_remove(item["remove"], mu)
        name = str(item.get("name") or item["remove"])
        made = _conditions(name, units, "group", [method], {"spec": item["remove"]}, whole_layer_variant=False)
        out += made
        controls = item.get("controls", 0)
        if controls:
            out += random_controls(made, mu, int(controls), seed)
    return _dedupe(out)


def unit_names(condition: Condition, mu: ModelUnits) -> list[str]:
    """Full module names the condition removes (the decoder layers for ``skip_layer``)."""
    by_key = mu.by_key()
    units = [by_key[k] for k in condition.units]
    if condition.method == "skip_layer":
        return sorted({u.layer_module for u in units}, key=lambda n: int(n.rsplit(".", 1)[1]))
    return [name for u in units for name in u.modules]
