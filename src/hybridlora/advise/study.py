"""``placements: [advisor]`` in a study: the advisor's proposal for one model × training domain, as a concrete
placement entry of the job spec (every host and rank written out, so the job id hashes what the cell trains).

The proposal is a pure function of the base model, the data, the settings and the budget; it is cached under
``<study>/advisor/`` so that re-running the study (or ``--dry-run``) finds the same jobs without measuring again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_DIR = "advisor"
VERSION = 1  # bump when the proposal for the same inputs changes (signals, allocation)


def _cache_key(marker: dict, model: dict, data: dict, domain: dict) -> str:
    inputs = {"version": VERSION, "advisor": marker["advisor"], "rank": marker["rank"],
              "match_budget": marker["match_budget"], "model": model, "data": data,
              "domain": {k: domain[k] for k in ("name", "train_domain")}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def advisor_placement(marker: dict, study_dir: Path, model: dict, data: dict, domain: dict, *,
                      demo_seed: int = 0) -> dict:
    """The placement entry {"name", "placement", "match_budget": None, "advisor": facts} for one cell group."""
    path = Path(study_dir) / CACHE_DIR / f"{_cache_key(marker, model, data, domain)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    entry = _propose_for(marker, Path(study_dir), model, data, domain, demo_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(entry, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return entry


def _propose_for(marker: dict, study_dir: Path, model_spec: dict, data: dict, domain: dict, demo_seed: int) -> dict:
    from ..components import build_component_map
    from ..data import pad_id_of
    from ..placement import placement_from_dict, resolve
    from ..study.config import BUILTIN_DATA
    from ..study.jobs import data_dir_of, load_base
    from .propose import advice_examples, budget_of_rank, propose

    if data["source"] == BUILTIN_DATA:  # the runner writes the demo data after the grid; the advisor needs it now
        from ..study.demo_data import write_demo_data

        write_demo_data(study_dir / "data", seed=demo_seed)
    settings = marker["advisor"]
    model, tokenizer = load_base(model_spec)
    cmap = build_component_map(model)
    if marker["match_budget"]:
        other = resolve(placement_from_dict(marker["match_budget"], "match_budget"), cmap)
        budget, source = other.trainable_params, f"budget of {other.name}"
    else:
        budget, source = budget_of_rank(cmap, marker["rank"]), f"every eligible host at rank {marker['rank']}"
    tr, held_out, _ = advice_examples(domain["name"], tokenizer, data_dir=data_dir_of({"data": data}, study_dir),
                                      examples=settings["examples"], seed=settings["seed"],
                                      max_length=settings["max_length"])
    proposal = propose(model, cmap, tr, held_out, pad_id_of(tokenizer), budget, signal=settings["signal"],
                       unit=settings["unit"], seed=settings["seed"], budget_source=source)
    b = proposal.allocation.budget
    facts = {**settings, "budget_source": source, "budget_requested": b.requested, "budget_achieved": b.achieved,
             "fingerprint": proposal.fingerprint()}  # no timings: this dict is part of the hashed job spec
    return {"name": marker["name"], "placement": proposal.placement.model_dump(mode="json"), "match_budget": None,
            "advisor": facts}
