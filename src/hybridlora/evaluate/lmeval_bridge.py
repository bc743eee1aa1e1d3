"""Bridge to EleutherAI's lm-evaluation-harness (``--protocol lm-eval``).

Runs lm-eval's *stock* task definitions (prompt templates, choices, filters, metrics) for mmlu, arc_challenge,
hellaswag, gsm8k and humaneval on the *same in-memory model object* as the study protocol (lm-eval's ``HFLM``
wraps ``CausalLM.model`` and ``CausalLM.tokenizer``; nothing is reloaded), and converts lm-eval's per-sample
log into this package's per-instance records (see :mod:`hybridlora.evaluate.runner`).

Data. lm-eval's stock tasks read Hugging Face hub datasets. Here every task is pointed at local files instead:
the items come from this package's own loaders (``--data-dir`` / ``$HYBRIDLORA_DATA`` laid out like
``shared/data``; the hub only where those loaders use it), are written in the hub dataset's column layout
(plus an ``example_id`` column) as JSON-lines files in a temporary folder, and the stock config is loaded from
lm-eval's installed YAML with ``dataset_path: json`` and ``dataset_kwargs.data_files`` replaced. The evaluated
items are the study's fixed seeded subset (``n``/``seed``/``limit`` as in the study protocol), so records of the
two protocols pair up by ``example_id``. A stock YAML that is missing, or a task that cannot be built from the
local files, is an error (:class:`LmEvalError`), never a silent fallback to the hub.

Few-shot counts are the study's (MMLU 5, ARC 25, HellaSwag 10, GSM8K 8, HumanEval 0); the *shots themselves*
follow lm-eval's samplers (MMLU: the first dev questions of the subject; ARC/GSM8K: drawn per question from the
train split with lm-eval's few-shot seed). HellaSwag has no local train split: its pool is the study's ten fixed
validation shots (excluded from evaluation), and its query text is the local file's ``query`` (activity label +
": " + context) put through lm-eval's own ``preprocess`` (the hub's split ``ctx_a``/``ctx_b`` is not available).

HumanEval executes model-written code, so it runs only with ``allow_code_execution=True``
(``--confirm-run-unsafe-code``); otherwise it is reported as not run and nothing is generated. Execution is by
this package's sandbox (``code_executor="sandbox"``, the default: lm-eval only generates), or by lm-eval's own
``code_eval`` metric (``code_executor="lm-eval"``: ``confirm_run_unsafe_code=True`` is passed to lm-eval and
``HF_ALLOW_CODE_EVAL=1`` set; that metric is a hub script and runs code in a plain subprocess, not a sandbox).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .data import BenchmarkError, letters, resolve_source
from .lm import CausalLM

PROTOCOL = "lm-eval"
TESTED_VERSION = "0.4.13"
INSTALL_HINT = "pip install 'hybridlora[lmeval]'"
NOT_RUN = "not run"

# our benchmark name -> stock lm-eval YAML (relative to lm_eval/tasks) and the study's local data location
_STOCK = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
    "humaneval": "humaneval/humaneval.yaml",
    "mmlu": "mmlu/default/mmlu_{subject}.yaml",
}
_PRIMARY_FILTER = {"gsm8k": "strict-match"}


class LmEvalError(BenchmarkError):
    """lm-eval is missing, or a stock task cannot be set up against local data; the message says what to do."""


# --------------------------------------------------------------------------------------------- lm-eval access
def require_lm_eval() -> str:
    """lm-eval's version; a one-line :class:`LmEvalError` when it is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise LmEvalError(f"--protocol lm-eval needs EleutherAI's lm-evaluation-harness, which is not installed "
                          f"({exc}); install it with: {INSTALL_HINT}") from exc
    return lmeval_version()


def lmeval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        import lm_eval

        return str(getattr(lm_eval, "__version__", "unknown"))


def stock_yaml(relative: str) -> Path:
    """Path of a stock task YAML shipped inside the installed lm-eval."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / relative
    if not path.is_file():
        raise LmEvalError(f"lm-eval {lmeval_version()} has no stock task file tasks/{relative} (the bridge was "
                          f"written against lm-eval {TESTED_VERSION}); install that version: {INSTALL_HINT}")
    return path


def stock_config(relative: str, *, resolve_functions: bool = True) -> dict[str, Any]:
    """A stock task config as a plain dict (``include`` merged; ``!function`` resolved unless told not to)."""
    try:  # lm-eval's own YAML reader (handles its ``include`` and ``!function`` tags); not a public API
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as exc:
        raise LmEvalError(f"lm-eval {lmeval_version()} has no tasks._yaml_loader (the bridge was written against "
                          f"lm-eval {TESTED_VERSION}); install that version: {INSTALL_HINT}") from exc

    config = dict(load_yaml(stock_yaml(relative), resolve_func=resolve_functions))
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    return config


def make_hflm(lm: CausalLM) -> Any:
    """lm-eval's ``HFLM`` around the very model and tokenizer of ``lm`` (no copy, no reload)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=lm.batch_size, max_length=lm.max_length,
                backend="causal")


# --------------------------------------------------------------------------------------------- local documents
def _arc_doc(item: dict) -> dict:
    return {"example_id": item["example_id"], "id": item["example_id"], "question": item["question"],
            "choices": {"text": list(item["choices"]), "label": list(item["labels"])},
            "answerKey": item["labels"][item["gold"]]}


def _mmlu_doc(item: dict) -> dict:
    return {"example_id": item["example_id"], "question": item["question"], "subject": item["subject"],
            "choices": list(item["choices"]), "answer": int(item["gold"])}


def _hellaswag_doc(item: dict, preprocess: Any) -> dict:
    # the stock process_docs needs the hub's ctx_a/ctx_b split; the local file only has the joined query,
    # so the already-processed fields are written and the same lm-eval preprocess is applied to them
    return {"example_id": item["example_id"], "query": preprocess(item["question"]),
            "choices": [preprocess(e) for e in item["choices"]], "label": str(item["gold"]), "gold": int(item["gold"])}


def _gsm8k_doc(item: dict) -> dict:
    return {"example_id": item["example_id"], "question": item["question"], "answer": item["answer"]}


def _humaneval_doc(item: dict) -> dict:
    return {"example_id": item["example_id"], "task_id": item["task_id"], "prompt": item["prompt"],
            "test": item["test"], "entry_point": item["entry_point"]}


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def local_dataset(config: dict, splits: dict[str, Path], cache_dir: Path) -> dict:
    """``config`` pointed at local JSON-lines files (one per split), never at the hub."""
    config = dict(config)
    config.update(dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {k: str(v) for k, v in splits.items()}, "cache_dir": str(cache_dir)})
    return config


# --------------------------------------------------------------------------------------------- task building
def data_source(name: str, data_dir: str | Path | None) -> str:
    """Where benchmark ``name``'s items will come from ("local <path>" or "hub <id>"), checked without reading
    them; the loaders' own :class:`BenchmarkError` when neither is available. Used by both protocols' CLI to
    fail before a model is loaded."""
    from .. import synthetic
    from . import arc, gsm8k, hellaswag, humaneval, mmlu

    if name in synthetic.TASKS:  # generated in memory: the same items everywhere, no folder or hub needed
        return f"generated: hybridlora.synthetic v{synthetic.VERSION}"
    relative = {"mmlu": "mmlu/test", "arc_challenge": "arc/ARC-Challenge", "hellaswag": hellaswag._FILE,
                "gsm8k": "gsm8k/test.jsonl", "humaneval": humaneval._FILE}[name]
    hf_id = {m.NAME: m.HF_ID for m in (mmlu, arc, hellaswag, gsm8k, humaneval)}[name]
    root = resolve_source(name, data_dir, relative, hf_id)
    return f"local {Path(root) / relative}" if root is not None else f"hub {hf_id} (via hybridlora's loader)"


def build_tasks(name: str, items: list[dict], shots: Any, workdir: Path, *, data_dir: str | Path | None = None,
                num_fewshot: int, max_new_tokens: int | None = None,
                code_executor: str = "sandbox") -> list[dict]:
    """lm-eval task configs (dicts) for benchmark ``name`` over ``items``, reading JSON-lines files in ``workdir``.

    MMLU gives one task per subject present in ``items`` (as lm-eval's own ``mmlu`` group does).
    """
    cache = workdir / "hf_datasets_cache"
    folder = workdir / name
    if name == "arc_challenge":
        from . import arc

        train, _ = arc.load(data_dir, "train")
        config = stock_config(_STOCK[name])
        splits = {"train": write_jsonl(folder / "train.jsonl", map(_arc_doc, train)),
                  "validation": write_jsonl(folder / "validation.jsonl", map(_arc_doc, items))}
        config.update(training_split="train", fewshot_split="train", validation_split="validation", test_split=None)
        configs = [local_dataset(config, splits, cache)]
    elif name == "hellaswag":
        config = stock_config(_STOCK[name])
        preprocess = _hellaswag_preprocess(config)
        splits = {"train": write_jsonl(folder / "train.jsonl", (_hellaswag_doc(s, preprocess) for s in shots)),
                  "validation": write_jsonl(folder / "validation.jsonl",
                                            (_hellaswag_doc(i, preprocess) for i in items))}
        config.update(process_docs=None, training_split="train", fewshot_split="train", validation_split="validation",
                      test_split=None)
        configs = [local_dataset(config, splits, cache)]
    elif name == "gsm8k":
        from . import gsm8k

        train, _ = gsm8k.load(data_dir, "train")
        config = stock_config(_STOCK[name])
        splits = {"train": write_jsonl(folder / "train.jsonl", map(_gsm8k_doc, train)),
                  "test": write_jsonl(folder / "test.jsonl", map(_gsm8k_doc, items))}
        config.update(training_split="train", fewshot_split="train", test_split="test")
        if max_new_tokens:
            config["generation_kwargs"] = {**config.get("generation_kwargs", {}), "max_gen_toks": int(max_new_tokens)}
        configs = [local_dataset(config, splits, cache)]
    elif name == "humaneval":
        configs = [_humaneval_task(items, folder, cache, max_new_tokens, code_executor)]
    elif name == "mmlu":
        configs = []
        by_subject: dict[str, list[dict]] = {}
        for item in items:
            by_subject.setdefault(item["subject"], []).append(item)
        for subject, subject_items in by_subject.items():
            config = stock_config(_STOCK[name].format(subject=subject))
            dev = shots.get(subject, [])
            if len(dev) < num_fewshot:
                raise LmEvalError(f"mmlu: subject {subject} has {len(dev)} dev questions, {num_fewshot} shots needed")
            splits = {"dev": write_jsonl(folder / f"{subject}_dev.jsonl", map(_mmlu_doc, dev)),
                      "test": write_jsonl(folder / f"{subject}_test.jsonl", map(_mmlu_doc, subject_items))}
            config.update(test_split="test", fewshot_split="dev")
            configs.append(local_dataset(config, splits, cache))
    else:
        raise LmEvalError(f"no lm-eval task mapping for benchmark {name!r}")
    for config in configs:
        config["num_fewshot"] = num_fewshot
    return configs


def _hellaswag_preprocess(config: dict) -> Any:
    import sys

    process_docs = config.get("process_docs")
    module = sys.modules.get(getattr(process_docs, "__module__", ""), None)
    preprocess = getattr(module, "preprocess", None)
    if not callable(preprocess):
        raise LmEvalError(f"lm-eval {lmeval_version()}: the stock hellaswag task has no utils.preprocess to apply to "
                          f"the local data (written against lm-eval {TESTED_VERSION}); {INSTALL_HINT}")
    return preprocess


def _humaneval_task(items: list[dict], folder: Path, cache: Path, max_new_tokens: int | None,
                    code_executor: str) -> dict:
    splits = {"test": write_jsonl(folder / "test.jsonl", map(_humaneval_doc, items))}
    if code_executor == "lm-eval":
        try:  # importing the stock utils loads HF evaluate's code_eval metric script (from the hub or its cache)
            config = stock_config(_STOCK["humaneval"])
        except Exception as exc:
            raise LmEvalError(f"humaneval: lm-eval's pass@k metric (HF evaluate 'code_eval', a hub script) could not "
                              f"be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              f"use the sandbox executor instead (the default)") from exc
    elif code_executor == "sandbox":
        # lm-eval only generates (same prompt, stop strings and budget as its stock task); this package's
        # sandbox executes afterwards. Nothing here runs code, so the task is not marked unsafe.
        config = stock_config(_STOCK["humaneval"], resolve_functions=False)
        config.update(unsafe_code=False, filter_list=None,
                      metric_list=[{"metric": "bypass", "aggregation": "bypass", "higher_is_better": True}])
    else:
        raise LmEvalError(f"unknown code executor {code_executor!r} (sandbox or lm-eval)")
    config["test_split"] = "test"
    if max_new_tokens:
        config["generation_kwargs"] = {**config.get("generation_kwargs", {}), "max_gen_toks": int(max_new_tokens)}
    return local_dataset(config, splits, cache)


# --------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _quiet_datasets(progress: bool) -> Iterator[None]:
    import datasets

    was = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _code_eval_allowed(allowed: bool) -> Iterator[None]:
    """HF evaluate's code_eval refuses to run unless HF_ALLOW_CODE_EVAL=1; set only for an explicitly allowed run
    and restored afterwards."""
    if not allowed:
        yield
        return
    before = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = before


@contextlib.contextmanager
def _no_run_metadata() -> Iterator[None]:
    """Skip lm-eval's run metadata probes: ``git describe`` in the working directory and torch's environment
    report (which spawns tools such as pip and nvidia-smi). Evaluation itself is untouched; the summary records
    the versions that matter (``lm_eval_version``, model, settings)."""
    from unittest import mock

    import lm_eval.evaluator as evaluator

    with contextlib.ExitStack() as stack:
        if hasattr(evaluator, "get_git_commit_hash"):
            stack.enter_context(mock.patch.object(evaluator, "get_git_commit_hash", lambda: None))
        if hasattr(evaluator, "add_env_info"):
            stack.enter_context(mock.patch.object(evaluator, "add_env_info", lambda storage: None))
        yield


def run_tasks(hflm: Any, configs: list[dict], *, confirm_run_unsafe_code: bool = False, progress: bool = True,
              include_path: str | Path | None = None, task_names: list[str] | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on inline task configs (or on ``task_names`` found under ``include_path``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=False)
    tasks: list[Any] = list(configs) + list(task_names or [])
    with _quiet_datasets(progress), _no_run_metadata():
        try:
            results = simple_evaluate(model=hflm, tasks=tasks, task_manager=manager, log_samples=True,
                                      bootstrap_iters=1000, confirm_run_unsafe_code=confirm_run_unsafe_code)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            names = [c.get("task") for c in configs] + list(task_names or [])
            raise LmEvalError(f"lm-eval could not run {', '.join(map(str, names))}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if results is None:
        raise LmEvalError("lm-eval returned no results (not rank 0)")
    return results


def _samples_by_doc(samples: list[dict]) -> dict[int, dict[str, dict]]:
    """{doc_id: {filter name: sample}} (lm-eval logs one sample per document and filter)."""
    out: dict[int, dict[str, dict]] = {}
    for sample in samples:
        out.setdefault(int(sample["doc_id"]), {})[sample["filter"]] = sample
    return out


def mc_record(name: str, sample: dict, index: int, num_fewshot: int) -> dict:
    """One multiple-choice lm-eval sample as a per-instance record (letters for choices, as the study's)."""
    scores = [float(pair[0]) for pair in sample["filtered_resps"]]
    pred = max(range(len(scores)), key=scores.__getitem__)
    gold = int(sample["target"])
    labels = letters(len(scores))
    doc = sample["doc"]
    record = {"benchmark": name, "example_id": doc["example_id"], "index": index, "correct": int(sample["acc"]),
              "prediction": labels[pred], "gold": labels[gold], "pred_index": pred, "gold_index": gold,
              "scores": scores, "meta_subject": doc.get("subject"), "num_fewshot": num_fewshot}
    if "acc_norm" in sample:
        record["correct_norm"] = int(sample["acc_norm"])
    return record


def gsm8k_record(by_filter: dict[str, dict], index: int, num_fewshot: int, gold: str | None) -> dict:
    main = by_filter[_PRIMARY_FILTER["gsm8k"]]
    record = {"benchmark": "gsm8k", "example_id": main["doc"]["example_id"], "index": index,
              "correct": int(main["exact_match"]), "prediction": main["filtered_resps"][0], "gold": gold}
    flexible = by_filter.get("flexible-extract")
    if flexible is not None:
        record.update(correct_flexible=int(flexible["exact_match"]), prediction_flexible=flexible["filtered_resps"][0])
    record.update(completion=main["resps"][0][0], num_fewshot=num_fewshot)
    return record


def humaneval_record(by_filter: dict[str, dict], index: int) -> dict:
    sample = next(iter(by_filter.values()))
    completion = sample["resps"][0][0]
    record = {"benchmark": "humaneval", "example_id": sample["doc"]["example_id"], "index": index,
              "task_id": sample["doc"]["task_id"], "correct": None, "status": NOT_RUN, "completion": completion,
              "num_fewshot": 0}
    if "pass@1" in sample:  # lm-eval executed it (code_executor="lm-eval"; its metric expands to "pass@1")
        record.update(correct=int(float(sample["pass@1"]) > 0), status="lm-eval code_eval")
    return record


def _records(name: str, results: dict[str, Any], items: list[dict], num_fewshot: int) -> list[dict]:
    position = {item["example_id"]: i for i, item in enumerate(items)}
    records = []
    for task_samples in results["samples"].values():
        for doc_id, by_filter in sorted(_samples_by_doc(task_samples).items()):
            sample = next(iter(by_filter.values()))
            index = position[sample["doc"]["example_id"]]
            if name == "gsm8k":
                records.append(gsm8k_record(by_filter, index, num_fewshot, items[index]["gold"]))
            elif name == "humaneval":
                records.append(humaneval_record(by_filter, index))
            else:
                records.append(mc_record(name, sample, index, num_fewshot))
    records.sort(key=lambda r: r["index"])
    if [r["example_id"] for r in records] != [i["example_id"] for i in items]:
        raise LmEvalError(f"{name}: lm-eval returned samples for {len(records)} of {len(items)} items")
    return records


def _clean_configs(configs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's effective task configs, minus the temporary file paths (the data source is reported apart)."""
    out = {}
    for task, config in configs.items():
        config = dict(config)
        config.pop("dataset_kwargs", None)
        out[task] = config
    return out


def evaluate_benchmark_lmeval(lm: CausalLM, name: str, *, hflm: Any = None, data_dir: str | Path | None = None,
                              n: int | None = None, limit: int | None = None, seed: int | None = None,
                              output_dir: str | Path | None = None, max_new_tokens: int | None = None,
                              allow_code_execution: bool = False, code_executor: str = "sandbox",
                              num_fewshot: int | None = None, sandbox_workers: int | None = None,
                              sandbox_timeout_s: float = 10.0, progress: bool = True) -> dict[str, Any]:
    """One benchmark through lm-eval's stock task; summary (``protocol: "lm-eval"``) + per-instance records."""
    from .data import SUBSET_SEED
    from .runner import finish_benchmark, get_benchmark, load_items

    version = require_lm_eval()
    module = get_benchmark(name)
    seed = SUBSET_SEED if seed is None else seed
    # an override never gives shots to a zero-shot benchmark (lm-eval's own rule for num_fewshot: 0 in a config)
    shots_n = module.NUM_FEWSHOT if num_fewshot is None or module.NUM_FEWSHOT == 0 else int(num_fewshot)
    source = data_source(name, data_dir)
    items, shots = load_items(name, data_dir, n=n, limit=limit, seed=seed)
    humaneval = name == "humaneval"
    skipped = humaneval and not allow_code_execution
    start = time.perf_counter()
    results: dict[str, Any] = {}
    records: list[dict] = []
    if items and not skipped:
        lmeval_executes = humaneval and allow_code_execution and code_executor == "lm-eval"
        workdir = Path(tempfile.mkdtemp(prefix="hybridlora-lmeval-"))
        try:
            with _code_eval_allowed(lmeval_executes):
                configs = build_tasks(name, items, shots, workdir, data_dir=data_dir, num_fewshot=shots_n,
                                      max_new_tokens=max_new_tokens, code_executor=code_executor)
                results = run_tasks(hflm if hflm is not None else make_hflm(lm), configs, progress=progress,
                                    confirm_run_unsafe_code=lmeval_executes)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        records = _records(name, results, items, shots_n)
        if humaneval and code_executor == "sandbox":
            from .sandbox import run_many

            outcomes = run_many([(item, rec["completion"]) for item, rec in zip(items, records)],
                                workers=sandbox_workers, timeout_s=sandbox_timeout_s)
            for rec, res in zip(records, outcomes):
                rec.update(correct=int(res.passed), status=res.status, detail=res.detail)
    wall = time.perf_counter() - start
    scored = [r["correct"] for r in records if r["correct"] is not None]
    accuracy: float | str | None = sum(scored) / len(scored) if scored else None
    if skipped:
        accuracy = NOT_RUN
    summary: dict[str, Any] = {
        "benchmark": name, "metric": "pass@1" if humaneval else ("exact_match" if name == "gsm8k" else "accuracy"),
        "accuracy": accuracy, "n": len(records), "correct": sum(scored) if scored else None,
        "protocol": PROTOCOL, "lm_eval_version": version, "num_fewshot": shots_n,
        "model": lm.name, "adapter": lm.adapter,
        "settings": {"subset_size": module.DEFAULT_N if n is None else n, "limit": limit, "seed": seed,
                     "batch_size": lm.batch_size, "max_length": lm.max_length, "max_new_tokens": max_new_tokens,
                     "code_execution": ((code_executor if allow_code_execution else NOT_RUN) if humaneval else None),
                     "data_source": source, "stock_task": _STOCK[name]},
        "wall_s": wall, "examples_per_s": len(records) / wall if wall > 0 and records else None,
    }
    if skipped:
        summary["reason"] = "HumanEval executes model-written code: pass --confirm-run-unsafe-code to run it"
    for key, name_in_record in (("accuracy_norm", "correct_norm"), ("accuracy_flexible", "correct_flexible")):
        values = [r[name_in_record] for r in records if name_in_record in r]
        if values:
            summary[key] = sum(values) / len(values)
    if results:
        summary["lmeval"] = {"results": results.get("results"), "n-shot": results.get("n-shot"),
                             "versions": results.get("versions"), "configs": _clean_configs(results.get("configs", {}))}
    return finish_benchmark(name, summary, records, output_dir)


def evaluate_lmeval(lm: CausalLM, benchmarks: str | Iterable[str], *, output_dir: str | Path | None = None,
                    **options: Any) -> dict[str, dict[str, Any]]:
    """Every benchmark through lm-eval (one ``HFLM`` around ``lm``'s model); writes ``summary.json`` too."""
    from .runner import parse_benchmarks, write_json_atomic

    require_lm_eval()
    names = parse_benchmarks(benchmarks)
    hflm = make_hflm(lm)
    results = {name: evaluate_benchmark_lmeval(lm, name, hflm=hflm, output_dir=output_dir, **options)
               for name in names}
    if output_dir is not None:
        write_json_atomic(Path(output_dir) / "summary.json",
                          {name: {k: v for k, v in s.items() if k != "records"} for name, s in results.items()})
    return results
