"""The pictures and report.html of `embgeom text`: per-layer curves, head heat maps, kept-vector
scatters (trajectories, labelled sets, difference vectors).
"""
from __future__ import annotations

import html
import os
from . import new_figure, save_figure, table_html, write_html
from .plots import (HEAD, LAYER, depth_axis, head_matrix, head_strips, layer_axis, layer_head_axes, literal,
                    over_heads)
import numpy as np
from ..analysis.clouds import geometry, projection
from ..analysis.text.trace import special_only_note
from ..formatting import fmt
from . import explained_variance_png
from .definitions import defined
from .interactive import PALETTE, label_color, scatter_png, write_scatter_html
from ..tables import Raw



def _heatmap(out_dir, name, data, title, xlabel=None, ylabel=None, cmap="viridis", vmin=None, vmax=None,
             label="", ticks=None, values: str | None = None):
    """A heat map saved as name.png; without xlabel/ylabel its rows are layers 1..L and its
    columns heads 0..H-1. label: the colour bar's quantity; ticks: names of rows and columns;
    values: a format ("{:.2f}") writing each cell's value in it (a table's worth of cells)."""
    fig, ax = heatmap_figure(data, title, xlabel, ylabel, cmap, vmin, vmax, label=label, ticks=ticks)
    if values is not None:
        for (i, j), v in np.ndenumerate(np.asarray(data, dtype=float)):
            if np.isfinite(v):
                ax.text(j, i, values.format(v), ha="center", va="center", fontsize=8)
    return save_figure(fig, out_dir, name)


def heatmap_figure(data, title, xlabel=None, ylabel=None, cmap="viridis", vmin=None, vmax=None, *,
                   label="", ticks=None):
    """(figure, axes) of `_heatmap` (unsaved)."""
    data = np.asarray(data, dtype=float)
    fig, ax = new_figure(max(4.0, 0.45 * data.shape[1] + 2), max(3.0, 0.4 * data.shape[0] + 1.5))
    im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    if xlabel is None:
        layer_head_axes(ax, *data.shape)
    else:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if ticks is not None:
        ticks = [literal(t) for t in ticks]
        ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right")
        ax.set_yticks(range(len(ticks)), ticks)
    return fig, ax


# Clark's figure 2 panels ([CLS], [SEP], ". or ,") and the other targets the report keeps;
# (key or keys summed, title): "period" + "comma" is Clark's ". ," (each text's mean of the sum)
CLARK_TARGETS = ((("cls",), "attention to [CLS]"), (("sep",), "attention to [SEP]"),
                 (("period", "comma"), "attention to '.' or ',' (Clark)"), (("period",), "attention to '.'"),
                 (("comma",), "attention to ','"), (("sep_from_other",), "other tokens' attention to [SEP]"),
                 (("next",), "attention to the next token"), (("prev",), "attention to the previous token"))


def clark_strips(out_dir: str, report: dict, L: int, H: int) -> str:
    """clark_heads.png: Clark's one-dot-per-head strips (figures 2 and 4) for the row entropy
    (Clark's smoothed one with --heads, else entropy.mean), the entropy of the [CLS] row (with
    --heads) and the attention_to_per_text targets of report.json (Clark's per-text-first
    averages; attention_to when a report has none)."""
    def nan(v):  # a report.json [L][H] list (None for NaN) or a tensor
        v = v.tolist() if hasattr(v, "tolist") else v
        return np.array([[np.nan if x is None else x for x in row] for row in v], dtype=float)

    heads = report.get("attention_heads")
    if heads is not None and "clark_entropy" in heads:
        panels = [("row entropy, smoothed 1e-4 (Clark)", nan(heads["clark_entropy"]), "entropy (nats)",
                   float(heads["uniform_entropy"]))]
        if "cls_entropy" in heads:
            panels.append(("entropy of the [CLS] row (Clark)", nan(heads["cls_entropy"]), "entropy (nats)", None))
    else:
        panels = [("row entropy", nan(report["entropy"]["mean"]), "entropy (nats)",
                   report["entropy"]["uniform_baseline"])]
    entropies = len(panels)
    # Clark's figure 2 averages per text first (attention_to_per_text); older reports lack it
    to = report.get("attention_to_per_text") or report["attention_to"]
    for keys, title in CLARK_TARGETS:
        if all(k in to for k in keys):
            v = sum(nan(to[k]) for k in keys)
            # softmax attention is never 0: a mass of 0 everywhere means no such token
            absent = bool(np.isfinite(v).all() and not v.any())
            panels.append((title + ("\n(no such token in these texts)" if absent else ""), v,
                           "attention mass per query row", None))
    rows = -(-len(panels) // 4)
    fig = new_figure(14, 3.2 * rows)[0]
    fig.clf()
    head_strips(fig, panels, L, H)
    for ax in fig.axes[entropies:]:
        ax.set_ylim(-0.02, 1.02)
    return save_figure(fig, out_dir, "clark_heads")


def head_sections(out_dir: str, report: dict) -> list:
    from .head_sections import context_maps_section, context_section, gaussianity_section, heads_sections, \
        matrices_section, similar_section

    out = []
    for section in (context_section, similar_section, context_maps_section):
        ctx = section(out_dir, report["context_similarity"])
        if ctx is not None:
            out.append(ctx)
    if "attention_heads" in report:
        out += heads_sections(out_dir, report["attention_heads"], provenance=report.get("provenance"))
    if "gaussianity" in report:
        out.append(gaussianity_section(out_dir, report["gaussianity"]))
    if "attention_matrices" in report:
        out.append(matrices_section(out_dir, report["attention_matrices"]))
    return out


def write_report(out_dir: str, r, report: dict, extra_sections=()) -> list[str]:
    """The PNG plots and report.html for a TraceResult `r` (extra_sections: more (heading, body,
    PNGs) at the end); returns the PNG paths."""
    import numpy as np

    L, H = r.layers, r.heads
    layers = np.arange(1, L + 1)
    pngs = {}

    fig, ax = new_figure()
    ci = report["cone_index"]
    f = lambda v: np.array([np.nan if x is None else x for x in v], dtype=float)  # noqa: E731
    heads = np.array([[np.nan if x is None else x for x in row] for row in ci["head_output"]], dtype=float)
    ax.plot(layers, f(ci["layer_input"]), "o-", label="layer input (hidden state l-1)")
    mean, low, high = over_heads(heads)  # (as the table beside it: a head without a value left out)
    ax.plot(layers, mean, "s-", label="head output (mean over heads)")
    ax.fill_between(layers, low, high, alpha=0.15, color="C1", label="head output range")
    ax.plot(layers, f(ci["multihead_output"]), "^-", label="multi-head output")
    ax.plot(layers, f(ci["layer_output"]), "d-", label="layer output (hidden state l)")
    layer_axis(ax, L)
    ax.set_ylabel("cone index I/n (mean over texts)")
    ax.set_title("cone index of the hidden states and the heads' outputs")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    pngs["cone"] = save_figure(fig, out_dir, "cone_index")

    ent = r.entropy.cpu().numpy()
    pngs["entropy"] = _heatmap(out_dir, "entropy", ent, f"attention row entropy (nats), mean over rows; uniform "
                               f"baseline (mean ln n over the same rows) {fmt(r.uniform_baseline, 3)}", label="entropy (nats)")
    fig, ax = new_figure(7.5, 6.5)
    head_matrix(fig, ax, r.js_distance.cpu().numpy(), L, H, title="Jensen-Shannon distance between heads",
                label="JS distance (sqrt of nats)", vmin=0)
    pngs["js"] = save_figure(fig, out_dir, "js_distance")

    fig, _ = new_figure(15, 3.0)
    fig.clf()
    for i, key in enumerate(("cls", "sep", "punct", "prev", "next")):
        ax = fig.add_subplot(1, 5, i + 1)
        im = ax.imshow(r.attention_to[key].cpu().numpy(), vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_title(f"to {key}")
        layer_head_axes(ax, L, H)
        ax.tick_params(axis="x", labelsize=6)
        if i:  # one layer axis label for the row of panels: the others ran into their neighbours
            ax.set_ylabel("")
    fig.colorbar(im, ax=fig.axes, label="attention mass per query row")
    pngs["attention_to"] = save_figure(fig, out_dir, "attention_to")

    pngs["clark"] = clark_strips(out_dir, report, L, H)

    pngs["context"] = _heatmap(out_dir, "context_distance", r.context_mean_distance.cpu().numpy(),
                               "context similarity: mean |i - j| to the most similar token",
                               cmap="cividis", label="mean |i - j| (tokens)")

    fig, _ = new_figure(10, 3.5)
    fig.clf()
    a1 = fig.add_subplot(1, 3, 1)
    a1.plot(layers, r.step_distance.cpu().numpy(), "o-")
    a1.set_title("step distance ||h_l - h_(l-1)||")
    a1.set_ylabel("Euclidean distance")
    a2 = fig.add_subplot(1, 3, 2)
    a2.plot(layers, r.step_cosine.cpu().numpy(), "o-")
    a2.set_title("step cosine")
    a2.set_ylabel("cos(h_l, h_(l-1))")
    a3 = fig.add_subplot(1, 3, 3)
    a3.plot(np.arange(L + 1), r.norm.cpu().numpy(), "o-")
    a3.set_title("norm ||h_l||")
    a3.set_ylabel("norm")
    for a in (a1, a2):
        layer_axis(a, L)
    depth_axis(a3, L + 1)
    fig.tight_layout()  # (the panels' y labels had run into the panels beside them)
    pngs["evolution"] = save_figure(fig, out_dir, "evolution")

    if "cls_pairs" in report:
        cp = report["cls_pairs"]
        pngs["pairs"] = _heatmap(out_dir, "cls_pairs", cp["cosine"].cpu().numpy(),
                                 "cosine between mean [CLS] difference vectors (last layer)", "group", "group",
                                 cmap="coolwarm", vmin=-1, vmax=1, label="cosine",
                                 ticks=[str(g) for g in cp["groups"]],
                                 values="{:.2f}" if len(cp["groups"]) <= 16 else None)

    summary = table_html(
        ["model", "texts", "tokens", "layers", "heads", "truncated", "forward passes with metrics (s)"],
        [[r.model, r.n_texts, r.n_tokens, L, H, r.truncated, r.seconds]])
    if r.special_only:
        summary += f"<p>{html.escape(special_only_note(r.special_only))}.</p>"
    per_layer = table_html(
        [LAYER, Raw(defined("cone_index", "cone in")), Raw(defined("cone_index", "cone heads (mean)")),
         Raw(defined("cone_index", "cone multi-head")), Raw(defined("cone_index", "cone out")),
         Raw(defined("entropy", "entropy (mean)"))]
        + [Raw(defined("attention_to", f"to {k}")) for k in ("[CLS]", "[SEP]", "punct", "prev", "next")]
        + [Raw(defined("context", "context |i-j|")), Raw(defined("evolution", "step cos"))],
        [[l + 1, float(r.cone_layer_input[l]), float(np.nanmean(heads[l])), float(r.cone_multihead_output[l]),
          float(r.cone_layer_output[l]), float(ent[l].mean())]
         + [float(r.attention_to[k][l].mean()) for k in ("cls", "sep", "punct", "prev", "next")]
         + [float(r.context_mean_distance[l].nanmean()), float(r.step_cosine[l])] for l in range(L)])
    focus = table_html([f"{LAYER} / {HEAD}"] + [f"h{h}" for h in range(H)],
                               [[l + 1] + list(r.focus_token[l]) for l in range(L)])
    sel = report.get("correct_only")
    if sel:  # every number below is over the kept texts: say so where the counts are read
        summary += (f"<p>--correct-only: {fmt(sel['kept'])} of {fmt(sel['texts'])} texts kept, those the "
                    f"model classifies as their label (accuracy {fmt(sel['accuracy'])}); every number on "
                    "this page is over the kept texts.</p>" + table_html(
                        ["label", "texts", "kept"],
                        [[g, n, sel["kept_per_label"].get(g, 0)] for g, n in sel["texts_per_label"].items()]))
    sections = [
        ("Summary", summary + per_layer, []),
        ("Cone index: do a layer's vectors point one way?",
         f"<p>The {defined('cone_index')} per text over its real tokens, mean over texts, for the four "
         "tensors of each layer.</p>", [pngs["cone"]]),
        ("Attention entropy: how spread is each head's attention?",
         f"<p>{defined('entropy', 'Row entropy')} averaged over every real query row.</p>", [pngs["entropy"]]),
        ("Where attention goes: [CLS], [SEP], punctuation, neighbours",
         f"<p>Mean {defined('attention_to', 'attention mass')} per real query row.</p>", [pngs["attention_to"]]),
        ("Every head, layer by layer: entropy and attention targets (Clark et al., figures 2 and 4)",
         f"<p>One dot per head at its layer (1..L; heads spread a little sideways and coloured by "
         f"index), the black bar the mean over the layer's heads: the {defined('entropy', 'row entropy')} "
         + ("with Clark's smoothing (attention_heads.clark_entropy) and the entropy of the [CLS] row "
            "(.cls_entropy)" if "attention_heads" in report
            else "(entropy.mean; --heads adds Clark's smoothed one and the [CLS] row's)")
         + f" and the {defined('attention_to_per_text', 'attention mass')} of a real query row on [CLS], "
         "[SEP], '.' or ',' (Clark's panel: the two summed), '.', ',' and the next and previous token, "
         "averaged per text first and then over texts as Clark et al. do (report.json "
         "attention_to_per_text.cls, .sep, .period + .comma, .period, .comma, .next, .prev), and the "
         "attention of the rows that are neither [CLS] nor [SEP] to [SEP] (.sep_from_other).</p>",
         [pngs["clark"]]),
        ("How different the heads are: Jensen-Shannon distances",
         f"<p>{defined('js_distance', 'JS distance')} between heads' mean attention over [CLS], [SEP] and "
         "relative offsets.</p>", [pngs["js"]]),
        ("Context similarity: which other token a head's output resembles most",
         f"<p>Most similar other token under O O<sup>T</sup> ({defined('context')}); focus token "
         "per head (most often the focus of a text):</p>" + focus, [pngs["context"]]),
        ("How token vectors change from layer to layer",
         f"<p>{defined('evolution')}: means over every real token.</p>", [pngs["evolution"]]),
    ]
    if "pairs" in pngs:
        cp = report["cls_pairs"]
        sections.append(("[CLS] difference vectors", table_html(
            ["group", "pairs", "||mean difference||"],
            [[g, int(n), float(v)] for g, n, v in zip(cp["groups"], cp["counts"].tolist(), cp["mean_norm"].tolist())]),
            [pngs["pairs"]]))
    if report.get("by_label"):
        sections.append(label_section(out_dir, report["by_label"], L))
    sections += head_sections(out_dir, report)
    sections.extend(extra_sections)
    write_html(os.path.join(out_dir, "report.html"), f"embgeom text: {r.model}", sections,
               provenance=report.get("provenance"))
    return list(pngs.values())


# (title, report.json key path, reduce over heads) of the per-label curves and table
LABEL_CURVES = (
    ("cone index of the layer output", ("cone_index", "layer_output"), False),
    ("attention row entropy (nats, mean over heads)", ("entropy", "mean"), True),
    ("attention to [CLS] (per text, mean over heads)", ("attention_to_per_text", "cls"), True),
    ("attention to [SEP] (per text, mean over heads)", ("attention_to_per_text", "sep"), True),
    ("context |i - j| (mean over heads)", ("context_similarity", "mean_distance"), True),
    ("step cosine cos(h_l, h_(l-1))", ("evolution", "step_cosine"), False),
)


def label_section(out_dir: str, by_label: dict, L: int):
    """--labels: the default metrics once more per class (report.json by_label), as curves over
    the layers with one line per label (its colour in the [CLS] scatters: the palette by sorted
    label) and a table of the last layer. -> (heading, body, PNGs)."""
    labels = sorted(by_label, key=str)

    def curve(label, keys, per_head):
        v = by_label[label]
        for k in keys:
            v = v[k]
        a = np.array([[np.nan if x is None else x for x in (row if isinstance(row, list) else [row])] for row in v],
                     dtype=float)
        return over_heads(a)[0] if per_head else a[:, 0]

    fig, _ = new_figure(13, 6.6)
    fig.clf()
    layers = np.arange(1, L + 1)
    for n, (title, keys, per_head) in enumerate(LABEL_CURVES):
        ax = fig.add_subplot(2, 3, n + 1)
        for label in labels:
            ax.plot(layers, curve(label, keys, per_head), "o-", ms=3, lw=1.2,
                    color=label_color(label, labels), label=literal(f"{label} ({by_label[label]['n_texts']})"))
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(title.split(" (")[0], fontsize=8)
        layer_axis(ax, L)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    png = save_figure(fig, out_dir, "by_label")
    table = table_html(
        ["label", "texts", "tokens"] + [f"{title} (layer {L})" for title, _, _ in LABEL_CURVES],
        [[label, by_label[label]["n_texts"], by_label[label]["n_tokens"]]
         + [float(curve(label, keys, over)[-1]) for _, keys, over in LABEL_CURVES] for label in labels])
    body = (f"<p>The default metrics computed once more over each label's texts (report.json by_label: "
            f"every key of the report's per-text analyses, per label): {defined('cone_index')}, "
            f"{defined('entropy', 'row entropy')}, {defined('attention_to_per_text', 'attention mass')} "
            f"per text, {defined('context', 'context similarity')} and {defined('evolution', 'step cosine')}; "
            "in parentheses the label's number of texts.</p>" + table)
    return ("Per label: the default metrics of each class's texts", body, [png])


# ------------------------------------------------------------------------------ pictures
def trajectory_plots(out_dir: str, path: str) -> tuple[list[str], dict]:
    """PCA paths of the kept tokens (all depths; without the last step) and per-token step
    distance, step cosine and norm (thesis 4.3, figures 20-22)."""
    with np.load(path) as z:  # (an npz holds its file open until closed)
        states, text, tokens = z["states"], z["text"], z["token"]
    n, depths, d = states.shape
    names = [literal(f"{t}:{tok}") for t, tok in zip(text.tolist(), tokens.tolist())]
    pngs = []
    fig = new_figure(12, 5.5)[0]
    fig.clf()
    for a, last in enumerate((depths, depths - 1)):
        # each panel its own PCA, fitted on the states it shows (thesis figure 20 a/b)
        flat = states[:, :last].reshape(n * last, d)
        _, mean, comps = projection.pca_fit(flat, 2)
        paths = ((flat.astype(np.float64) - mean) @ comps).reshape(n, last, 2)
        ax = fig.add_subplot(1, 2, a + 1)
        shown = set()
        for i in range(n):
            t = int(text[i])
            c = PALETTE[t % len(PALETTE)]
            ax.plot(paths[i, :last, 0], paths[i, :last, 1], "-o", ms=2, lw=0.8, color=c, alpha=0.7,
                    label=None if t in shown else f"text {t}")
            shown.add(t)
            # the end label set off by a few points, stepped by token: ends that meet stay readable
            ax.annotate(literal(tokens[i]), paths[i, last - 1], xytext=(3, -6 + 6 * (i % 3)),
                        textcoords="offset points", fontsize=6, color=c)
        ax.scatter(paths[:, 0, 0], paths[:, 0, 1], color="red", s=12, zorder=3, label="depth 0 (embeddings)")
        ax.set_title("token paths, PCA of all depths" if last == depths else "PCA without the last depth")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    pngs.append(save_figure(fig, out_dir, "trajectories_pca"))
    steps = geometry.trajectory_steps(states)
    fig = new_figure(13, 3.8)[0]
    fig.clf()
    for a, (key, title, xs) in enumerate((("step_distance", "step distance ||h_l - h_(l-1)||", range(1, depths)),
                                          ("step_cosine", "step cosine", range(1, depths)),
                                          ("norm", "norm ||h_l||", range(depths)))):
        ax = fig.add_subplot(1, 3, a + 1)
        for i in range(n):
            ax.plot(list(xs), steps[key][i], lw=0.8, color=PALETTE[int(text[i]) % len(PALETTE)],
                    label=names[i] if n <= 12 else None)
        ax.set_title(title)
        ax.set_ylabel({"step_distance": "Euclidean distance", "step_cosine": "cos(h_l, h_(l-1))",
                       "norm": "norm"}[key])
        if key == "norm":
            depth_axis(ax, depths)
        else:
            layer_axis(ax, depths - 1)
        if a == 0:  # one line per token, coloured by text
            if n <= 12:
                ax.legend(fontsize=6, title="text:token", title_fontsize=6)
            else:
                for t in sorted(set(int(v) for v in text.tolist()))[:12]:
                    ax.plot([], [], color=PALETTE[t % len(PALETTE)], label=f"text {t}")
                ax.legend(fontsize=6, title=f"{n} tokens, by text", title_fontsize=6)
    pngs.append(save_figure(fig, out_dir, "trajectories_steps"))
    summary = {"tokens": n, "texts": int(text.max()) + 1 if n else 0,
               "step_distance_mean": steps["step_distance"].mean(0).tolist(),
               "step_cosine_mean": steps["step_cosine"].mean(0).tolist(),
               "norm_mean": steps["norm"].mean(0).tolist()}
    return pngs, summary


def group_plots(out_dir: str, cls_path: str, labels: list[str], groups: dict, texts: list[str] | None,
                seed: int = 0, provenance: dict | None = None) -> tuple[list[str], list[str]]:
    """Pictures of the labelled [CLS] sets: PCA (and UMAP when umap-learn is there) of the last
    depth coloured by label, per-label PCA curves, silhouette / within / between over depth,
    cosine histograms per label; provenance: the footer of the scatter pages. Returns (PNG
    paths, notes)."""
    cls = np.load(cls_path, mmap_mode="r")
    last = np.asarray(cls[:, -1], dtype=np.float32)
    pngs, notes = [], []
    proj = projection.project(last, method="pca", labels=labels)
    pngs.append(scatter_png(out_dir, "groups_pca", proj.embedding, labels,
                            title="[CLS] at the last depth, PCA", xlabel="PC 1", ylabel="PC 2"))
    write_scatter_html(os.path.join(out_dir, "groups_pca.html"), proj.embedding, labels, texts,
                       title="[CLS] at the last depth, PCA", xlabel="PC 1", ylabel="PC 2",
                       provenance=provenance)
    pngs.append(explained_variance_png(out_dir, "groups_explained_variance", proj.pca_curves, labels))
    if last.shape[0] >= 4:
        try:
            um = projection.project(last, method="umap", labels=labels, k=min(15, last.shape[0] - 2), seed=seed)
            pngs.append(scatter_png(out_dir, "groups_umap", um.embedding, labels,
                                    title="[CLS] at the last depth, UMAP (exact cosine graph)",
                                    xlabel="UMAP 1", ylabel="UMAP 2"))
            write_scatter_html(os.path.join(out_dir, "groups_umap.html"), um.embedding, labels, texts,
                               title="[CLS] at the last depth, UMAP", knn=(um.indices, um.similarities),
                               knn_file="groups_umap_knn.npz",
                               xlabel="UMAP 1", ylabel="UMAP 2", provenance=provenance)
            groups["umap_silhouette"] = um.silhouette
        except ValueError as exc:
            notes.append(f"UMAP left out: {exc}")
    fig = new_figure(13, 3.8)[0]
    fig.clf()
    depths = len(groups["silhouette"])
    nan = lambda v: np.array([np.nan if x is None else x for x in v], dtype=float)  # noqa: E731
    within, between = nan(groups["within_cosine"]), nan(groups["between_cosine"])
    a1 = fig.add_subplot(1, 3, 1)
    a1.plot(range(depths), nan(groups["silhouette"]), "o-", color="C0")
    a1.set_ylabel("silhouette (cosine distance)")
    a1.set_title("silhouette of the labels")
    a2 = fig.add_subplot(1, 3, 2)
    a2.plot(range(depths), within, "s-", color="C1", label="same label")
    a2.plot(range(depths), between, "^-", color="C2", label="different labels")
    a2.set_ylabel("mean cosine")
    a2.set_title("mean cosine of [CLS] pairs")
    a2.legend(fontsize=8)
    a3 = fig.add_subplot(1, 3, 3)
    gap = within - between
    a3.plot(range(depths), gap, "d-", color="C3")
    # the two curves can differ at 1e-5 where both are near 1: the gap on a log axis shows it
    if np.all(gap[np.isfinite(gap)] > 0):
        a3.set_yscale("log")
        a3.set_title("gap between the two (log axis)")
    else:  # (log where |gap| > 1e-6, linear through 0)
        a3.set_yscale("symlog", linthresh=1e-6)
        a3.set_title("gap between the two (symmetric log axis)")
    a3.set_ylabel("within - between (mean cosine)")
    for ax in (a1, a2, a3):
        depth_axis(ax, depths)
    fig.suptitle("labelled [CLS] sets over depth", fontsize=10)
    fig.tight_layout()
    pngs.append(save_figure(fig, out_dir, "groups_depth"))
    # within labels and across label pairs in two panels: one set of colours each (in one panel
    # the pairs' dotted lines reused the labels' colours)
    fig = new_figure(14, 4.8)[0]
    fig.clf()
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    lo, hi = 1.0, -1.0

    def curve(h):
        edges = np.linspace(h["lo"], h["hi"], h["bins"] + 1)
        counts = np.asarray(h["counts"], dtype=float)
        used = np.nonzero(counts)[0]
        return edges, counts / max(counts.sum(), 1), used

    for g, st in groups["last"]["per_label"].items():
        if "cosine" not in st:
            continue
        edges, share, used = curve(st["cosine"]["hist"])
        if used.size:
            lo, hi = min(lo, edges[used[0]]), max(hi, edges[used[-1] + 1])
        ax.stairs(share, edges, color=label_color(g, groups["last"]["per_label"]), lw=1.4, label=literal(g))
    pairs = list(groups["last"]["per_pair"].items())
    cmap = __import__("matplotlib").colormaps["tab20" if len(pairs) <= 20 else "turbo"]
    for k, (_, st) in enumerate(pairs):
        edges, share, used = curve(st["cosine"]["hist"])
        if used.size:
            lo, hi = min(lo, edges[used[0]]), max(hi, edges[used[-1] + 1])
        bx.stairs(share, edges, lw=1, color=cmap(k / max(len(pairs) - 1, 1)),
                  label=literal(" x ".join(st["labels"])))
    depth = groups["last"].get("depth")
    at = "" if depth is None else f", depth {depth}"
    for a, title in ((ax, f"pairwise cosine within each label{at}"),
                     (bx, f"pairwise cosine across label pairs ({len(pairs)}){at}")):
        if lo < hi:  # the range the data covers (both panels alike), not -1..1
            pad = 0.02 * (hi - lo)
            a.set_xlim(lo - pad, hi + pad)
        a.set_xlabel("cosine")
        a.set_ylabel("share of pairs")
        a.set_title(title, fontsize=10)
    # a panel without curves says why instead of showing empty axes (and no empty legend)
    for a, empty_note, legend in (
            (ax, "no label has two texts: no pairs within a label", dict(fontsize=7)),
            (bx, groups["last"].get("per_pair_note") or "one label only: no pairs across labels",
             dict(fontsize=6, ncol=2 if len(pairs) > 8 else 1, bbox_to_anchor=(1.01, 1), loc="upper left"))):
        if a.patches:  # (the curves are stairs: patches, not lines)
            a.legend(**legend)
        else:
            a.text(0.5, 0.5, empty_note, ha="center", va="center", transform=a.transAxes, fontsize=9)
    fig.tight_layout()
    pngs.append(save_figure(fig, out_dir, "groups_cosine_hist"))
    return pngs, notes


def pair_plot(out_dir: str, vectors: np.ndarray, pair_groups: list[str]) -> str:
    """PCA of the [CLS] difference vectors, with each group's mean difference as an arrow from
    the image of the zero vector (thesis 4.4.2, figure 24)."""
    _, mean, comps = projection.pca_fit(vectors, 2)
    xy = (vectors - mean) @ comps
    origin = (-mean) @ comps
    lab = np.asarray(pair_groups)
    arrows = {g: (origin, xy[lab == g].mean(0)) for g in sorted(set(pair_groups))}
    return scatter_png(out_dir, "pair_differences_pca", xy, pair_groups, arrows=arrows,
                       title="[CLS] difference vectors, PCA; arrows: mean per group",
                       xlabel="PC 1", ylabel="PC 2")
