"""Small models on a machine without a GPU: a long run takes one single-threaded runner per spare core."""
from __future__ import annotations

import pytest
import torch

from hybridlora import threads
from hybridlora.study import backends
from hybridlora.study.backends import LOCAL, Backend, small_cpu_runners


@pytest.fixture
def two_idle_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(threads, "spare_cores", lambda: 2)
    monkeypatch.setattr(threads, "explicit_threads", lambda: None)
    monkeypatch.pinned = []
    monkeypatch.setattr(threads, "pin", lambda n, reason: monkeypatch.pinned.append(n))  # not this test process
    return monkeypatch


def test_long_runs_of_small_models_spread_over_the_spare_cores(two_idle_cores, capsys):
    chosen = small_cpu_runners(LOCAL, 37, small=True, what="removals")
    assert chosen.workers_per_gpu == 2 and "2 runner processes" in capsys.readouterr().err
    assert two_idle_cores.pinned == [1]  # one thread each: the same results with one runner or four
    assert small_cpu_runners(LOCAL, 26, small=True, what="cells", say=False).workers_per_gpu == 2
    assert capsys.readouterr().err == ""  # --quiet: nothing said


def test_one_runner_where_the_split_would_not_pay_or_the_user_chose(two_idle_cores):
    assert small_cpu_runners(LOCAL, backends.SMALL_CPU_RUNNERS_FROM - 1, small=True, what="x") is LOCAL
    assert two_idle_cores.pinned == [1]  # one runner, still one thread: results independent of the load
    assert small_cpu_runners(LOCAL, 37, small=False, what="x") is LOCAL  # full-size models: memory per runner
    assert two_idle_cores.pinned == [1]  # ... and their threads are the automatic choice
    mine = Backend(workers_per_gpu=1)
    assert small_cpu_runners(mine, 37, small=True, what="x") is mine  # the user's --workers-per-gpu stands
    assert small_cpu_runners(None, 37, small=True, what="x") is None  # --dry-run
    two_idle_cores.setattr(threads, "explicit_threads", lambda: 1)
    assert small_cpu_runners(LOCAL, 37, small=True, what="x") is LOCAL  # so do --threads / $OMP_NUM_THREADS
    two_idle_cores.setattr(threads, "explicit_threads", lambda: None)
    two_idle_cores.setattr(threads, "spare_cores", lambda: 1)
    assert small_cpu_runners(LOCAL, 37, small=True, what="x") is LOCAL  # a busy machine: one runner
    two_idle_cores.setattr(torch.cuda, "is_available", lambda: True)
    two_idle_cores.setattr(threads, "spare_cores", lambda: 8)
    assert small_cpu_runners(LOCAL, 37, small=True, what="x") is LOCAL  # a GPU machine keeps its own choice


def test_jobs_left_counts_what_a_study_directory_has_not_completed(tmp_path):
    from hybridlora.study.grid import Job
    from hybridlora.study.store import Store

    assert backends.jobs_left(tmp_path / "new", ["a", "b"]) == 2  # nothing there yet: every job is left
    store = Store(tmp_path)
    jobs = [Job(f"j{i}", "train", "m", "p", "d", 0, {}) for i in range(3)]
    store.register(jobs, {})
    job = store.claim("me")
    assert store.complete(job.id, "me", {"summaries": {}, "records": []})
    store.close()
    assert backends.jobs_left(tmp_path, [j.id for j in jobs]) == 2
    assert backends.jobs_left(tmp_path, [j.id for j in jobs] + ["not-registered-yet"]) == 3


def test_pin_fixes_the_threads_until_the_next_configure():
    before = threads.configure(None)
    explicit_before = threads.explicit_threads()  # the test run may fix threads through the environment
    try:
        choice = threads.pin(1, "test")
        assert choice.threads == 1 == torch.get_num_threads() and threads.explicit_threads() == 1
        assert threads.rebalance() is None  # no re-balancing between jobs
    finally:
        threads.configure(None)
    assert threads.explicit_threads() == explicit_before and torch.get_num_threads() == before.threads


def test_spare_cores_trust_a_fresh_idle_sample_over_a_lagging_load_average(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "live_processes", lambda: 1)
    monkeypatch.setattr(threads, "other_load", lambda: 1.9)  # a run that just ended still weighs in the average
    monkeypatch.setattr(threads, "busy_cores_now", lambda sample_s=0.2: 0.0)
    assert threads.spare_cores() == 2
    monkeypatch.setattr(threads, "busy_cores_now", lambda sample_s=0.2: 1.0)  # and really busy now
    assert threads.spare_cores() == 1
    monkeypatch.setattr(threads, "busy_cores_now", lambda sample_s=0.2: None)  # no /proc: the load average
    assert threads.spare_cores() == 1


def test_busy_cores_now_is_a_share_of_the_usable_cores():
    busy = threads.busy_cores_now(0.05)
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= busy <= threads.usable_cores() + 1e-9
