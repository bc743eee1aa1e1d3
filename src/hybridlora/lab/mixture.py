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
