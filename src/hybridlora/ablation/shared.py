"""Several ablation conditions in each forward (``ablate --conditions-per-batch K``).

A small model on a GPU spends most of a decode step, and of a short multiple-choice forward, on work that does not
grow with the rows (kernel launches, weights read once per step): K conditions' rows in one batch pay that once.
The runner claims up to K pending conditions of one model that share every setting but the removal
(:func:`group_key`) and hands them to :func:`run_conditions`:

* the hooks of all of them are attached at once (:class:`.methods.SharedAblation`), every row repeated once per
  condition, interleaved (row ``r`` belongs to condition ``r % K``);
* perplexity runs each window once per condition in one forward (:func:`.perplexity.strided_nll_copies`);
* the benchmarks run through the ordinary evaluator once per condition, each seeing a :class:`ConditionLM`: the
  first condition's request runs every condition's rows at once on one :class:`~..evaluate.lm.CausalLM` with
  ``copies=K``, and the later conditions receive their share of that result (checked to be the same request);
* the diagnostics run per condition, on a single condition's hooks (a few short windows).

A group always holds K conditions: one with fewer pending conditions is filled with the intact model's rows (their
results are dropped), so every forward of a condition has the same shape whatever ran beside it, and a condition
run again alone after a crash gets the numbers it would have got in its first group. The rows of the other
conditions leave a row's numbers alone (each row's computation is its own), except where a kernel's work for one
row depends on the batch's other rows: a mixture-of-experts layer batches the tokens routed to each expert, so
its last bits may vary with what shares the batch (measured on CPU: up to 1e-7 in the logits of tiny MoE models).
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Sequence

SPEC_KEY = "conditions_per_batch"  # in an ablation job's spec only when above 1 (earlier job ids stay)
INTACT = {"method": "none", "units": []}


def group_size(spec: dict) -> int:
    return int(spec.get(SPEC_KEY) or 1)


def group_key(spec: dict) -> str:
    """What conditions sharing a forward must have in common: every setting but the removal."""
    return json.dumps({k: v for k, v in spec.items() if k not in ("removal", "removed")}, sort_keys=True,
                      default=str)


class SharedLM:
    """One :class:`~..evaluate.lm.CausalLM` computing ``count`` conditions' rows at once, and the results each
    condition has not collected yet."""

    def __init__(self, lm: Any, count: int):
        self.lm, self.count = lm, count
        self._pending: dict[tuple, dict[int, Any]] = {}
        self._seconds: dict[tuple, float] = {}

    def view(self, index: int) -> "ConditionLM":
        return ConditionLM(self, index)

    def take(self, index: int, key: tuple, compute: Callable[[], list[Any]]) -> tuple[Any, float, float]:
        """Condition ``index``'s result of the request ``key`` (computed for every condition on first asking), its
        share of the compute time, and the compute time spent in this call (0 when another condition's call ran
        it)."""
        spent = 0.0
        if key not in self._pending:
            start = time.perf_counter()
            results = compute()
            spent = self._seconds[key] = time.perf_counter() - start
            self._pending[key] = dict(enumerate(results))
        pending = self._pending[key]
        if index not in pending:
            raise RuntimeError(f"condition {index} asked twice for one request: the evaluator's requests must come "
                               "once per condition, in the same order")
        result = pending.pop(index)
        share = self._seconds[key] / self.count
        if not pending:  # every condition has its share: the same request later is a new one
            del self._pending[key], self._seconds[key]
        return result, share, spent

    def scores(self, index: int, prepared: Sequence[Any]) -> tuple[list[list[float]], float, float]:
        key = ("choices", _fingerprint(row for row, _, _ in prepared), _fingerprint(l for _, _, l in prepared))

        def compute():
            fanned = [item for item in prepared for _ in range(self.count)]
            out = self.lm.score_choices(fanned)
            return [out[c::self.count] for c in range(self.count)]
        return self.take(index, key, compute)

    def generations(self, index: int, inputs: Any, stop: Sequence[str]) -> tuple[list[str], float, float]:
        from ..evaluate.lm import PromptRows

        key = ("generate", _fingerprint(inputs.rows), tuple(inputs.order), inputs.max_new_tokens, tuple(stop))

        def compute():
            k = self.count
            fanned = PromptRows([row for row in inputs.rows for _ in range(k)],
                                [i * k + c for i in inputs.order for c in range(k)], inputs.max_new_tokens)
            out = self.lm.generate_rows(fanned, stop)
            return [out[c::k] for c in range(k)]
        return self.take(index, key, compute)


def _fingerprint(rows) -> int:
    return hash(tuple(tuple(r) for r in rows))


class ConditionLM:
    """What the evaluator sees as one condition's model: the shared LM's attributes, its batch sizes per
    condition, and each scoring or generation request answered with this condition's rows. ``shared_s`` adds up
    this condition's share of the shared compute time, ``spent_s`` the compute time its own calls ran."""

    def __init__(self, shared: SharedLM, index: int):
        self._shared, self._index = shared, index
        self.shared_s = self.spent_s = 0.0

    def __getattr__(self, name: str) -> Any:  # tokenization, names, kernels, decode path, prefix-reuse notes
        return getattr(self._shared.lm, name)

    @property
    def batch_size(self) -> int:
        return self._shared.lm.batch_size // self._shared.count

    @property
    def generate_batch_size(self) -> int:
        return self._shared.lm.generate_batch_size // self._shared.count

    @property
    def prefix_reused_rows(self) -> int:
        return self._shared.lm.prefix_reused_rows // self._shared.count

    def score_choices(self, prepared, *, progress: Any = None) -> list[list[float]]:
        return self._done(*self._shared.scores(self._index, prepared), progress)

    def generate_rows(self, inputs, stop: Sequence[str] = (), *, progress: Any = None) -> list[str]:
        return self._done(*self._shared.generations(self._index, inputs, tuple(s for s in stop if s)), progress)

    def _done(self, out: list, share: float, spent: float, progress: Any) -> list:
        self.shared_s += share
        self.spent_s += spent
        if progress is not None:
            progress.update(len(out))
        return out
