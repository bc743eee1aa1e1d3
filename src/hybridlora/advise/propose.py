"""One proposal: measure a signal on the user's data, allocate the budget, and give a placement that resolves to
exactly the allocated hosts and ranks (plus everything needed to report and reproduce it)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .allocate import Allocation, allocate, check_resolves_exactly, component_shares, placement_of, rank_summary
from .signals import HostSignals, candidate_hosts, gradient_signals, probe_signals

DEFAULT_EXAMPLES = 256
DEFAULT_MAX_LENGTH = 512
ADVISOR_NAME = "advisor"


@dataclass
class Proposal:
    name: str
    signal: HostSignals
    allocation: Allocation
    placement: object  # Placement
    resolved: object  # ResolvedPlacement
    candidates: object  # ResolvedPlacement of every candidate host
    budget_source: str
    wall_s: float

    def fingerprint(self) -> str:
        """Hash of the proposal itself (hosts and ranks): the same data and seed give the same fingerprint."""
        text = json.dumps(sorted(self.resolved.ranks().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        b = self.allocation.budget
        return {
            "name": self.name,
            "signal": self.signal.signal,
            "fingerprint": self.fingerprint(),
            "budget": {"source": self.budget_source, "requested": b.requested, "achieved": b.achieved,
                       "relative_error": round(b.relative_error, 6)},
            "trainable_params": self.resolved.trainable_params,
            "pct_trainable": round(self.resolved.pct_trainable, 4),
            "num_target_modules": len(self.resolved.hosts),
            "component_share": {c: round(v, 4) for c, v in component_shares(self.resolved).items()},
            "signal_share_at_rank_16": {c: round(v, 4) for c, v in self.signal.by_component(16).items()},
            "ranks_by_component_role": rank_summary(self.resolved),
            "rank_pattern": self.resolved.ranks(),
            "excluded": self.signal.excluded,
            "measured_on": {"examples": self.signal.examples, "tokens": self.signal.tokens,
                            "signal_wall_s": round(self.signal.wall_s, 3), **self.signal.extra},
            "wall_s": round(self.wall_s, 3),
            "placement": self.placement.model_dump(mode="json"),
        }


def budget_of_rank(cmap, rank: int) -> int:
    """``--rank R``: the budget of every candidate host (the ``all`` preset) at rank R."""
    return candidate_hosts(cmap, rank).trainable_params


def advice_examples(source: str, tokenizer, *, data_dir=None, examples: int = DEFAULT_EXAMPLES, seed: int = 3407,
                    max_length: int = DEFAULT_MAX_LENGTH, fields=None, held_out: int = 32):
    """(signal examples, held-out examples) from a domain / file, seeded; the held-out slice serves the probe."""
    from ..train import TrainConfig, prepare_data

    config = TrainConfig(seed=seed, max_length=max_length, loss_on="full")
    tr, va, manifest = prepare_data(source, tokenizer, config, data_dir=data_dir, max_examples=examples,
                                    val_examples=held_out, fields=fields)
    if not tr.examples:
        from ..data import DataError

        raise DataError(f"{source}: no usable example left (all longer than {max_length} tokens or malformed)")
    return tr.examples, va.examples, manifest


def measure(signal: str, model, candidates, train_examples, held_out, pad_id: int, *, seed: int,
            batch_size: int = 8) -> HostSignals:
    from ..train.loop import bind_kernels

    torch.manual_seed(seed)
    kernels = bind_kernels(model)  # the fast mixer kernels on CUDA, as training binds them (warns about missing)
    if signal == "grad":
        measured = gradient_signals(model, candidates, train_examples, pad_id, batch_size=batch_size)
        measured.extra["kernels"] = kernels
        return measured
    if signal == "probe":
        probe = probe_signals(model, candidates, train_examples, held_out, pad_id, seed=seed, batch_size=batch_size)
        probe.peft_model.unload()  # give the caller its base model back, without LoRA layers
        probe.signals.extra["kernels"] = kernels
        return probe.signals
    raise ValueError(f"unknown signal {signal!r}")


# Not settled by measurement (the demo grids disagree, docs/ADVISE.md): the probe sees what Adam-trained LoRA does,
# while the raw gradient's scale follows the model's multipliers.
DEFAULT_SIGNAL = "probe"


def propose(model, cmap, train_examples, held_out, pad_id: int, budget: int, *, signal: str = DEFAULT_SIGNAL,
            unit: str = "host", seed: int = 3407, name: str = ADVISOR_NAME, budget_source: str = "--budget",
            batch_size: int = 8) -> Proposal:
    start = time.perf_counter()
    candidates = candidate_hosts(cmap)
    measured = measure(signal, model, candidates, train_examples, held_out, pad_id, seed=seed, batch_size=batch_size)
    allocation = allocate(measured, candidates, budget, unit=unit)
    placement = placement_of(allocation, candidates, name)
    resolved = check_resolves_exactly(placement, cmap, allocation)
    return Proposal(name, measured, allocation, placement, resolved, candidates, budget_source,
                    time.perf_counter() - start)


def write_outputs(proposal: Proposal, directory: str | Path, base_model: str | None) -> dict[str, str]:
    """``placement.yaml`` (for ``train --placement`` / a study's ``{file: ...}``), ``adapter_config.json``
    (PEFT, with rank_pattern) and ``advice.json``; written aside and renamed into place."""
    from ..placement import save_adapter_config

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    (tmp / "placement.yaml").write_text(yaml.safe_dump(proposal.placement.model_dump(mode="json"), sort_keys=False))
    save_adapter_config(proposal.resolved, tmp / "peft", base_model=base_model)
    os.replace(tmp / "peft" / "adapter_config.json", tmp / "adapter_config.json")
    os.rmdir(tmp / "peft")
    (tmp / "advice.json").write_text(json.dumps({"base_model": base_model, **proposal.to_dict()}, indent=2))
    if directory.exists():
        import shutil

        old = directory.with_name(f".{directory.name}.old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return {k: str(directory / f) for k, f in
            (("placement", "placement.yaml"), ("peft_config", "adapter_config.json"), ("advice", "advice.json"))}
