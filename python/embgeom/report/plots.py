"""PNG plots for reports (matplotlib, headless)."""
from __future__ import annotations

import os

import numpy as np

# axis and column names (docs/metrics.md, layers, depths and heads)
LAYER = "layer (1..L)"
DEPTH = "depth (0 = embeddings)"
HEAD = "head (from 0)"
HEAD_INDEX = "(layer - 1) * H + head"


def literal(text) -> str:
    """A user's string (a label, token or group name) as matplotlib draws it, letter for letter:
    `$` escaped (two of them started mathtext, whose parse error ended the run), and a leading
    `_` behind an invisible word joiner (matplotlib leaves labels starting with `_` out of legends:
    fastText's `__label__pos`)."""
    text = str(text).replace("$", r"\$")
    return "\u2060" + text if text.startswith("_") else text


def save_figure(fig, out_dir: str, name: str) -> str:
    """Save a matplotlib figure (new_figure's) as out_dir/name.png, return the path. A stop
    that a figure's finalizer dropped is raised first (raise_swallowed: a page of figures had
    held it to the phase's end, 6-14 s in `vocab`)."""
    from ..interrupts import raise_swallowed

    raise_swallowed()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def save_axes(fig, ax, out_dir: str, name: str, *, xlabel: str, ylabel: str, title: str) -> str:
    """Label one plot's axes and title, then save_figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(fig, out_dir, name)


def layer_head_axes(ax, layers: int, heads: int | None = None) -> None:
    """Name and tick the axes of an imshow in its default coordinates with one row per layer:
    rows labelled 1..L and, when `heads` is given, columns labelled 0..H-1 (integer ticks)."""
    ax.set_yticks(range(layers), [str(l + 1) for l in range(layers)])
    ax.set_ylabel(LAYER)
    if heads is not None:
        ax.set_xticks(range(heads), [str(h) for h in range(heads)])
        ax.set_xlabel(HEAD)


def layer_axis(ax, layers: int) -> None:
    """x axis of a curve over layers 1..L: integer ticks, named."""
    ax.set_xticks(range(1, layers + 1))
    ax.set_xlabel(LAYER)


def depth_axis(ax, depths: int) -> None:
    """x axis of a curve over depths 0..L (depths = L + 1): integer ticks, named."""
    ax.set_xticks(range(depths))
    ax.set_xlabel(DEPTH)


def head_matrix(fig, ax, data, layers: int, heads: int, *, title: str, label: str, cmap: str = "magma",
                vmin=None, vmax=None) -> None:
    """An (L*H) x (L*H) matrix between all heads: one tick per layer (L1..LL) at its block's
    centre, white lines at the layer boundaries, a colour bar labelled with the quantity."""
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    for b in range(1, layers):
        ax.axhline(b * heads - 0.5, color="w", lw=0.7)
        ax.axvline(b * heads - 0.5, color="w", lw=0.7)
    centres = [l * heads + (heads - 1) / 2 for l in range(layers)]
    names = [f"L{l + 1}" for l in range(layers)]
    ax.set_xticks(centres, names)
    ax.set_yticks(centres, names)
    ax.set_xlabel(f"head, by layer (heads 0..{heads - 1} within each block; index {HEAD_INDEX})", fontsize=8)
    ax.set_ylabel("head, by layer", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label, shrink=0.85)


def head_strips(fig, panels: list[tuple], layers: int, heads: int, *, columns: int = 4) -> None:
    """Clark et al.'s per-head strip plots (arXiv 1906.04341, figures 2 and 4): one panel per
    (title, values (L, H), y label, baseline or None); x = layer 1..L, one dot per head (spread a
    little within its layer, coloured by head), the mean over the layer's heads as a black bar
    joined by a line, a dotted horizontal baseline where given."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if heads > 10 else "tab10"]
    rows = -(-len(panels) // columns)
    layer = np.arange(1, layers + 1)
    offsets = (np.arange(heads) - (heads - 1) / 2) * (0.5 / max(heads, 1))
    for k, (title, values, ylabel, baseline) in enumerate(panels):
        v = np.asarray(values, dtype=float).reshape(layers, heads)
        ax = fig.add_subplot(rows, columns, k + 1)
        for h in range(heads):
            ax.scatter(layer + offsets[h], v[:, h], s=14, color=cmap(h % cmap.N), alpha=0.85,
                       linewidths=0, label=f"head {h}" if k == 0 else None)
        mean = np.nanmean(v, axis=1) if np.isfinite(v).any() else np.full(layers, np.nan)
        ax.plot(layer, mean, "-", color="k", lw=0.8, alpha=0.6)
        ax.scatter(layer, mean, marker="_", s=300, color="k", linewidths=2,
                   label="mean over heads" if k == 0 else None, zorder=3)
        if baseline is not None:
            ax.axhline(baseline, color="gray", ls=":", lw=1, label="uniform (ln n, averaged as the dots)" if k == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        layer_axis(ax, layers)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="lower center", fontsize=7,
               ncol=min(heads + 2, 8), bbox_to_anchor=(0.5, -0.02 - 0.025 * ((heads + 2) // 8)))
    fig.tight_layout()


def new_figure(width=7.0, height=4.0):
    """(figure, axes) drawn by Agg without pyplot: a report written from a notebook or a
    caller's process (cli.main) leaves its matplotlib backend, figures and rcParams as they were
    (matplotlib.use("Agg") had switched an inline backend off for the rest of the session)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def over_heads(v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, min, max) over the heads (axis 1) of v (L, H), a head without a value (NaN: None in
    report.json) left out as the tables leave it out; NaN where a layer has no value at all."""
    import warnings

    v = np.asarray(v, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (all-NaN layers: NaN, said by the gap)
        return np.nanmean(v, 1), np.nanmin(v, 1), np.nanmax(v, 1)


def explained_variance_png(out_dir: str, name: str, curves: dict, labels) -> str:
    """Cumulative explained-variance curves (projection.pca_curves: the whole cloud's, drawn
    thicker in black, and each label's) as name.png; each label in its colour in the scatters
    (scatter_png: the palette by sorted label over every label of `labels`, the points' labels:
    pca_curves leaves out a label of one point, and the colours had shifted)."""
    from .interactive import label_color

    fig, ax = new_figure()
    by_label = curves.get("by_label", {})
    all_points = curves["all"]
    ax.plot(range(1, len(all_points) + 1), all_points, label="all points", lw=2, color="black")
    for key, curve in by_label.items():
        ax.plot(range(1, len(curve) + 1), curve, label=literal(key), lw=1, color=label_color(key, labels))
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_title("PCA: cumulative explained variance" + (", all points and each label" if by_label else ""))
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)
