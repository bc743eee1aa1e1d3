"""An offline byte-level tokenizer for tiny test models (vocab exactly 256: one token per byte).

Real evaluations use the checkpoint's own tokenizer; this one exists so that tests and ``--tiny`` demos run with
no hub access. Byte 0 doubles as pad and end-of-sequence token so that no id falls outside a 256-row embedding.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for raw bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    special = byte_to_char[0]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=special, eos_token=special,
                                  model_max_length=10**6)
    tok.padding_side = "right"
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one tokenizers' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))
