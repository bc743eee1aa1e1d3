"""Turning examples into token ids and labels.

With a tokenizer that has a chat template, the conversation is rendered by that template, and each assistant
turn's span (from the end of the generation prompt to the end of the turn, end-of-turn marker included) is
located in the rendering (see ``_template_segments``). Without a chat template, the plain template is used
(documented here and in the run log)::

    <bos>### User:
    {content}

    ### Assistant:
    {content}<eos>

    ### User:
    ...

(``### System:`` for system turns). By default only assistant tokens carry a loss (labels are -100 elsewhere);
``loss_on="full"`` trains on every non-padding token, prompt and template text included (the study's recipe).
Examples longer than ``max_length`` are skipped and counted (never truncated: a cut-off answer would teach the
model to stop mid-solution), as are examples whose assistant turns cannot be located in the template's
rendering or that keep no loss token.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .registry import DataError, Example

IGNORE = -100
PLAIN_TEMPLATE = "### {Role}:\n{content}"
PLAIN_SEPARATOR = "\n\n"
LOSS_MODES = ("assistant", "full")


@dataclass
class TokenizedExample:
    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class TokenizedSet:
    examples: list[TokenizedExample]
    skipped: Counter = field(default_factory=Counter)
    template: str = "plain"  # "chat_template" | "plain"
    loss_on: str = "assistant"


def _plain_segments(messages, tokenizer) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    if tokenizer.bos_token:
        segments.append((tokenizer.bos_token, False))
    for i, m in enumerate(messages):
        sep = PLAIN_SEPARATOR if i else ""
        header = sep + PLAIN_TEMPLATE.format(Role=m["role"].capitalize(), content="")
        if m["role"] == "assistant":
            segments.append((header, False))
            segments.append((m["content"] + (tokenizer.eos_token or ""), True))
        else:
            segments.append((header + m["content"], False))
    return segments


def _template_segments(messages, tokenizer) -> list[tuple[str, bool]] | None:
    """Split the chat-template rendering into (text, is_assistant) pieces; None if the assistant turns cannot
    be located in it (the example is then skipped and counted).

    Assistant turn k starts where the rendering of the turns before it plus the generation prompt ends. It ends
    where the rendering of turns 0..k ends, if that is a prefix of the whole conversation; templates that render
    the latest assistant turn differently from earlier ones (Qwen3-style: an empty think block on the last turn
    only) are not prefix-stable, and there the turn ends after its content plus the template's end-of-turn text.
    """
    def render(msgs, gen):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    segments, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:k], True)) if k else None
        if start is None:  # a conversation opening with the assistant: no generation prompt to anchor on
            at = full.find(m["content"])
            start = at if at >= 0 else -1
        elif not full.startswith(render(messages[:k], True)):
            return None
        if start < pos:
            return None
        end_text = render(messages[: k + 1], False)
        if full.startswith(end_text) and len(end_text) > start:
            end = len(end_text)
        else:
            at = full.find(m["content"], start)
            if at < 0:
                return None
            end = at + len(m["content"])
            tail = end_text[end_text.rfind(m["content"]) + len(m["content"]):] if m["content"] in end_text else ""
            if tail and full.startswith(tail, end):
                end += len(tail)
        segments.append((full[pos:start], False))
        segments.append((full[start:end], True))
        pos = end
    segments.append((full[pos:], False))
    return [(t, a) for t, a in segments if t]


def tokenize_example(example: Example, tokenizer, *, max_length: int = 1024, loss_on: str = "assistant",
                     use_chat_template: bool | None = None) -> tuple[TokenizedExample | None, str | None, str]:
    """(tokenized or None, reason skipped, template used)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = has_template if use_chat_template is None else (use_chat_template and has_template)
    segments, template = None, "plain"
    if use:
        try:
            segments = _template_segments(example.messages, tokenizer)
            template = "chat_template"
        except Exception:  # a template that rejects this conversation (e.g. a role order it forbids)
            return None, "chat template rejected the conversation", "chat_template"
        if segments is None:
            return None, "assistant turn not found in the chat template rendering", "chat_template"
    if segments is None:
        segments = _plain_segments(example.messages, tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if (is_assistant or loss_on == "full") else [IGNORE] * len(piece))
    if len(ids) > max_length:
        return None, f"longer than max_length={max_length}", template
    if not any(x != IGNORE for x in labels[1:]):
        return None, "no assistant tokens", template
    return TokenizedExample(example.id, ids, labels), None, template


def tokenize_examples(examples: list[Example], tokenizer, *, max_length: int = 1024, loss_on: str = "assistant",
                      use_chat_template: bool | None = None) -> TokenizedSet:
    if loss_on not in LOSS_MODES:
        raise DataError(f"loss_on must be one of {LOSS_MODES} (got {loss_on!r})")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 (got {max_length})")
    out = TokenizedSet([], Counter(), loss_on=loss_on)
    for ex in examples:
        tok, why, template = tokenize_example(ex, tokenizer, max_length=max_length, loss_on=loss_on,
                                              use_chat_template=use_chat_template)
        out.template = template
        if tok is None:
            out.skipped[why] += 1
        else:
            out.examples.append(tok)
    return out


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch (padding only, no packing)."""
    width = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b.input_ids)
        ids[i, :n] = torch.tensor(b.input_ids)
        labels[i, :n] = torch.tensor(b.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
