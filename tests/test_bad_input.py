"""Bad input ends with one ``error:`` line saying what to do, exit status 2, no traceback and nothing written
(issue 16, section 2: every case the issue lists, except the two study-directory ones tested with the study).

Each case builds its inputs under ``tmp_path/in``, runs the command in an empty ``tmp_path/work`` and checks that
no file under ``tmp_path`` appeared or changed.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from hybridlora.cli import main

NOT_UTF8 = b"\xff\xfe not utf-8 \xc3\x28\n"
GSM8K_ROW = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}
TINY = ["qwen3.5-0.8b", "--tiny"]


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _gsm8k_dir(root: Path, *, test=None, train=True) -> Path:
    """A data folder holding GSM8K only (test rows as given, a small train file unless train=False)."""
    _jsonl(root / "gsm8k" / "test.jsonl", test if test is not None else [GSM8K_ROW] * 3)
    if train:
        _jsonl(root / "gsm8k" / "train.jsonl", [GSM8K_ROW] * 10)
    return root


def _unreadable(path: Path) -> Path:
    """A file that exists and cannot be read, even by root: reading /proc/self/mem fails with EIO."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/proc/self/mem")
    return path


def _adapter(folder: Path, weights: bytes | None) -> Path:
    """A PEFT adapter folder for the tiny Qwen3.5 with the given adapter_model.safetensors bytes."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj"], "lora_dropout": 0.0, "bias": "none"}))
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def _truncated_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    data = save({"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})
    return data[: len(data) - 100]


def _study_yaml(path: Path, **over) -> Path:
    import yaml

    config = {"name": "bad", "data_dir": "builtin:demo", "models": [{"model": "qwen3.5-0.8b", "tiny": True}],
              "placements": ["attention_only"], "domains": [{"name": "gsm8k", "max_examples": 8}],
              "seeds": [1], "eval": {"benchmarks": {"mmlu": 2}}}
    config.update(over)
    path.write_text(yaml.safe_dump(config))
    return path


def _eval(*extra: str) -> list[str]:
    return ["eval", *TINY, "--no-progress", "--output", "ev", *extra]


# (case id, inputs builder: (input folder, real data folder) -> argv, a fragment the message must contain)
CASES = [
    # --- study ---
    ("study-output-is-a-file", lambda i, d: ["study", "demo", "--output", str(_touch(i / "taken.txt"))],
     "not a folder"),
    ("study-output-unwritable", lambda i, d: ["study", "demo", "--output", "/sys/kernel/hybridlora-study"],
     "cannot create"),
    ("study-yaml-not-utf8", lambda i, d: ["study", str(_bytes(i / "s.yaml", b"name: x\n" + NOT_UTF8))],
     "UTF-8"),
    ("study-seed-1e23", lambda i, d: ["study", "demo", "--output", "st", "--seeds", str(10 ** 23)], "seed"),
    ("study-yaml-seed-1e23", lambda i, d: ["study", str(_study_yaml(i / "s.yaml", seeds=[10 ** 23])),
                                           "--output", "st"], "seed"),
    ("study-domain-file-not-utf8-row", lambda i, d: [
        "study", str(_study_yaml(i / "s.yaml", domains=[{"name": str(_bytes(
            i / "dom.jsonl", json.dumps({"prompt": "a", "response": "b"}).encode() + b"\n" + NOT_UTF8))}])),
        "--output", "st"], "UTF-8"),
    ("study-domain-file-unreadable", lambda i, d: [
        "study", str(_study_yaml(i / "s.yaml", domains=[{"name": str(_unreadable(i / "dom.jsonl"))}])),
        "--output", "st"], "cannot be read"),
    # --- plan / verify ---
    ("plan-save-config-is-a-file", lambda i, d: ["plan", "qwen3.5-0.8b", "--placement", "softmax_only",
                                                 "--save-config", str(_touch(i / "taken.txt"))], "not a folder"),
    ("plan-rank-0", lambda i, d: ["plan", "qwen3.5-0.8b", "--placement", "softmax_only", "--rank", "0"], "--rank"),
    ("plan-rank-negative", lambda i, d: ["plan", "qwen3.5-0.8b", "--placement", "softmax_only", "--rank", "-4"],
     "--rank"),
    ("plan-alpha-0", lambda i, d: ["plan", "qwen3.5-0.8b", "--placement", "softmax_only", "--alpha", "0"],
     "--alpha"),
    ("plan-alpha-negative", lambda i, d: ["plan", "qwen3.5-0.8b", "--placement", "softmax_only", "--alpha", "-8"],
     "--alpha"),
    ("verify-rank-0", lambda i, d: ["verify", "qwen3.5-0.8b", "--placement", "softmax_only", "--rank", "0"],
     "--rank"),
    ("verify-rank-negative", lambda i, d: ["verify", "qwen3.5-0.8b", "--placement", "softmax_only", "--rank", "-2"],
     "--rank"),
    ("verify-rank-huge", lambda i, d: ["verify", "qwen3.5-0.8b", "--placement", "softmax_only",
                                       "--rank", "1000000000000"], "--rank"),
    ("verify-alpha-negative", lambda i, d: ["verify", "qwen3.5-0.8b", "--placement", "softmax_only",
                                            "--alpha", "-1"], "--alpha"),
    ("verify-threads-0", lambda i, d: ["verify", "qwen3.5-0.8b", "--placement", "softmax_only", "--threads", "0"],
     "threads"),
    # --- train ---
    ("train-data-not-utf8", lambda i, d: ["train", *TINY, "--placement", "softmax_only", "--no-progress",
                                          "--data", str(_bytes(i / "d.jsonl", NOT_UTF8)), "--output", "run"],
     "UTF-8"),
    ("train-data-unreadable", lambda i, d: ["train", *TINY, "--placement", "softmax_only", "--no-progress",
                                            "--data", str(_unreadable(i / "d.jsonl")), "--output", "run"],
     "cannot be read"),
    ("train-seed-1e23", lambda i, d: ["train", *TINY, "--placement", "softmax_only", "--no-progress", "--data",
                                      "gsm8k", "--data-dir", str(d), "--seed", str(10 ** 23), "--output", "run"],
     "--seed"),
    # --- eval ---
    ("eval-output-is-a-file", lambda i, d: ["eval", *TINY, "--no-progress", "--benchmarks", "mmlu", "--limit", "1",
                                            "--data-dir", str(d), "--output", str(_touch(i / "taken.txt"))],
     "not a folder"),
    ("eval-data-not-utf8", lambda i, d: _eval("--benchmarks", "gsm8k", "--limit", "1", "--data-dir", str(
        _gsm8k_dir(i / "data", test=[GSM8K_ROW]) and _append(i / "data" / "gsm8k" / "test.jsonl", NOT_UTF8)
        and i / "data")), "UTF-8"),
    ("eval-data-unreadable", lambda i, d: _eval("--benchmarks", "gsm8k", "--limit", "1", "--data-dir", str(
        _unreadable_test(i / "data"))), "cannot be read"),
    ("eval-perplexity-text-not-utf8", lambda i, d: _eval("--benchmarks", "mmlu", "--limit", "1", "--data-dir",
                                                         str(d), "--perplexity-text", str(_bytes(i / "p.txt", NOT_UTF8))),
     "UTF-8"),
    ("eval-humaneval-garbage-gz", lambda i, d: _eval("--benchmarks", "humaneval", "--limit", "1", "--data-dir", str(
        _bytes(i / "data" / "humaneval" / "HumanEval.jsonl.gz", b"this is no gzip file").parent.parent)), "gzip"),
    ("eval-humaneval-truncated-gz", lambda i, d: _eval("--benchmarks", "humaneval", "--limit", "1", "--data-dir", str(
        _bytes(i / "data" / "humaneval" / "HumanEval.jsonl.gz",
               gzip.compress(b'{"task_id": "HumanEval/0"}\n' * 50)[:40]).parent.parent)), "gzip"),
    ("eval-gsm8k-train-file-missing", lambda i, d: _eval("--benchmarks", "gsm8k", "--limit", "1", "--data-dir",
                                                         str(_gsm8k_dir(i / "data", train=False))), "train.jsonl"),
    ("eval-gsm8k-row-without-answer", lambda i, d: _eval("--benchmarks", "gsm8k", "--limit", "1", "--data-dir", str(
        _gsm8k_dir(i / "data", test=[GSM8K_ROW, {"question": "no answer here"}]))), "answer"),
    ("eval-max-length-negative", lambda i, d: _eval("--benchmarks", "mmlu", "--limit", "1", "--data-dir", str(d),
                                                    "--max-length", "-5"), "--max-length"),
    ("eval-max-new-tokens-0", lambda i, d: _eval("--benchmarks", "gsm8k", "--limit", "1", "--data-dir", str(d),
                                                 "--max-new-tokens", "0"), "--max-new-tokens"),
    ("eval-adapter-garbage", lambda i, d: _eval("--benchmarks", "mmlu", "--limit", "1", "--data-dir", str(d),
                                                "--adapter", str(_adapter(i / "ad", b"garbage, not safetensors"))),
     "safetensors"),
    ("eval-adapter-truncated", lambda i, d: _eval("--benchmarks", "mmlu", "--limit", "1", "--data-dir", str(d),
                                                  "--adapter", str(_adapter(i / "ad", _truncated_safetensors()))),
     "safetensors"),
]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("something that is not a folder\n")
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _append(path: Path, data: bytes) -> Path:
    with path.open("ab") as handle:
        handle.write(data)
    return path


def _unreadable_test(root: Path) -> Path:
    _gsm8k_dir(root)
    (root / "gsm8k" / "test.jsonl").unlink()
    _unreadable(root / "gsm8k" / "test.jsonl")
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("case, build, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(case, build, fragment, tmp_path, data_dir,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDLORA_PROCESS_DIR", str(tmp_path.parent / f"{tmp_path.name}-processes"))
    inputs, work = tmp_path / "in", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    argv = build(inputs, data_dir)
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err + out
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert _snapshot(tmp_path) == before, "files were written"
    assert not list(work.iterdir())


def test_every_case_is_distinct():
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permission bits say")
def test_permission_bits_are_errors_too(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    data.chmod(0)
    locked.chmod(0o500)
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["study", "demo", "--output", str(locked / "st")]) == 2
        assert main(["train", *TINY, "--placement", "softmax_only", "--data", str(data), "--output", "run"]) == 2
    finally:
        locked.chmod(0o700)
        data.chmod(0o600)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    shutil.rmtree(locked)
