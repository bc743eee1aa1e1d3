"""A small real tokenizer built offline, for tests and the offline demo (tiny models have vocab_size=256).

It is a character-level BPE trained with the ``tokenizers`` library on text from the shared data folder (or on
texts you pass): printable ASCII and newline as the alphabet, ``▁`` for spaces (Metaspace), merges up to
``vocab_size``, other characters mapped to ``<unk>``. Special tokens: ``<pad>`` = 0, ``<eos>`` = 1,
``<unk>`` = 2, ``<bos>`` = 3. No chat template unless ``chat_template=True`` (then a small ChatML-like one).
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable

SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


def _sample_texts(data_dir: Path, limit: int = 800) -> list[str]:
    texts: list[str] = []
    gsm = data_dir / "gsm8k" / "train.jsonl"
    if gsm.is_file():
        with gsm.open(encoding="utf-8") as fh:
            for i, line in zip(range(limit), fh):
                row = json.loads(line)
                texts += [row["question"], row["answer"]]
    ca = data_dir / "codealpaca" / "code_alpaca_2k.json"
    if ca.is_file():
        for row in json.loads(ca.read_text(encoding="utf-8"))[:limit]:
            texts += [row["instruction"], row["input"], row["output"]]
    hh = data_dir / "hh-rlhf" / "hh_rlhf_helpful_base_test_chosen.jsonl"
    if hh.is_file():
        with hh.open(encoding="utf-8") as fh:
            for i, line in zip(range(limit), fh):
                texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def build_tiny_tokenizer(texts: Iterable[str] | None = None, *, data_dir: str | Path | None = None,
                         vocab_size: int = 256, chat_template: bool = False):
    """A ``PreTrainedTokenizerFast`` with at most ``vocab_size`` tokens (ids < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        if data_dir is None:
            raise ValueError("build_tiny_tokenizer needs texts or data_dir (the shared data folder)")
        texts = _sample_texts(Path(data_dir))
    texts = list(texts)
    if not texts:
        raise ValueError("build_tiny_tokenizer: no training text")
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c")) + ["▁"]
    if vocab_size < len(SPECIALS) + len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(SPECIALS) + len(alphabet)}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<bos>")
    if chat_template:
        fast.chat_template = SIMPLE_CHAT_TEMPLATE
    assert len(fast) <= vocab_size
    return fast
