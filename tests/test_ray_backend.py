"""``hybridlora study --backend ray`` on real Ray clusters started here (CPU only, logical GPUs; no mocks).

Every cluster is started with ``ray start --block`` in its own process group and its own temp dir, and killed
as a group afterwards (never ``ray stop``, which would stop every Ray process on the machine).
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from hybridlora.cli import main  # noqa: E402
from hybridlora.study import Store, expand_grid  # noqa: E402
from hybridlora.study import jobs as jobs_module  # noqa: E402
from hybridlora.study.backends import Backend  # noqa: E402
from hybridlora.study.config import study_config_from_dict  # noqa: E402
from hybridlora.study.grid import Job  # noqa: E402
from hybridlora.study.runner import run_jobs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
TIMING_KEYS = {"examples_per_s", "tokens_per_s", "wall_s", "elapsed_s", "seconds", "time_s"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Kernel-cache variables that an earlier test in this pytest process may have set (TorchInductor exports its
# default cache dir when it first compiles): the clusters here must start as a fresh node would, without them.
_PROCESS_CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")


def _env(**extra) -> dict:
    src = str(REPO / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    inherited = {k: v for k, v in os.environ.items() if k not in _PROCESS_CACHE_VARS}
    return {**inherited, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error", "RAY_USAGE_STATS_ENABLED": "0",
            # Token auth (Ray >= 2.5x) would make these throw-away loopback clusters depend on ~/.ray/auth_token
            "RAY_AUTH_MODE": "disabled", **extra}


class Cluster:
    """Ray nodes started by this test (``ray start --block``), each its own process group and temp dir."""

    def __init__(self, root: Path):
        self.root, self.nodes, self.port = root, [], _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, args: list[str], name: str, cwd: Path, env: dict, hide: Path | None = None) -> None:
        temp = Path(f"/tmp/hlray-{uuid.uuid4().hex[:8]}")  # short: Ray's unix socket paths have a length limit
        cwd.mkdir(parents=True, exist_ok=True)
        log = (self.root / f"{name}.log").open("w")
        command = [RAY, "start", *args, "--temp-dir", str(temp), "--disable-usage-stats", "--block"]
        if hide is not None:  # its own mount namespace, with an empty tmpfs over the hidden folder
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f"mount -t tmpfs none {hide} && exec " + " ".join(command)]
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.nodes.append((proc, temp, name))

    def head(self, *, cpus: int, gpus: int, env: dict | None = None) -> "Cluster":
        self._start(["--head", "--port", str(self.port), "--num-cpus", str(cpus), "--num-gpus", str(gpus),
                     "--include-dashboard=false"], "head", self.root / "head-cwd", env or _env())
        self.wait_for_nodes(1)
        return self

    def add_node(self, *, cpus: int, gpus: int, cwd: Path, hide: Path | None = None) -> None:
        """A second node; ``hide``: a folder this node's processes see empty (tmpfs over it, own mount ns)."""
        args = ["--address", self.address, "--num-cpus", str(cpus), "--num-gpus", str(gpus)]
        self._start(args, f"node{len(self.nodes)}", cwd, _env(), hide)
        self.wait_for_nodes(len(self.nodes))

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        code = (f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                "print(sum(x['Alive'] for x in ray.nodes()))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc, _, name in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray {name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            try:
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                                     timeout=max(5.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                break
            if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster did not reach {n} node(s) in {timeout} s")

    def stop(self) -> None:
        for proc, temp, _ in reversed(self.nodes):
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: ray start, GCS, raylet, its workers
            except ProcessLookupError:
                pass
            proc.wait()
        import shutil

        for _, temp, _ in self.nodes:
            shutil.rmtree(temp, ignore_errors=True)


def can_hide_folders() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One node, 2 CPUs and 2 logical GPUs; workers keep kernels in a per-node cache folder of this test."""
    root = tmp_path_factory.mktemp("ray-cluster")
    c = Cluster(root)
    c.kernel_cache = root / "kernel-cache"
    try:
        c.head(cpus=2, gpus=2, env=_env(HYBRIDLORA_KERNEL_CACHE=str(c.kernel_cache)))
        yield c
    finally:
        c.stop()


def mini(tmp_path: Path, out: str = "study", **changes) -> dict:
    """One tiny model, its base evaluation and the given placements; 2-4 items per benchmark."""
    data = {
        "name": "mini", "output": str(tmp_path / out), "data_dir": "builtin:demo",
        "models": [{"model": "qwen3.5-0.8b", "tiny": True, "label": "q"}],
        "placements": ["attention_only"],
        "domains": [{"name": "gsm8k", "max_examples": 16, "val_examples": 4}],
        "train": {"epochs": 1, "micro_batch_size": 4, "grad_accum": 2, "max_length": 128, "save_every": 1},
        "eval": {"benchmarks": {"mmlu": 4, "arc_challenge": 4, "hellaswag": 3, "gsm8k": 2, "humaneval": 2},
                 "batch_size": 4, "max_length": 256, "max_new_tokens": 8, "allow_code_execution": True},
    }
    data.update(changes)
    return data


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(yaml.safe_dump(data))
    return cfg


class Driver:
    """``hybridlora study`` (or the command ``argv`` gives) as a child process; its stderr lines collected as they
    come."""

    def __init__(self, tmp_path: Path, cfg: Path | str | None, *args: str, env: dict | None = None,
                 argv: list[str] | None = None):
        argv = argv or ["study", str(cfg), "--quiet", "--no-report", *args]
        self.proc = subprocess.Popen([sys.executable, "-m", "hybridlora.cli", *argv], cwd=tmp_path, env=env or _env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),
                                        daemon=True)
        self._reader.start()

    def wait_for_line(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            assert self.proc.poll() is None, (self.proc.returncode, "".join(self.lines)[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} in {timeout} s: {''.join(self.lines)[-3000:]}")

    def finish(self, timeout: float = 400) -> tuple[int, str, str]:
        out = self.proc.stdout.read()  # not communicate(): that would also read stderr, which the reader owns
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode, out, "".join(self.lines)


def _db(study: Path) -> dict:
    db = sqlite3.connect(study / "study.db")
    try:
        return {"integrity": db.execute("PRAGMA integrity_check").fetchone()[0],
                "jobs": {r[0]: {"kind": r[1], "status": r[2], "attempts": r[3], "error": r[4]} for r in db.execute(
                    "SELECT id, kind, status, attempts, error FROM jobs")},
                "metrics": sorted(db.execute("SELECT job_id, benchmark, n, correct, accuracy FROM metrics")),
                "summaries": {(j, b): _untimed(json.loads(s.replace(str(study), "<study>"))) for j, b, s in
                              db.execute("SELECT job_id, benchmark, summary FROM metrics")},
                "instances": sorted(db.execute("SELECT * FROM instances")),
                "train_log": sorted((j, s, e, json.dumps(_untimed(json.loads(d)), sort_keys=True))
                                    for j, s, e, d in db.execute("SELECT * FROM train_log")),
                "per_job": {r[0]: r[1] for r in db.execute(
                    "SELECT job_id, count(*) FROM instances GROUP BY job_id")}}
    finally:
        db.close()


def _untimed(value):
    """A record without its speed fields (seconds and rates differ between any two runs)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING_KEYS}
    return value


def _worker_infos(study: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (study / "runs").glob("*/worker.json")}


def _csv_tables(report: Path) -> dict[str, list[dict]]:
    return {p.name: [_untimed(r) for r in csv.DictReader(p.open())] for p in sorted((report / "tables").glob("*.csv"))}


# ------------------------------------------------------------------ results, GPUs, artifacts
def test_ray_study_equals_local_and_each_task_gets_its_own_gpu(tmp_path, cluster):
    data = mini(tmp_path, placements=["attention_only", "all"])
    driver = Driver(tmp_path, _write(tmp_path, data), "--backend", "ray", "--address", cluster.address)
    rc, out, err = driver.finish()
    assert rc == 0, err
    assert "3/3 jobs complete, 3 run now" in out
    assert len(re.findall(r"started .* on \S+ \(.*\), GPUs [01], pid \d+", err)) == 3, err  # where each job runs

    # The same study on the local backend (this process): identical tables.
    local = study_config_from_dict(mini(tmp_path, out="local", placements=["attention_only", "all"]))
    from hybridlora.study import run_study

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task (1 CPU): the same float summation order
    try:
        assert not run_study(local, progress=False).failed
    finally:
        torch.set_num_threads(threads)
    ray_db, local_db = _db(tmp_path / "study"), _db(tmp_path / "local")
    assert ray_db["integrity"] == "ok" and {j["status"] for j in ray_db["jobs"].values()} == {"complete"}
    for key in ("metrics", "summaries", "instances", "train_log"):
        assert ray_db[key] == local_db[key], key
    assert main(["report", str(tmp_path / "study")]) == 0
    ray_tables, local_tables = _csv_tables(tmp_path / "study" / "report"), _csv_tables(tmp_path / "local" / "report")
    assert ray_tables and ray_tables == local_tables

    # Each task ran in its own fresh process with its own GPU: concurrent tasks never shared a device.
    infos = _worker_infos(tmp_path / "study")
    assert len(infos) == 3 and len({i["where"]["pid"] for i in infos.values()}) == 3
    for info in infos.values():
        where = info["where"]
        assert len(where["gpu_ids"]) == 1 and where["cuda_visible_devices"] == where["gpu_ids"][0]
        assert info["kernel_caches"]["TRITON_CACHE_DIR"] == str(cluster.kernel_cache / "triton")
        assert info["kernel_caches"]["TORCHINDUCTOR_CACHE_DIR"] == str(cluster.kernel_cache / "inductor")
    spans = [(i["timing"]["task_start"], i["timing"]["task_end"], i["where"]["cuda_visible_devices"])
             for i in infos.values()]
    overlapping = [(a, b) for n, a in enumerate(spans) for b in spans[n + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, spans  # two GPUs, three jobs submitted at once: two ran side by side
    assert all(a[2] != b[2] for a, b in overlapping), spans
    # Artifacts came back: the adapter of every train job, the evaluation records of every job.
    for job_id, job in ray_db["jobs"].items():
        run = tmp_path / "study" / "runs" / job_id
        assert (run / "eval" / "mmlu.jsonl").is_file()
        assert job["kind"] != "train" or (run / "train" / "adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------ faults
def test_job_that_raises_is_retried_then_recorded_failed(tmp_path, cluster):
    bad = tmp_path / "broken.jsonl"
    bad.write_text("this is not JSON\n")
    data = mini(tmp_path, domains=[{"name": str(bad), "max_examples": 8}])
    driver = Driver(tmp_path, _write(tmp_path, data), "--backend", "ray", "--address", cluster.address,
                    "--retries", "1")
    rc, out, err = driver.finish()
    assert rc == 1, err
    assert "1/2 jobs complete" in out
    assert re.search(r"FAILED q · attention_only · broken · seed 3407 on \S+: .*\(retry 1 of 1\)", err), err
    facts = _db(tmp_path / "study")
    train = next(j for j in facts["jobs"].values() if j["kind"] == "train")
    assert train["status"] == "failed" and train["attempts"] == 2 and train["error"]
    assert "No such file" not in train["error"]  # the file reached the worker; its content is what failed
    assert facts["integrity"] == "ok"


def boom(spec, study_dir, out, progress=True):
    """A job kind that always raises (registered by the local retry test)."""
    raise ValueError(f"deliberate failure of {spec['name']}")


def test_local_backend_retries_a_job_that_raises(tmp_path, monkeypatch):
    monkeypatch.setitem(jobs_module.JOB_KINDS, "boom", f"{__name__}:boom")
    job = Job("boom-1", "boom", "m", "p", "d", 1, {"kind": "boom", "name": "boom-1"})
    store = Store(tmp_path)
    store.register([job])
    store.close()
    run = run_jobs(tmp_path, [job], progress=False, backend=Backend(retries=2))
    assert run.failed == {"boom-1": "ValueError: deliberate failure of boom-1"}
    store = Store(tmp_path)
    row = store.jobs()[0]
    store.close()
    assert row["status"] == "failed" and row["attempts"] == 3


def fails_once_per_marker(spec, study_dir, out, progress=True):
    """A job kind (registered by the kept-process test) that raises on its first attempt (its marker file does
    not exist yet) and succeeds later; the file holds the pid of the process that failed."""
    marker = Path(spec["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        raise ValueError("deliberate first failure")
    return {"summaries": {}, "records": [], "artifact_dir": f"runs/{Path(out).name}", "wall_s": 0.0}


def test_a_kept_process_whose_job_raised_is_replaced_for_the_retry(tmp_path, cluster, monkeypatch):
    monkeypatch.setitem(jobs_module.JOB_KINDS, "fails_once", f"{__name__}:fails_once_per_marker")
    monkeypatch.setitem(jobs_module.JOB_KEEPS_PROCESS, "fails_once", True)
    # The workers import this module: the driver forwards its PYTHONPATH to them.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))
    job = Job("fails-once-1", "fails_once", "m", "p", "d", 1, {"kind": "fails_once", "name": "f",
                                                                "marker": str(tmp_path / "failed_in")})
    store = Store(tmp_path / "study")
    store.register([job])
    store.close()
    run = run_jobs(tmp_path / "study", [job], progress=False,
                   backend=Backend(name="ray", address=cluster.address, retries=1))
    assert not run.failed and run.ran == ["fails-once-1"]
    failed_pid = int((tmp_path / "failed_in").read_text())
    info = _worker_infos(tmp_path / "study")["fails-once-1"]
    assert info["where"]["pid"] != failed_pid  # the retry ran in a new process, not the one whose job raised
    assert info["timing"]["jobs_before_in_process"] == 0


def _longer_training(tmp_path: Path) -> dict:
    """48 optimizer steps, a checkpoint after each: on a quiet machine several seconds of training remain after
    the first checkpoint reached the driver (the worker streams them every second), so a kill lands mid-job."""
    return mini(tmp_path, placements=["all"], domains=[{"name": "gsm8k", "max_examples": 96, "val_examples": 4}],
                train={"epochs": 4, "micro_batch_size": 4, "grad_accum": 2, "max_length": 128, "save_every": 1},
                eval={"benchmarks": {"mmlu": 2, "gsm8k": 2}, "batch_size": 4, "max_new_tokens": 4})


def _wait_for_checkpoint(study: Path, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list((study / "runs").glob("train-*/train/checkpoints/step-*/trainer_state.pt"))
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError("no checkpoint reached the driver")


def test_worker_killed_mid_training_is_rerun_from_the_checkpoint_that_reached_the_driver(tmp_path, cluster):
    data = _longer_training(tmp_path)
    driver = Driver(tmp_path, _write(tmp_path, data), "--backend", "ray", "--address", cluster.address)
    pid = int(driver.wait_for_line(r"started q · all · gsm8k · seed 3407 .* pid (\d+)").group(1))
    _wait_for_checkpoint(tmp_path / "study")  # streamed back by the worker, written by the driver
    os.kill(pid, signal.SIGKILL)
    rc, out, err = driver.finish()
    assert rc == 0, err
    assert re.search(r"LOST q · all .*worker lost .*rerunning from checkpoint step-\d+", err), err
    assert re.search(r"started q · all .* pid (?!%d\b)\d+, resuming from checkpoint step-\d+" % pid, err), err
    facts = _db(tmp_path / "study")
    assert facts["integrity"] == "ok" and {j["status"] for j in facts["jobs"].values()} == {"complete"}
    train_id, train = next((k, j) for k, j in facts["jobs"].items() if j["kind"] == "train")
    assert train["attempts"] == 2
    log = (tmp_path / "study" / "runs" / train_id / "train" / "train_log.jsonl").read_text()
    assert '"event": "resume"' in log  # continued from the checkpoint instead of starting over
    assert set(facts["per_job"].values()) == {4}  # every cell's instances recorded exactly once


def test_driver_killed_at_several_points_then_rerun_finishes_every_cell_once(tmp_path, cluster):
    data = _longer_training(tmp_path)
    cfg = _write(tmp_path, data)
    args = ("--backend", "ray", "--address", cluster.address)
    study = tmp_path / "study"
    # 1. kill -9 while the train job is mid-training (a checkpoint already reached the driver).
    first = Driver(tmp_path, cfg, *args)
    _wait_for_checkpoint(study)
    first.proc.kill()
    first.finish()
    # 2.-3. the driver dies just before, then just after, recording a finished job.
    for point in ("before_complete", "after_complete"):
        rc, _, err = Driver(tmp_path, cfg, *args, env=_env(HYBRIDLORA_TEST_CRASH=point)).finish()
        assert rc == 137, err
    rc, out, err = Driver(tmp_path, cfg, *args).finish()
    assert rc == 0, err
    assert "2/2 jobs complete" in out
    facts = _db(study)
    assert facts["integrity"] == "ok" and {j["status"] for j in facts["jobs"].values()} == {"complete"}
    assert set(facts["per_job"].values()) == {4}
    assert len(facts["metrics"]) == 2 * 2  # two jobs × two benchmarks, no duplicates
    train_id = next(k for k, j in facts["jobs"].items() if j["kind"] == "train")
    log = [json.loads(x) for x in (study / "runs" / train_id / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("end") == 1


# ------------------------------------------------------------------ two nodes, no shared study directory
def test_two_node_cluster_runs_the_demo_on_a_node_that_cannot_see_the_study(tmp_path):
    hide = can_hide_folders()
    c = Cluster(tmp_path / "cluster")
    (tmp_path / "cluster").mkdir()
    node_cwd = Path(f"/tmp/hlnode-{uuid.uuid4().hex[:8]}")  # outside the test's folder, which it cannot see
    try:
        c.head(cpus=0, gpus=0)  # the driver's node runs no task: every job goes to the second node
        c.add_node(cpus=2, gpus=1, cwd=node_cwd, hide=tmp_path if hide else None)
        # The demo preset, trimmed to one model's base job and one fine-tune, to keep the test's time down.
        rc, out, err = Driver(tmp_path, "demo", "--output", str(tmp_path / "study"), "--only",
                              "model=demo-sequential,placement=attention_only,domain=syn_first,seed=3407",
                              "--backend", "ray", "--address", c.address).finish()
    finally:
        c.stop()
        import shutil

        shutil.rmtree(node_cwd, ignore_errors=True)
    assert rc == 0, err
    assert "2/2 jobs complete" in out
    facts = _db(tmp_path / "study")
    assert facts["integrity"] == "ok" and {j["status"] for j in facts["jobs"].values()} == {"complete"}
    infos = _worker_infos(tmp_path / "study")
    assert len(infos) == 2
    for job_id, info in infos.items():
        where = info["where"]
        assert where["cwd"] != str(tmp_path) and not where["work_dir"].startswith(str(tmp_path))
        assert where["gpu_ids"] == ["0"]
        if hide:  # the worker's node saw an empty folder where the study is: it cannot have touched it
            assert where["saw_study_dir"] is False
    train_id = next(k for k, j in facts["jobs"].items() if j["kind"] == "train")
    assert (tmp_path / "study" / "runs" / train_id / "train" / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ ablation conditions
def _ablate(tmp_path: Path, data_dir: Path, out: str, *extra: str) -> list[str]:
    """``hybridlora ablate`` of the tiny Qwen3.5's groups: 6 conditions, two benchmarks, a short text."""
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text((Path(data_dir) / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:3000])
    return ["ablate", "qwen3.5-0.8b", "--tiny", "--data-dir", str(data_dir), "--text", str(text), "--window", "128",
            "--reference-windows", "2", "--benchmarks", "arc_challenge,gsm8k", "--limit", "3",
            "--max-new-tokens", "8", "--output", str(tmp_path / out), "--quiet", "--format", "json", *extra]


def _lines(out: str, *, with_job: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if not with_job:  # sharing changes the job ids (the spec holds the group size), not the numbers
        rows = [{k: v for k, v in r.items() if k != "job"} for r in rows]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def test_ray_ablation_keeps_its_processes_shares_groups_and_equals_local(tmp_path, cluster, data_dir):
    ray_args = ("--backend", "ray", "--address", cluster.address)
    rc, ray_out, err = Driver(tmp_path, None, argv=_ablate(tmp_path, data_dir, "ray", *ray_args)).finish()
    assert rc == 0, err
    rc, local_out, err = Driver(tmp_path, None, argv=_ablate(tmp_path, data_dir, "local")).finish()
    assert rc == 0, err
    rc, shared_out, err = Driver(tmp_path, None, argv=_ablate(tmp_path, data_dir, "shared", *ray_args,
                                                               "--conditions-per-batch", "2")).finish()
    assert rc == 0, err
    assert len(_lines(ray_out)) == 6 and _lines(ray_out) == _lines(local_out)
    assert _lines(shared_out, with_job=False) == _lines(local_out, with_job=False)
    ray_db, local_db = _db(tmp_path / "ray"), _db(tmp_path / "local")
    assert ray_db["integrity"] == "ok" and {j["status"] for j in ray_db["jobs"].values()} == {"complete"}
    for key in ("metrics", "summaries", "instances"):  # the per-instance records too (perplexity windows, items)
        assert ray_db[key] == local_db[key], key

    # The conditions ran one after another in kept processes (two GPUs: at most two), each on one GPU for life.
    infos = _worker_infos(tmp_path / "ray")
    by_pid: dict[int, list] = {}
    for info in infos.values():
        by_pid.setdefault(info["where"]["pid"], []).append(info)
    assert len(infos) == 6 and len(by_pid) <= 2, by_pid.keys()
    assert sorted(i["timing"]["jobs_before_in_process"] for i in infos.values()) != [0] * 6
    for runs in by_pid.values():
        assert len({tuple(i["where"]["gpu_ids"]) for i in runs}) == 1
        assert sorted(i["timing"]["jobs_before_in_process"] for i in runs) == list(range(len(runs)))
    # With --conditions-per-batch 2 each task ran a group of two.
    shared = _worker_infos(tmp_path / "shared")
    assert len(shared) == 6 and {i["timing"]["group_size"] for i in shared.values()} == {2}


def test_kept_process_that_dies_mid_condition_is_replaced_and_every_condition_recorded_once(tmp_path, cluster,
                                                                                            data_dir):
    marker = tmp_path / "crashed"
    env = _env(HYBRIDLORA_TEST_CRASH_ONCE=f"evaluated:{marker}")  # forwarded to the workers by the driver
    driver = Driver(tmp_path, None, env=env, argv=_ablate(tmp_path, data_dir, "abl", "--backend", "ray", "--address",
                                                          cluster.address))
    rc, out, err = driver.finish()
    assert rc == 0, err
    assert marker.exists()  # one process died at the point
    lost = re.findall(r"LOST (.*): worker lost", err)
    assert len(lost) == 1, err
    facts = _db(tmp_path / "abl")
    assert facts["integrity"] == "ok" and {j["status"] for j in facts["jobs"].values()} == {"complete"}
    assert sorted(j["attempts"] for j in facts["jobs"].values()) == [1] * 5 + [2]
    assert len(_lines(out)) == 6 and len(facts["per_job"]) == 6
    assert len(set(facts["per_job"].values())) == 1  # every condition's instances once: none recorded twice
    label = re.escape(lost[0])
    pids = re.findall(rf"started {label} \[.*\] on .* pid (\d+)", err)
    assert len(pids) == 2 and pids[0] != pids[1], err  # rerun in a new process


def test_two_node_ablation_ships_its_data_and_texts_to_a_node_that_cannot_see_them(tmp_path, data_dir):
    import shutil

    hide = can_hide_folders()
    data = tmp_path / "data"  # inside the folder the node cannot see: the benchmark and the texts must travel
    shutil.copytree(Path(data_dir) / "arc", data / "arc")
    shutil.copytree(Path(data_dir) / "wikitext-2", data / "wikitext-2")
    c = Cluster(tmp_path / "cluster")
    (tmp_path / "cluster").mkdir()
    node_cwd = Path(f"/tmp/hlnode-{uuid.uuid4().hex[:8]}")
    try:
        c.head(cpus=0, gpus=0)  # every condition runs on the second node
        c.add_node(cpus=1, gpus=1, cwd=node_cwd, hide=tmp_path if hide else None)
        argv = ["ablate", "qwen3.5-0.8b", "--tiny", "--data-dir", str(data), "--window", "128", "--limit", "2",
                "--reference-windows", "2", "--benchmarks", "arc_challenge", "--remove", "softmax_attention",
                "--method", "mean", "--output", str(tmp_path / "abl"), "--quiet", "--format", "json",
                "--backend", "ray", "--address", c.address]
        rc, out, err = Driver(tmp_path, None, argv=argv).finish()
    finally:
        c.stop()
        shutil.rmtree(node_cwd, ignore_errors=True)
    assert rc == 0, err
    rows = _lines(out)
    assert sorted(r["method"] for r in rows) == ["mean", "none"]
    for row in rows:  # the default texts (WikiText-2 test, valid for the means) were read on the node
        assert row["metrics"]["perplexity"]["tokens"] > 0 and row["metrics"]["arc_challenge"]["n"] == 2
    infos = _worker_infos(tmp_path / "abl")
    assert len(infos) == 2 and len({i["where"]["pid"] for i in infos.values()}) == 1  # one kept process
    if hide:
        assert all(i["where"]["saw_study_dir"] is False for i in infos.values())


# ------------------------------------------------------------------ config and errors
def test_backend_key_in_the_config_changes_no_job_id(tmp_path):
    plain = [j.id for j in expand_grid(study_config_from_dict(mini(tmp_path)))]
    for backend in ("ray", {"name": "ray", "address": "auto", "gpus_per_job": 2, "retries": 3}):
        config = study_config_from_dict(mini(tmp_path, backend=backend))
        assert config.backend.name == "ray"
        assert [j.id for j in expand_grid(config)] == plain


def test_unreachable_cluster_is_one_error_line(tmp_path):
    cfg = _write(tmp_path, mini(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "hybridlora.cli", "study", str(cfg), "--backend", "ray",
                           "--address", f"127.0.0.1:{_free_port()}"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot reach a Ray cluster at 127.0.0.1:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "study").exists()  # nothing written before the check


def test_ray_not_installed_is_one_error_line(tmp_path):
    cfg = _write(tmp_path, mini(tmp_path))
    code = ("import sys; sys.modules['ray'] = None; from hybridlora.cli import main; "
            f"sys.exit(main(['study', {str(cfg)!r}, '--backend', 'ray']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("error: --backend ray needs Ray, which is not installed here: pip install "
                           "'hybridlora[ray]' (or pip install ray)\n")


def test_local_backend_rejects_ray_only_options(tmp_path, capsys):
    cfg = _write(tmp_path, mini(tmp_path))
    assert main(["study", str(cfg), "--address", "auto"]) == 2
    assert "add --backend ray" in capsys.readouterr().err
