"""Multiple-choice scoring with the few-shot prefix computed once (``CausalLM(prefix_reuse=True)``).

A benchmark's few-shot examples are the same for every question (per subject for MMLU): 86 % of an MMLU prompt's
characters, 96 % of ARC-Challenge's and HellaSwag's. Rows that share a token prefix are scored by running that
prefix once, keeping the model's cache (attention keys/values, convolution and recurrent states), copying it
to a batch of questions and running only each question's own tokens, right-padded, on top of it. The log-probs
are those of the whole row up to floating-point order.

Each model is checked before it is trusted: the first group's longest row is scored both ways, and a difference
above the dtype's tolerance (or a cache this module cannot copy) turns reuse off for the rest of the run, with
the reason in ``CausalLM.prefix_reuse_note`` (printed in the evaluation summary). Before giving up, the check is
repeated with the prefix cut at a multiple of a chunked recurrent mixer's chunk (``CHUNK_ALIGNMENTS``): chunked
kernels split a sequence into chunks from its first token, so a prefix cut elsewhere makes the continuation's
chunks differ from the whole row's and low precision rounds the two decompositions differently; cut at a chunk
boundary, the continuation repeats the whole row's chunks. The smallest alignment that passes where no larger
one could explain the pass is used for every later group.

With ``copies`` > 1 (several ablation conditions sharing each forward: ``hybridlora.ablation.methods.
SharedAblation``) every distinct row arrives that many times in a row, and every forward here keeps a row's
copies together and in order: the prefix runs once per copy, each question's batch takes the prefix's rows in
turn, and the check compares all copies of its row.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch

MIN_PREFIX = 64  # shared tokens below which one forward per row is as cheap as the bookkeeping
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # log-prob difference allowed by the check; else 5e-2
LOW_PRECISION_TOLERANCE = 5e-2
# prefix cuts tried, in order, after an uncut prefix fails the check: fla's chunked Gated DeltaNet works in chunks
# of 64 tokens, Mamba-2 models in chunks of 128 (Falcon-H1-0.5B) or 256 (each a multiple of the ones before)
CHUNK_ALIGNMENTS = (64, 128, 256)
# once the cut is trusted, groups whose shared lengths lie within this share of each other run their prefixes in one
# forward and their questions in common batches, all cut at the shortest (_next_chunk)
CHUNK_SLACK = 0.25


class ReuseUnavailable(Exception):
    """The model's cache cannot be copied to a batch (a cache type this module does not know)."""


class _Mismatch(Exception):
    """The checked row's reused log-probs differ from the whole row's (``diff``); nothing was scored yet."""

    def __init__(self, diff: float):
        super().__init__(f"{diff:.2e}")
        self.diff = diff


def prefix_groups(rows: Sequence[Sequence[int]], first_scored: Sequence[int]) -> tuple[list[tuple[int, list[int]]],
                                                                                       list[int]]:
    """Group row indices by shared token prefix: ``([(prefix length, indices), ...], indices scored whole)``.

    Rows are sorted, so rows with the same few-shot block are neighbours; the sorted run is cut wherever two
    neighbours share less than half the typical (median) shared length — where one shot set ends and another
    begins (a row that kept fewer shots, another MMLU subject) — so that one such row does not shrink a whole
    group's prefix to the header. ``first_scored[i]`` is the first position whose logits row ``i`` needs: a
    group's prefix stops before its earliest one, so every scored position lies in the part run on the cache."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))
    shared = [_common_length(rows[a], rows[b]) for a, b in zip(order, order[1:])]
    cut = max(MIN_PREFIX, sorted(shared)[len(shared) // 2] // 2) if shared else MIN_PREFIX
    runs, current = [], [order[0]] if order else []
    for k, i in enumerate(order[1:]):
        if shared[k] < cut:
            runs.append((current, shared[k - len(current) + 1:k]))
            current = []
        current.append(i)
    if current:
        runs.append((current, shared[len(order) - len(current):len(order) - 1]))
    groups, whole = [], []
    for members, between in runs:
        length = min([*between, *(first_scored[i] for i in members)]) if len(members) > 1 else 0
        if length >= MIN_PREFIX:
            groups.append((length, sorted(members)))
        else:
            whole += members
    return groups, whole


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (binary search over slice comparisons: C speed)."""
    a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def batch_cache(cache: Any, size: int, copies: int = 1, rows: Sequence[int] | None = None) -> Any:
    """A copy of a prefix cache as the cache of a batch of ``size`` rows (transformers' layered caches: each layer's
    tensors of the prefix batch — keys, values, convolution and recurrent states). Row ``r`` takes the cache's row
    ``rows[r]`` when given (prefixes of several groups in one cache), else ``r % copies`` (one prefix, run once per
    condition sharing the forward)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ReuseUnavailable(f"its cache ({type(cache).__name__}) has no per-layer states to copy")
    cached = copies if rows is None else _cache_batch(layers)
    index = [r % copies for r in range(size)] if rows is None else list(rows)
    out = copy.deepcopy(cache)
    for layer in out.layers:
        for name, value in list(vars(layer).items()):
            if _prefix_rows(value, cached):
                setattr(layer, name, _take(value, index))
            elif isinstance(value, dict):
                for key, item in list(value.items()):
                    if _prefix_rows(item, cached):
                        value[key] = _take(item, index)
    return out


def _cache_batch(layers: Sequence[Any]) -> int:
    """The batch a cache was computed at: the first dimension of its per-row tensors."""
    for layer in layers:
        for value in (*vars(layer).values(), *(v for d in vars(layer).values() if isinstance(d, dict)
                                               for v in d.values())):
            if torch.is_tensor(value) and value.dim() > 1:
                return value.shape[0]
    raise ReuseUnavailable("its cache holds no per-row tensors to copy")


def _prefix_rows(value: Any, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 1 and value.shape[0] == batch


def _take(value: torch.Tensor, index: list[int]) -> torch.Tensor:
    if index == list(range(value.shape[0])) * (len(index) // value.shape[0]):  # plain tiling: repeat, no gather
        return value.repeat(len(index) // value.shape[0], *(1,) * (value.dim() - 1))
    return value.index_select(0, torch.tensor(index, dtype=torch.long, device=value.device))


def run_prefix(model: torch.nn.Module, prefix: Sequence[int], device: torch.device, copies: int = 1) -> Any:
    """The model's cache after ``prefix`` (batch ``copies``); its logits are not read (one position kept)."""
    return run_prefixes(model, [prefix], device, copies)


def run_prefixes(model: torch.nn.Module, prefixes: Sequence[Sequence[int]], device: torch.device,
                 copies: int = 1) -> Any:
    """The model's cache after ``prefixes`` (equal lengths, no padding), each run ``copies`` times in a row: row
    ``p * copies + c`` holds prefix ``p``'s copy ``c``."""
    ids = torch.tensor([list(p) for p in prefixes for _ in range(copies)], device=device)
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # 5.24 names it cache
    if cache is None:
        raise ReuseUnavailable("it returns no cache")
    return cache


def logprobs_at(model: torch.nn.Module, inputs: dict[str, Any],
                positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Log-softmax of one forward's logits at ``positions`` (per row, in the forward's own coordinates): the head
    runs only at the positions some row wants (``logits_to_keep``; sliced afterwards for a model that ignores
    it), not over every position: with a 248k vocabulary a batch's full logits are gigabytes (64 rows x 90
    tokens: 2.9 GB in bf16, twice that in float32 for the softmax)."""
    wanted = sorted({p for ps in positions for p in ps})
    keep = torch.tensor(wanted, dtype=torch.long, device=inputs["input_ids"].device)
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # a forward without logits_to_keep refuses it before running: run it plainly
        logits = model(**inputs).logits
    if logits.shape[1] != len(wanted):  # every position came back (the argument was ignored): slice, never
        logits = logits[:, keep]        # run again, as a forward on a cache has moved that cache on
    logp = torch.log_softmax(logits.float(), dim=-1)
    where = {p: j for j, p in enumerate(wanted)}
    return [logp[i, [where[p] for p in ps]] for i, ps in enumerate(positions)]


def suffix_logprobs(model: torch.nn.Module, cache: Any, rows: Sequence[Sequence[int]], prefix_length: int,
                    positions: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                    copies: int = 1, cache_rows: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Log-softmax at ``positions`` (whole-row coordinates) of ``rows``, whose first ``prefix_length`` tokens are
    in ``cache`` (row ``i``'s at the cache's row ``cache_rows[i]`` when given): one forward over the rest,
    right-padded."""
    tails = [list(r[prefix_length:]) for r in rows]
    width = max(len(t) for t in tails)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), prefix_length + width), dtype=torch.long)
    mask[:, :prefix_length] = 1
    for i, tail in enumerate(tails):
        ids[i, :len(tail)] = torch.tensor(tail)
        mask[i, prefix_length:prefix_length + len(tail)] = 1
    from ..fast.decode import cache_argument

    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": True,
              cache_argument(model): batch_cache(cache, len(rows), copies, cache_rows)}
    return logprobs_at(model, inputs, [[p - prefix_length for p in ps] for ps in positions])


def agrees(reused: torch.Tensor, whole: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(within the dtype's tolerance, the largest difference) of one row's log-probs scored both ways."""
    diff = float((reused - whole).abs().max())
    return diff <= TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE), diff


def score_with_reuse(prepared: Sequence[tuple[list[int], list[int], list[int]]], positions: Callable[[int], list[int]],
                     score_whole: Callable[[list[int]], None], use: Callable[[int, torch.Tensor], None], *,
                     model: torch.nn.Module, batch_size: int, pad_id: int, device: torch.device,
                     check: Callable[[list[int], list[torch.Tensor]], tuple[bool, float]],
                     alignments: Sequence[int] = (1, *CHUNK_ALIGNMENTS),
                     copies: int = 1) -> tuple[str | None, int, int | None, bool]:
    """Score ``prepared`` rows: shared-prefix groups through the cache, the rest by ``score_whole(indices)``;
    ``use(i, logp)`` receives each reused row's log-probs. ``copies``: each distinct row's copies in a row (the
    module docstring); ``batch_size`` is then a multiple of it.

    The prefix cut is chosen by ``check`` (the group's first reused row — each of its copies — scored whole as well,
    ``check(indices, reused log-probs)``), trying the cuts of
    ``alignments`` in turn (1: the whole shared prefix; N: cut down to a multiple of N tokens) until one passes.
    A pass *confirms* the alignment only when no larger candidate divides the cut that passed (a cut of 256
    passing under 64 may owe it to a 256-token chunk); until then each group is checked, moving on to larger
    alignments if the current one fails there, and after it groups are scored unchecked. If no cut passes, or a
    cache cannot be copied, every remaining row is scored whole. Returns (why reuse was turned off or None, rows
    scored through a cache, the alignment used last or None, whether it was confirmed)."""
    rows = [p[0] for p in prepared]
    groups, whole = prefix_groups(rows[::copies], [positions(i)[0] for i in range(0, len(rows), copies)])
    if copies > 1:  # groups of distinct rows, each index expanded to its copies (which stay next to each other)
        expand = lambda indices: [i * copies + c for i in indices for c in range(copies)]  # noqa: E731
        groups, whole = [(length, expand(members)) for length, members in groups], expand(whole)
    score_whole(whole)
    candidates, k, confirmed, off, reused = list(alignments), 0, False, None, 0
    used: set[int] = set()

    def use_once(i: int, logp: torch.Tensor) -> None:
        used.add(i)
        use(i, logp)

    def rest(members: list[int]) -> list[int]:  # rows a failure mid-group left unscored (none scored twice)
        return [i for i in members if i not in used]

    run = dict(model=model, rows=rows, positions=positions, use=use_once, batch_size=batch_size, pad_id=pad_id,
               device=device, copies=copies)
    pending = list(groups)
    while pending:
        if off is None and confirmed:  # trusted: groups of similar length share one prefix forward (_next_chunk)
            chunk, pending = _next_chunk(pending, max(1, batch_size // copies))
            length, members = min(n for n, _ in chunk), [i for _, group in chunk for i in group]
        else:
            (length, members), pending = pending[0], pending[1:]
        if off is not None:
            score_whole(members)
            continue
        try:
            if confirmed:
                cut = length - length % candidates[k]
                done = _reuse_group(cut, members, None, **run) if cut >= MIN_PREFIX else 0
            else:
                found = _checked_cut(length, members, check, candidates[k:], run)
                if found is None:
                    done = 0
                else:
                    j, cut, done = found
                    k += j
                    confirmed = not any(cut % c == 0 for c in candidates[k + 1:])
            if done == 0:  # no cut of this group long enough to pay
                score_whole(members)
            reused += done
        except ReuseUnavailable as exc:
            off = f"prefix reuse off for this model: {exc}; rows scored whole"
            score_whole(rest(members))
        except Exception as exc:  # a family whose forward does not take a copied cache: opt-in must never crash
            off = (f"prefix reuse off for this model: its forward on a copied cache failed "
                   f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); rows scored whole")
            reused += len(used.intersection(members))
            score_whole(rest(members))
    return off, reused, candidates[k] if reused else None, confirmed


def _next_chunk(groups: list[tuple[int, list[int]]], most: int) -> tuple[list[tuple[int, list[int]]],
                                                                        list[tuple[int, list[int]]]]:
    """(the next chunk, the groups left): the shortest group and the next ones by length, up to ``most`` groups and
    while their shared length stays within CHUNK_SLACK of the first's. A chunk is cut at its shortest length, so a
    longer member recomputes at most that share of its prefix on the continuation; in exchange each prefix forward
    and each continuation forward serves several groups (MMLU's per-subject shots: 56 groups of median 7
    questions, whose one-group forwards were launch-bound on the H200: 40-55 ms each for 7 rows, 2026-12-05)."""
    ordered = sorted(groups, key=lambda g: g[0])
    first, count = ordered[0][0], 1
    while count < min(most, len(ordered)) and ordered[count][0] <= first * (1 + CHUNK_SLACK):
        count += 1
    return ordered[:count], ordered[count:]


def _checked_cut(length: int, members: list[int], check, alignments: Sequence[int],
                 run: dict) -> tuple[int, int, int] | None:
    """(index into ``alignments`` of the first cut that passes ``check``, that cut, rows scored) for one group;
    None when no cut of it is long enough to try; ReuseUnavailable naming every difference when none passes."""
    tried: list[tuple[int, int, float]] = []
    for j, align in enumerate(alignments):
        cut = length - length % align
        if cut < MIN_PREFIX or any(cut == c for _, c, _ in tried):
            continue  # too short to pay, or the same cut as one already refused
        try:
            return j, cut, _reuse_group(cut, members, check, **run)
        except _Mismatch as exc:
            tried.append((align, cut, exc.diff))
    if not tried:
        return None
    (align, _, diff), rest = tried[0], tried[1:]
    text = f"its log-probs differ from the whole row's by {diff:.2e}"
    if align != 1:
        text += f" with the prefix cut at a multiple of {align} tokens"
    if rest:
        text += " (" + "; ".join(f"cut at a multiple of {a} tokens: {d:.2e}" for a, _, d in rest) + ")"
    raise ReuseUnavailable(text)


def _reuse_group(cut: int, members: list[int], check, *, model, rows, positions, use, batch_size: int, pad_id: int,
                 device, copies: int = 1) -> int:
    """Score ``members`` on the cache of their first ``cut`` tokens, one prefix forward over the distinct prefixes
    among them (one for a group, several for a chunk of groups); with ``check``, the first batch's first row (its
    copies) is checked before anything is used (``_Mismatch`` if it fails). Returns the rows scored."""
    prefixes: dict[tuple[int, ...], int] = {}
    cache_row = {}  # member -> its prefix's row for its copy: prefix p's copy c is row p * copies + c
    for i in members:  # a distinct row's copies sit next to each other, copy c at index i with i % copies == c
        cache_row[i] = prefixes.setdefault(tuple(rows[i][:cut]), len(prefixes)) * copies + i % copies
    if len(prefixes) == 1:
        cache = run_prefix(model, rows[members[0]][:cut], device, copies)
    else:
        cache = run_prefixes(model, list(prefixes), device, copies)
        if _cache_batch(getattr(cache, "layers", None) or []) != len(prefixes) * copies:
            raise ReuseUnavailable("its cache's rows do not follow the prefixes' batch")
    members, done = sorted(members, key=lambda i: -len(rows[i])), 0
    for start in range(0, len(members), batch_size):
        batch = members[start:start + batch_size]
        extra = {} if len(prefixes) == 1 else {"cache_rows": [cache_row[i] for i in batch]}
        logps = suffix_logprobs(model, cache, [rows[i] for i in batch], cut, [positions(i) for i in batch], pad_id,
                                device, copies, **extra)
        if check is not None and start == 0:
            ok, diff = check(batch[:copies], logps[:copies])
            if not ok:
                raise _Mismatch(diff)
        for i, logp in zip(batch, logps):
            use(i, logp)
        done += len(batch)
    return done
