"""``hybridlora eval``: the study's benchmarks on a model (+ optional LoRA adapter).

Wire in with ``from hybridlora.evaluate.cli import register; register(subparsers)``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from ..threads import add_option as add_threads_option
from ..threads import current as current_threads


DEFAULT_BENCHMARKS = "mmlu,arc_challenge,hellaswag,gsm8k,humaneval"


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer or 'auto'")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model on the study's benchmarks",
        description="Few-shot MMLU/ARC-Challenge/HellaSwag (letter log-probs), GSM8K and HumanEval (greedy). "
                    "Writes <output>/<benchmark>.jsonl, <benchmark>.summary.json and summary.json. "
                    "--protocol lm-eval runs lm-evaluation-harness's stock tasks on the same model and items instead.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="catalog name, hub id or local model directory (not with --score-completions)")
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter directory to load on top of MODEL")
    p.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, help=f"comma list (default {DEFAULT_BENCHMARKS})")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items of each fixed subset")
    p.add_argument("--data-dir", metavar="DIR", help="local data laid out like shared/data (else $HYBRIDLORA_DATA, "
                                                    "else the Hugging Face hub)")
    p.add_argument("--output", metavar="DIR", help="results folder (default eval_results, or eval_results_lmeval "
                                                  "with --protocol lm-eval)")
    p.add_argument("--protocol", choices=["study", "lm-eval"], default="study",
                   help="study: this package's evaluator (the study's prompts and scoring, default); lm-eval: "
                        "EleutherAI lm-evaluation-harness's stock tasks on the same model and items "
                        "(needs pip install 'hybridlora[lmeval]')")
    p.add_argument("--lmeval-code-executor", choices=["sandbox", "lm-eval"], default="sandbox",
                   help="with --protocol lm-eval and --confirm-run-unsafe-code: who executes HumanEval code "
                        "(sandbox: this package's sandbox, default; lm-eval: its code_eval metric, no sandbox)")
    p.add_argument("--tiny", action="store_true", help="a random tiny model of MODEL's family with a byte tokenizer")
    p.add_argument("--batch-size", type=_batch_size, default=8, metavar="N|auto",
                   help="questions per forward (default 8); auto: the largest that fits in GPU memory (8 on CPU)")
    p.add_argument("--max-length", type=int, help="context limit in tokens (default: the model's)")
    p.add_argument("--prefix-reuse", action="store_true",
                   help="multiple choice: run each benchmark's shared few-shot prefix once and score the questions on "
                        "its cache (checked against whole rows first; docs/EVALUATION.md)")
    p.add_argument("--max-new-tokens", type=int, help="override the generation budget of GSM8K/HumanEval")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", help="torch device (default: the model's, i.e. cpu)")
    p.add_argument("--perplexity-text", metavar="FILE",
                   help="also report mean token log-likelihood / perplexity of this held-out text file "
                        "(documents separated by blank lines)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="execute HumanEval completions (in the sandbox; with --protocol lm-eval see "
                        "--lmeval-code-executor); without it HumanEval pass@1 is 'not run'")
    p.add_argument("--score-completions", metavar="FILE.jsonl",
                   help="instead of a model: score a file of HumanEval completions made elsewhere (JSON lines with "
                        "task_id and completion) in the sandbox; needs --confirm-run-unsafe-code")
    p.add_argument("--no-trim", action="store_true",
                   help="with --score-completions: execute each completion as it is (default: cut it at the "
                        "standard HumanEval stops \\nclass \\ndef \\n# \\nif \\nprint; the raw text stays in the record)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads_option(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from hybridlora.errors import CliError, check_output_folder

    from .data import BenchmarkError
    from .lm import load_lm
    from .runner import evaluate, load_items, parse_benchmarks, perplexity

    output = args.output or ("eval_results_lmeval" if args.protocol == "lm-eval" else "eval_results")
    if args.score_completions:
        check_output_folder(output, "--output")
        return score_completions_command(args, output)
    if not args.model:
        raise CliError("eval needs a MODEL (or --score-completions FILE.jsonl to score completions made elsewhere)")
    try:
        names = parse_benchmarks(args.benchmarks)
        _check_numbers(args)  # flags that contradict each other are wrong whatever is installed: say so first
        if args.protocol == "lm-eval":
            from .lmeval_bridge import require_lm_eval

            from ..synthetic import TASKS as SYNTHETIC

            synthetic = [n for n in names if n in SYNTHETIC]
            if synthetic:
                raise BenchmarkError(f"--protocol lm-eval has no task for {', '.join(synthetic)} (hybridlora's "
                                     "synthetic benchmarks); use --protocol study for them")
            require_lm_eval()
        if args.limit is not None and args.limit < 1:
            raise BenchmarkError("--limit must be at least 1 (omit it to evaluate the whole subset)")
        check_output_folder(output, "--output")
        texts = _perplexity_texts(args.perplexity_text) if args.perplexity_text else None
        from .lmeval_bridge import data_source

        for name in names:  # missing or unreadable data fails here, before a model is loaded
            data_source(name, args.data_dir)
            load_items(name, args.data_dir, limit=args.limit)
        if args.adapter:
            check_adapter(args.model, args.adapter, tiny=args.tiny)
        import torch

        lm = load_lm(args.model, adapter=args.adapter, tiny=args.tiny, device=args.device, dtype=getattr(torch, args.dtype),
                     batch_size=args.batch_size, max_length=args.max_length)
        lm.prefix_reuse = args.prefix_reuse
        if current_threads() and lm.device.type == "cpu":
            print(current_threads(), file=sys.stderr)
        options = dict(output_dir=output, data_dir=args.data_dir, limit=args.limit, max_new_tokens=args.max_new_tokens,
                       allow_code_execution=args.confirm_run_unsafe_code, progress=not args.no_progress)
        if args.protocol == "lm-eval":
            from .lmeval_bridge import evaluate_lmeval

            results = evaluate_lmeval(lm, names, code_executor=args.lmeval_code_executor, **options)
        else:
            results = evaluate(lm, names, **options)
        if texts is not None:
            ppl = perplexity(lm, texts, output_dir=output)
    except BenchmarkError as exc:
        raise CliError(str(exc)) from exc
    width = max(len(n) for n in results)
    for name, summary in results.items():
        acc = summary["accuracy"]
        shown = f"{acc:.4f}" if isinstance(acc, float) else str(acc)
        print(f"{name:<{width}}  {summary['metric']:<8}  {shown:<8}  n={summary['n']}  "
              f"{summary['examples_per_s'] or 0:.2f} ex/s")
    if texts is not None:
        print(f"perplexity {ppl['perplexity']:.3f}  (mean token log-prob {ppl['mean_token_logprob']:.4f}, "
              f"{ppl['tokens']} tokens)")
    for summary in results.values():  # each note once, under the results (also in <benchmark>.summary.json)
        if summary.get("fewshot_note"):
            print(f"note: {summary['fewshot_note']}", file=sys.stderr)
    if args.prefix_reuse:
        print(f"note: {lm.prefix_reuse_note}" if lm.prefix_reuse_note else
              f"note: prefix reuse: {lm.prefix_reused_rows} multiple-choice rows scored on a shared few-shot "
              f"prefix's cache (checked against whole rows{_cut_note(lm.prefix_reuse_align)})", file=sys.stderr)
    print(f"results in {output} (protocol {args.protocol})", file=sys.stderr)
    return 0


def _cut_note(align: int | None) -> str:
    if not align or align == 1:
        return ""
    return f"; prefixes cut to multiples of {align} tokens, the uncut ones having failed the check"


def _check_numbers(args: argparse.Namespace) -> None:
    from .data import BenchmarkError

    if args.max_length is not None and args.max_length < 1:
        raise BenchmarkError(f"--max-length {args.max_length}: give a positive number of tokens (omit it for the "
                             "model's own limit)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise BenchmarkError(f"--max-new-tokens {args.max_new_tokens}: give at least 1 (omit it for each "
                             "benchmark's own budget: GSM8K 256, HumanEval 512)")
    if args.prefix_reuse and args.protocol == "lm-eval":
        raise BenchmarkError("--prefix-reuse applies to --protocol study only (lm-eval scores through its own "
                             "HFLM); drop one of the two")


def _perplexity_texts(name: str) -> list[str]:
    from .data import BenchmarkError

    path = Path(name)
    if not path.is_file():
        raise BenchmarkError(f"--perplexity-text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"--perplexity-text {path}: not UTF-8 text (at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise BenchmarkError(f"--perplexity-text {path}: cannot be read ({exc.strerror or exc})") from None
    return [t for t in text.split("\n\n") if t.strip()]


# --------------------------------------------------------------------------------------------- completions
def score_completions_command(args: argparse.Namespace, output: str) -> int:
    """``eval --score-completions FILE``: HumanEval pass@1 of completions made elsewhere, same files as a model run."""
    import time

    from hybridlora.errors import CliError

    from . import humaneval
    from .data import BenchmarkError
    from .runner import finish_benchmark, write_json_atomic

    if args.model:
        raise CliError(f"--score-completions scores a file, not a model: drop MODEL ({args.model})")
    if not args.confirm_run_unsafe_code:
        raise CliError("--score-completions executes the completions (in the sandbox): add --confirm-run-unsafe-code")
    try:
        rows = humaneval.read_completions(args.score_completions)
        if args.limit is not None:
            if args.limit < 1:
                raise BenchmarkError("--limit must be at least 1 (omit it to score every completion)")
            rows = rows[:args.limit]
        items, _ = humaneval.load(args.data_dir)
        start = time.perf_counter()
        records = humaneval.score_completions(rows, {item["task_id"]: item for item in items},
                                              trim=not args.no_trim)
    except BenchmarkError as exc:
        raise CliError(str(exc)) from exc
    wall = time.perf_counter() - start
    correct = sum(r["correct"] for r in records)
    summary = {
        "benchmark": humaneval.NAME, "metric": "pass@1", "accuracy": correct / len(records), "n": len(records),
        "correct": correct, "protocol": f"completions from {args.score_completions}, scored by hybridlora's sandbox "
                                        "(trusted checker)", "num_fewshot": humaneval.NUM_FEWSHOT,
        "mean_fewshot_kept": float(humaneval.NUM_FEWSHOT), "model": None, "adapter": None,
        "settings": {"completions": str(Path(args.score_completions).resolve()), "limit": args.limit,
                     "trim": "none" if args.no_trim else humaneval.STANDARD_TRIM, "code_execution": "run",
                     "data_dir": args.data_dir},
        "wall_s": wall, "examples_per_s": len(records) / wall if wall > 0 else None,
    }
    summary = finish_benchmark(humaneval.NAME, summary, records, output)
    write_json_atomic(Path(output) / "summary.json", {humaneval.NAME: {k: v for k, v in summary.items()
                                                                        if k != "records"}})
    print(f"humaneval  pass@1  {summary['accuracy']:.4f}  ({correct}/{len(records)})  "
          f"{'untrimmed' if args.no_trim else 'trimmed at the standard stops'}")
    print(f"results in {output}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- adapter checks
def check_adapter(model: str, adapter: str | Path, *, tiny: bool = False) -> None:
    """Fail early, in one line, when the adapter in ``adapter`` was not made for ``model``.

    Checked before PEFT loads anything: the adapter's ``base_model_name_or_path`` against MODEL (when both name
    a known model), its ``target_modules`` against MODEL's module names, and its LoRA weight shapes (from the
    safetensors header) against those modules. MODEL is built on the meta device (no memory, no weights).
    """
    from hybridlora.errors import CliError

    folder = Path(adapter)
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise CliError(f"--adapter {adapter}: no adapter_config.json there; pass a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"--adapter {adapter}: adapter_config.json is not valid JSON ({exc})") from exc
    base = config.get("base_model_name_or_path") or None
    source, network = _meta_model(model, tiny)
    owner = f"{base}" if base else "another model (its adapter_config.json names no base model)"
    redo = (f"evaluate it with `hybridlora eval {base} --adapter {adapter}`" if base else
            "pass the MODEL (and --tiny setting) it was trained with")
    mine, theirs = _model_identity(source.spec, source.kind, source.name), _model_identity(base)
    if mine and theirs and mine != theirs:
        raise CliError(f"--adapter {adapter} belongs to {base} (adapter_config.json base_model_name_or_path), "
                       f"not {model}: {redo}, or pass an adapter trained on {model}")
    names = [n for n, _ in network.named_modules() if n]
    missing = _missing_targets(config.get("target_modules"), names)
    if missing:
        total = len(config["target_modules"]) if isinstance(config.get("target_modules"), list) else 1
        raise CliError(f"--adapter {adapter} belongs to {owner}: {len(missing)} of its {total} target modules are "
                       f"not in {model}{' (tiny)' if tiny else ''} (e.g. {missing[0]}); {redo}")
    wrong = _shape_mismatch(folder, network)
    if wrong:
        raise CliError(f"--adapter {adapter} belongs to {owner}: its LoRA weights do not fit "
                       f"{model}{' (tiny)' if tiny else ''} ({wrong}); {redo}")


def _meta_model(model: str, tiny: bool):
    from hybridlora import models
    from hybridlora.families import family_for

    source = models.resolve_model(model)
    config = models.text_config(source.config)
    if tiny:
        family = family_for(config.model_type)
        if family is None:
            raise models.ModelError(f"{model}: no family entry for {config.model_type!r}, so no tiny config")
        config = models.tiny_config(config, family)
    return source, models.build_meta_model(config)


def _model_identity(spec: str | None, kind: str | None = None, name: str | None = None) -> str | None:
    """A comparable name for a model reference: its catalog entry, else its hub id; None for local paths."""
    if not spec:
        return None
    if kind in ("local", "config"):
        return None
    if kind is None and (Path(spec).expanduser().exists() or spec.startswith((".", "/", "~"))):
        return None
    from hybridlora.models import catalog

    key = spec.lower()
    for entry in catalog().values():
        if key in (n.lower() for n in (entry["name"], entry.get("hub_id", ""), *entry.get("aliases", [])) if n):
            return f"catalog:{entry['name']}"
    return f"hub:{(name or spec).lower()}"


def _missing_targets(targets: Any, names: list[str]) -> list[str]:
    """PEFT's target matching (exact name or '.'-suffix for a list, full regex match for a string)."""
    import re

    if not targets or targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    suffixes = {n.split(".")[-1] for n in names}
    missing = []
    for target in targets:
        if "." in target:
            found = any(n == target or n.endswith("." + target) for n in names)
        else:
            found = target in suffixes
        if not found:
            missing.append(target)
    return missing


def _shape_mismatch(folder: Path, network: Any) -> str | None:
    """The first LoRA weight whose shape does not fit its module (from the safetensors header only)."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    _check_safetensors_size(weights)
    try:
        return _first_mismatch(weights, network, safe_open)
    except (SafetensorError, OSError) as exc:
        from hybridlora.errors import CliError

        raise CliError(f"--adapter {folder}: {weights.name} is not a readable safetensors file ({exc}); save or "
                       "train the adapter again") from None


def _check_safetensors_size(weights: Path) -> None:
    """A truncated file whose header survived still opens; its tensors' byte ranges must fit in the file."""
    import struct

    from hybridlora.errors import CliError

    problem = None
    try:
        with weights.open("rb") as handle:
            raw = handle.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            header = json.loads(handle.read(size)) if size is not None and size < (1 << 27) else None
        if not isinstance(header, dict):
            problem = "no valid header"
        else:
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + size + end > weights.stat().st_size:
                problem = f"truncated: {weights.stat().st_size:,} bytes, the header needs {8 + size + end:,}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        problem = f"unreadable header ({type(exc).__name__})"
    if problem:
        raise CliError(f"--adapter {weights.parent}: {weights.name} is not a readable safetensors file ({problem}); "
                       "save or train the adapter again")


def _first_mismatch(weights: Path, network: Any, safe_open: Any) -> str | None:
    prefix = "base_model.model."
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            for part, axis, attribute in ((".lora_A.weight", 1, "in_features"), (".lora_B.weight", 0, "out_features")):
                if not (key.startswith(prefix) and key.endswith(part)):
                    continue
                module_name = key[len(prefix): -len(part)]
                try:
                    module = network.get_submodule(module_name)
                except AttributeError:
                    return f"no module {module_name}"
                expected = getattr(module, attribute, None)
                got = handle.get_slice(key).get_shape()[axis]
                if expected is not None and expected != got:
                    return f"{module_name}.{attribute} is {expected}, the adapter's {part[1:-7]} has {got}"
    return None
