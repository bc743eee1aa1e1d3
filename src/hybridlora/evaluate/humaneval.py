"""HumanEval (164 Python problems), zero-shot code completion.

Protocol: the problem's prompt (signature + docstring) as is; greedy completion of up to 512 new tokens,
stopped at a new top-level ``def``/``class``/``if``/``print``; pass@1 by executing prompt + completion + tests
in the sandbox *only* when code execution is explicitly allowed, otherwise reported as not run.
"""
from __future__ import annotations

from pathlib import Path

from .data import hf_load, read_jsonl, resolve_source

NAME = "humaneval"
HF_ID = "openai/openai_humaneval"
DEFAULT_N = 164
NUM_FEWSHOT = 0
KIND = "generate"
MAX_NEW_TOKENS = 512
STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n```", "<|endoftext|>", "</s>")
PROTOCOL = ("0-shot, all 164 problems, greedy <=512 new tokens until a new top-level def/class/if/print, "
            "pass@1 by sandboxed execution only with explicit permission")
_FILE = "humaneval/HumanEval.jsonl.gz"


def load(data_dir: str | Path | None = None) -> tuple[list[dict], None]:
    root = resolve_source(NAME, data_dir, _FILE, HF_ID)
    rows = read_jsonl(root / _FILE) if root is not None else list(hf_load(HF_ID)["test"])
    items = [{"example_id": r["task_id"], "task_id": r["task_id"], "prompt": r["prompt"], "test": r["test"],
              "entry_point": r["entry_point"]} for r in rows]
    return items, None


def prompt_parts(item: dict, shots: None) -> tuple[str, list[str], str]:
    return "", [], item["prompt"]


def trim_completion(text: str, stop: tuple[str, ...] = STOP) -> str:
    """Cut ``text`` at the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
