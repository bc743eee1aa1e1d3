"""The synthetic pretraining mixture: the three pretraining tasks of :mod:`hybridlora.synthetic` as trainer examples.

Used by the embedded demo's models (``lab demo-models``) and by ``lab pretrain --corpus synthetic`` (the
topology experiment on a machine with no corpus: the mixture is generated where it trains). Examples are
formatted exactly as fine-tuning formats a synthetic domain (the plain template, ``data.formatting``), with the
loss on the answer tokens only: the prompts are random by construction, and a small model that also models them
learns the answers far more slowly.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CORPUS_NAME = "synthetic"  # the --corpus value that selects the mixture (a local path of that name: ./synthetic)
VALIDATION_SEED_OFFSET = 1_000_003  # validation: the same tasks from the train streams of seed + this
PARALLEL_FROM = 50_000  # documents from which tokenizing is spread over processes (about 7k documents/s each)


def mixture_tokenizer():
    """The byte tokenizer plus the plain template's two headers as single tokens (ids 256, 257): the answer then
    sits one token after its question instead of 17 bytes later, and examples are 2.5x shorter, which is what
    lets a 250k-parameter model learn the tasks in minutes on a CPU."""
    import copy

    from .. import synthetic
    from ..evaluate.tokenizer import byte_tokenizer

    tokenizer = copy.deepcopy(byte_tokenizer())  # the shared byte tokenizer stays as it is
    tokenizer.add_tokens([synthetic.USER_HEADER, synthetic.ASSISTANT_HEADER])
    return tokenizer


def mixture_pairs(documents: int, seed: int) -> list[tuple[str, str, str]]:
    """``(task, prompt, answer)`` of the first ``documents`` documents: the pretraining tasks in turn, each task's
    pairs from its own seeded train stream (so the first N documents are the same whatever the total)."""
    from .. import synthetic

    names = synthetic.PRETRAINING
    per_task = {n: synthetic.pairs(n, -(-documents // len(names)), seed=seed) for n in names}
    return [(names[i % len(names)], *per_task[names[i % len(names)]][i // len(names)]) for i in range(documents)]


def mixture_examples(documents: int, seed: int, tokenizer, seq_len: int, *, workers: int = 1) -> list:
    """The first ``documents`` documents of the mixture as the trainer's examples (``workers`` > 1 tokenizes
    chunks in that many processes from ``PARALLEL_FROM`` documents on; the examples are the same either way)."""
    rows = mixture_pairs(documents, seed)
    if workers <= 1 or documents < PARALLEL_FROM:
        return _tokenize(rows, 0, tokenizer, seq_len)
    size = -(-documents // workers)
    chunks = [(rows[a:a + size], a) for a in range(0, documents, size)]
    # fork: the children inherit the tokenizer and modules; nothing here has touched CUDA yet
    import multiprocessing

    with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("fork")) as pool:
        parts = pool.map(_tokenize, *zip(*chunks), [tokenizer] * len(chunks), [seq_len] * len(chunks))
        return [example for part in parts for example in part]


# A run of `lab pretrain --corpus synthetic` keeps its generated examples in its folder until it finishes:
# generating and tokenizing a 20M-token mixture takes a minute or more, which a run stopped at a deadline would
# pay again on every resume. The file holds a key of everything the examples depend on; a file with another
# key, or unreadable, is never trusted.

def cache_key(documents: int, seed: int, tokenizer, seq_len: int) -> str:
    """What the first ``documents`` examples depend on, as one hash."""
    import hashlib
    import json

    from .. import synthetic

    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = {"documents": documents, "seed": seed, "seq_len": seq_len, "synthetic_version": synthetic.VERSION,
             "tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def write_cache(path: Path, key: str, examples: list) -> None:
    """Flat arrays (token ids, example lengths, ids joined by newlines, and the loss mask: the mixture's labels
    are the ids on the answer and ignored elsewhere), written whole or not at all."""
    import numpy as np

    from ..data.formatting import IGNORE

    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64, count=int(lengths.sum()))
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int64, count=int(lengths.sum()))
    arrays = {"key": np.frombuffer(key.encode(), dtype=np.uint8), "lengths": lengths.astype(np.int32),
              "ids": ids.astype(np.uint16 if ids.size == 0 or ids.max() < 2 ** 16 else np.int32),
              "names": np.frombuffer("\n".join(e.id for e in examples).encode(), dtype=np.uint8)}
    arrays["loss_mask"] = labels == ids
    if not np.all(arrays["loss_mask"] | (labels == IGNORE)):
        raise ValueError("write_cache keeps examples whose labels are their ids or ignored; these are not")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    os.replace(partial, path)


def read_cache(path: Path, key: str) -> list | None:
    """The examples kept under ``key``; None when the file is missing, unreadable or holds another key."""
    import zipfile

    import numpy as np

    from ..data.formatting import IGNORE, TokenizedExample

    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if bytes(data["key"]).decode() != key:
                return None
            lengths, ids = data["lengths"].astype(np.int64), data["ids"].astype(np.int64)
            labels = np.where(data["loss_mask"], ids, IGNORE)
            names = bytes(data["names"]).decode().split("\n")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    if len(names) != len(lengths) or int(lengths.sum()) != len(ids):
        return None
    ends = np.cumsum(lengths).tolist()
    flat_ids, flat_labels = ids.tolist(), labels.tolist()
    starts = [0, *ends[:-1]]
    return [TokenizedExample(name, flat_ids[a:b], flat_labels[a:b]) for name, a, b in zip(names, starts, ends)]


def documents_for(tokens: int, tokenizer, seq_len: int, seed: int) -> int:
    """How many documents hold about ``tokens`` tokens (from the mean length of the first 3,000)."""
    sample = mixture_examples(3000, seed, tokenizer, seq_len)
    mean = sum(len(e.input_ids) for e in sample) / len(sample)
    return max(1, round(tokens / mean))


def default_workers() -> int:
    from ..threads import usable_cores

    return max(1, min(8, usable_cores()))


def _tokenize(rows: list[tuple[str, str, str]], start: int, tokenizer, seq_len: int) -> list:
    from ..data.formatting import tokenize_example
    from ..data.registry import synthetic_example

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    examples = []
    for offset, (name, prompt, answer) in enumerate(rows):
        index = start + offset
        example, why, _ = tokenize_example(synthetic_example(name, index, prompt, answer), tokenizer,
                                           max_length=seq_len, loss_on="assistant")
        if example is None:
            raise ValueError(f"{name} example {index} cannot be formatted ({why})")
        examples.append(example)
    return examples
