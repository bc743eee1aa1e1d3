"""The report as a reader sees it: labels that do not collide, captions that match the drawing, no rows of
nothing, no raw JSON in the page, and (when chromium is installed) no sideways scrolling at 1400 px."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from hybridlora.analysis.contract import InstanceRecord, RunInfo
from hybridlora.analysis.figures import _spread, loss_curves_figure, params_bars, pareto_scatter, render_figures
from hybridlora.analysis.metrics import Series, compute_tables
from hybridlora.analysis.report import build_report
from hybridlora.analysis.results import StudyResults

from test_report import toy_study

REPO = Path(__file__).resolve().parents[1]
M = "toy/hybrid"


def test_spread_keeps_labels_apart_and_in_place_when_there_is_room():
    assert _spread([10.0, 100.0], 11.0) == [10.0, 100.0]
    out = _spread([50.0, 50.0, 52.0, 10.0], 11.0)
    ordered = sorted(out)
    assert all(b - a >= 11.0 for a, b in zip(ordered, ordered[1:]))
    assert out[3] == 10.0 and min(out[:3]) == 50.0


def _label_boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # as to_png renders it
    canvas.draw()
    renderer = canvas.get_renderer()
    return [t.get_window_extent(renderer) for ax in fig.axes for t in ax.texts]


def test_pareto_labels_do_not_overlap_and_stay_inside_their_panel():
    rows = [{"model": M, "train_domain": "d", "placement": name, "trainable_params": params, "mean_accuracy": acc,
             "pareto": pareto}
            for name, params, acc, pareto in (("recurrent_only", 7296, 0.145, True), ("attention_only", 14336, 0.145,
                                              False), ("all", 40064, 0.145, False), ("mlp_only", 30000, 0.1449,
                                              False))]
    fig = pareto_scatter(rows)
    boxes = _label_boxes(fig)
    assert len(boxes) == 4
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    frame = fig.axes[0].get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def test_bar_value_labels_stay_inside_the_frame():
    fig = params_bars([{"model": M, "placement": p, "trainable_params": n}
                       for p, n in (("a", 8192), ("b", 28000), ("all", 73088))])
    boxes = _label_boxes(fig)
    frame = fig.axes[0].get_window_extent()
    assert [t.get_text() for t in fig.axes[0].texts] == [" 8.2k", " 28.0k", " 73.1k"]
    assert all(b.x1 <= frame.x1 for b in boxes)


def test_loss_caption_promises_a_validation_line_only_when_one_is_drawn():
    results = toy_study()
    no_val = [f for f in render_figures(compute_tables(results, resamples=20)).figures if f.name == "loss_curves"]
    assert "no validation loss" in no_val[0].caption and "dashed" not in no_val[0].caption
    key = next(iter(results.curves))
    results.curves[key] = results.curves[key] + [{"step": 5, "val_loss": 0.5}]
    with_val = [f for f in render_figures(compute_tables(results, resamples=20)).figures if f.name == "loss_curves"]
    assert "dashed" in with_val[0].caption


def test_loss_curves_of_many_runs_share_one_legend_that_covers_no_panel():
    """Seven placements x three seeds per panel (the topology preset's grid): one legend entry per placement for
    the whole figure, below the panels, and the seeds of a placement in one colour in every panel -- per-panel
    legends of 42 entries covered the neighbouring panels."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    placements = ["attention_only", "recurrent_only", "mlp_only", "attention_mlp", "recurrent_mlp", "all",
                  "recurrent_only@budget_of_attention_only"]
    x = np.arange(1.0, 33.0)
    def panel(names):
        return [Series(f"{p} (seed {s})" + v, x if not v else x[-1:], np.exp(-x / (i + 2)) if not v else np.ones(1))
                for i, p in enumerate(names) for s in (42, 1234, 3407) for v in ("", " (val)")]
    curves = {(m, d): panel(placements if m != "control" else ["attention_only", "mlp_only", "all"])
              for m in ("sequential", "parallel", "control") for d in ("count", "first")}
    fig = loss_curves_figure(curves)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == placements
    box = legend.get_window_extent(canvas.get_renderer())
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.get_visible())
    colour = {}
    for ax in fig.axes:
        for line, s in zip(ax.get_lines(), curves[tuple(ax.get_title().split(" — "))]):
            placement = s.label.split(" (seed")[0]
            assert colour.setdefault(placement, line.get_color()) == line.get_color()


def _unchanged_study() -> StudyResults:
    """Two placements on gsm8k: one answers exactly as the base model, one gains."""
    base = [i < 5 for i in range(10)]
    records = [InstanceRecord(M, "base", "base", None, "gsm8k", str(i), v) for i, v in enumerate(base)]
    records += [InstanceRecord(M, "same", "gsm8k", 1, "gsm8k", str(i), v) for i, v in enumerate(base)]
    records += [InstanceRecord(M, "better", "gsm8k", 1, "gsm8k", str(i), i < 8) for i in range(10)]
    runs = [RunInfo(M, "base", "base", None, 0), RunInfo(M, "same", "gsm8k", 1, 10),
            RunInfo(M, "better", "gsm8k", 1, 20)]
    return StudyResults(records=records, runs=runs, title="t", metadata={"config": {"rank": 8}})


def test_key_deltas_leave_out_cells_where_nothing_changed_and_say_so(tmp_path):
    build_report(_unchanged_study(), tmp_path / "r", resamples=50, progress=False)
    md = (tmp_path / "r" / "report.md").read_text()
    section = md.split("## Key deltas")[1].split("\n## ")[0]
    assert "| better |" in section.replace("toy/hybrid | gsm8k | gsm8k ", "")  # the changed cell is a row
    assert "| same |" not in section
    assert "1 cell(s) left out: no target example changed its answer" in section and "same on gsm8k" in section


def test_metadata_goes_to_a_file_and_is_collapsed_in_the_page(tmp_path):
    paths = build_report(toy_study(), tmp_path / "r", resamples=50, progress=False)
    meta = json.loads(paths["metadata.json"].read_text())
    assert meta["study"]["config"] == {"rank": 8} and meta["report"]["resamples"] == 50
    html = paths["report.html"].read_text()
    for pre in re.finditer(r"<pre>", html):  # every <pre> block sits inside a closed <details>
        opened = html.rfind("<details>", 0, pre.start())
        assert opened != -1 and html.rfind("</details>", 0, pre.start()) < opened


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the Debian chromium package")
def test_report_fits_1400_px_and_every_image_loads_in_chromium(tmp_path):
    spec = importlib.util.spec_from_file_location("check_report", REPO / "bench" / "check_report.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    results = toy_study()
    # a recipe table whose 'qualifying' column is long: the old report pushed it off the page
    paths = build_report(results, tmp_path / "r", resamples=50, progress=False)
    result = check.check_report(paths["report.html"], tmp_path / "check", 1400)
    assert result["scroll_width"] <= 1400 and result["overflowing"] == [], result
    assert result["broken_images"] == [] and result["images"] >= 8
    assert (tmp_path / "check" / "screenshot.png").stat().st_size > 10_000
