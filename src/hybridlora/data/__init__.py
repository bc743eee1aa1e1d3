"""Training data: domain registry, local files, seeded splits with manifests, formatting and a tiny tokenizer."""
from .formatting import (IGNORE, LOSS_MODES, TokenizedExample, TokenizedSet, collate, pad_id_of, tokenize_example,
                         tokenize_examples)
from .registry import DOMAINS, DataError, DataSplit, Domain, Example, load_examples, load_split, read_rows
from .tokenizer import build_tiny_tokenizer

__all__ = [
    "DOMAINS", "DataError", "DataSplit", "Domain", "Example", "IGNORE", "LOSS_MODES", "TokenizedExample",
    "TokenizedSet", "build_tiny_tokenizer", "collate", "load_examples", "load_split", "pad_id_of", "read_rows",
    "tokenize_example", "tokenize_examples",
]
