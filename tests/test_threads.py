"""Threads per process: usable cores shared by the live hybridlora processes, with overrides (issue 16, §1)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hybridlora import threads


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """A private process registry, no thread variables set, and this process not yet registered."""
    monkeypatch.setenv(threads.REGISTRY_ENV, str(tmp_path / "processes"))
    for name in (threads.THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "other_load", lambda: 0.0)  # an idle machine unless a test says otherwise
    threads.unregister_process()
    saved = torch.get_num_threads()
    yield tmp_path / "processes"
    threads.unregister_process()
    torch.set_num_threads(saved)


@pytest.fixture()
def other_runner(registry):
    """A second live process registered as a hybridlora process on the same cores."""
    code = ("import os, sys, time; os.environ['HYBRIDLORA_PROCESS_DIR'] = sys.argv[1]; "
            "from hybridlora import threads; threads.register_process(); print('ready', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(registry)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("cores, processes, expected", [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 3, 5), (1, 1, 1)])
def test_an_equal_share_of_the_cores_and_never_zero(cores, processes, expected):
    assert threads.threads_for(cores, processes) == expected


@pytest.mark.parametrize("cores, processes, load, expected", [(2, 1, 10.0, 1), (2, 1, 0.4, 2), (16, 2, 4.0, 8),
                                                                (16, 1, 12.4, 4), (16, 1, 40.0, 1)])
def test_cores_that_other_work_keeps_busy_are_left_alone(cores, processes, load, expected):
    assert threads.threads_for(cores, processes, load) == expected


def test_a_busy_machine_gets_one_thread(registry, monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "other_load", lambda: 9.6)
    choice = threads.configure()
    assert choice.threads == 1 and "other load 9.6" in choice.describe()


def test_two_runners_on_two_cores_take_one_thread_each(registry, other_runner, monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    choice = threads.configure()
    assert (choice.threads, choice.processes, choice.source) == (1, 2, "auto")
    assert torch.get_num_threads() == 1
    assert "1 (2 usable cores shared by 2 hybridlora processes" in choice.describe()
    assert threads.current() == choice.describe()


def test_a_runner_that_stops_gives_its_share_back(registry, other_runner, monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.configure().threads == 1
    other_runner.kill()
    other_runner.wait()
    changed = threads.rebalance()  # what the study runner does between jobs
    assert changed is not None and changed.threads == 2 and torch.get_num_threads() == 2
    assert [p.name for p in registry.iterdir()] == [str(__import__("os").getpid())]  # the dead entry is gone


def test_the_option_then_the_variables_override_the_automatic_choice(registry, other_runner, monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose().threads == 3 and threads.choose().source == "$OMP_NUM_THREADS"
    monkeypatch.setenv(threads.THREADS_ENV, "4")
    assert threads.choose().threads == 4
    assert threads.choose(5).threads == 5 and threads.choose(5).source == "--threads"
    threads.configure(5)
    assert threads.rebalance() is None  # a fixed number is kept between jobs


@pytest.mark.parametrize("value", [0, -2, "x", "1e3", 100000])
def test_bad_thread_counts_are_refused(registry, value):
    with pytest.raises(ValueError, match="whole number of threads"):
        threads.choose(value)


def test_cores_come_from_the_affinity_mask():
    import os

    assert 1 <= threads.usable_cores() <= len(os.sched_getaffinity(0))
