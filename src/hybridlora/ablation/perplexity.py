"""Strided perplexity over a whole text set — the one likelihood protocol of ``hybridlora ablate``.

Protocol (the sliding-window evaluation of transformers' perplexity guide, stated exactly):

1. The text set is read whole (a file's bytes decoded as UTF-8, unchanged; a hub dataset's ``text`` column joined
   with newlines) and tokenized once with the model's tokenizer: ids ``x_0 … x_{N-1}``.
2. Windows of ``window`` tokens start every ``stride`` tokens: ``[b, min(b + window, N))`` for
   ``b = 0, stride, 2·stride, …`` while ``b < N - 1``.
3. A window scores only the tokens no earlier window scored: ``x_t`` for ``t`` in ``[max(prev_end, b + 1), end)``,
   each conditioned on the window's tokens before it (so every token but the first window's has at least
   ``window - stride`` tokens of context). Every token ``x_1 … x_{N-1}`` is scored exactly once.
4. ``nll_sum = Σ −log p(x_t | context)`` (float32 log-softmax, summed in float64), ``tokens = N − 1``, ``ppl = exp(nll_sum / tokens)``.

Each window is one per-instance record (``nll_sum``, ``tokens``), so conditions can be compared window by window
(paired bootstrap of the log-perplexity difference). ``max_windows`` keeps the first windows only (quick looks);
the summary then says how many of the set's tokens were scored.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .methods import AblationError

DEFAULT_TEXT = "wikitext-2"
HUB_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-v1", "test")


@dataclass(frozen=True)
class Window:
    index: int
    begin: int
    end: int
    first_target: int  # first scored position (absolute)


def plan_windows(n_tokens: int, window: int, stride: int, max_windows: int | None = None) -> list[Window]:
    if window < 2 or stride < 1 or stride > window:
        raise AblationError(f"perplexity window {window} / stride {stride}: need window >= 2 and 1 <= stride <= window")
    out, prev_end, begin = [], 0, 0
    while begin < n_tokens - 1:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append(Window(len(out), begin, end, first))
        prev_end = end
        if end == n_tokens or len(out) == max_windows:
            break
        begin += stride
    return out


def text_source(text: str | None, data_dir: str | Path | None) -> dict[str, Any]:
    """Where the text comes from, as a JSON-able spec: a local file, or a hub dataset (only when given its id)."""
    text = text or DEFAULT_TEXT
    if text in ("wikitext-2", "wikitext-2:test", "wikitext-2:valid"):
        split = text.partition(":")[2] or "test"
        if data_dir is not None:
            path = Path(data_dir) / "wikitext-2" / f"{split}.txt"
            if not path.is_file():
                raise AblationError(f"{path} not found; give --data-dir a folder laid out like shared/data, or "
                                    "--text FILE")
            return {"kind": "file", "path": str(path.resolve()), "label": f"WikiText-2 {split} (tokenized, v1)"}
        return {"kind": "hub", "id": HUB_WIKITEXT[0], "config": HUB_WIKITEXT[1], "split": split,
                "label": f"WikiText-2 {split} (hub {HUB_WIKITEXT[0]}, {HUB_WIKITEXT[1]})"}
    path = Path(text).expanduser()
    if path.is_file():
        return {"kind": "file", "path": str(path.resolve()), "label": path.name}
    if "/" in text and not path.suffix:
        hub_id, _, config = text.partition(":")
        return {"kind": "hub", "id": hub_id, "config": config or None, "split": "test", "label": text}
    raise AblationError(f"--text {text}: no such file; give a text file, `wikitext-2` (with --data-dir) or a hub "
                        "dataset id owner/name[:config]")


def read_text(source: dict[str, Any]) -> str:
    if source["kind"] == "file":
        try:
            return Path(source["path"]).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise AblationError(f"{source['path']}: not UTF-8 text (at byte {exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise AblationError(f"{source['path']}: cannot be read ({exc.strerror or exc})") from None
    try:
        import datasets
    except ImportError:
        raise AblationError(f"{source['id']}: reading a hub dataset needs the `datasets` package") from None
    try:
        rows = datasets.load_dataset(source["id"], source.get("config"), split=source["split"])
    except Exception as exc:  # offline, gated, no such dataset
        raise AblationError(f"{source['id']}: cannot load from the hub ({type(exc).__name__}); give --data-dir "
                            "or a local --text FILE") from None
    return "\n".join(rows["text"])


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, verbose=False).input_ids)  # the whole set is longer than the model's context


def strided_nll(model: torch.nn.Module, ids: Sequence[int], windows: Sequence[Window], *,
                batch_size: int = 4, progress: Any = None) -> list[dict]:
    """One record per window: ``{"window", "begin", "end", "tokens", "nll_sum"}`` (see the module docstring).
    A batch that does not fit in GPU memory (its logits are ``batch x (stride + 1) x vocabulary``: 16 GB for 32
    windows with a 248k vocabulary) is run again in halves, with a warning naming the size that fitted."""
    return strided_nll_copies(model, ids, windows, copies=1, batch_size=batch_size, progress=progress)[0]


def strided_nll_copies(model: torch.nn.Module, ids: Sequence[int], windows: Sequence[Window], *, copies: int,
                       batch_size: int = 4, progress: Any = None) -> list[list[dict]]:
    """:func:`strided_nll` with each window's row run ``copies`` times in a row in its forward (several ablation
    conditions sharing each forward, :class:`~hybridlora.ablation.methods.SharedAblation`): the records of each
    copy. ``batch_size`` counts windows, so a forward holds ``batch_size x copies`` rows."""
    device = next(model.parameters()).device
    records: list[list[dict]] = [[] for _ in range(copies)]
    with torch.inference_mode():
        # windows of one length share a forward; only the last window is usually shorter
        for group in _same_length_batches(windows, batch_size):
            for copy, rows in enumerate(_nll_fitting(model, ids, group, device, copies)):
                records[copy] += rows
            if progress is not None:
                progress.update(len(group))
    return records


def _nll_fitting(model: torch.nn.Module, ids: Sequence[int], group: Sequence[Window], device,
                 copies: int) -> list[list[dict]]:
    """:func:`_window_nll` of ``group``, halving it until a forward fits in GPU memory."""
    try:
        return _window_nll(model, ids, group, device, copies)
    except torch.cuda.OutOfMemoryError:
        if len(group) == 1:
            raise
    torch.cuda.empty_cache()  # outside the except block: the failed attempt's tensors are released first
    half = len(group) // 2
    warnings.warn(f"hybridlora: a perplexity batch of {len(group)} windows did not fit in GPU memory; running it in "
                  f"batches of {half} (a smaller --batch-size avoids the retry)", RuntimeWarning, stacklevel=3)
    first, second = (_nll_fitting(model, ids, part, device, copies) for part in (group[:half], group[half:]))
    return [a + b for a, b in zip(first, second)]


def _window_nll(model: torch.nn.Module, ids: Sequence[int], group: Sequence[Window], device,
                copies: int) -> list[list[dict]]:
    rows = torch.tensor([list(ids[w.begin:w.end]) for w in group], device=device).repeat_interleave(copies, 0)
    keep = max(w.end - w.first_target for w in group) + 1  # logits predicting the scored tokens
    logits = _logits(model, rows, keep)
    records: list[list[dict]] = [[] for _ in range(copies)]
    for row in range(rows.shape[0]):
        w = group[row // copies]
        n = w.end - w.first_target
        pred = logits[row, -(n + 1):-1].float()
        target = rows[row, -n:]
        # per-token NLL in float32, summed in float64: a condition's change can be far below a float32
        # sum's rounding over thousands of tokens
        nll = torch.nn.functional.cross_entropy(pred, target, reduction="none").double().sum()
        records[row % copies].append({"window": w.index, "begin": w.begin, "end": w.end, "tokens": n,
                                      "nll_sum": float(nll)})
    return records


def _logits(model, rows: torch.Tensor, keep: int) -> torch.Tensor:
    keep = min(keep, rows.shape[1])
    try:
        logits = model(input_ids=rows, logits_to_keep=keep).logits
        if logits.shape[1] == keep:
            return logits
    except TypeError:  # a model without logits_to_keep
        pass
    return model(input_ids=rows).logits[:, -keep:]


def _same_length_batches(windows: Sequence[Window], batch_size: int):
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or (w.end - w.begin) != (batch[0].end - batch[0].begin)):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def summarize(records: Sequence[dict], total_tokens: int) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in records)
    nll = sum(r["nll_sum"] for r in records)
    if tokens == 0:
        raise AblationError("perplexity: no token to score (the text is shorter than two tokens)")
    return {"tokens": tokens, "nll_sum": nll, "ppl": math.exp(nll / tokens), "windows": len(records),
            "set_tokens": total_tokens, "whole_set": tokens == total_tokens - 1}
