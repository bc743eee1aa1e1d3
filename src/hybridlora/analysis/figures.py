"""Figures of the study report (matplotlib, Agg, no pyplot global state).

Every function here draws tables already computed by :mod:`.metrics`; nothing is computed
here. Figures are rendered to PNG bytes. :func:`render_figures` draws all of them and lists
every figure it had to skip together with the reason (its data is absent).
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import EngFormatter, NullFormatter

from .metrics import Matrix, Series, StudyTables

__all__ = [
    "RenderedFigure",
    "FigureSet",
    "heatmap",
    "pareto_scatter",
    "params_bars",
    "component_params_bars",
    "loss_curves_figure",
    "norm_dynamics_figure",
    "render_figures",
    "to_png",
    "slug",
]

DPI = 110


@dataclass(frozen=True)
class RenderedFigure:
    """One figure: file-safe ``name``, ``title``, ``caption`` and the ``png`` bytes."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclass
class FigureSet:
    """Rendered figures plus ``skipped``: ``[(figure name, reason)]``."""

    figures: List[RenderedFigure] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)


def slug(text: str) -> str:
    """File-name-safe lower-case form of ``text`` (``"Qwen/Qwen3.5-0.8B"`` -> ``"qwen-qwen3-5-0-8b"``)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def to_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # no "Software" tag: the PNG then carries no URL or version string
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- heatmaps


def _text_colour(rgba) -> str:
    # relative luminance decides black or white text, readable on any colormap
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def heatmap(matrix: Matrix) -> Figure:
    """Annotated heatmap of a :class:`Matrix`: accuracy in % (sequential colours) or pp
    (diverging, centred on 0). Empty cells are grey with their mark (``n/s``, ``—``); target
    benchmark cells are outlined."""
    rows, cols = matrix.values.shape
    fig = Figure(figsize=(1.6 + 1.15 * cols, 1.2 + 0.36 * rows), layout="constrained")
    ax = fig.add_subplot()
    shown = matrix.values * (100.0 if matrix.unit == "accuracy" else 1.0)
    finite = shown[np.isfinite(shown)]
    if matrix.unit == "pp":
        lim = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        cmap, norm, label = "RdBu", TwoSlopeNorm(0.0, -lim, lim), "delta (pp)"
    else:
        cmap, norm, label = "viridis", None, "accuracy (%)"
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=colormaps[cmap].with_extremes(bad="#dddddd"),
                      norm=norm, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            value = shown[i, j]
            if math.isfinite(value):
                text = f"{value:.1f}" if matrix.unit == "accuracy" else f"{value:+.1f}"
                colour = _text_colour(image.cmap(image.norm(value)))
            else:
                text, colour = matrix.marks[i][j], "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    for i, j in matrix.highlight:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
    ax.set_xticks(range(cols), matrix.col_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), matrix.row_labels, fontsize=8)
    ax.set_title(matrix.title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    return fig


# --------------------------------------------------------------------------- parameters and Pareto


def _short(value: float) -> str:
    """7296 -> "7.3k", 10822656 -> "10.8M": bar labels short enough to stay inside the frame."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


_LABEL_GAP_PX = 11.0  # vertical room one 7-pt label needs at DPI 110


def _spread(ys: Sequence[float], gap: float) -> List[float]:
    """Label heights for points at pixel heights ``ys`` (any order): each at its point when there is room,
    else pushed up just enough to keep ``gap`` px from the label below it."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = [0.0] * len(ys)
    floor = -math.inf
    for i in order:
        out[i] = max(ys[i], floor + gap)
        floor = out[i]
    return out


def _label_points(ax, points: Sequence[Tuple[float, float, str]]) -> None:
    """Name each point without labels overlapping each other or leaving the frame: points at the same spot share
    one label; labels of the right half sit left of their point; crowded labels are moved apart vertically and
    tied to their point by a thin line."""
    merged: Dict[Tuple[float, float], List[str]] = {}
    for x, y, name in points:
        merged.setdefault((x, y), []).append(name)
    ax.autoscale_view()
    pixels = ax.transData.transform([key for key in merged])
    middle = sum(ax.transAxes.transform([(0.0, 0.0), (1.0, 0.0)])[:, 0]) / 2
    for right_side in (False, True):
        keys = [k for k, px in zip(merged, pixels) if (px[0] > middle) == right_side]
        ys = [ax.transData.transform([k])[0][1] for k in keys]
        for key, y, label_y in zip(keys, ys, _spread(ys, _LABEL_GAP_PX)):
            dy = (label_y - y) * 72.0 / DPI + 3  # pixels -> points
            ax.annotate(", ".join(merged[key]), key, fontsize=7, xytext=(-5 if right_side else 5, dy),
                        textcoords="offset points", ha="right" if right_side else "left", va="bottom",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6} if dy > 6 else None)


def pareto_scatter(means: Sequence[dict]) -> Figure:
    """Trainable params (log x) vs mean accuracy, one panel per train domain of ONE model.

    Input: :func:`.metrics.placement_means` rows of one model with known params; Pareto
    points (``pareto`` True) are filled and joined by a step line.
    """
    domains = list(dict.fromkeys(r["train_domain"] for r in means))
    fig = Figure(figsize=(4.6 * len(domains), 3.8), layout="constrained")
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, domain in zip(axes, domains):
        rows = [r for r in means if r["train_domain"] == domain]
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["trainable_params"])
        ax.step([r["trainable_params"] for r in front], [100 * r["mean_accuracy"] for r in front],
                where="post", color="tab:red", linewidth=1, label="Pareto front")
        for r in rows:
            ax.scatter(r["trainable_params"], 100 * r["mean_accuracy"], s=36,
                       facecolor="tab:red" if r["pareto"] else "white", edgecolor="tab:red", zorder=3)
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.25)  # room for the labels inside the frame
        # engineering labels (10k, 2M) on major ticks only: minor log labels collide on narrow ranges
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("mean accuracy (%)")
        ax.set_title(f"train domain: {domain}", fontsize=9)
        ax.grid(alpha=0.3)
        _label_points(ax, [(r["trainable_params"], 100 * r["mean_accuracy"], r["placement"]) for r in rows])
    fig.suptitle(f"Params vs mean accuracy — {means[0]['model']}", fontsize=10)
    return fig


def params_bars(rows: Sequence[dict]) -> Figure:
    """Horizontal bars of trainable params per placement of ONE model
    (:func:`.metrics.params_table` rows with known counts)."""
    fig = Figure(figsize=(6.0, 0.8 + 0.4 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    names = [r["placement"] for r in rows]
    values = [r["trainable_params"] for r in rows]
    ax.barh(range(len(rows)), values, color="tab:blue")
    for i, v in enumerate(values):
        ax.text(v, i, f" {_short(v)}", va="center", fontsize=7)
    ax.set_xlim(0, max(values) * 1.15)  # the value labels stay inside the frame
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("trainable parameters")
    ax.set_title(f"Trainable parameters per placement — {rows[0]['model']}", fontsize=9)
    return fig


def component_params_bars(rows: Sequence[dict]) -> Figure:
    """Stacked horizontal bars: trainable params per component type, per placement of ONE
    model (:func:`.metrics.component_params_table` rows)."""
    placements = list(dict.fromkeys(r["placement"] for r in rows))
    components = list(dict.fromkeys(r["component"] for r in rows))
    value = {(r["placement"], r["component"]): r["trainable_params"] for r in rows}
    fig = Figure(figsize=(6.5, 1.0 + 0.42 * len(placements)), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(placements))
    for comp in components:
        widths = np.array([value.get((p, comp), 0) for p in placements], dtype=float)
        ax.barh(range(len(placements)), widths, left=left, label=comp)
        left += widths
    ax.set_yticks(range(len(placements)), placements, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("trainable parameters")
    ax.xaxis.set_major_formatter(EngFormatter())
    # beside the axes, never over a bar
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"Trainable parameters per component type — {rows[0]['model']}", fontsize=9)
    return fig


# --------------------------------------------------------------------------- training traces


_SEED_SUFFIX = re.compile(r" \(seed [^)]*\)$")


def _run_group(label: str) -> str:
    """A series' run without its seed and validation suffix: the seeds of one placement share a colour."""
    return _SEED_SUFFIX.sub("", label.removesuffix(" (val)"))


def _lines(ax, series: Sequence[Series], colours: Dict[str, object] | None = None, legend: bool = True) -> None:
    """One line per series in its run group's colour (``colours``, shared by the panels of one figure, grows with
    groups it lacks); a "<label> (val)" series is dashed with markers (often a single point, at the end of
    training) in its run's colour. ``legend``: one entry per group on the panel itself."""
    colours = {} if colours is None else colours
    named = set()
    for s in series:
        group = _run_group(s.label)
        colour = colours.setdefault(group, f"C{len(colours) % 10}")
        val = s.label.endswith("(val)")
        label = group if not val and group not in named else None
        named.add(group)
        ax.plot(s.x, s.y, label=label, linewidth=1, color=colour, linestyle="--" if val else "-",
                marker="o" if val else None, markersize=3.5)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=6)


def _panel_grid(count: int, width: float, height: float):
    """(figure, the first ``count`` axes) of a grid up to 3 panels wide, ``width`` × ``height`` inches per panel;
    the grid's unused panels are hidden."""
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def loss_curves_figure(curves: Dict[Tuple[str, str], List[Series]]) -> Figure:
    """Training loss vs step; one panel per (model, train_domain), one colour per placement (its seeds share it),
    one legend for the figure below the panels: a study of seven placements and three seeds draws 42 lines per
    panel, whose per-panel legends covered the neighbouring panels."""
    keys = list(curves)
    fig, axes = _panel_grid(len(keys), 4.3, 3.2)
    # one colour per placement across the panels, in the order they first appear (tab20 beyond ten placements)
    groups = list(dict.fromkeys(_run_group(s.label) for key in keys for s in curves[key]))
    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    colours = {g: palette(i % palette.N) for i, g in enumerate(groups)}
    for ax, key in zip(axes, keys):
        _lines(ax, curves[key], colours, legend=False)
        ax.set_title(f"{key[0]} — {key[1]}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    handles = [Line2D([], [], color=c, linewidth=1.5, label=g) for g, c in colours.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=7, frameon=False)
    fig.suptitle("Training loss", fontsize=10)
    return fig


def norm_dynamics_figure(key: Tuple[str, str], runs: Dict[str, List[Series]]) -> Figure:
    """LoRA ``‖B·A‖`` (summed per component type) vs step for ONE (model, train_domain);
    one panel per run, one line per component type."""
    labels = list(runs)
    fig, axes = _panel_grid(len(labels), 4.0, 3.0)
    for ax, label in zip(axes, labels):
        _lines(ax, runs[label])
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("‖BA‖ (sum)")
    fig.suptitle(f"LoRA norm dynamics — {key[0]} — {key[1]}", fontsize=10)
    return fig


# --------------------------------------------------------------------------- all figures


def _add(out: FigureSet, name: str, title: str, caption: str, fig: Figure) -> None:
    out.figures.append(RenderedFigure(name, title, caption, to_png(fig)))


def _matrix_figures(out: FigureSet, kind: str, title: str, caption: str, maps: Dict[str, Matrix],
                    models: Sequence[str]) -> None:
    for model in models:
        name = f"{kind}__{slug(model)}"
        matrix = maps.get(model)
        if matrix is None or not np.isfinite(matrix.values).any():
            out.skipped.append((name, "no scored cells to show"))
        else:
            _add(out, name, f"{title} — {model}", caption, heatmap(matrix))


def render_figures(tables: StudyTables) -> FigureSet:
    """Draw every figure the tables allow; list the others in ``skipped`` with the reason."""
    out = FigureSet()
    models = tables.index.models
    _matrix_figures(out, "accuracy_heatmap", "Accuracy", "Mean accuracy over seeds (%). Grey: n/s = not "
                    "scored, — = not evaluated. Outlined: benchmarks of the training domain.",
                    tables.accuracy_maps, models)
    _matrix_figures(out, "delta_heatmap", "Delta vs base", "Accuracy minus base accuracy on shared example "
                    "ids, percentage points, mean over seeds.", tables.delta_maps, models)
    _matrix_figures(out, "transfer_matrix", "Transfer matrix", "Delta vs base (pp) per train domain and "
                    "benchmark, averaged over placements and seeds.", tables.transfer_maps, models)
    for model in models:
        pts = [r for r in tables.placement_means if r["model"] == model and r["pareto"] is not None]
        name = f"pareto__{slug(model)}"
        if pts:
            _add(out, name, f"Pareto front — {model}", "Filled points are Pareto-optimal (no placement has "
                 "fewer params and higher mean accuracy).", pareto_scatter(pts))
        else:
            out.skipped.append((name, "trainable parameter counts unknown"))
        rows = [r for r in tables.params if r["model"] == model and r["trainable_params"] is not None]
        name = f"params__{slug(model)}"
        if rows:
            _add(out, name, f"Trainable parameters — {model}", "Trainable LoRA parameters per placement.",
                 params_bars(rows))
        else:
            out.skipped.append((name, "trainable parameter counts unknown"))
        rows = [r for r in tables.component_params if r["model"] == model]
        name = f"component_params__{slug(model)}"
        if rows:
            _add(out, name, f"Parameters per component type — {model}", "Trainable LoRA parameters per "
                 "component type, stacked per placement.", component_params_bars(rows))
        else:
            out.skipped.append((name, "no per-component parameter breakdown"))
    if tables.loss_curves:
        has_val = any(s.label.endswith("(val)") for series in tables.loss_curves.values() for s in series)
        caption = ("Training loss per step (solid); validation loss on the held-out slice (dashed, a dot where measured)." if has_val
                   else "Training loss per step; no validation loss was logged.")
        _add(out, "loss_curves", "Training loss", caption, loss_curves_figure(tables.loss_curves))
    else:
        out.skipped.append(("loss_curves", "no training curves"))
    if tables.norm_curves:
        for key, runs in tables.norm_curves.items():
            _add(out, f"norms__{slug(key[0])}__{slug(key[1])}", f"LoRA norm dynamics — {key[0]} — {key[1]}",
                 "Sum of ‖B·A‖ per component type over training.", norm_dynamics_figure(key, runs))
    else:
        out.skipped.append(("norms", "no LoRA norm traces"))
    return out
