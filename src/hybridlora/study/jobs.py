"""Running one job: a pure function of its spec (see :mod:`.grid`), writing artifacts under one directory.

``base`` job: build/load the model, evaluate every benchmark. ``train`` job: build/load the same base model,
resolve the placement on it, fine-tune (resuming from the newest checkpoint if an earlier attempt died), then
evaluate the adapted model. The returned dict is what :meth:`Store.complete` records.

Artifacts of job ``J`` live in ``<study>/runs/J/``: ``train/`` (adapter, checkpoints, run config, data manifest,
train_log.jsonl) and ``eval/`` (per-benchmark JSONL + summaries).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import BUILTIN_DATA

CRASH_ENV = "HYBRIDLORA_TEST_CRASH"
"""Test hook: when set to a point name, the process dies there as if killed (``os._exit(137)``)."""

CRASH_ONCE_ENV = "HYBRIDLORA_TEST_CRASH_ONCE"
"""Test hook: ``POINT:MARKER_FILE`` — the first process of the machine to reach the point dies there (it creates
the marker file; later processes find it and go on). The Ray backend forwards it to its workers."""


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)
    point, _, marker = os.environ.get(CRASH_ONCE_ENV, "").partition(":")
    if point == name and marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(137)


class JobError(RuntimeError):
    """A job could not run (bad model, data, placement); the message says why."""


def data_dir_of(spec: dict, study_dir: Path) -> str | None:
    source = spec["data"]["source"]
    if source == BUILTIN_DATA:
        return str(study_dir / "data")
    return source


def device_and_dtype(model_spec: dict):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = model_spec.get("dtype", "auto")
    if name == "auto":  # the study's recipe: bf16 on GPU (LoRA weights stay fp32 under autocast), fp32 on CPU
        name = "bfloat16" if device == "cuda" else "float32"
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_base(model_spec: dict):
    """(model on its device, tokenizer) — the same base weights for every job of a model."""
    from .. import models
    from ..families import family_for

    device, dtype = device_and_dtype(model_spec)
    source = models.resolve_model(model_spec["model"])
    if model_spec["tiny"]:
        from ..evaluate.tokenizer import byte_tokenizer

        config = models.text_config(source.config)
        family = family_for(config.model_type)
        if family is None:
            raise JobError(f"{model_spec['model']}: unknown family, so no tiny model; set tiny: false")
        model = models.build_model(models.tiny_config(config, family), seed=model_spec["model_seed"], dtype=dtype)
        tokenizer = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        if source.kind == "catalog" and not models.hub_reachable():
            raise JobError(f"{model_spec['model']}: the weights are not here and the hub is unreachable; download "
                           "the checkpoint and give its local directory as `model:` (or use tiny: true for a "
                           "pipeline check)")
        model = models.load_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(source.path) if source.path else source.name)
    return model.to(device), tokenizer


def resolve_placement(spec: dict, model):
    from ..components import build_component_map
    from ..placement import match_budget, placement_from_dict, resolve

    cmap = build_component_map(model)
    placement = placement_from_dict(spec["placement"]["placement"], f"placement {spec['placement']['name']}")
    resolved = resolve(placement, cmap)
    other = spec["placement"].get("match_budget")
    if other:
        budget = resolve(placement_from_dict(other, "match_budget"), cmap).trainable_params
        resolved, _ = match_budget(resolved, budget)
    resolved.placement = resolved.placement.model_copy(update={"name": spec["placement"]["name"]})
    return resolved


def _train_config(spec: dict, progress: bool):
    from ..train import TrainConfig

    t = spec["train"]
    return TrainConfig(lora_dropout=t["dropout"], learning_rate=t["learning_rate"], epochs=t["epochs"],
                       micro_batch_size=t["micro_batch_size"], grad_accum=t["grad_accum"],
                       max_length=t["max_length"], weight_decay=t["weight_decay"], warmup_ratio=t["warmup_ratio"],
                       seed=spec["seed"], save_every=t["save_every"], norm_every=t["norm_every"],
                       loss_on=t["loss_on"], compile=t.get("compile", "off"), progress=progress)


def _fine_tune(spec: dict, model, tokenizer, out: Path, data_dir: str | None, progress: bool):
    """The adapted model (PEFT-wrapped), its resolved placement and the training log rows."""
    from ..data import pad_id_of
    from ..threads import current as current_threads
    from ..train import checkpoints, load_adapter, prepare_data, train
    from ..train.loop import ADAPTER_DIR, LOG_NAME

    resolved = resolve_placement(spec, model)
    train_dir = out / "train"
    if (train_dir / ADAPTER_DIR).is_dir():  # trained by an earlier attempt that died before recording
        peft_model = load_adapter(model, train_dir / ADAPTER_DIR)
    else:
        config = _train_config(spec, progress)
        domain = spec["domain"]
        tr, va, manifest = prepare_data(domain["name"], tokenizer, config, data_dir=data_dir,
                                        max_examples=domain["max_examples"], val_examples=domain["val_examples"])
        result = train(model, resolved, tr, train_dir, config, pad_id=pad_id_of(tokenizer), val_set=va,
                       data_manifest=manifest, resume=bool(checkpoints(train_dir)),
                       run_info={"job": spec["placement"]["name"], "train_domain": domain["train_domain"],
                                 "threads": current_threads()})
        peft_model = result.peft_model
    crash_point("trained")
    log = [json.loads(line) for line in (train_dir / LOG_NAME).read_text().splitlines() if line.strip()]
    rows = [r for r in log if r.get("event") in ("step", "lora_norms", "eval", "end")]
    return peft_model, resolved, rows


def _evaluate(spec: dict, model, tokenizer, out: Path, data_dir: str | None, adapter: str | None,
              progress: bool) -> tuple[dict, list[dict]]:
    from ..evaluate.lm import CausalLM
    from ..evaluate.runner import evaluate_benchmark, write_json_atomic

    e = spec["eval"]
    lm = CausalLM(model, tokenizer, batch_size=e["batch_size"], max_length=e["max_length"],
                  name=spec["model"]["name"], adapter=adapter, prefix_reuse=e.get("prefix_reuse", False))
    summaries, records = {}, []
    # One bar for the job's benchmarks (below the study's grid bar), not one lingering bar per benchmark.
    bar = tqdm(total=len(e["benchmarks"]), desc="  evaluate", unit="bench", leave=False, disable=not progress,
               position=1)
    for bench, size in e["benchmarks"].items():
        bar.set_postfix_str(bench)
        summary = evaluate_benchmark(lm, bench, data_dir=data_dir, n=size, limit=e["limit"], seed=e["subset_seed"],
                                     output_dir=out / "eval", max_new_tokens=e["max_new_tokens"],
                                     allow_code_execution=e["allow_code_execution"], progress=False)
        records += summary.pop("records")
        summary.pop("files", None)
        summaries[bench] = summary
        bar.update(1)
    bar.close()
    write_json_atomic(out / "eval" / "summary.json", summaries)
    crash_point("evaluated")
    return summaries, records


def run_job(spec: dict, study_dir: str | Path, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run one job; returns {"summaries", "records", "train_log", "trainable_params", "params_by_component",
    "artifact_dir", "wall_s"}."""
    start = time.perf_counter()
    study_dir, out = Path(study_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir_of(spec, study_dir)
    model, tokenizer = load_base(spec["model"])
    result: dict[str, Any] = {"train_log": [], "trainable_params": 0, "params_by_component": {}}
    adapter = None
    if spec["kind"] == "train":
        model, resolved, rows = _fine_tune(spec, model, tokenizer, out, data_dir, progress)
        by_component: dict[str, int] = {}
        for host in resolved.hosts:
            by_component[host.component] = by_component.get(host.component, 0) + host.lora_params
        result.update(train_log=rows, trainable_params=resolved.trainable_params, params_by_component=by_component)
        adapter = str(out / "train" / "adapter")
    model.eval()
    summaries, records = _evaluate(spec, model, tokenizer, out, data_dir, adapter, progress)
    result.update(summaries=summaries, records=records, artifact_dir=str(out.relative_to(study_dir)),
                  wall_s=time.perf_counter() - start)
    return result


# Every kind of job the runner (and any backend) can execute: kind -> "module:function", the function taking
# (spec, study_dir, out, progress=...) and returning a JSON-able result for ``Store.complete``. Dotted paths, not
# imports, so that the study package does not import the packages that add kinds (no cycles), and a fresh worker
# process imports only what its job needs.
JOB_KINDS: dict[str, str] = {
    "base": "hybridlora.study.jobs:run_job",
    "train": "hybridlora.study.jobs:run_job",
    "ablation": "hybridlora.ablation.jobs:run_condition",
}


# Whether a job kind needs a GPU (the Ray backend asks for none for a kind mapped to False); unknown kinds do.
JOB_USES_GPU: dict[str, bool] = {"base": True, "train": True}


# Kinds whose jobs may follow one another in one worker process: the Ray backend keeps such a process (a Ray actor
# holding its GPU) for the kind's next job, so what a process caches across jobs (an ablation's model, tokenized
# texts and prepared benchmarks) is built once per process, as in the local runner. Kinds that train are left out:
# a fresh process per job returns all of a job's GPU memory.
JOB_KEEPS_PROCESS: dict[str, bool] = {"ablation": True}


# The entries of a job's spec (dotted keys) that may name a file or folder the job reads. The Ray backend ships
# those that exist on the driver to workers that cannot see its disk and points the job at the copies; the value
# ``builtin:demo`` travels as the study's own data folder; anything else (a hub id, a known domain) is left as is.
JOB_INPUTS: dict[str, tuple[str, ...]] = {
    "base": ("data.source",),
    "train": ("data.source", "domain.name"),
    "ablation": ("eval.data_dir", "perplexity.source.path", "reference.source.path", "adapter"),
}


def spec_value(spec: dict, dotted: str):
    """``spec["a"]["b"]`` for ``"a.b"``; None where a level is missing."""
    value = spec
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def set_spec_value(spec: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        spec = spec[part]
    spec[last] = value


# Kinds whose jobs may run several at once, sharing their forwards: a module with ``group_size(spec)`` (how many
# jobs a group holds; 1: alone), ``group_key(spec)`` (jobs with equal keys may share) and ``run_conditions(specs,
# study_dir, outs, progress=)`` (their results, in order).
JOB_GROUPS: dict[str, str] = {"ablation": "hybridlora.ablation.jobs"}


def group_rule(spec: dict) -> tuple[int, str] | None:
    """(group size, sharing key) of a job whose kind runs in groups and whose spec asks for more than one; None:
    it runs alone."""
    import importlib

    path = JOB_GROUPS.get(spec.get("kind"))
    if path is None:
        return None
    module = importlib.import_module(path)
    size = module.group_size(spec)
    return (size, module.group_key(spec)) if size > 1 else None


def execute_group(specs: list[dict], study_dir: str | Path, outs: list, *, progress: bool = True) -> list[dict]:
    """Run jobs that share a :func:`group_rule` together (one job: :func:`execute`)."""
    if len(specs) == 1 and group_rule(specs[0]) is None:
        return [execute(specs[0], study_dir, outs[0], progress=progress)]
    import importlib

    module = importlib.import_module(JOB_GROUPS[specs[0]["kind"]])
    return module.run_conditions(specs, study_dir, outs, progress=progress)


def execute(spec: dict, study_dir: str | Path, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run one job of any registered kind."""
    kind = spec.get("kind")
    if kind not in JOB_KINDS:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(sorted(JOB_KINDS))}")
    return job_function(JOB_KINDS[kind])(spec, study_dir, out, progress=progress)


def job_function(path: str):
    """The function a ``JOB_KINDS`` entry names ("module:function"), imported on first use."""
    import importlib

    module, function = path.split(":")
    return getattr(importlib.import_module(module), function)
