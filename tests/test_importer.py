"""Tests of hybridlora.analysis.importer: the published study folder and the generic format.

Expected values for the published data are computed here independently, by reading the
gzipped JSONL files with gzip/json, not through the importer.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from hybridlora.analysis.contract import InstanceRecord, RunInfo, cell_accuracy, group_cells
from hybridlora.analysis.importer import (
    ResultsFormatError,
    detect_format,
    import_results,
    load_generic,
    load_published,
    load_results,
)
from hybridlora.analysis.stats import mcnemar_exact, paired_bootstrap

QWEN = "Qwen/Qwen3.5-0.8B-Base"
FALCON = "tiiuae/Falcon-H1-0.5B-Base"
SEED = 3407


@pytest.fixture(scope="module")
def published_dir(data_dir: Path) -> Path:
    path = data_dir / "published" / "lora-placement-hybrid"
    assert path.is_dir(), path
    return path


@pytest.fixture(scope="module")
def published(published_dir):
    return load_results(published_dir)


@pytest.fixture(scope="module")
def cells(published):
    return group_cells(published.records)


def raw_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- published data


def test_detects_published_layout(published_dir):
    assert detect_format(published_dir) == "published"
    records = import_results(published_dir)
    assert records and all(isinstance(r, InstanceRecord) for r in records)
    assert all(isinstance(r.example_id, str) for r in records)


def test_published_runs(published):
    runs = published.runs
    assert all(isinstance(r, RunInfo) and r.trainable_params is None for r in runs)
    assert len(runs) == 38
    per_model = Counter(r.model for r in runs)
    assert per_model == {QWEN: 19, FALCON: 19}
    placements = defaultdict(set)
    for r in runs:
        placements[r.model].add(r.placement)
        if r.placement == "base":
            assert (r.train_domain, r.seed) == ("base", None)
        else:
            assert r.seed == SEED
            assert r.train_domain in {"gsm8k", "codealpaca", "chat"}
    assert placements[QWEN] == {
        "base", "all_layers", "gdn_only", "gdn_plus_mlp", "mlp_only", "softmax_only", "softmax_plus_mlp",
    }
    assert placements[FALCON] == {
        "base", "all_eligible", "attention_only", "attention_plus_mlp", "mlp_only", "ssm_only", "ssm_plus_mlp",
    }
    # every (model, placement != base) is trained on each of the three domains, one seed
    trained = Counter((r.model, r.placement) for r in runs if r.placement != "base")
    assert set(trained.values()) == {3}


def test_published_cells_match_files(published_dir, cells):
    files = sorted(published_dir.glob("*.jsonl.gz"))
    assert len(files) == 164
    assert len(cells) == len(files)
    assert Counter(k[0] for k in cells) == {QWEN: 82, FALCON: 82}
    assert Counter(k[4] for k in cells) == {
        "mmlu": 38, "arc_challenge": 38, "hellaswag": 38, "gsm8k": 38, "humaneval": 12,
    }


def test_every_cell_matches_independent_count(published_dir, cells):
    """Decode every file name by hand and compare counts with the importer's cells."""
    models = {"qwen3_5_0_8b_base": QWEN, "falcon_h1_0_5b_base": FALCON}
    domains = {"gsm8k_train": "gsm8k", "codealpaca": "codealpaca", "ultrachat": "chat"}
    for path in sorted(published_dir.glob("*.jsonl.gz")):
        stem = path.name.replace(".jsonl.gz", "")
        fields = stem.split("__")
        if fields[0] == "train":
            key = (models[fields[1]], fields[2], domains[fields[3]], int(fields[4][4:]), fields[6])
        else:
            key = (models[fields[0]], "base", "base", None, fields[2])
        rows = raw_rows(path)
        scored = [r["correct"] for r in rows if "correct" in r]
        cell = cells[key]
        assert len(cell) == len(rows), path.name
        assert cell_accuracy(cell) == (sum(scored), len(scored)), path.name
        assert set(cell) == {str(r["example_id"]) for r in rows}, path.name


def test_qwen_base_mmlu_accuracy(published_dir, cells):
    rows = raw_rows(published_dir / "qwen3_5_0_8b_base__base__mmlu.jsonl.gz")
    expected = (sum(r["correct"] for r in rows), len(rows))
    assert expected == (247, 512)  # 48.24%
    assert cell_accuracy(cells[(QWEN, "base", "base", None, "mmlu")]) == expected
    # spot-check one example's value
    assert cells[(QWEN, "base", "base", None, "mmlu")]["0"] is bool(rows[0]["correct"])


def test_trained_cell_accuracy(published_dir, cells):
    name = "train__falcon_h1_0_5b_base__ssm_only__gsm8k_train__seed3407__inline_eval__gsm8k.jsonl.gz"
    rows = raw_rows(published_dir / name)
    expected = (sum(r["correct"] for r in rows), len(rows))
    assert expected[1] == 256
    assert cell_accuracy(cells[(FALCON, "ssm_only", "gsm8k", SEED, "gsm8k")]) == expected


def test_humaneval_is_unscored(published, cells):
    he = [r for r in published.records if r.benchmark == "humaneval"]
    assert he and all(r.correct is None for r in he)
    he_cells = {k: v for k, v in cells.items() if k[4] == "humaneval"}
    assert len(he_cells) == 12
    assert {k[2] for k in he_cells} == {"codealpaca"}
    assert all(cell_accuracy(v) == (0, 0) for v in he_cells.values())
    # one published HumanEval file is short: Falcon all_eligible lacks problems 86..92
    short = he_cells[(FALCON, "all_eligible", "codealpaca", SEED, "humaneval")]
    assert len(short) == 157
    assert set(map(str, range(164))) - set(short) == {str(i) for i in range(86, 93)}
    # every other scored record is scored
    assert all(r.correct is not None for r in published.records if r.benchmark != "humaneval")


def test_benchmark_sizes(cells):
    sizes = defaultdict(set)
    for (model, placement, domain, _seed, bench), cell in cells.items():
        if bench == "gsm8k":
            sizes[(model, bench, placement == "base" or domain == "gsm8k")].add(len(cell))
        else:
            sizes[(model, bench)].add(len(cell))
    assert sizes[(QWEN, "mmlu")] == sizes[(FALCON, "mmlu")] == {512}
    assert sizes[(QWEN, "hellaswag")] == sizes[(FALCON, "hellaswag")] == {512}
    assert sizes[(QWEN, "arc_challenge")] == sizes[(FALCON, "arc_challenge")] == {299}
    # the README's quirk: Qwen GSM8K has 128 examples for base and gsm8k_train runs
    assert sizes[(QWEN, "gsm8k", True)] == {128}
    assert sizes[(QWEN, "gsm8k", False)] == {256}
    assert sizes[(FALCON, "gsm8k", True)] == sizes[(FALCON, "gsm8k", False)] == {256}


def test_qwen_gsm8k_quirk_pairs_on_shared_ids(published_dir, cells):
    base = cells[(QWEN, "base", "base", None, "gsm8k")]
    tuned = cells[(QWEN, "mlp_only", "codealpaca", SEED, "gsm8k")]
    assert (len(base), len(tuned)) == (128, 256)
    result = paired_bootstrap(tuned, base, resamples=2000, seed=0)
    assert result.n_shared == 128
    # independent: ids 0..127 of both files
    rows_t = raw_rows(published_dir / "train__qwen3_5_0_8b_base__mlp_only__codealpaca__seed3407__inline_eval__gsm8k.jsonl.gz")
    rows_b = raw_rows(published_dir / "qwen3_5_0_8b_base__base__gsm8k.jsonl.gz")
    shared = {r["example_id"] for r in rows_b}
    acc_t = sum(r["correct"] for r in rows_t if r["example_id"] in shared) / len(shared)
    acc_b = sum(r["correct"] for r in rows_b) / len(rows_b)
    assert result.mean_diff == pytest.approx(acc_t - acc_b, abs=1e-12)
    assert mcnemar_exact(tuned, base).n_shared == 128


def test_published_placement_pairs_include_falcon_gsm8k_attention_vs_ssm(published_dir, published):
    """The paper's headline contrast is placement vs placement; the re-analysis now makes it (it used to compare
    with base and the full placement only)."""
    from hybridlora.analysis.metrics import index_study, paired_comparisons, resolve_full_placements
    from hybridlora.analysis.results import from_result_set

    results = from_result_set(published)
    index = index_study(results)
    rows, _ = paired_comparisons(index, resolve_full_placements(results, index), resamples=200, seed=0)
    row = next(r for r in rows if (r["model"], r["train_domain"], r["benchmark"], r["placement_a"],
                                   r["placement_b"]) == (FALCON, "gsm8k", "gsm8k", "attention_only", "ssm_only"))
    name = "train__falcon_h1_0_5b_base__{}__gsm8k_train__seed3407__inline_eval__gsm8k.jsonl.gz"
    attn = {r["example_id"]: r["correct"] for r in raw_rows(published_dir / name.format("attention_only"))}
    ssm = {r["example_id"]: r["correct"] for r in raw_rows(published_dir / name.format("ssm_only"))}
    shared = attn.keys() & ssm.keys()
    b10 = sum(attn[i] and not ssm[i] for i in shared)  # attention right, SSM wrong
    b01 = sum(ssm[i] and not attn[i] for i in shared)
    assert (row["n_shared"], row["b01"], row["b10"]) == (len(shared), b01, b10)
    assert row["mean_diff"] == pytest.approx(100 * (b10 - b01) / len(shared))
    assert row["reference"] == "pair" and row["holm_family"] == "model x domain x benchmark"
    family = [r for r in rows if r["reference"] == "pair" and (r["model"], r["train_domain"], r["benchmark"]) ==
              (FALCON, "gsm8k", "gsm8k")]
    assert len(family) == 10  # the 15 pairs of six placements, minus the 5 with the full placement


def test_published_is_strict_about_data_file_names(tmp_path):
    def write(name, rows):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    write("qwen3_5_0_8b_base__base__mmlu.jsonl.gz", [{"benchmark": "mmlu", "example_id": 0, "correct": 1}])
    (tmp_path / "README.md").write_text("ignored")
    recs = import_results(tmp_path)
    assert recs == [InstanceRecord(QWEN, "base", "base", None, "mmlu", "0", True)]

    write("mystery_results.jsonl.gz", [{"example_id": 0}])
    write("train__llama__mlp_only__codealpaca__seed1__inline_eval__mmlu.jsonl.gz", [{"example_id": 0}])
    with pytest.raises(ResultsFormatError) as exc:
        load_published(tmp_path)
    msg = str(exc.value)
    assert "2 unrecognised result file(s)" in msg
    assert "mystery_results.jsonl.gz" in msg and "unknown model key 'llama'" in msg
    assert "\n" not in msg


def test_published_rejects_benchmark_mismatch(tmp_path):
    with gzip.open(tmp_path / "falcon_h1_0_5b_base__base__mmlu.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"benchmark": "hellaswag", "example_id": 0, "correct": 0}) + "\n")
    with pytest.raises(ResultsFormatError, match=r"mmlu\.jsonl\.gz:1: row says benchmark 'hellaswag'"):
        import_results(tmp_path)


# --------------------------------------------------------------------------- generic format


def write_jsonl(path: Path, rows, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def make_generic(root: Path, *, runs=None, manifest_as_list=False) -> Path:
    (root / "base").mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "base" / "mmlu.jsonl", [
        {"example_id": "q1", "correct": 1},
        {"example_id": "q2", "correct": False},
        {"example_id": 3, "correct": True, "extra": "ignored"},
    ])
    write_jsonl(root / "lora_mmlu.jsonl.gz", [
        {"example_id": "q1", "correct": 0},
        {"example_id": "q2", "correct": True, "benchmark": "mmlu"},
    ], gz=True)
    write_jsonl(root / "lora_he.jsonl", [{"example_id": "HumanEval/0"}, {"example_id": "HumanEval/1", "correct": None}])
    if runs is None:
        runs = [
            {"model": "org/M", "placement": "base", "train_domain": "base", "seed": None,
             "files": {"mmlu": "base/mmlu.jsonl"}},
            {"model": "org/M", "placement": "attention_only", "train_domain": "chat", "seed": 7,
             "trainable_params": 12345, "files": {"mmlu": "lora_mmlu.jsonl.gz", "humaneval": "lora_he.jsonl"}},
        ]
    manifest = runs if manifest_as_list else {"description": "toy", "runs": runs}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return root


@pytest.mark.parametrize("as_list", [False, True])
def test_generic_round_trip(tmp_path, as_list):
    root = make_generic(tmp_path, manifest_as_list=as_list)
    assert detect_format(root) == "generic"
    rs = load_results(root)
    assert rs.runs == [
        RunInfo("org/M", "base", "base", None, None),
        RunInfo("org/M", "attention_only", "chat", 7, 12345),
    ]
    assert rs.records == [
        InstanceRecord("org/M", "base", "base", None, "mmlu", "q1", True),
        InstanceRecord("org/M", "base", "base", None, "mmlu", "q2", False),
        InstanceRecord("org/M", "base", "base", None, "mmlu", "3", True),
        InstanceRecord("org/M", "attention_only", "chat", 7, "mmlu", "q1", False),
        InstanceRecord("org/M", "attention_only", "chat", 7, "mmlu", "q2", True),
        InstanceRecord("org/M", "attention_only", "chat", 7, "humaneval", "HumanEval/0", None),
        InstanceRecord("org/M", "attention_only", "chat", 7, "humaneval", "HumanEval/1", None),
    ]
    assert import_results(root) == rs.records
    cells = group_cells(rs.records)
    r = paired_bootstrap(cells[("org/M", "attention_only", "chat", 7, "mmlu")],
                         cells[("org/M", "base", "base", None, "mmlu")], resamples=100)
    assert r.n_shared == 2 and r.mean_diff == 0.0


def _base_run(**overrides):
    run = {"model": "org/M", "placement": "base", "train_domain": "base", "seed": None,
           "files": {"mmlu": "base/mmlu.jsonl"}}
    run.update(overrides)
    return run


@pytest.mark.parametrize(
    "runs, pattern",
    [
        ([_base_run(lr=1e-4)], r"runs\[0\]: unknown key\(s\) \['lr'\]"),
        ([{k: v for k, v in _base_run().items() if k != "seed"}], r"runs\[0\]: missing required key\(s\) \['seed'\]"),
        ([_base_run(files={"mmlu": "nope.jsonl"})], r"files\['mmlu'\] = 'nope.jsonl' does not exist"),
        ([_base_run(files={})], r"'files' must be a non-empty object"),
        ([_base_run(), _base_run()], r"runs\[1\]: run .* is already listed as runs\[0\]"),
        ([_base_run(train_domain="chat")], r"runs\[0\]: .*both set to 'base'"),
        ([_base_run(seed="7")], r"runs\[0\]: seed must be an int or None"),
        ([], r"lists no runs"),
    ],
)
def test_generic_bad_manifest(tmp_path, runs, pattern):
    make_generic(tmp_path, runs=runs)
    with pytest.raises(ResultsFormatError, match=pattern) as exc:
        import_results(tmp_path)
    assert "\n" not in str(exc.value)


def test_generic_bad_manifest_json_and_top_level(tmp_path):
    make_generic(tmp_path)
    (tmp_path / "manifest.json").write_text('{"runs": [}\n')
    with pytest.raises(ResultsFormatError, match=r"manifest.json:1: invalid JSON"):
        import_results(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"runs": [], "version": 2}))
    with pytest.raises(ResultsFormatError, match=r"unknown top-level key\(s\) \['version'\]"):
        import_results(tmp_path)


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"example_id": "a", "correct": 1}', "", '{"example_id": "b", "correct": 1'],
         r"mmlu\.jsonl:3: invalid JSON"),
        (['{"correct": 1}'], r"mmlu\.jsonl:1: missing required field 'example_id'"),
        (['{"example_id": "a", "correct": 2}'], r"mmlu\.jsonl:1: correct must be 0, 1, true, false or null"),
        (['{"example_id": "a", "correct": "yes"}'], r"mmlu\.jsonl:1: correct must be"),
        (['{"example_id": "a"}', '{"example_id": "a"}'], r"mmlu\.jsonl:2: duplicate example_id 'a' \(first on line 1\)"),
        (['{"example_id": [1]}'], r"mmlu\.jsonl:1: example_id must be a string or integer"),
        (['[1, 2]'], r"mmlu\.jsonl:1: expected a JSON object"),
        (['{"example_id": "a", "benchmark": "arc"}'], r"mmlu\.jsonl:1: row says benchmark 'arc'"),
    ],
)
def test_generic_bad_jsonl(tmp_path, lines, pattern):
    make_generic(tmp_path, runs=[_base_run()])
    write_jsonl(tmp_path / "base" / "mmlu.jsonl", lines)
    with pytest.raises(ResultsFormatError, match=pattern) as exc:
        load_generic(tmp_path)
    assert "\n" not in str(exc.value)


def test_missing_manifest_and_unknown_layout(tmp_path):
    with pytest.raises(ResultsFormatError, match="no manifest.json"):
        load_generic(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"example_id": 0}\n')
    with pytest.raises(ResultsFormatError) as exc:
        import_results(tmp_path)
    msg = str(exc.value)
    assert "generic format" in msg and "manifest.json" in msg and "lora-placement-hybrid" in msg
    with pytest.raises(ResultsFormatError, match="not a directory"):
        import_results(tmp_path / "results.jsonl")
