"""The study: config validation, grid ids, demo data, runner + store (resume, crashes, concurrency)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hybridlora.cli import main
from hybridlora.study import Store, StudyConfigError, expand_grid, filter_jobs, load_study_config, parse_only
from hybridlora.study import jobs as jobs_module
from hybridlora.study import run_study
from hybridlora.study.config import study_config_from_dict
from hybridlora.study.demo_data import demo_files, fingerprint, write_demo_data

REPO = Path(__file__).resolve().parents[1]


def mini(tmp_path: Path, **changes) -> dict:
    """A study small enough for a test: two tiny families, two placements, one domain, 4 items per benchmark."""
    data = {
        "name": "mini", "output": str(tmp_path / "study"), "data_dir": "builtin:demo",
        "models": [{"model": "qwen3.5-0.8b", "tiny": True, "label": "q"},
                   {"model": "falcon-h1-0.5b", "tiny": True, "label": "f"}],
        "placements": ["attention_only", "all"],
        "domains": [{"name": "gsm8k", "max_examples": 16, "val_examples": 4}],
        "train": {"epochs": 1, "micro_batch_size": 4, "grad_accum": 2, "max_length": 128, "save_every": 1},
        "eval": {"benchmarks": {"mmlu": 4, "arc_challenge": 4, "hellaswag": 4, "gsm8k": 3, "humaneval": 2},
                 "batch_size": 4, "max_length": 256, "max_new_tokens": 8},
    }
    data.update(changes)
    return data


def expected_instances(data: dict) -> int:
    return sum(data["eval"]["benchmarks"].values())


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "colour: Extra inputs are not permitted"),
    ({"seeds": [1, 1]}, "seeds repeat"),
    ({"eval": {"benchmarks": ["mmlu", "trivia"]}}, "unknown benchmark(s) ['trivia']"),
    ({"placements": [{"preset": "a", "file": "b.yaml"}]}, "exactly one of preset, group or file"),
    ({"models": []}, "models: List should have at least 1 item"),
    ({"domains": [{"name": "gsm8k", "label": "base"}]}, "'base' is reserved"),
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
    ({"eval": {"benchmarks": {"mmlu": 0}}}, "eval.benchmarks.mmlu: Input should be greater than or equal to 1"),
])
def test_bad_configs_name_the_field(tmp_path, change, message):
    with pytest.raises(StudyConfigError) as err:
        study_config_from_dict(mini(tmp_path, **change), "x.yaml")
    assert message in str(err.value) and str(err.value).startswith("x.yaml: ")


def test_bad_config_file_and_unknown_preset_are_one_line_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [qwen3.5-0.8b\n")
    assert main(["study", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["study", "no-such-preset", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no such file and no such preset" in err and "demo" in err and err.count("\n") == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(mini(tmp_path, placements=["no_such_placement"])))
    assert main(["study", str(cfg), "--dry-run"]) == 2
    assert "unknown placement 'no_such_placement'" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"domains": ["nosuch"]}, "'nosuch' is neither a known domain"),
    ({"domains": ["missing.jsonl"]}, "'missing.jsonl' is neither a known domain"),
    ({"data_dir": "/nonexistent/data"}, "data_dir /nonexistent/data: no such folder"),
])
def test_data_problems_stop_the_study_before_any_work(tmp_path, capsys, change, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(mini(tmp_path, **change)))
    for extra in (["--dry-run"], []):
        assert main(["study", str(cfg), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_tiny_models_are_never_reported_under_the_real_checkpoint_name(tmp_path):
    data = mini(tmp_path)
    data["models"] = [{"model": "qwen3.5-0.8b", "tiny": True}]
    jobs = expand_grid(study_config_from_dict(data))
    assert {j.model for j in jobs} == {"qwen3.5-0.8b [tiny random]"}


def test_placement_budget_reference_must_exist(tmp_path):
    config = study_config_from_dict(mini(tmp_path, placements=[{"preset": "attention_only", "match_budget": "nope"}]))
    with pytest.raises(StudyConfigError, match="match_budget names 'nope'"):
        expand_grid(config)


# ------------------------------------------------------------------ grid
def test_paper_presets_expand_to_the_published_grid():
    paper = expand_grid(load_study_config("paper"))
    assert len(paper) == 2 + 2 * 6 * 3  # 2 base models + 2 models × 6 placements × 3 domains × 1 seed
    assert {j.placement for j in paper if j.model == "tiiuae/Falcon-H1-0.5B-Base"} == {
        "base", *(f"study/{n}" for n in ("all_eligible", "attention_only", "ssm_only", "mlp_only",
                                         "attention_plus_mlp", "ssm_plus_mlp"))}
    multi = expand_grid(load_study_config("paper-multiseed"))
    assert len(multi) == 2 + 36 * 3 and {j.seed for j in multi if j.kind == "train"} == {3407, 42, 1234}
    assert {j.id for j in paper} <= {j.id for j in multi}  # seed 3407 cells are the same jobs


def test_job_ids_are_deterministic_and_track_what_a_job_computes(tmp_path):
    a = expand_grid(study_config_from_dict(mini(tmp_path)))
    b = expand_grid(study_config_from_dict(mini(tmp_path)))
    assert [j.id for j in a] == [j.id for j in b] and len({j.id for j in a}) == len(a) == 2 + 2 * 2
    longer = expand_grid(study_config_from_dict(mini(tmp_path, train={"epochs": 2})))
    assert [j.id for j in longer if j.kind == "base"] == [j.id for j in a if j.kind == "base"]
    assert not {j.id for j in longer if j.kind == "train"} & {j.id for j in a if j.kind == "train"}
    other_eval = expand_grid(study_config_from_dict(mini(tmp_path, eval={"benchmarks": ["mmlu"]})))
    assert not {j.id for j in other_eval} & {j.id for j in a}


def test_only_filters_cells_and_keeps_their_base_models(tmp_path):
    jobs = expand_grid(study_config_from_dict(mini(tmp_path)))
    kept = filter_jobs(jobs, parse_only("model=f,placement=all"))
    assert [(j.kind, j.model, j.placement) for j in kept] == [("base", "f", "base"), ("train", "f", "all")]
    with pytest.raises(StudyConfigError, match="key=pattern"):
        parse_only("colour=red")
    with pytest.raises(StudyConfigError, match="matches no cell"):
        filter_jobs(jobs, parse_only("placement=zzz"))


def test_dry_run_prints_grid_and_cost_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(mini(tmp_path)))
    assert main(["study", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 jobs: 2 base evaluations + 4 fine-tuning runs" in out and "cost (6 jobs on tiny" in out
    assert "CPU-minutes" in out and "GPU-hours" not in out  # tiny models: no GPU estimate
    assert "73,088" in out and "8,192" in out  # trainable params resolved on the tiny Qwen3.5 architecture
    assert not (tmp_path / "study").exists()


def test_dry_run_catches_a_placement_that_matches_nothing_on_one_model(tmp_path, capsys):
    placement = tmp_path / "late.yaml"
    placement.write_text("name: late\ntargets:\n  - components: [softmax_attention]\n    layers: '3'\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(mini(tmp_path, placements=[{"file": str(placement)}])))
    assert main(["study", str(cfg), "--dry-run"]) == 2  # tiny Qwen3.5 has attention at layer 3, Falcon-H1 has 2 layers
    err = capsys.readouterr().err
    assert err.startswith("error: f: placement 'late' matches no eligible module") and err.count("\n") == 1
    assert main(["study", str(cfg)]) == 2 and not (tmp_path / "study").exists()  # a real run stops before writing


# ------------------------------------------------------------------ demo data
def test_demo_data_is_deterministic_and_its_humaneval_tests_pass(tmp_path):
    assert fingerprint(demo_files()) == fingerprint(demo_files())
    assert write_demo_data(tmp_path / "d") == write_demo_data(tmp_path / "d")
    import gzip

    tasks = [json.loads(line) for line in gzip.decompress(demo_files()["humaneval/HumanEval.jsonl.gz"]).splitlines()]
    for task in tasks:  # the generated canonical solution passes its own generated tests (plain exec: our code)
        scope: dict = {}
        exec(task["prompt"] + task["canonical_solution"] + "\n" + task["test"], scope)
        scope["check"](scope[task["entry_point"]])
        with pytest.raises(AssertionError):  # and the tests can fail
            scope["check"](lambda a, b: 10**6)


# ------------------------------------------------------------------ runner + store
def _run(tmp_path, **changes):
    return run_study(study_config_from_dict(mini(tmp_path, **changes)), progress=False, report=False)


def _db_facts(study_dir: Path, data: dict) -> dict:
    store = Store(study_dir)
    try:
        jobs = store.jobs()
        facts = {"integrity": store.integrity_ok(), "status": {j["status"] for j in jobs},
                 "attempts": {j["id"]: j["attempts"] for j in jobs},
                 "instances": {j["id"]: len(store.instances(j["id"])) for j in jobs}}
    finally:
        store.close()
    assert set(facts["instances"].values()) == {expected_instances(data)}, facts["instances"]
    return facts


def test_study_runs_every_cell_once_and_a_rerun_skips_them(tmp_path):
    data = mini(tmp_path)
    first = _run(tmp_path)
    assert len(first.ran) == 6 and not first.failed
    facts = _db_facts(tmp_path / "study", data)
    assert facts["integrity"] and facts["status"] == {"complete"} and set(facts["attempts"].values()) == {1}
    again = _run(tmp_path)
    assert again.ran == [] and again.counts["complete"] == 6
    store = Store(tmp_path / "study")
    try:
        train = [j for j in store.jobs() if j["kind"] == "train"]
        assert {j["placement"]: j["trainable_params"] for j in train if j["model"] == "q"} == {
            "attention_only": 8192, "all": 73088}  # equals `hybridlora plan` on the tiny Qwen3.5 config
        log = store.train_log(train[0]["id"])
        assert [r["step"] for r in log if r["event"] == "step"] == [1, 2]  # 16 examples / (4 × 2) per step
        assert any(r["event"] == "lora_norms" for r in log)
    finally:
        store.close()
    adapter = tmp_path / "study" / "runs" / train[0]["id"] / "train" / "adapter" / "adapter_config.json"
    assert adapter.is_file()
    # The report of the study, rebuilt by the CLI: every cell in tables/accuracy.csv, the demo warning on top.
    assert main(["report", str(tmp_path / "study")]) == 0
    report = tmp_path / "study" / "report"
    import csv

    rows = list(csv.DictReader((report / "tables" / "accuracy.csv").open()))
    assert len(rows) == 6 * 5 and {r["train_domain"] for r in rows} == {"base", "gsm8k"}
    assert {(r["model"], r["placement"]) for r in rows if r["train_domain"] == "base"} == {("q", "base"), ("f", "base")}
    store = Store(tmp_path / "study")
    base_q = next(j for j in store.jobs() if j["model"] == "q" and j["kind"] == "base")
    mmlu = [c for b, _, c in store.instances(base_q["id"]) if b == "mmlu"]
    store.close()
    row = next(r for r in rows if r["model"] == "q" and r["placement"] == "base" and r["benchmark"] == "mmlu")
    assert (int(row["n"]), int(row["correct"])) == (len(mmlu), sum(mmlu))
    assert "NO scientific meaning" in (report / "report.html").read_text()


class _Killed(BaseException):
    """Stands for kill -9 inside one process: nothing catches it, and the claim stays in the database."""


@pytest.mark.parametrize("point", ["claimed", "trained", "evaluated", "before_complete", "after_complete"])
def test_crash_at_any_point_then_rerun_gives_every_cell_exactly_once(tmp_path, monkeypatch, point):
    data = mini(tmp_path, models=[mini(tmp_path)["models"][0]], placements=["attention_only"])
    calls = {"n": 0}
    nth = 1 if point == "trained" else 2  # every job passes the other points; the train job is the second

    def crash(name):
        if name == point:
            calls["n"] += 1
            if calls["n"] == nth:
                raise _Killed(name)

    monkeypatch.setattr(jobs_module, "crash_point", crash)
    monkeypatch.setattr("hybridlora.study.runner.crash_point", crash)
    with pytest.raises(_Killed):
        _run(tmp_path, models=data["models"], placements=data["placements"])
    monkeypatch.undo()
    rerun = _run(tmp_path, models=data["models"], placements=data["placements"])
    facts = _db_facts(tmp_path / "study", data)
    assert facts["integrity"] and facts["status"] == {"complete"}
    attempts = sorted(facts["attempts"].values())
    # The killed job is redone once, except after a crash that followed its atomic completion.
    assert attempts == ([1, 1] if point == "after_complete" else [1, 2])
    assert len(rerun.ran) == (0 if point == "after_complete" else 1)


def _cli(tmp_path: Path, cfg: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "hybridlora.cli", "study", str(cfg), "--quiet", "--no-report"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_during_training_then_rerun_completes_exactly_once(tmp_path):
    data = mini(tmp_path, models=[mini(tmp_path)["models"][1]], placements=["all"],
                domains=[{"name": "gsm8k", "max_examples": 64, "val_examples": 4}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = _cli(tmp_path, cfg)
    runs = tmp_path / "study" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("train-*/train/checkpoints/step-*/trainer_state.pt")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = _cli(tmp_path, cfg)
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert "2/2 jobs complete" in out
    facts = _db_facts(tmp_path / "study", data)
    assert facts["integrity"] and facts["status"] == {"complete"} and max(facts["attempts"].values()) == 2
    log = (next(runs.glob("train-*")) / "train" / "train_log.jsonl").read_text()
    assert '"event": "resume"' in log  # it continued from the checkpoint instead of starting over


def test_two_concurrent_runners_never_run_the_same_cell(tmp_path):
    data = mini(tmp_path, models=[mini(tmp_path)["models"][0]], placements=["attention_only", "recurrent_only", "all"],
                eval={"benchmarks": {"mmlu": 4, "gsm8k": 2}, "batch_size": 4, "max_new_tokens": 4})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    # Each job waits 3 s after its claim, so the two runners surely overlap (4 jobs: one runner alone would
    # need >= 12 s, far longer than the other's start-up).
    procs = [_cli(tmp_path, cfg, {"HYBRIDLORA_TEST_JOB_DELAY": "3"}) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    facts = _db_facts(tmp_path / "study", data)
    assert facts["status"] == {"complete"} and set(facts["attempts"].values()) == {1}
    ran = [int(out.split(" run now")[0].rsplit(", ", 1)[-1]) if " run now" in out else 0 for out, _ in outs]
    assert sum(ran) == 4 and min(ran) >= 1, ran  # both worked, and no cell ran twice


def test_claims_are_exclusive_and_dead_owners_are_taken_over(tmp_path):
    data = mini(tmp_path)
    jobs = expand_grid(study_config_from_dict(data))
    store_a, store_b = Store(tmp_path), Store(tmp_path)
    store_a.register(jobs)
    a = store_a.claim("host|1|x|a")
    b = store_b.claim("host|2|x|b")
    assert a.id != b.id
    dead = f"{os.uname().nodename}|999999|1|dead"  # this host, no such pid
    store_a.db.execute("UPDATE jobs SET owner = ? WHERE id = ?", (dead, a.id))
    mine = f"{os.uname().nodename}|{os.getpid()}|x|me"
    reused = f"{os.uname().nodename}|{os.getpid()}|x|old"  # a dead runner whose pid this process now has
    store_a.db.execute("UPDATE jobs SET owner = ? WHERE id = ?", (reused, b.id))
    taken = store_b.claim(mine)
    assert taken.id == a.id  # the dead runner's job comes back first (grid order)
    assert store_b.claim(mine).id == b.id  # so does the job of the runner whose pid was reused
    from hybridlora.study.store import make_owner, release_owner

    live = make_owner()  # a second runner alive in this same process keeps its claims
    store_a.db.execute("UPDATE jobs SET owner = ?, status = 'running' WHERE id = ?", (live, a.id))
    assert store_b.claim(mine, ids=[a.id]) is None
    release_owner(live)
    assert store_b.claim(mine, ids=[a.id]).id == a.id
    assert not store_a.complete(a.id, "host|1|x|a", {"summaries": {}, "records": []})  # lost claim: nothing written
    store_a.close(), store_b.close()


def test_grid_shape_counts_placements_per_model():
    """Two models whose families name their placements differently: 6 each, not the 11 names of the union."""
    import types

    from hybridlora.study.runner import _grid_shape

    def jobs(model, placements):
        return [types.SimpleNamespace(model=model, placement=p, train_domain=d, seed=1)
                for p in placements for d in ("gsm8k", "code", "chat")]

    qwen = jobs("q", ["all", "attn", "gdn", "mlp", "attn_mlp", "gdn_mlp"])
    falcon = jobs("f", ["all", "attn", "ssm", "mlp", "attn_mlp", "ssm_mlp"])
    assert _grid_shape(qwen + falcon) == "2 models × 6 placements × 3 domains × 1 seeds"
    assert _grid_shape(qwen + falcon[:3]) == "2 models × placements 6 / 1 per model × 3 domains × 1 seeds"


def test_prefix_reuse_is_in_the_job_spec_only_when_asked_for(tmp_path):
    """eval.prefix_reuse changes how multiple choice is computed, so it is part of the job id when true; when false
    it is left out of the spec, so the ids of studies written before the option existed stay the same."""
    data = mini(tmp_path)
    plain = expand_grid(study_config_from_dict(data))
    assert all("prefix_reuse" not in j.spec["eval"] for j in plain)
    data["eval"] = {**data["eval"], "prefix_reuse": True}
    reused = expand_grid(study_config_from_dict(data))
    assert all(j.spec["eval"]["prefix_reuse"] is True for j in reused)
    assert not {j.id for j in plain} & {j.id for j in reused}
    data["eval"] = {**data["eval"], "prefix_reuse": False}
    assert [j.id for j in expand_grid(study_config_from_dict(data))] == [j.id for j in plain]
