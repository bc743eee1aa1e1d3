"""bench/bench_topology.py's bookkeeping of pretraining runs stopped at a deadline (no training: stand-in runs).

A device call's limit stops the runs still going; the figures of those that had already finished must survive
(the next call finds their models made and would never measure them again), each with its own seconds."""
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_topology.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_topology_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StandInRun:
    """A child process that ends ``after`` seconds from now with ``code`` (None: never ends by itself)."""

    def __init__(self, after: float | None, code: int = 0):
        self.end = None if after is None else time.perf_counter() + after
        self.code, self.returncode, self.terminated = code, None, False

    def poll(self):
        if self.returncode is None and self.end is not None and time.perf_counter() >= self.end:
            self.returncode = self.code
        return self.returncode

    def terminate(self):
        self.terminated, self.returncode = True, -15

    def wait(self, timeout=None):
        return self.returncode


def finished_run_files(run_dir: Path) -> Path:
    """What a finished `lab pretrain` leaves: lab_run.json, train_log.jsonl and the model directory."""
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "lab_run.json").write_text(json.dumps({"match": {"achieved": 1000}, "train_tokens_per_epoch": 64,
                                                      "epochs": 1}))
    lines = [{"event": "start", "kernels": "kernels (no CUDA)", "cuda_graphs": "off"},
             {"event": "step", "step": 1, "tokens_per_s": 10.0}, {"event": "step", "step": 2, "tokens_per_s": 30.0},
             {"event": "end", "final_loss": 0.5, "val_loss": 0.6}]
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir / "model"


def test_runs_finished_before_the_deadline_keep_their_figures(bench, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fast = finished_run_files(tmp_path / "fast")
    started = time.perf_counter()
    running = [(SimpleNamespace(name="slow"), tmp_path / "slow" / "model", open(out / "slow.log", "w"),
                started, StandInRun(after=None)),
               (SimpleNamespace(name="fast"), fast, open(out / "fast.log", "w"), started, StandInRun(after=0.2))]
    made, partial = {}, {"fast": 5.0}  # fast was also stopped once before: its earlier seconds count
    with pytest.raises(bench.PretrainingStopped):
        bench._wait_for_runs(running, lambda item: bench._record_pretraining(item, made, out, lambda line: None,
                                                                            False, True, partial),
                             started + 1.5, lambda left: "stopped")
    assert [r[0].name for r in running] == ["slow"]  # only the unfinished run is left to stop
    assert set(made) == {"fast"}
    fast_figures = made["fast"]
    assert 5.1 <= fast_figures["seconds"] < 5.0 + 1.4  # its own end (~0.2 s) plus the earlier call, not the deadline
    assert fast_figures["seconds_in_runs_stopped_at_deadline"] == 5.0
    assert fast_figures["steady_tokens_per_s"] == 30 and fast_figures["concurrent_with_other_pretraining"]
    assert (out / "fast_train_log.jsonl").is_file() and "fast" not in partial


def test_make_models_hands_the_finished_figures_to_the_caller(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = {"a": StandInRun(after=None), "b": StandInRun(after=0.2)}
    config = SimpleNamespace(models=[
        SimpleNamespace(name=n, model=f"lab/{n}/model",
                        made_by=f"hybridlora lab pretrain demo-gdn --tokens 10 --output lab/{n}") for n in "ab"])
    monkeypatch.setattr(bench.subprocess, "Popen", lambda argv, **kw: runs[argv[argv.index("--output") + 1][4:]])
    monkeypatch.setattr(bench.shutil, "copyfile", lambda a, b: None)
    monkeypatch.setattr(bench, "pretrain_figures", lambda run_dir, s: {"seconds": round(s, 1), "kernels": ""})
    started = time.perf_counter()
    partial = {}
    with pytest.raises(bench.PretrainingStopped) as stopped:
        bench.make_models(config, False, lambda line: None, tmp_path, concurrently=True, save_every=100,
                          stop_at=started + 2.0, partial_s=partial)
    # b is timed to its own end (0.2 s, seen at the next poll), not to the deadline that stopped a
    assert set(stopped.value.made) == {"b"} and stopped.value.made["b"]["seconds"] < 1.5
    assert runs["a"].terminated and not runs["b"].terminated
    assert set(partial) == {"a"} and partial["a"] >= 1.9


def test_warm_up_runs_a_few_steps_of_each_missing_model_once(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab" / "made" / "model").mkdir(parents=True)  # made already: not warmed up
    (tmp_path / "lab" / "b" / "checkpoints" / "step-100").mkdir(parents=True)  # a stopped real run: no --resume
    made_by = ("hybridlora lab pretrain s --tokens 20000000 --seq-len 32 --micro-batch-size 2048 --save-every 0 "
               "--output lab/{}")
    config = SimpleNamespace(models=[SimpleNamespace(name=n, model=f"lab/{n}/model", made_by=made_by.format(n))
                                     for n in ("a", "b", "made")])
    launched = []

    def popen(argv, **kw):
        launched.append(argv)
        return StandInRun(after=0.1)
    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    out = tmp_path / "out"
    out.mkdir()
    figures = bench.warm_up(config, False, lambda line: None, out, 3)
    assert [a[a.index("--output") + 1] for a in launched] == [str(out / "warm-up" / n) for n in "ab"]
    for argv in launched:
        assert argv[argv.index("--stop-after-steps") + 1] == "3" and "--resume" not in argv
        assert argv[argv.index("--tokens") + 1] == str(2048 * 32 * 4)  # enough examples for 3 steps, not 20M tokens
        assert argv[argv.index("--save-every") + 1] == "0"
    assert set(figures["seconds_per_model"]) == {"a", "b"} and not (out / "warm-up").exists()
    assert bench.warm_up(config, False, lambda line: None, out, 3) is None and len(launched) == 2  # done here
    assert bench.warm_up(config, False, lambda line: None, tmp_path / "other", 0) is None


def test_the_studys_store_comes_back_with_the_bench_output_while_a_runner_holds_it(bench, tmp_path):
    """A device call returns only its output folder: the store is copied there after every study run, whole
    even while another connection has an uncommitted write open, and a study not yet started copies nothing."""
    import sqlite3

    study, out = tmp_path / "study", tmp_path / "out"
    study.mkdir()
    assert bench.keep_study_results(study, out) is None and not out.exists()
    with sqlite3.connect(study / "study.db") as db:
        db.execute("CREATE TABLE jobs (id TEXT, status TEXT)")
        db.executemany("INSERT INTO jobs VALUES (?, ?)", [("base", "complete"), ("cell", "pending")])
    (study / "study.yaml").write_text("name: t\n")
    holder = sqlite3.connect(study / "study.db")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE jobs SET status = 'running' WHERE id = 'cell'")  # not committed: must not be copied
    try:
        kept = bench.keep_study_results(study, out)
    finally:
        holder.rollback()
        holder.close()
    with sqlite3.connect(kept / "study.db") as copy:
        assert sorted(copy.execute("SELECT id, status FROM jobs")) == [("base", "complete"), ("cell", "pending")]
    assert (kept / "study.yaml").read_text() == "name: t\n" and not (kept / "study.db.partial").exists()


def test_pretraining_figures_report_the_graphs_the_run_captured(bench, tmp_path):
    (tmp_path / "lab_run.json").write_text(json.dumps({"match": {"achieved": 1000}, "train_tokens_per_epoch": 64,
                                                       "epochs": 1}))
    lines = [{"event": "start", "kernels": "k", "cuda_graphs": "on: one graph per row length, 0 captured"},
             {"event": "step", "tokens_per_s": 10.0}, {"event": "step", "tokens_per_s": 30.0},
             {"event": "end", "final_loss": 0.5, "val_loss": 0.6, "cuda_graphs": "on: one graph per row length, 2 captured"}]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    figures = bench.pretrain_figures(tmp_path, 12.34)
    assert figures["cuda_graphs"].endswith("2 captured") and figures["kernels"] == "k"
    assert figures["steady_tokens_per_s"] == 30 and figures["val_loss"] == 0.6 and figures["seconds"] == 12.3


@pytest.mark.parametrize("deadline,started", [(60, False), (400, True)])
def test_the_study_starts_only_with_enough_time_before_the_deadline(bench, tmp_path, monkeypatch, deadline, started):
    """Runners given less than --min-study-seconds (default 90) are not started: on the H200, eight runners given
    41 s were stopped before any job ended, and the call's time was spent for nothing."""
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(bench, "make_models", lambda *a, **k: {})
    monkeypatch.setattr(bench, "run_study", lambda *a, **k: calls.append(a) or {"seconds": 1.0, "jobs_done": 0,
                                                                                "jobs_total": 1})
    monkeypatch.setattr(sys, "argv", ["bench_topology.py", "--out", str(tmp_path / "out"), "--deadline",
                                      str(deadline)])
    assert bench.main() == 0
    assert bool(calls) == started
    study = json.loads((tmp_path / "out" / "bench_topology.json").read_text())["runs"][-1]["study"]
    assert study.get("not_started", False) == (not started)
