"""The architecture lab, stage 3: probe generators (answers right by construction, seeds reproducible), the
probe runner, summaries and the CLI."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from hybridlora.cli import main
from hybridlora.lab.probes import (PROBE_MODULES, Settings, generate, probe_spec, run_probe, run_suite, summarize,
                                   task_args)
from hybridlora.lab.probes.base import IGNORE
from hybridlora.lab.spec import spec_from_dict

SMALL = Settings(name="test", train_examples=48, test_examples=16, epochs=1, batch_size=16, depth=2,
                 target_params=30_000, scale=0.25)


@pytest.mark.parametrize("name", PROBE_MODULES)
def test_generators_are_reproducible_per_seed_and_split(name):
    a = generate(name, 7, "train", 20, SMALL)
    b = generate(name, 7, "train", 20, SMALL)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, generate(name, 8, "train", 20, SMALL).inputs)
    assert not torch.equal(a.inputs, generate(name, 7, "test", 20, SMALL).inputs)
    assert a.answers > 0 and int(a.inputs.max()) < a.vocab_size and int(a.inputs.min()) >= 0


def _pairs_consistent(tokens, labels, is_key):
    """Every labelled token is the value that its (single-token) key got at its first showing."""
    first_value = {}
    for t in range(1, len(tokens)):
        if is_key(tokens[t - 1]) and not is_key(tokens[t]):
            key, value = tokens[t - 1], tokens[t]
            if labels[t] != IGNORE:
                assert key in first_value and first_value[key] == value == labels[t]
            else:
                assert key not in first_value  # only a first showing is left unlabelled
            first_value.setdefault(key, value)


@pytest.mark.parametrize("name", ["in_context_recall", "noisy_recall"])
def test_recall_answers_are_the_values_shown_before(name):
    data = generate(name, 1, "train", 30, SMALL)
    args = task_args(name, SMALL)
    content = args["vocab_size"] - args.get("noise_vocab_size", 0)
    for tokens, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        _pairs_consistent(tokens, labels, lambda tok: tok < content // 2)
        if name == "noisy_recall":
            assert all(lab == IGNORE for tok, lab in zip(tokens, labels) if tok >= content)


def test_fuzzy_recall_answers_are_whole_value_motifs_of_repeated_keys():
    data = generate("fuzzy_recall", 2, "train", 30, SMALL)
    half = (task_args("fuzzy_recall", SMALL)["vocab_size"] - 1) // 2
    for tokens, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        runs, current = [], []
        for t, tok in enumerate(tokens):  # split into alternating key / value runs by token range (0 pads)
            kind = "pad" if tok == 0 else ("key" if tok <= half else "value")
            if current and current[0][0] != kind:
                runs.append(current)
                current = []
            current.append((kind, t, tok))
        runs.append(current)
        seen = {}
        for key_run, value_run in zip(runs[::2], runs[1::2]):
            if key_run[0][0] == "pad" or value_run[0][0] == "pad":
                break
            key, value = tuple(x[2] for x in key_run), tuple(x[2] for x in value_run)
            labelled = [labels[x[1]] for x in value_run]
            if key in seen:
                assert seen[key] == value and labelled == list(value)
            else:
                assert all(lab == IGNORE for lab in labelled)
            seen.setdefault(key, value)


def test_selective_copying_answers_are_the_content_tokens_in_order():
    data = generate("selective_copying", 3, "train", 20, SMALL)
    n = task_args("selective_copying", SMALL)["num_tokens_to_copy"]
    for tokens, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        context = tokens[:-n - 1]
        assert tokens[-n - 1] == 1  # the copy marker
        assert [x for x in context if x != 0] == labels[-n:] == tokens[-n:]
        assert all(lab == IGNORE for lab in labels[:-n])


def test_compression_labels_are_the_sequence_to_rebuild():
    data = generate("compression", 0, "train", 10, SMALL)
    assert torch.equal(data.labels[:, :-1], data.inputs[:, :-1]) and (data.inputs[:, -1] == 0).all()
    assert (data.inputs[:, :-1] > 0).all()


def test_memorization_train_and_test_share_one_table():
    table = {}
    for split in ("train", "test"):
        data = generate("memorization", 5, split, 40, SMALL)
        for tokens, labels in zip(data.inputs.tolist(), data.labels.tolist()):
            for t in range(1, len(tokens), 2):
                assert labels[t] == tokens[t]
                assert table.setdefault(tokens[t - 1], tokens[t]) == tokens[t]
    other = generate("memorization", 6, "train", 40, SMALL)
    assert any(table.get(k) not in (None, v) for k, v in zip(other.inputs[:, 0::2].flatten().tolist(),
                                                              other.inputs[:, 1::2].flatten().tolist()))


@pytest.mark.parametrize("factor", [1, 2, 8])
def test_mqar_and_long_context_queries_answer_with_the_pairs_values(factor):
    data = generate("long_context", 4, "test", 10, SMALL, factor=factor)
    args = task_args("long_context", SMALL)
    assert data.inputs.shape[1] == factor * args["seq_len"]  # the same pairs and queries, stretched by filler
    pairs = args["num_pairs"]
    for tokens, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        mapping = dict(zip(tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]))
        answered = [(tokens[t - 1], labels[t]) for t in range(len(tokens)) if labels[t] != IGNORE]
        assert len(answered) == pairs and all(mapping[k] == v for k, v in answered)
    mq = generate("mqar", 4, "train", 10, SMALL)
    assert mq.answers == 10 * task_args("mqar", SMALL)["seq_len"] // 4


def test_probe_architectures_stay_matched():
    spec = spec_from_dict({"name": "p", "mixers": ["attention", "gdn"], "ratio": "1:1"})
    from hybridlora.lab.solve import solve
    from hybridlora.lab.spec import variants

    for name in ("in_context_recall", "noisy_recall", "memorization", "long_context"):  # each vocabulary size
        sizes = [solve(probe_spec(v, name, SMALL))[1] for v in variants(spec).values()]
        assert all(abs(m.relative_error) <= 0.01 for m in sizes), name


def test_suite_runs_resumes_and_summarises(tmp_path):
    spec = spec_from_dict({"name": "p", "mixers": ["attention", "mamba2"], "ratio": "1:1"})
    specs = {"p": spec}
    records = run_suite(specs, ["memorization", "compression"], [0, 1], SMALL, tmp_path, progress=False)
    assert len(records) == 4 and all(r["params"] for r in records)
    again = run_suite(specs, ["memorization", "compression"], [0, 1], SMALL, tmp_path, progress=False)
    assert len(again) == 4 and len((tmp_path / "probes.jsonl").read_text().splitlines()) == 4  # nothing re-run
    rows = summarize(records)
    assert {r["probe"] for r in rows} == {"memorization", "compression"}
    for r in rows:
        lo, hi = r["wilson95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1 and r["seeds"] == [0, 1]


def test_suite_in_worker_processes_gives_the_records_of_one_process(tmp_path, monkeypatch):
    """--workers 2: the runs split over two processes give the same records as one process (each run seeded on
    its own), every run once; one thread everywhere, since a CPU sum over another thread count rounds otherwise."""
    monkeypatch.setenv("HYBRIDLORA_THREADS", "1")
    spec = spec_from_dict({"name": "p", "mixers": ["attention", "mamba2"], "ratio": "1:1"})
    probes, seeds = ["memorization", "compression"], [0, 1]
    one = run_suite({"p": spec}, probes, seeds, SMALL, tmp_path / "one", progress=False)
    two = run_suite({"p": spec}, probes, seeds, SMALL, tmp_path / "two", progress=False, workers=2)
    lines = (tmp_path / "two" / "probes.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(two) == 4

    def key(r):
        return r["probe"], r["seed"]

    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in sorted(one, key=key)]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in sorted(two, key=key)] == strip


def test_warm_up_runs_each_architecture_and_probe_once_and_leaves_the_records_alone(tmp_path, monkeypatch):
    """The warm-up before runner processes start (fresh GPUs autotune each kernel shape once, not in every worker):
    one short run per (architecture, probe), nothing written, the suite's records those of a suite without it."""
    import hybridlora.lab.probes as probes_pkg

    monkeypatch.setenv("HYBRIDLORA_THREADS", "1")
    spec = spec_from_dict({"name": "p", "mixers": ["attention", "mamba2"], "ratio": "1:1"})
    probes, seeds = ["memorization", "compression"], [0, 1]
    plain = run_suite({"p": spec}, probes, seeds, SMALL, tmp_path / "plain", progress=False)
    calls = []
    real = probes_pkg.run_probe

    def counted(spec_, name, seed, settings, device=None):
        calls.append((name, settings.train_examples, settings.epochs))
        return real(spec_, name, seed, settings, device)

    monkeypatch.setattr(probes_pkg, "run_probe", counted)
    warmed = run_suite({"p": spec}, probes, seeds, SMALL, tmp_path / "warm", progress=False, warm_up_steps=2)
    short = [c for c in calls if c[1] == 2 * SMALL.batch_size]
    assert sorted(c[0] for c in short) == sorted(probes) and all(c[2] == 1 for c in short)  # once per pair, brief
    assert len((tmp_path / "warm" / "probes.jsonl").read_text().splitlines()) == 4

    def key(r):
        return r["probe"], r["seed"]

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in sorted(rs, key=key)]

    assert strip(warmed) == strip(plain)
    calls.clear()
    run_suite({"p": spec}, probes, seeds, SMALL, tmp_path / "warm", progress=False, warm_up_steps=2)
    assert calls == []  # everything done: no warm-up either


class _CpuGraphs:
    """Stand-in for the CUDA calls of ``graphed.GraphedStep.capture`` on CPU: "capturing" runs the step once and
    a replay runs it again into the same loss tensor, as a graph replays its kernels into the same memory."""

    class _Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            self.run()

    current_stream = staticmethod(lambda device: _CpuGraphs._Stream())
    Stream = staticmethod(lambda device: _CpuGraphs._Stream())
    stream = staticmethod(lambda s: contextlib.nullcontext())
    set_stream = staticmethod(lambda s: None)
    get_rng_state = staticmethod(lambda device: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, device: torch.set_rng_state(state))
    synchronize = staticmethod(lambda device: None)
    release_generator = staticmethod(lambda device: None)

    @staticmethod
    def capture(graph, fn):
        out = fn()
        graph.run = lambda: out.copy_(fn())
        return out


class _BrokenGraphs(_CpuGraphs):
    @staticmethod
    def capture(graph, fn):  # a graph that replays nothing: stale loss, no gradients
        out = fn()
        graph.run = lambda: None
        return out


def _graph_records(monkeypatch, cuda, probe: str, settings: Settings):
    from hybridlora.lab.probes import graphed

    spec = spec_from_dict({"name": "g", "mixers": ["attention", "mamba2"], "ratio": "1:1"})
    eager = run_probe(spec, probe, 0, settings, device="cpu")  # CPU also on a GPU machine: the stand-in is for CPU
    monkeypatch.setattr(graphed, "wanted", lambda device: True)
    monkeypatch.setattr(graphed, "_cuda", cuda)
    return eager, run_probe(spec, probe, 0, settings, device="cpu")


@pytest.mark.parametrize("probe,examples", [("memorization", 48), ("compression", 40)])  # 40: a last batch of 8
def test_the_graphed_probe_step_trains_exactly_as_the_eager_one(monkeypatch, probe, examples):
    """The replayed step (inputs copied in, gradients zeroed and added into the same tensors, a smaller last batch
    run eagerly into them, a probe head's extra parameters) gives the eager run's record, loss curve included."""
    settings = Settings(name="g", train_examples=examples, test_examples=16, epochs=2, batch_size=16, depth=2,
                        target_params=30_000, scale=0.25)
    eager, graphed_run = _graph_records(monkeypatch, _CpuGraphs, probe, settings)
    assert eager["step"] == "eager" and graphed_run["step"] == "cuda graph"
    drop = ("seconds", "step")
    assert {k: v for k, v in graphed_run.items() if k not in drop} == {k: v for k, v in eager.items() if k not in drop}


def test_a_graph_that_disagrees_with_the_eager_step_is_not_used(monkeypatch):
    settings = Settings(name="g", train_examples=32, test_examples=16, epochs=1, batch_size=16, depth=2,
                        target_params=30_000, scale=0.25)
    with pytest.warns(UserWarning, match="CUDA graph of the probe's training step not used"):
        eager, fallback = _graph_records(monkeypatch, _BrokenGraphs, "memorization", settings)
    assert fallback["step"].startswith("eager: RuntimeError: the replayed step's")
    drop = ("seconds", "step")
    assert {k: v for k, v in fallback.items() if k not in drop} == {k: v for k, v in eager.items() if k not in drop}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shipped,variant", [("gpu-120m-gdn", "sequential"), ("gpu-120m-mamba2", "parallel")])
def test_on_cuda_the_probe_step_is_a_graph_and_trains_as_the_eager_step(monkeypatch, shipped, variant):
    """The real capture on the GPU, on the probe architectures of MAD's settings (fla's GDN and mamba-ssm's
    Mamba-2 kernels): the record says the graph ran, and its scores and losses are the eager run's (the same
    kernels; bf16 autocast, so within rounding)."""
    from hybridlora.lab.spec import load_spec, variants

    spec = variants(load_spec(shipped))[variant]
    settings = Settings(name="c", train_examples=64, test_examples=32, epochs=3, batch_size=16, depth=2,
                        target_params=450_000, scale=0.25)
    graphed_run = run_probe(spec, "mqar", 0, settings)
    monkeypatch.setenv("HYBRIDLORA_PROBE_GRAPHS", "0")
    eager = run_probe(spec, "mqar", 0, settings)
    assert graphed_run["step"] == "cuda graph" and eager["step"] == "eager"
    assert graphed_run["loss_first"] == pytest.approx(eager["loss_first"], rel=1e-2)
    assert graphed_run["loss_last"] == pytest.approx(eager["loss_last"], rel=5e-2, abs=1e-2)
    assert abs(graphed_run["scores"]["test"]["accuracy"] - eager["scores"]["test"]["accuracy"]) <= 0.05


def test_a_probe_learns_memorization_on_cpu():
    spec = spec_from_dict({"name": "m", "mixers": ["attention"]})
    record = run_probe(spec, "memorization", 0, Settings(name="t", epochs=6, train_examples=256, test_examples=64,
                                                         target_params=60_000, scale=0.25, lr=5e-3))
    assert record["loss_last"] < record["loss_first"] - 1.0
    assert record["scores"]["test"]["accuracy"] > 0.5  # chance is 1/128


def test_mads_settings_without_cuda_get_a_warning_with_the_workload():
    from hybridlora.lab.probes.cli import workload_note

    note = workload_note(32, Settings.mad(), cuda=False)
    assert note.startswith("warning: 32 runs of 20,000 training steps") and "--settings tiny" in note
    assert workload_note(32, Settings.mad(), cuda=True) is None
    assert workload_note(32, Settings.tiny(), cuda=False) is None


def test_probe_cli_bad_inputs(tmp_path, capsys):
    for extra in (["--probes", "nope"], ["--seeds", "a,b"], ["--archs", "sideways"], ["--workers", "0"],
                  ["--warm-up-steps", "-1"]):
        assert main(["lab", "probe", "tiny-gdn", "--output", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_the_seed_interval_of_an_accuracy_stays_within_0_and_1():
    def record(seed, correct):
        return {"arch": "a", "probe": "p", "seed": seed, "scores": {"test": {"correct": correct, "answers": 100,
                                                                              "accuracy": correct / 100}}}

    row, = summarize([record(0, 0), record(1, 50)])  # mean 0.25, t interval about [-2.9, 3.4] unclipped
    assert row["seed_mean"] == pytest.approx(0.25)
    assert row["seed_t95"] == [0.0, 1.0]
    one, = summarize([record(0, 30)])
    assert all(math.isnan(v) for v in one["seed_t95"])  # one seed: no interval, not a made-up one


def test_several_runs_share_a_gpu_by_default_and_one_runs_on_cpu(monkeypatch):
    from hybridlora import threads
    from hybridlora.lab.probes import cli as probe_cli

    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    assert probe_cli.default_workers(cuda=True) == probe_cli.GPU_WORKERS == 8
    assert probe_cli.default_workers(cuda=False) == 1
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    assert probe_cli.default_workers(cuda=True) == 3  # a worker launches from a core of its own
