"""Training data: domain registry, local files and hub datasets, seeded splits with manifests, formatting and a
tiny tokenizer."""
from .formatting import (IGNORE, LOSS_MODES, TokenizedExample, TokenizedSet, collate, pad_id_of, tokenize_example,
                         tokenize_examples)
from .registry import (DOMAINS, DataError, DataSplit, Domain, Example, benchmark_questions, load_examples,
                       load_split, read_rows, resolve_fields, source_kind)
from .tokenizer import build_tiny_tokenizer

__all__ = [
    "DOMAINS", "DataError", "DataSplit", "Domain", "Example", "IGNORE", "LOSS_MODES", "TokenizedExample",
    "TokenizedSet", "benchmark_questions", "build_tiny_tokenizer", "collate", "load_examples", "load_split",
    "pad_id_of", "read_rows", "resolve_fields", "source_kind", "tokenize_example", "tokenize_examples",
]
