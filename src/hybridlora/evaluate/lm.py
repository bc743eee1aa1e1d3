"""The model boundary: the only code that touches the model (in the spirit of lm-eval's ``LM`` interface).

* :meth:`CausalLM.choice_logprobs` — multiple choice. For each context, the log-probability of each candidate
  continuation (the answer letters " A", " B", ...). ONE forward per question: the candidates must tokenize to
  the same length and differ only in their last token (true of letters in every common tokenizer; a byte
  tokenizer gives " "+"A"), so the shared prefix is appended to the context and every candidate is read from the
  same last-position logits. Rows are right-padded and read at their own last index, which is exact for any
  causal model (attention or recurrent): padding comes after the positions that are read.
* :meth:`CausalLM.generate_until` — batched greedy decoding (left padding, attention mask) with stop strings;
  each completion is cut at its earliest stop string. ``decode="auto"`` (default): the static-cache loop of
  :mod:`hybridlora.fast.decode` (same tokens as transformers' greedy ``generate``), its decode step replayed as a
  CUDA graph on CUDA and run eagerly on the CPU (there it saves transformers' per-step host work: 13 % of the CPU
  time of ``ablate qwen3.5-0.8b --tiny --plan all --limit 8``), and transformers' ``generate`` for a model the loop
  cannot reproduce (a logits processor, an untested cache; the reason is recorded); ``"static"`` / ``"hf"`` force
  one of them.
  ``decode_path`` says what the last call ran, and evaluation summaries record it.
* :meth:`CausalLM.mean_loglikelihood` — mean token log-likelihood / perplexity of held-out text.

Both split into tokenization (:meth:`CausalLM.choice_inputs`, :meth:`CausalLM.prompt_rows`) and the model call
(:meth:`CausalLM.score_choices`, :meth:`CausalLM.generate_rows`), so that a caller evaluating many variants of one
model (``hybridlora ablate``) tokenizes each benchmark once (:class:`hybridlora.evaluate.runner.PreparedCache`).

Contexts longer than ``max_length`` keep their last tokens (the benchmark modules first drop whole few-shot
examples, oldest first, so this only bites when a single example is too long).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import prefix as reuse

DECODE_MODES = ("auto", "static", "hf")

ChoiceRow = tuple[list[int], list[int], list[int]]  # (row, shared prefix of the choices, last token of each choice)


@dataclass(frozen=True)
class PromptRows:
    """Generation prompts tokenized for one budget (:meth:`CausalLM.prompt_rows`)."""
    rows: list[list[int]]  # per prompt, in the prompts' order
    order: list[int]  # the order batches take them in
    max_new_tokens: int


class CausalLM:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int | str = 8, max_length: int | None = None,
                 name: str = "model", adapter: str | None = None, device: str | torch.device | None = None,
                 decode: str = "auto", generate_batch_size: int | None = None, prefix_reuse: bool = False,
                 copies: int = 1) -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"decode={decode!r}: use one of {', '.join(DECODE_MODES)}")
        # rows arrive ``copies`` times each, in a row (several ablation conditions sharing each forward,
        # hybridlora.ablation.shared): batches are multiples of it, and the prefix-reuse path keeps copies together
        self.copies = max(1, int(copies))
        self.model = model.eval()
        self.decode = decode
        self.decode_path: str | None = None
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = getattr(model, "config", None)
        limit = max_length or getattr(config, "max_position_embeddings", None) or 2048
        self.max_length = int(min(limit, 32768))
        self.name, self.adapter = name, adapter
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.kernels = self._bind_kernels()
        self.batch_size = self.auto_batch_size() if batch_size == "auto" else max(1, int(batch_size))
        # prompts per greedy-decoding batch (default: batch_size): a decode step of a small model costs about the
        # same at 8 or 256 rows on a GPU, so a whole benchmark in one batch takes a fraction of the steps
        self.generate_batch_size = max(1, int(generate_batch_size or self.batch_size))
        if self.batch_size % self.copies or self.generate_batch_size % self.copies:
            raise ValueError(f"batch sizes {self.batch_size}/{self.generate_batch_size} must be multiples of "
                             f"copies={self.copies}, so that no forward splits a row's copies")
        # multiple choice: run a shared few-shot prefix once and score each question on top of its cache
        # (evaluate/prefix.py; checked against the whole row before it is trusted)
        self.prefix_reuse = prefix_reuse
        self.prefix_reuse_note: str | None = None
        self.prefix_reused_rows = 0
        self.prefix_reuse_align: int | None = None  # 1: whole shared prefixes; N: cut to multiples of N tokens
        self._confirmed_align: int | None = None  # one whose pass no larger alignment could explain

    def _bind_kernels(self) -> str:
        """On CUDA, the fast mixer kernels are bound and missing ones warned about; the line goes in summaries."""
        from hybridlora import fast

        if self.device.type == "cuda":
            fast.use("fast")
            fast.warn_missing_kernels(self.model, training=False)  # evaluation runs forward only
        return fast.describe(self.model, training=False)

    def auto_batch_size(self, start: int = 64) -> int:
        """The largest power-of-two batch (≤ ``start``) whose full-length forward fits in GPU memory.

        On CPU memory is not what limits a batch, and larger batches only add padding work: 8.
        """
        if self.device.type != "cuda":
            return 8
        size = start
        while size > 1:
            try:
                with torch.inference_mode():
                    ids = torch.zeros((size, self.max_length), dtype=torch.long, device=self.device)
                    self.model(input_ids=ids).logits[:, -1].float().sum().item()
                return size
            except torch.cuda.OutOfMemoryError:
                size //= 2
            finally:
                torch.cuda.empty_cache()
        return 1

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def token_count(self, text: str) -> int:
        return len(self.encode(text))

    def continuation_ids(self, context: str, continuation: str) -> list[int]:
        """Tokens ``continuation`` adds after ``context`` (encoded jointly, so merges at the seam count)."""
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return whole[len(ctx):]
        return list(self.tokenizer(continuation, add_special_tokens=False).input_ids)

    # ------------------------------------------------------------------ scoring
    def _forward_positions(self, rows: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax rows at the requested positions of right-padded ``rows`` (one forward)."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        return reuse.logprobs_at(self.model, inputs, positions)

    def choice_logprobs(self, contexts: Sequence[str], choices: Sequence[Sequence[str]], *,
                        progress: Any = None) -> list[list[float]]:
        """log p(choice | context) for every choice of every context; one forward per context, batched."""
        return self.score_choices(self.choice_inputs(contexts, choices), progress=progress)

    def choice_inputs(self, contexts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[ChoiceRow]:
        """The token rows :meth:`score_choices` scores (tokenization only, no model call): per context the row
        (context + the choices' shared prefix, cut to ``max_length``), the shared prefix and each choice's last
        token."""
        prepared = []
        for context, options in zip(contexts, choices, strict=True):
            conts = [self.continuation_ids(context, c) for c in options]
            length = len(conts[0])
            if any(len(c) != length or c[:-1] != conts[0][:-1] for c in conts):
                raise ValueError(f"choices {list(options)!r} do not tokenize to one shared prefix + one differing "
                                 "token; one-forward scoring needs that (use letters as choices)")
            row = (self.encode(context) + conts[0][:-1])[-self.max_length:]
            prepared.append((row, conts[0][:-1], [c[-1] for c in conts]))
        return prepared

    def score_choices(self, prepared: Sequence[ChoiceRow], *, progress: Any = None) -> list[list[float]]:
        """log p of each choice for rows made by :meth:`choice_inputs`; longest rows first, ``batch_size`` a forward
        (with ``prefix_reuse``: rows sharing a few-shot prefix on top of its cache, :mod:`.prefix`)."""
        out: list[list[float]] = [[] for _ in prepared]

        def positions(i: int) -> list[int]:
            row, prefix, _ = prepared[i]
            return list(range(len(row) - 1 - len(prefix), len(row)))  # predicts prefix tokens, then the letter

        def scored(i: int, logp: torch.Tensor) -> torch.Tensor:
            """The log-probs row ``i``'s scores are made of: its choices' shared tokens, then each last token."""
            _, prefix, lasts = prepared[i]
            index = {"dtype": torch.long, "device": logp.device}
            return torch.cat([logp[torch.arange(len(prefix), **index), torch.tensor(prefix, **index)],
                              logp[-1, torch.tensor(lasts, **index)]])

        def use(i: int, logp: torch.Tensor) -> None:
            values, n_shared = scored(i, logp).tolist(), len(prepared[i][1])  # one device read per row
            shared = sum(values[:n_shared])
            out[i] = [shared + v for v in values[n_shared:]]
            if progress is not None:
                progress.update(1)

        def score_whole(indices: Sequence[int]) -> None:
            order = sorted(indices, key=lambda i: -len(prepared[i][0]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start: start + self.batch_size]
                for i, logp in zip(batch, self._forward_positions([prepared[i][0] for i in batch],
                                                                  [positions(i) for i in batch])):
                    use(i, logp)

        with torch.inference_mode():
            if not self.prefix_reuse or self.prefix_reuse_note is not None:
                score_whole(range(len(prepared)))
                return out
            def check(indices: list[int], reused: list[torch.Tensor]) -> tuple[bool, float]:
                # compared where the scores read, not over the whole vocabulary: in bf16 the largest of ~250k
                # differences is set by rounding (a whole row is itself ~0.15 from float32 there, the reused
                # one no further: measured on Qwen3.5-0.8B's architecture), a wrong cache moves the scores too
                wholes = self._forward_positions([prepared[i][0] for i in indices], [positions(i) for i in indices])
                dtype = next(self.model.parameters()).dtype
                results = [reuse.agrees(scored(i, r), scored(i, w), dtype)
                           for i, r, w in zip(indices, reused, wholes)]
                return all(ok for ok, _ in results), max(diff for _, diff in results)

            # a confirmed cut is kept for the run's later benchmarks (each still checks its first group)
            alignments = ((self._confirmed_align,) if self._confirmed_align
                          else (1, *reuse.CHUNK_ALIGNMENTS))
            self.prefix_reuse_note, reused, align, confirmed = reuse.score_with_reuse(
                prepared, positions, score_whole, use, model=self.model, batch_size=self.batch_size,
                pad_id=self.tokenizer.pad_token_id, device=self.device, check=check, alignments=alignments,
                copies=self.copies)
            self.prefix_reused_rows += reused
            self.prefix_reuse_align = align or self.prefix_reuse_align
            if confirmed:
                self._confirmed_align = align
        return out

    def mean_loglikelihood(self, texts: Sequence[str], *, stride: int | None = None) -> dict[str, float]:
        """Mean per-token log-likelihood and perplexity of ``texts`` (non-overlapping windows of max_length;
        the first token of each window is conditioned on nothing and not counted)."""
        window = stride or self.max_length
        total, count = 0.0, 0
        with torch.inference_mode():
            for text in texts:
                ids = self.encode(text)
                for start in range(0, max(len(ids) - 1, 0), window):
                    chunk = ids[start: start + window]
                    if len(chunk) < 2:
                        continue
                    x = torch.tensor([chunk], device=self.device)
                    logp = torch.log_softmax(self.model(input_ids=x).logits.float(), dim=-1)[0, :-1]
                    total += float(logp.gather(1, x[0, 1:, None]).sum())
                    count += len(chunk) - 1
        if count == 0:
            raise ValueError("no tokens to score")
        mean = total / count
        return {"mean_token_logprob": mean, "perplexity": math.exp(-mean), "tokens": count}

    # ------------------------------------------------------------------ generation
    def generate_until(self, prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 256, *,
                       progress: Any = None) -> list[str]:
        """Greedy completions of ``prompts`` (batched, left padding), each cut at its earliest stop string."""
        return self.generate_rows(self.prompt_rows(prompts, max_new_tokens), stop, progress=progress)

    def prompt_rows(self, prompts: Sequence[str], max_new_tokens: int) -> PromptRows:
        """The prompts' token rows for :meth:`generate_rows` (tokenization only, no model call): each keeps its
        last ``max_length - max_new_tokens`` tokens; batches take the longest prompt texts first."""
        budget = max(1, self.max_length - max_new_tokens)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        return PromptRows([self.encode(p)[-budget:] for p in prompts], order, max_new_tokens)

    def generate_rows(self, inputs: PromptRows, stop: Sequence[str] = (), *, progress: Any = None) -> list[str]:
        """Greedy completions of rows made by :meth:`prompt_rows` (``generate_batch_size`` rows a batch), each cut
        at its earliest stop string."""
        from transformers import StoppingCriteriaList

        tok = self.tokenizer
        max_new_tokens = inputs.max_new_tokens
        stop = tuple(s for s in stop if s)
        out: list[str] = [""] * len(inputs.rows)
        static, why_not = self._static_decoding()
        paths: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(inputs.order), self.generate_batch_size):
                batch = inputs.order[start: start + self.generate_batch_size]
                ids, mask = left_pad([inputs.rows[i] for i in batch], tok.pad_token_id)
                width = ids.shape[1]
                ids, mask = ids.to(self.device), mask.to(self.device)
                if static:
                    from hybridlora.fast.decode import greedy_generate

                    result = greedy_generate(self.model, ids, mask, max_new_tokens=max_new_tokens,
                                             pad_token_id=tok.pad_token_id,
                                             stop_at=stop_finder(tok, stop) if stop else None,
                                             graphs=self.device.type == "cuda")
                    new_tokens = result.tokens
                    paths.append(result.graph)
                else:
                    generated = self.model.generate(
                        input_ids=ids, attention_mask=mask, do_sample=False,
                        max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                        stopping_criteria=StoppingCriteriaList([stop_criterion(tok, stop, width)]) if stop else None,
                        temperature=None, top_p=None, top_k=None)
                    new_tokens = generated[:, width:]
                texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    out[i] = trim_at_stop(text, stop)
                if progress is not None:
                    progress.update(len(batch))
        self.decode_path = _describe_decoding(static, why_not, paths)
        return out

    def _static_decoding(self) -> tuple[bool, str | None]:
        """Whether this model decodes on the static-cache loop, and if not (under ``auto``), why."""
        if self.decode == "hf":
            return False, "decode=hf"
        from hybridlora.fast.decode import unsupported_reason

        why = unsupported_reason(self.model)
        if self.decode == "static":
            if why:
                raise ValueError(f"decode=static cannot reproduce transformers' generate here: {why}; use decode=auto")
            return True, None
        if why and self.device.type == "cuda":  # on the CPU the loop only saves host work: no warning needed
            warnings.warn(f"hybridlora: greedy decoding stays with transformers' generate (no CUDA graph): {why}",
                          RuntimeWarning, stacklevel=3)
        return why is None, why


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as a left-padded ``[len(rows), longest]`` id tensor and its attention mask (generation's layout)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, row in enumerate(rows):
        ids[j, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[j, width - len(row):] = 1
    return ids, mask


def stop_criterion(tok: Any, stop: Sequence[str], width: int) -> Any:
    """transformers' stopping criterion for ``generate``: a row is done once its generated text (after the
    prompt's ``width`` tokens) holds a stop string. A stop string first appears at the end of the text, so only
    the last :func:`stop_window` generated tokens are decoded each step (decoding all of them made the check grow
    with every token). The outputs are cut at the earliest stop string afterwards in any case, so the window
    changes only when a row stops, never what it returns."""
    from transformers import StoppingCriteria

    window = stop_window(stop)

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            start = max(width, input_ids.shape[1] - window)
            texts = tok.batch_decode(input_ids[:, start:], skip_special_tokens=False)
            done = [any(s in t for s in stop) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()


def stop_finder(tok: Any, stop: Sequence[str]):
    """``stop_at`` for :func:`hybridlora.fast.decode.greedy_generate`: the first step whose last
    :func:`stop_window` generated tokens decode to text holding a stop string — the check of
    :func:`stop_criterion`, step by step, so both end a row at the same token."""
    window = stop_window(stop)

    def stop_at(tokens: list[int], first: int) -> int | None:
        for t in range(first, len(tokens)):
            text = tok.decode(tokens[max(0, t + 1 - window): t + 1], skip_special_tokens=False)
            if any(s in text for s in stop):
                return t
        return None
    return stop_at


def _describe_decoding(static: bool, why_not: str | None, paths: Sequence[str]) -> str:
    if not static:
        return f"transformers generate ({why_not})" if why_not else "transformers generate"
    if not paths:
        return "static cache"
    kinds = sorted(set(paths), key=paths.index)
    return "static cache, decode step " + "; ".join(f"{k} ({paths.count(k)} of {len(paths)} batches)" for k in kinds)


def stop_window(stop: Sequence[str]) -> int:
    """Generated tokens to decode per step so that a stop string completed by the newest token is seen: every
    token decodes to at least one character, so a stop string of c characters lies within the last c tokens;
    doubled, plus slack for tokens that decode to nothing on their own (partial UTF-8 bytes)."""
    return 2 * max((len(s) for s in stop), default=0) + 8


def trim_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) its earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def load_lm(model: str, *, adapter: str | Path | None = None, tiny: bool = False, dtype: torch.dtype = torch.float32,
            device: str | None = None, batch_size: int | str = 8, max_length: int | None = None) -> CausalLM:
    """A :class:`CausalLM` for ``model`` (catalog name, hub id or local dir; see ``hybridlora.models``).

    ``tiny``: a randomly initialised small model of the same family with the offline byte tokenizer (for demos
    and tests). ``adapter``: a PEFT adapter directory, loaded inside ``exact_targets()`` so that PEFT keeps its
    exact module names.
    """
    from hybridlora import models

    source = models.resolve_model(model)
    if tiny:
        from .tokenizer import byte_tokenizer

        from hybridlora.families import family_for

        config = models.text_config(source.config)
        family = family_for(config.model_type)
        if family is None:
            raise models.ModelError(f"{model}: no family entry for {config.model_type!r}, so no tiny config")
        net = models.build_model(models.tiny_config(config, family), dtype=dtype)
        tokenizer = byte_tokenizer()
        if net.config.vocab_size < len(tokenizer):
            raise ValueError(f"tiny model vocab {net.config.vocab_size} < 256 byte tokens")
    else:
        from transformers import AutoTokenizer

        net = models.load_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(source.path) if source.path else source.name)
    if device:
        net = net.to(device)
    if adapter is not None:
        from peft import PeftModel

        from hybridlora.placement import exact_targets

        with exact_targets():
            net = PeftModel.from_pretrained(net, str(adapter))
        net = net.eval()
    name = f"{source.name} [tiny random]" if tiny else source.name  # never the real checkpoint's name
    return CausalLM(net, tokenizer, batch_size=batch_size, max_length=max_length, name=name,
                    adapter=str(adapter) if adapter is not None else None, device=device)
