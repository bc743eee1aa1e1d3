"""Synthetic probes (the MAD protocol: Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures", arXiv 2403.17844; task settings from its code, athms/mad-lab), multi-query associative recall
(Arora et al. 2023) and a long-context retrieval probe. One module per probe; each defines ``NAME``,
``DEFAULTS`` (the task at MAD's baseline size) and ``generate(rng, n, **task) -> ProbeData``.

Every probe trains the architecture briefly from scratch (:func:`run_probe`): the spec re-solved at the probe's
vocabulary, depth and parameter target (so a sequential/parallel pair stays matched), one fresh model per seed.
Results are per answer token, pooled over seeds with a Wilson interval and as a mean over seeds with a Student-t
interval (``analysis.stats``).
"""
from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path
from typing import Any

from .base import ProbeData, Settings, lm_loss, rng_for, train_and_score  # noqa: F401

PROBE_MODULES = ("in_context_recall", "fuzzy_recall", "noisy_recall", "selective_copying", "compression",
                 "memorization", "mqar", "long_context")
RESULTS = "probes.jsonl"


def probe_module(name: str):
    if name not in PROBE_MODULES:
        raise KeyError(f"unknown probe {name!r}; known: {', '.join(PROBE_MODULES)}")
    return importlib.import_module(f"{__name__}.{name}")


def task_args(name: str, settings: Settings) -> dict[str, Any]:
    """The probe's task at MAD's baseline size, lengths scaled by ``settings.scale``, then overrides."""
    args = dict(probe_module(name).DEFAULTS)
    if settings.scale != 1.0:
        for key, floor in (("seq_len", 8), ("num_tokens_to_copy", 2), ("num_pairs", 2)):
            if key in args:
                args[key] = max(floor, round(args[key] * settings.scale))
        if name == "long_context":
            args["seq_len"] = max(args["seq_len"], 4 * args["num_pairs"] + 4)
    args.update(settings.task.get(name, {}))
    return args


def _longest(name: str, args: dict[str, Any]) -> int:
    factor = max(probe_module("long_context").FACTORS) if name == "long_context" else 1
    return factor * args["seq_len"] + 4 * args.get("num_pairs", 0)


def probe_spec(spec, name: str, settings: Settings):
    """The architecture a probe trains: the spec at the probe's vocabulary, depth and parameter target."""
    args = task_args(name, settings)
    return spec.with_(vocab_size=args["vocab_size"], tokenizer=None, depth=settings.depth,
                      target_params=settings.target_params,
                      max_position_embeddings=max(spec.max_position_embeddings, _longest(name, args)))


def generate(name: str, seed: int, split: str, n: int, settings: Settings, **extra: Any) -> ProbeData:
    module = probe_module(name)
    args = {**task_args(name, settings), **extra}
    if getattr(module, "SHARED_TABLE", False):
        args["table_seed"] = seed  # one fact table for train and test
    return module.generate(rng_for(seed, f"{name}/{split}"), n, **args)


def run_probe(spec, name: str, seed: int, settings: Settings, device: str | None = None) -> dict[str, Any]:
    """Train a fresh model of ``spec`` on probe ``name`` with ``seed``; return one result record."""
    import torch

    from ..solve import build

    start = time.perf_counter()
    arch = probe_spec(spec, name, settings)
    train = generate(name, seed, "train", settings.train_examples, settings)
    test = generate(name, seed, "test", settings.test_examples, settings)
    more = {}
    if name == "long_context":
        factors = probe_module(name).FACTORS
        more = {f"x{f}": generate(name, seed, f"test-x{f}", settings.test_examples, settings, factor=f)
                for f in factors}
    model, match = build(arch, seed=seed)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loss_fn, extra = (probe_module(name).make_loss(model, train) if hasattr(probe_module(name), "make_loss")
                      else (lm_loss, []))
    out = train_and_score(model, train, test, settings, seed, loss_fn, extra, more)
    curve = out["loss_curve"]
    return {"arch": spec.name, "probe": name, "seed": seed, "settings": settings.name,
            "params": match.achieved, "target_params": match.target, "task": task_args(name, settings),
            "scores": out["scores"], "steps": out["steps"], "precision": out["precision"], "step": out["step"],
            "loss_first": curve[0] if curve else None, "loss_last": sum(curve[-5:]) / max(len(curve[-5:]), 1),
            "seconds": round(time.perf_counter() - start, 2)}


def warm_up(specs: dict, jobs: list[tuple[str, str, int]], settings: Settings, steps: int = 2,
            progress: bool = True) -> int:
    """A few training steps and one scoring batch of every (architecture, probe) among ``jobs``, in this process,
    results thrown away. Why: on a fresh GPU machine each new kernel shape is autotuned by Triton (minutes for
    fla's kernels); runner processes started together would all autotune the same shapes at once, each timing
    its candidates on a GPU the others are using. Done here first, one at a time, the winners land in Triton's
    on-disk cache and every runner reads them. Returns the number of (architecture, probe) pairs warmed up."""
    import dataclasses

    short = dataclasses.replace(settings, train_examples=steps * settings.batch_size,
                                test_examples=settings.batch_size, epochs=1)
    pairs = list(dict.fromkeys((arch, probe) for arch, probe, _ in jobs))
    for i, (arch, probe) in enumerate(pairs, 1):
        if progress:
            print(f"warming up kernels {i}/{len(pairs)}: {arch} {probe}", flush=True)
        run_probe(specs[arch], probe, 0, short)
    return len(pairs)


def run_suite(specs: dict, probes: list[str], seeds: list[int], settings: Settings, output: Path,
              progress: bool = True, workers: int = 1, warm_up_steps: int = 0) -> list[dict[str, Any]]:
    """Every (architecture, probe, seed); records appended to ``output/probes.jsonl`` as they finish, and a
    re-run skips the ones already there (resumable). ``workers`` > 1 runs that many at once in their own
    processes (:func:`_in_processes`); each run is seeded on its own, so the records are those of one process.
    ``warm_up_steps`` > 0 first runs that many steps of each (architecture, probe) here (:func:`warm_up`)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / RESULTS
    done = load_records(output)
    have = {(r["arch"], r["probe"], r["seed"], r["settings"]) for r in done}
    jobs = [(a, p, s) for a in specs for p in probes for s in seeds if (a, p, s, settings.name) not in have]
    if warm_up_steps > 0 and jobs:
        warm_up(specs, jobs, settings, warm_up_steps, progress)
    bar = None
    if progress and jobs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="probes", unit="run", leave=False)
    records = (_in_processes(specs, jobs, settings, workers) if workers > 1 and len(jobs) > 1
               else (run_probe(specs[arch], probe, seed, settings) for arch, probe, seed in jobs))
    with path.open("a", encoding="utf-8") as fh:
        for record in records:
            arch, probe, seed = record["arch"], record["probe"], record["seed"]
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            done.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{arch} {probe} seed {seed}: {record['scores']['test']['accuracy']:.2f}")
    if bar is not None:
        bar.close()
    return [r for r in done if r["settings"] == settings.name]


def _in_processes(specs: dict, jobs: list[tuple[str, str, int]], settings: Settings, workers: int):
    """Yield the records of ``jobs`` as ``workers`` processes finish them. Why processes: a probe model is small
    (~0.5M parameters at MAD's settings), so one run leaves most of a GPU idle while its host launches kernels;
    several runs keep it busy (on CPU they share the cores, each sizing its threads like any hybridlora process).
    An interrupted suite keeps the records written so far; the rest run again on the next call."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from ... import threads

    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_started, initargs=(threads.explicit_threads(),))
    try:
        with threads.standing_aside():  # this process only waits: its share of the cores goes to the workers
            pending = {pool.submit(run_probe, specs[arch], probe, seed, settings) for arch, probe, seed in jobs}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_started(fixed_threads: int | None) -> None:
    from ... import threads

    threads.configure(fixed_threads)


def load_records(output: Path) -> list[dict[str, Any]]:
    path = Path(output) / RESULTS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from an interrupted run: that job runs again
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (architecture, probe, test set): pooled accuracy with a Wilson interval over all answer
    tokens of all seeds, and the mean over seeds with a Student-t interval, clipped to [0, 1] (with few seeds the
    t interval of an accuracy can pass 0 or 1, which no accuracy can; NaN, for one seed, stays NaN)."""
    from ...analysis.stats import seed_summary, wilson_interval

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        for test, s in r["scores"].items():
            groups.setdefault((r["arch"], r["probe"], test), []).append({"seed": r["seed"], **s})
    rows = []
    for (arch, probe, test), items in sorted(groups.items()):
        correct, answers = sum(i["correct"] for i in items), sum(i["answers"] for i in items)
        low, high = wilson_interval(correct, answers)
        mean, s_low, s_high = seed_summary([i["accuracy"] for i in items])
        s_low, s_high = (v if math.isnan(v) else min(max(v, 0.0), 1.0) for v in (s_low, s_high))
        rows.append({"arch": arch, "probe": probe, "test": test, "seeds": sorted(i["seed"] for i in items),
                     "answers": answers, "accuracy": correct / max(answers, 1), "wilson95": [low, high],
                     "seed_mean": mean, "seed_t95": [s_low, s_high],
                     "per_seed": {str(i["seed"]): i["accuracy"] for i in items}})
    return rows


def register_cli(sub) -> None:
    from .cli import register

    register(sub)
