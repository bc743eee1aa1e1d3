"""The study grid: model × placement × training domain × seed, plus one base-model job per model.

Every cell becomes a :class:`Job` whose ``spec`` is a plain JSON-able dict holding *everything* the job needs
(model, placement definition, data, seeds, training and evaluation settings). A job is a pure function of its
spec, and its id is a hash of the spec: the same config always yields the same ids (so a re-run finds its
finished cells), any change to what a cell computes yields a new id, and a job can be shipped as-is to another
process or machine.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..analysis.contract import BASE
from .config import BUILTIN_DATA, StudyConfig, StudyConfigError

SPEC_VERSION = 1  # bump when the meaning of a spec field changes (old results then stop matching)


@dataclass(frozen=True)
class Job:
    id: str
    kind: str  # "base" (evaluate the un-fine-tuned model) or "train" (fine-tune, then evaluate)
    model: str
    placement: str
    train_domain: str
    seed: int | None
    spec: dict

    @property
    def label(self) -> str:
        if self.kind == "base":
            return f"{self.model} · base"
        if self.seed is None:  # a job kind without seeds (an ablation condition: model · condition · method)
            return f"{self.model} · {self.placement} · {self.train_domain}"
        return f"{self.model} · {self.placement} · {self.train_domain} · seed {self.seed}"


def job_id(kind: str, spec: dict) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return f"{kind}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def _data_spec(config: StudyConfig) -> dict:
    if config.data_dir == BUILTIN_DATA:
        from .demo_data import VERSION

        return {"source": BUILTIN_DATA, "version": VERSION}
    if config.data_dir is None:
        return {"source": None}
    return {"source": str(Path(config.data_dir).resolve())}  # the same folder whatever the working directory


def _model_spec(config: StudyConfig, entry) -> dict:
    return {"model": entry.model, "name": entry.name, "tiny": entry.tiny, "dtype": entry.dtype,
            "model_seed": config.model_seed if entry.tiny else None}


def _family_of(entry):
    """The family entry of a model (from its config: catalog, local dir or hub), or None if unknown."""
    from ..families import family_for
    from ..models import resolve_model, text_config

    return family_for(text_config(resolve_model(entry.model).config).model_type)


def placements_for(config: StudyConfig, entry) -> list[dict]:
    """The placement specs of one model: each {"name", "placement": Placement as dict, "match_budget"}."""
    from ..placement import load_placement_file, named_preset, preset_group

    family = _family_of(entry)
    rank, alpha = config.train.rank, config.train.alpha
    out: list[dict] = []
    for item in config.placements:
        if item.advisor is not None:  # made concrete per training domain in expand_grid
            settings = item.advisor.model_dump(mode="json")
            name = "advisor" + "".join(f"_{settings[k]}" for k, default in (("signal", "probe"), ("unit", "host"))
                                       if settings[k] != default)
            name += f"@budget_of_{item.match_budget}" if item.match_budget else ""
            out.append({"name": name, "advisor": settings,
                        "rank": item.rank or rank, "match_budget": item.match_budget})
            continue
        if item.group:
            chosen = [(p.with_defaults(rank, alpha), None) for p in preset_group(item.group, family)]
        elif item.file:
            chosen = [(load_placement_file(item.file).with_defaults(item.rank or rank, item.alpha or alpha),
                       item.match_budget)]
        else:
            chosen = [(named_preset(item.preset, family).with_defaults(item.rank or rank, item.alpha or alpha),
                       item.match_budget)]
        for placement, budget_of in chosen:
            name = placement.name if not budget_of else f"{placement.name}@budget_of_{budget_of}"
            out.append({"name": name, "placement": placement.model_dump(mode="json"), "match_budget": budget_of})
    names = [p["name"] for p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyConfigError(f"placements repeat for {entry.name}: {dup}")
    for p in out:
        if p["match_budget"] and p["match_budget"] not in names:
            raise StudyConfigError(f"placement {p['name']}: match_budget names {p['match_budget']!r}, which is "
                                   f"not in this study's placements ({', '.join(names)})")
    advisors = {q["name"] for q in out if "advisor" in q}
    for p in out:
        if p["match_budget"] in advisors:  # its budget is known only per domain, after measuring
            raise StudyConfigError(f"placement {p['name']}: match_budget cannot name an advisor entry; give the "
                                   "advisor entry a match_budget instead")
    for p in out:  # a budget-matched job carries the definition of the placement it matches
        if p["match_budget"]:
            p["match_budget"] = next(q["placement"] for q in out if q["name"] == p["match_budget"])
    return out


def expand_grid(config: StudyConfig) -> list[Job]:
    """All jobs of the study, base jobs first, then model → domain → placement → seed order."""
    data = _data_spec(config)
    evaluation = config.eval.model_dump(mode="json")
    if not evaluation["prefix_reuse"]:
        del evaluation["prefix_reuse"]
    training = config.train.model_dump(mode="json")
    if training.get("compile") == "off":  # a later option: off keeps the job ids of studies started before it
        del training["compile"]
    base_jobs, train_jobs = [], []
    for entry in config.models:
        model = _model_spec(config, entry)
        spec = {"version": SPEC_VERSION, "kind": "base", "model": model, "data": data, "eval": evaluation}
        base_jobs.append(Job(job_id("base", spec), "base", entry.name, BASE, BASE, None, spec))
        _check_made(entry)
        placements = _taken_by(entry, placements_for(config, entry))
        for domain in config.domains:
            dom = {"name": domain.name, "train_domain": domain.train_domain, "max_examples": domain.max_examples,
                   "val_examples": domain.val_examples}
            for placement in _concrete(placements, config, model, data, dom):
                for seed in config.seeds:
                    spec = {"version": SPEC_VERSION, "kind": "train", "model": model, "data": data,
                            "placement": placement, "domain": dom, "seed": seed, "train": training,
                            "eval": evaluation}
                    train_jobs.append(Job(job_id("train", spec), "train", entry.name, placement["name"],
                                          domain.train_domain, seed, spec))
    return base_jobs + train_jobs


def _check_made(entry) -> None:
    """A model made by a documented command (``made_by``) whose directory is missing: say which command makes it."""
    if entry.made_by and not Path(entry.model).is_dir():
        raise StudyConfigError(f"model {entry.model}: no such directory (relative paths are relative to the current "
                               f"directory); it is made by: {entry.made_by}")


def _taken_by(entry, placements: list[dict]) -> list[dict]:
    """The placements a model entry takes: all, or those its ``placements`` list names (e.g. no recurrent-only
    placement for an all-attention control, where it would match no module)."""
    if entry.placements is None:
        return placements
    names = [p["name"] for p in placements]
    unknown = [n for n in entry.placements if n not in names]
    if unknown:
        raise StudyConfigError(f"model {entry.name}: placements {unknown} are not among this study's placements "
                               f"({', '.join(names)})")
    return [p for p in placements if p["name"] in entry.placements]


def _concrete(placements: list[dict], config: StudyConfig, model: dict, data: dict, domain: dict) -> list[dict]:
    """Advisor entries replaced by the advisor's proposal for this model and domain (hosts and ranks written
    out, so the job id hashes exactly what it trains)."""
    if not any("advisor" in p and "placement" not in p for p in placements):
        return placements
    from ..advise.study import advisor_placement

    return [advisor_placement(p, config.output_dir(), model, data, domain, demo_seed=config.model_seed)
            if "advisor" in p and "placement" not in p else p for p in placements]


_FILTER_KEYS = ("model", "placement", "domain", "seed", "kind")


def parse_only(text: str | None) -> dict[str, list[str]]:
    """'placement=attn*,seed=3407' -> {"placement": ["attn*"], "seed": ["3407"]} (repeat a key for OR)."""
    wanted: dict[str, list[str]] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, pattern = part.partition("=")
        key = key.strip()
        if not sep or key not in _FILTER_KEYS or not pattern.strip():
            raise StudyConfigError(f"--only {part!r}: use key=pattern with key one of {', '.join(_FILTER_KEYS)} "
                                   "(e.g. --only placement=study/softmax_only,domain=gsm8k)")
        wanted.setdefault(key, []).append(pattern.strip())
    return wanted


def _field(job: Job, key: str) -> str:
    return {"model": job.model, "placement": job.placement, "domain": job.train_domain,
            "seed": "" if job.seed is None else str(job.seed), "kind": job.kind}[key]


def filter_jobs(jobs: Iterable[Job], only: dict[str, list[str]]) -> list[Job]:
    """Train jobs matching every key (any pattern per key); base jobs of their models are always kept,
    since every comparison needs them (unless ``kind`` itself is filtered)."""
    jobs = list(jobs)
    if not only:
        return jobs

    def matches(job: Job) -> bool:
        return all(any(fnmatch.fnmatchcase(_field(job, k), p) for p in pats) for k, pats in only.items())

    kept = [j for j in jobs if j.kind == "train" and matches(j)]
    models = {j.model for j in kept}
    if "kind" in only:
        bases = [j for j in jobs if j.kind == "base" and matches(j)]
    else:
        bases = [j for j in jobs if j.kind == "base" and j.model in models
                 and all(any(fnmatch.fnmatchcase(j.model, p) for p in only[k]) for k in only if k == "model")]
    if not kept and not bases:
        raise StudyConfigError(f"--only matches no cell of this study ({len(jobs)} jobs)")
    return bases + kept


def describe(spec: dict) -> dict[str, Any]:
    """The few spec fields a person wants to see in a grid listing."""
    out = {"model": spec["model"]["name"]}
    if spec["kind"] == "train":
        out.update(placement=spec["placement"]["name"], domain=spec["domain"]["train_domain"], seed=spec["seed"])
    return out
