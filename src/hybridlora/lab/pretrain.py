"""``hybridlora lab pretrain``: full-parameter causal-LM pretraining of a lab architecture with the trainer.

The corpus is split into documents (a Hugging Face dataset's text field, JSONL ``text`` rows, or blank-line
separated paragraphs of text files); each document is tokenized with an end-of-sequence token appended and cut
into examples of at most ``--seq-len`` tokens. The trainer (``train.loop.train`` with no placement: every
weight trains) packs each optimizer step's examples into rows whose example boundaries every mixer keeps
(``cu_seqlens`` / ``seq_idx``: recurrent states and convolution windows restart at each example, attention is
block-diagonal) where the bound functions allow it, checkpoints, resumes exactly and logs JSONL.

Output directory: ``model/`` (a model directory every command accepts: config, weights, tokenizer),
``tokenizer/`` (the tokenizer used, trained here with BPE unless one was given), ``lab_run.json`` (spec,
parameter match, corpus and token counts), ``train_log.jsonl``, ``run_config.yaml``, ``checkpoints/``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CliError
from .mixture import CORPUS_NAME

MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
RUN_FILE = "lab_run.json"
MIXTURE_CACHE = "mixture_examples.npz"  # --corpus synthetic: the generated examples, kept until the run ends


@dataclass
class PretrainOptions:
    """The recipe of one pretraining run (the CLI's flags; library callers build it directly)."""
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    seed: int = 0
    precision: str = "auto"
    packing: str = "auto"
    cuda_graphs: str = "auto"
    save_every: int = 100
    eval_every: int = 0
    resume: bool = False
    stop_after_steps: int | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args: Any) -> "PretrainOptions":
        names = [f for f in cls.__dataclass_fields__ if f != "progress"]
        return cls(**{f: getattr(args, f) for f in names}, progress=not args.no_progress)


# --- corpus ----------------------------------------------------------------------------------------
def read_documents(source: str, *, field: str = "text", split: str = "train", max_docs: int | None = None) -> list[str]:
    """Documents from local .txt/.jsonl files (a file or a directory of them) or a Hugging Face dataset id."""
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
        if not files:
            raise CliError(f"--corpus {source}: no .txt or .jsonl files in it")
        docs: list[str] = []
        for f in files:
            docs += _jsonl_documents(f, field) if f.suffix == ".jsonl" else _text_documents(f)
    else:
        docs = _hub_documents(source, field, split)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CliError(f"--corpus {source}: no non-empty documents")
    return docs[:max_docs] if max_docs else docs


def _text_documents(path: Path) -> list[str]:
    """Blank-line separated paragraphs (WikiText: one paragraph or heading per line, blank lines between)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [block.strip() for block in text.split("\n \n") if block.strip()] if "\n \n" in text else \
        [block.strip() for block in text.split("\n\n") if block.strip()]


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CliError(f"{path}:{i}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise CliError(f"{path}:{i}: no text field {field!r}; pass --text-field")
            docs.append(row[field])
    return docs


def _hub_documents(dataset_id: str, field: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CliError(f"--corpus {dataset_id} is no local path, and the datasets library is not installed") from None
    try:
        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:
        raise CliError(f"--corpus {dataset_id}: not a local path and not loadable from the hub "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if field not in data.column_names:
        raise CliError(f"--corpus {dataset_id}: no column {field!r} (columns: {', '.join(data.column_names)}); "
                       "pass --text-field")
    return [str(t) for t in data[field]]


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    import random

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs)))) if val_fraction > 0 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


# --- tokens ----------------------------------------------------------------------------------------
def tokenize_documents(docs: list[str], tokenizer, seq_len: int, prefix: str = "doc"):
    """Examples of at most ``seq_len`` tokens, each document ending in EOS; labels = input ids (every token)."""
    from ..data.formatting import TokenizedExample

    eos = tokenizer.eos_token_id
    examples = []
    for d, text in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        for c, start in enumerate(range(0, len(ids), seq_len)):
            chunk = ids[start:start + seq_len]
            if len(chunk) >= 2:
                examples.append(TokenizedExample(id=f"{prefix}{d}.{c}", input_ids=chunk, labels=list(chunk)))
    return examples


def take_tokens(examples: list, tokens: int) -> tuple[list, int]:
    """The first examples holding ``tokens`` tokens (one pass), or all of them with the epochs to reach it."""
    total = sum(len(e.input_ids) for e in examples)
    if total >= tokens:
        kept, seen = [], 0
        for e in examples:
            if seen >= tokens:
                break
            kept.append(e)
            seen += len(e.input_ids)
        return kept, 1
    return examples, math.ceil(tokens / max(total, 1))


def get_tokenizer(args, train_docs: list[str], out: Path, spec_tokenizer: str | None, vocab_size: int):
    """The tokenizer: --tokenizer, the spec's, the one a resumed run saved, or a BPE trained on the corpus."""
    from .solve import load_tokenizer
    from .spec import SpecError

    saved = out / TOKENIZER_DIR
    chosen = args.tokenizer or spec_tokenizer or (str(saved) if saved.is_dir() else None)
    if chosen:
        try:
            return load_tokenizer(chosen), chosen
        except SpecError as exc:
            raise CliError(str(exc)) from None
    from ..data.tokenizer import build_tiny_tokenizer

    try:
        tok = build_tiny_tokenizer(train_docs[:20000], vocab_size=vocab_size)
    except ValueError as exc:
        raise CliError(f"BPE tokenizer: {exc}") from None
    return tok, f"BPE trained on the corpus (vocab {len(tok)})"


# --- the command -----------------------------------------------------------------------------------
def register_cli(sub) -> None:
    p = sub.add_parser("pretrain", help="full-parameter pretraining of a lab architecture on a corpus")
    p.add_argument("spec", help="architecture spec YAML or shipped spec name (docs/LAB.md)")
    p.add_argument("--variant", choices=["as-written", "sequential", "parallel", "all_attention", "all_recurrent"],
                   default="as-written", help="which matched architecture of the spec to train (default: as written)")
    p.add_argument("--corpus", required=True, help="text/JSONL file or folder, a Hugging Face dataset id, or "
                   "`synthetic`: the synthetic pretraining mixture, generated here (docs/LAB.md)")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text (default: text)")
    p.add_argument("--split", default="train", help="hub dataset split (default: train)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens (the corpus repeats if smaller)")
    p.add_argument("--tokenizer", help="a tokenizer directory or tokenizer.json (default: the spec's, else a BPE "
                                       "trained on the corpus with the spec's vocab_size)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (default 256)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--val-fraction", type=float, default=0.02, help="documents held out for validation")
    p.add_argument("--max-docs", type=int, help="use only the first N documents")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and split seed")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--packing", choices=["auto", "off"], default="auto")
    p.add_argument("--cuda-graphs", choices=["auto", "off"], default="auto")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    # testing aid: stop (with a checkpoint) after N steps, as if interrupted
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)


def _architecture(spec, variant: str):
    from .spec import variants

    if variant == "as-written":
        return spec
    found = variants(spec)
    if variant not in found:
        raise CliError(f"the spec has no {variant} variant (its mixers: {', '.join(spec.mixers)})")
    return found[variant]


def cmd_pretrain(args) -> int:
    from .cli import load_spec_or_fail, solve_or_fail

    checks = [(args.tokens >= 1, "--tokens must be at least 1"), (args.seq_len >= 2, "--seq-len must be at least 2"),
              (0 <= args.val_fraction < 1, "--val-fraction must be in [0, 1)")]
    for ok, message in checks:
        if not ok:
            raise CliError(message)
    spec = _architecture(load_spec_or_fail(args.spec), args.variant)
    out = Path(args.output)
    if (out / MODEL_DIR).exists():
        raise CliError(f"{out} already holds a pretrained model ({out / MODEL_DIR}); choose another --output")
    keep = None  # writes what a resume reuses, once the run is sure to start (bad input writes nothing)
    if args.corpus == CORPUS_NAME:
        train_ex, val_ex, epochs, tokenizer, tok_source, corpus, keep = synthetic_corpus(args, out)
    else:
        train_ex, val_ex, epochs, tokenizer, tok_source, corpus = text_corpus(args, out, spec)
    spec = spec.with_(vocab_size=len(tokenizer), tokenizer=None)
    config, match = solve_or_fail(spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    if keep is not None:
        keep()
    result = pretrain(config, train_ex, val_ex, out, PretrainOptions.from_args(args), tokenizer, epochs=epochs,
                      info={"spec": spec.name, "variant": args.variant, "match": vars(match) | {
                          "relative_error": match.relative_error}, "corpus": args.corpus, "tokenizer": tok_source,
                          **corpus, "train_tokens_per_epoch": sum(len(e.input_ids) for e in train_ex),
                          "epochs": epochs, "tokens_requested": args.tokens, "seq_len": args.seq_len,
                          "seed": args.seed})
    print(f"{spec.name}: {match.line()}")
    if (out / MODEL_DIR).is_dir():  # finished: the generated examples were kept only for resuming
        (out / MIXTURE_CACHE).unlink(missing_ok=True)
    if result.steps and (out / MODEL_DIR).is_dir():
        print(f"pretrained {result.steps} steps; final loss {result.final_loss:.4f}, validation loss "
              f"{result.val_loss if result.val_loss is None else round(result.val_loss, 4)}; model: {out / MODEL_DIR}")
    else:
        print(f"stopped after {result.steps} steps; resume with --resume")
    return 0


def text_corpus(args, out: Path, spec):
    """Examples of a text corpus: documents split into train / validation, a tokenizer, tokens taken."""
    docs = read_documents(args.corpus, field=args.text_field, split=args.split, max_docs=args.max_docs)
    train_docs, val_docs = split_documents(docs, args.val_fraction, args.seed)
    tokenizer, tok_source = get_tokenizer(args, train_docs, out, spec.tokenizer, spec.vocab_size)
    train_ex, epochs = take_tokens(tokenize_documents(train_docs, tokenizer, args.seq_len), args.tokens)
    val_ex = tokenize_documents(val_docs, tokenizer, args.seq_len, prefix="val")[:200]
    return train_ex, val_ex, epochs, tokenizer, tok_source, {"documents": {"train": len(train_docs),
                                                                           "val": len(val_docs)}}


def synthetic_corpus(args, out: Path):
    """Examples of the synthetic pretraining mixture (``lab.mixture``), generated for ``--tokens`` and ``--seed``
    (or read back from the run's folder on a resume); validation: 200 documents of the same tasks from another
    seed. The tokenizer is the mixture's (byte tokenizer plus the template headers) unless ``--tokenizer`` names
    one. The last item: a function that keeps freshly generated examples in the run's folder (None if reused)."""
    from . import mixture
    from .. import synthetic

    if args.max_docs is not None or args.text_field != "text" or args.split != "train":
        raise CliError("--corpus synthetic is generated: --max-docs, --text-field and --split do not apply")
    saved = out / TOKENIZER_DIR
    if args.tokenizer or saved.is_dir():
        tokenizer, tok_source = get_tokenizer(args, [], out, None, 0)
    else:
        tokenizer, tok_source = mixture.mixture_tokenizer(), "the mixture's: byte tokenizer + the template headers"
    documents = mixture.documents_for(args.tokens, tokenizer, args.seq_len, args.seed)
    key = mixture.cache_key(documents, args.seed, tokenizer, args.seq_len)
    train_ex, keep = mixture.read_cache(out / MIXTURE_CACHE, key), None
    if train_ex is not None:
        print(f"reusing the {documents:,} documents generated by this run before ({out / MIXTURE_CACHE})", flush=True)
    else:
        print(f"generating {documents:,} documents of the synthetic mixture ({', '.join(synthetic.PRETRAINING)})",
              flush=True)
        train_ex = mixture.mixture_examples(documents, args.seed, tokenizer, args.seq_len,
                                            workers=mixture.default_workers())
        # kept in the run's folder until the run finishes, so that --resume reads them back
        keep = functools.partial(mixture.write_cache, out / MIXTURE_CACHE, key, train_ex)
    val_ex = mixture.mixture_examples(200, args.seed + mixture.VALIDATION_SEED_OFFSET, tokenizer, args.seq_len)
    return train_ex, val_ex, 1, tokenizer, tok_source, {
        "documents": {"train": documents, "val": len(val_ex)},
        "mixture": {"tasks": list(synthetic.PRETRAINING), "synthetic_version": synthetic.VERSION,
                    "seed": args.seed, "validation_seed": args.seed + mixture.VALIDATION_SEED_OFFSET}}, keep


def pretrain(config, train_ex: list, val_ex: list, out: Path, args: PretrainOptions, tokenizer, *, epochs: int,
             info: dict[str, Any]):
    """Train a freshly initialised model of ``config`` (a LabConfig, e.g. from ``solve.solve``) on tokenized
    examples (``tokenize_documents``) into ``out`` (the library entry point; ``lab pretrain`` wraps it)."""
    import warnings

    import torch

    from ..train.loop import TrainConfig, TrainingError, train
    from .model import LabForCausalLM

    recipe = TrainConfig(learning_rate=args.lr, epochs=epochs, micro_batch_size=args.micro_batch_size,
                         grad_accum=args.grad_accum, max_length=args.seq_len, weight_decay=args.weight_decay,
                         warmup_ratio=args.warmup_ratio, seed=args.seed, save_every=args.save_every,
                         norm_every=0, eval_every=args.eval_every, loss_on="full", precision=args.precision,
                         progress=args.progress, packing=args.packing, cuda_graphs=args.cuda_graphs,
                         lora_dropout=0.0)
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LabForCausalLM(config)
    if torch.cuda.is_available():
        model = model.cuda()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / TOKENIZER_DIR).is_dir():
        _save_tokenizer(tokenizer, out / TOKENIZER_DIR)
    _write_json(out / RUN_FILE, info)
    try:
        result = train(model, None, train_ex, out, recipe, pad_id=tokenizer.pad_token_id, val_set=val_ex,
                       run_info=info, resume=args.resume, stop_after_steps=args.stop_after_steps,
                       final_dir=MODEL_DIR)
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    if (out / MODEL_DIR).is_dir():  # the tokenizer goes beside the weights: a directory every command accepts
        for f in (out / TOKENIZER_DIR).iterdir():
            tmp = out / MODEL_DIR / f".{f.name}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, out / MODEL_DIR / f.name)
    return result


def _save_tokenizer(tokenizer, directory: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, directory)


def _write_json(path: Path, data: dict) -> None:
    from ..train.loop import write_atomic

    write_atomic(path, json.dumps(data, indent=1, default=str))
