"""Run the study's benchmarks against a :class:`~hybridlora.evaluate.lm.CausalLM` and write the results.

Per benchmark: ``<output>/<benchmark>.jsonl`` (one record per instance) and ``<output>/<benchmark>.summary.json``
(accuracy, n, protocol, model, adapter, settings, throughput); both written atomically (temp file + rename).
HumanEval completions are executed only when ``allow_code_execution=True``; otherwise pass@1 is reported as
"not run" — never as 0.

Record fields: ``benchmark``, ``example_id`` (stable source id, a str), ``index`` (position in the subset),
``correct`` (0/1, None when not scored), ``num_fewshot`` (shots kept after trimming); multiple choice adds
``prediction``/``gold`` (letters), ``pred_index``/``gold_index``, ``scores`` (log p of each letter),
``meta_subject`` (MMLU); GSM8K adds ``prediction``/``gold`` (normalised numbers) and ``completion``; HumanEval
adds ``task_id``, ``completion``, ``status`` ('not run' or the sandbox's) and ``detail`` when executed.
These records load with ``hybridlora.analysis`` (string ids, ``correct`` None = unscored).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from . import arc, gsm8k, hellaswag, humaneval, mmlu
from . import syn_arith, syn_copy, syn_count, syn_first, syn_recall, syn_recall_inverse, syn_reverse
from .data import DATA_ENV, SUBSET_SEED, BenchmarkError, fit_prompt, letters, seeded_subset
from .lm import CausalLM

BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in (mmlu, arc, hellaswag, gsm8k, humaneval, syn_recall, syn_copy,
                                                          syn_arith, syn_count, syn_first, syn_recall_inverse,
                                                          syn_reverse)}
NOT_RUN = "not run"


def get_benchmark(name: str) -> ModuleType:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}") from None


def parse_benchmarks(spec: str | Iterable[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise BenchmarkError(f"no benchmark given; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        get_benchmark(name)
    return names


def load_items(name: str, data_dir: str | Path | None = None, *, n: int | None = None, limit: int | None = None,
               seed: int = SUBSET_SEED) -> tuple[list[dict], Any]:
    """The benchmark's fixed evaluation subset (default size: the study's) and its few-shot source."""
    module = get_benchmark(name)
    items, shots = module.load(data_dir)
    return seeded_subset(items, module.DEFAULT_N if n is None else n, seed=seed, limit=limit), shots


def build_prompts(lm: CausalLM, module: ModuleType, items: Sequence[dict], shots: Any,
                  reserve: int = 1) -> list[tuple[str, int]]:
    """(prompt, shots kept) per item; the oldest shots are dropped until prompt + ``reserve`` tokens fit."""
    budget = lm.max_length - reserve
    out = []
    for item in items:
        header, examples, query = module.prompt_parts(item, shots)
        out.append(fit_prompt(header, examples, query, lambda text: lm.token_count(text) <= budget))
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    _write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Prepared:
    """One benchmark's inputs at one model boundary: items, prompts (with the shots kept) and their token rows
    (``lm.choice_inputs`` or ``lm.prompt_rows``). Shared by every evaluation that hits the cache: read only."""
    items: list[dict]
    prompts: list[tuple[str, int]]
    inputs: Any


def prepare_benchmark(lm: CausalLM, name: str, *, data_dir: str | Path | None = None, n: int | None = None,
                      limit: int | None = None, seed: int = SUBSET_SEED, reserve: int = 2) -> Prepared:
    """Load the subset, fit its prompts into ``lm.max_length - reserve`` tokens and tokenize them (no model call).
    ``reserve``: the tokens kept free after a prompt — a generative benchmark's generation budget (its rows are
    made for that budget), 2 for multiple choice."""
    module = get_benchmark(name)
    items, shots = load_items(name, data_dir, n=n, limit=limit, seed=seed)
    prompts = build_prompts(lm, module, items, shots, reserve=reserve)
    texts = [p for p, _ in prompts]
    if module.KIND == "generate":
        inputs = lm.prompt_rows(texts, reserve)
    else:
        inputs = lm.choice_inputs(texts, [[f" {c}" for c in letters(len(item["choices"]))] for item in items])
    return Prepared(items, prompts, inputs)


class PreparedCache:
    """Prepared benchmarks of one process, for callers that evaluate many variants of a model with one tokenizer
    (``hybridlora ablate``: every condition of a model sees the same items and prompts). Keyed by everything that
    shapes them: benchmark, data folder (and $HYBRIDLORA_DATA when none is given), subset size, limit, seed, the
    token budget (``max_length`` and the reserve: the generation budget) and the tokenizer object itself (held by
    the entry, so that its id is never reused). The oldest entries go beyond ``size``."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._entries: dict[tuple, tuple[Any, Prepared]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(lm: CausalLM, name: str, *, data_dir: str | Path | None, n: int | None, limit: int | None, seed: int,
            reserve: int) -> tuple:
        where = str(data_dir) if data_dir is not None else ("$" + DATA_ENV, os.environ.get(DATA_ENV))
        return (name, where, n, limit, seed, lm.max_length, reserve, id(lm.tokenizer))

    def get(self, lm: CausalLM, name: str, **settings: Any) -> Prepared:
        key = self.key(lm, name, **settings)
        if key in self._entries:
            self.hits += 1
            return self._entries[key][1]
        self.misses += 1
        prepared = prepare_benchmark(lm, name, **settings)
        while len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (lm.tokenizer, prepared)
        return prepared


def _mc_records(lm: CausalLM, name: str, prepared: Prepared, bar: Any) -> list[dict]:
    scores = lm.score_choices(prepared.inputs, progress=bar)
    records = []
    for index, (item, (_, kept), vector) in enumerate(zip(prepared.items, prepared.prompts, scores)):
        labels = letters(len(item["choices"]))
        pred = max(range(len(vector)), key=vector.__getitem__)
        records.append({"benchmark": name, "example_id": item["example_id"], "index": index,
                        "correct": int(pred == item["gold"]), "prediction": labels[pred], "gold": labels[item["gold"]],
                        "pred_index": pred, "gold_index": item["gold"], "scores": vector,
                        "meta_subject": item.get("subject"), "num_fewshot": kept})
    return records


def _generate_records(lm: CausalLM, module: ModuleType, prepared: Prepared, bar: Any) -> list[dict]:
    completions = lm.generate_rows(prepared.inputs, module.STOP, progress=bar)
    records = []
    for index, (item, (_, kept), completion) in enumerate(zip(prepared.items, prepared.prompts, completions)):
        record = {"benchmark": module.NAME, "example_id": item["example_id"], "index": index}
        if module is humaneval:
            record.update(task_id=item["task_id"], correct=None, status=NOT_RUN)
        else:
            record.update(module.score(item, completion))
        record.update(completion=completion, num_fewshot=kept)
        records.append(record)
    return records


def _execute_humaneval(items: list[dict], records: list[dict], workers: int | None, timeout_s: float) -> None:
    from .sandbox import run_many

    results = run_many([(item, rec["completion"]) for item, rec in zip(items, records)], workers=workers,
                       timeout_s=timeout_s)
    for rec, res in zip(records, results):
        rec.update(correct=int(res.passed), status=res.status, detail=res.detail)


def evaluate_benchmark(lm: CausalLM, name: str, *, data_dir: str | Path | None = None, n: int | None = None,
                       limit: int | None = None, seed: int = SUBSET_SEED, output_dir: str | Path | None = None,
                       max_new_tokens: int | None = None, allow_code_execution: bool = False,
                       sandbox_workers: int | None = None, sandbox_timeout_s: float = 10.0,
                       progress: bool = True, cache: PreparedCache | None = None) -> dict[str, Any]:
    """Evaluate one benchmark; returns its summary (and writes JSONL + summary JSON under ``output_dir``).
    ``cache``: reuse the items, prompts and token rows prepared earlier in this process (:class:`PreparedCache`)."""
    module = get_benchmark(name)
    generative = module.KIND == "generate"
    if max_new_tokens is not None and max_new_tokens < 1:  # 0 must not silently become the default budget
        raise BenchmarkError(f"max_new_tokens must be at least 1 (got {max_new_tokens}); None = the benchmark's own")
    new_tokens = max_new_tokens if max_new_tokens is not None else getattr(module, "MAX_NEW_TOKENS", 0)
    start = time.perf_counter()
    prepare = cache.get if cache is not None else prepare_benchmark
    prepared = prepare(lm, name, data_dir=data_dir, n=n, limit=limit, seed=seed,
                       reserve=new_tokens if generative else 2)
    items = prepared.items
    with tqdm(total=len(items), desc=name, unit="ex", disable=not progress) as bar:
        if generative:
            records = _generate_records(lm, module, prepared, bar)
        else:
            records = _mc_records(lm, name, prepared, bar)
    executed = False
    if module is humaneval and allow_code_execution and records:
        _execute_humaneval(items, records, sandbox_workers, sandbox_timeout_s)
        executed = True
    wall = time.perf_counter() - start
    scored = [r["correct"] for r in records if r["correct"] is not None]
    accuracy: float | str | None = (sum(scored) / len(scored) if scored else None)
    if module is humaneval and not executed:
        accuracy = NOT_RUN
    summary = {
        "benchmark": name, "metric": "pass@1" if module is humaneval else "accuracy", "accuracy": accuracy,
        "n": len(records), "correct": sum(scored) if scored else None, "protocol": module.PROTOCOL,
        "num_fewshot": module.NUM_FEWSHOT,
        "mean_fewshot_kept": (sum(r["num_fewshot"] for r in records) / len(records)) if records else None,
        "model": lm.name, "adapter": lm.adapter,
        "settings": {"subset_size": module.DEFAULT_N if n is None else n, "limit": limit, "seed": seed,
                     "batch_size": lm.batch_size, "max_length": lm.max_length, "kernels": lm.kernels,
                     "max_new_tokens": new_tokens if generative else None,
                     "decode": lm.decode_path if generative else None,
                     "code_execution": (("run" if executed else NOT_RUN) if module is humaneval else None),
                     "data_dir": str(data_dir) if data_dir is not None else None},
        "wall_s": wall, "examples_per_s": len(records) / wall if wall > 0 else None,
    }
    if generative and lm.generate_batch_size != lm.batch_size:  # said only when generation batched otherwise
        summary["settings"]["generate_batch_size"] = lm.generate_batch_size
    if not generative and lm.prefix_reuse:  # said only when asked for: how many rows ran on a shared prefix's cache
        summary["settings"]["prefix_reuse"] = {"rows_reused_so_far": lm.prefix_reused_rows,
                                               "off": lm.prefix_reuse_note,
                                               "cut_to_multiple_of": lm.prefix_reuse_align}
    kept = summary["mean_fewshot_kept"]
    if kept is not None and kept < module.NUM_FEWSHOT:
        # Trimmed shots change what is measured: say so, never silently.
        summary["fewshot_note"] = (f"{name}: prompts kept {kept:.1f} of {module.NUM_FEWSHOT} few-shot examples on "
                                   f"average (context limit {lm.max_length} tokens); raise the max length to keep more")
        # The caller shows it once (eval: under the results; study: in its end summary), not as a Python warning.
    return finish_benchmark(name, summary, records, output_dir)


def finish_benchmark(name: str, summary: dict[str, Any], records: list[dict],
                     output_dir: str | Path | None) -> dict[str, Any]:
    """Write ``<name>.jsonl`` + ``<name>.summary.json`` (atomically) when asked; the summary carries the records."""
    if output_dir is not None:
        out = Path(output_dir)
        write_jsonl_atomic(out / f"{name}.jsonl", records)
        write_json_atomic(out / f"{name}.summary.json", summary)
        summary["files"] = [str(out / f"{name}.jsonl"), str(out / f"{name}.summary.json")]
    summary["records"] = records
    return summary


def evaluate(lm: CausalLM, benchmarks: str | Iterable[str] = tuple(BENCHMARKS), *, output_dir: str | Path | None = None,
             **options: Any) -> dict[str, dict[str, Any]]:
    """Every benchmark in turn; also writes ``summary.json`` (all summaries, without records) under ``output_dir``."""
    names = parse_benchmarks(benchmarks)
    results = {name: evaluate_benchmark(lm, name, output_dir=output_dir, **options) for name in names}
    if output_dir is not None:
        write_json_atomic(Path(output_dir) / "summary.json",
                          {name: {k: v for k, v in s.items() if k != "records"} for name, s in results.items()})
    return results


def perplexity(lm: CausalLM, texts: Sequence[str], *, output_dir: str | Path | None = None,
               name: str = "perplexity") -> dict[str, Any]:
    """Mean token log-likelihood and perplexity on held-out ``texts`` (written to ``<name>.summary.json``)."""
    start = time.perf_counter()
    result = lm.mean_loglikelihood(texts)
    summary = {"benchmark": name, **result, "documents": len(texts), "model": lm.name, "adapter": lm.adapter,
               "settings": {"max_length": lm.max_length}, "wall_s": time.perf_counter() - start}
    if output_dir is not None:
        write_json_atomic(Path(output_dir) / f"{name}.summary.json", summary)
    return summary
