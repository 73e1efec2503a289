"""Report sections of docs/metrics.md, attention heads: Clark's entropies and MDS map, the gate-pattern labels,
directionality, the head-map grid, Gaussianity by depth and the context-similarity completions.
Each function returns (heading, html body, [png paths]) sections for `write_html`."""
from __future__ import annotations

import html
import warnings

import numpy as np

from .definitions import defined
from ..analysis.text.labelled import no_class_maps_note
from ..analysis.heads.measures import PERIOD_COMMA
from .attention_view import write_attention_view
from .headmaps import headmaps_html
from .interactive import label_color
from ..formatting import fmt as fmt_number
from ..tables import table_html
from .plots import (DEPTH, HEAD, LAYER, depth_axis, head_matrix, layer_axis, layer_head_axes,
                    literal, new_figure, over_heads, save_figure)

MARKERS = {"broad": "o", "next": ">", "previous": "<", "[CLS]": "s", "[SEP]": "D",
           PERIOD_COMMA: "P", "other": "x"}
ATTENTION_VIEW = "attention_view.html"
LABEL_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#dddddd"]


def _arr(v):
    return np.array([[np.nan if x is None else x for x in row] for row in v], dtype=float) \
        if isinstance(v, list) else np.asarray(v.cpu() if hasattr(v, "cpu") else v, dtype=float)


def _heat(ax, fig, data, title, cmap="viridis", vmin=None, vmax=None, fmt=None, label=""):
    im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    layer_head_axes(ax, *data.shape)
    if fmt and data.size <= 16 * 16:
        finite = data[np.isfinite(data)]
        if finite.size and finite.min() < finite.max() and fmt.endswith("f}"):
            # up to 2 decimals, as many as it takes for cells of different values to read
            # differently (12.8 in every cell hid what the colours showed)
            distinct = np.unique(finite).size
            least = decimals = int(fmt[-3])  # (a format of 3 or more decimals is kept as it is)
            for decimals in range(least, 3):
                if len({f"{v:.{decimals}f}" for v in finite.tolist()}) == distinct:
                    break
            fmt = f"{{:.{decimals}f}}"
        for (i, j), v in np.ndenumerate(data):
            # dark text on the colour map's light cells, light text on its dark ones
            light = np.isfinite(v) and sum(im.cmap(im.norm(v))[:3]) > 1.8
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color="k" if light else "w")


def _layer_band(ax, v, label: str = "mean over heads", color=None) -> None:
    """Curve over layers of v (L, H)'s mean over heads, its range over heads shaded."""
    layers = np.arange(1, v.shape[0] + 1)
    style = {} if color is None else {"color": color}
    mean, low, high = over_heads(v)
    ax.plot(layers, mean, "o-", label=label, **style)
    ax.fill_between(layers, low, high, alpha=0.2, label="range over heads", **style)


def heads_sections(out_dir: str, block: dict, provenance: dict | None = None) -> list:
    """block: the `attention_heads` dict of HeadsAccumulator.result; provenance: the report's,
    the footer of attention_view.html (written with the sample maps)."""
    sections = []
    ce, cls_e, ve = _arr(block["clark_entropy"]), _arr(block["cls_entropy"]), _arr(block["value_entropy"])
    L, H = ce.shape
    layers = np.arange(1, L + 1)
    fig, _ = new_figure(12, 3.6)
    fig.clf()
    a1 = fig.add_subplot(1, 3, 1)
    _layer_band(a1, ce, "mean over a text's rows (Clark)")
    a1.plot(layers, cls_e.mean(1), "s--", label="from [CLS] (row 0)")
    a1.axhline(block["uniform_entropy"], color="gray", ls=":", label="uniform (ln n, mean over texts)")
    a1.set_title("attention row entropy (nats), smoothing 1e-4", fontsize=9)
    a1.set_ylabel("entropy (nats)")
    layer_axis(a1, L)
    a1.legend(fontsize=7)
    a2 = fig.add_subplot(1, 3, 2)
    _layer_band(a2, ve, color="C2")
    a2.axhline(block["value_entropy_max"], color="gray", ls=":", label="ln 20")
    a2.set_title("value-histogram entropy (20 bins, nats)", fontsize=9)
    a2.set_ylabel("entropy (nats)")
    layer_axis(a2, L)
    a2.legend(fontsize=7)
    a3 = fig.add_subplot(1, 3, 3)
    _heat(a3, fig, _arr(block["sep_to_sep"]), "[SEP] -> [SEP] attention", "Blues", 0, 1,
          label="attention mass")
    a3.tick_params(axis="x", labelsize=7 if H > 8 else 9)  # (a third of the figure: "10" and "11" had met)
    png = save_figure(fig, out_dir, "head_entropy")
    fig, ax = new_figure(0.5 * H + 3, 0.4 * L + 2)
    _heat(ax, fig, ce, "Clark entropy per head (nats)", fmt="{:.1f}", label="entropy (nats)")
    png2 = save_figure(fig, out_dir, "clark_entropy")
    sections.append(("How focused is each head? Entropy per head (Clark; value histogram)",
                     f"<p>{defined('clark')}: Clark et al. (arXiv 1906.04341): row entropy of 0.9999 A + 0.0001/n, mean over "
                     "a text's rows, then over texts; from [CLS]: row 0 only. Its uniform baseline is ln n averaged "
                     f"the same way, over texts: {fmt_number(block['uniform_entropy'], 3)} nats (the row "
                     "entropy heat map averages over rows, so long texts weigh more there and its "
                     "baseline differs). Value-histogram entropy: the geometry-of-BERT authors' code "
                     "(arXiv 2502.12033), maximum ln 20.</p>", [png, png2]))

    if "js_divergence" in block:
        js = _arr(block["js_divergence"])
        mds = _arr(block["mds"])
        beh = [b for row in block["mds_behaviour"] for b in row]
        fig, _ = new_figure(13, 5.5)
        fig.clf()
        a1 = fig.add_subplot(1, 2, 1)
        cmap = __import__("matplotlib").colormaps["viridis"]
        for k, (x, y) in enumerate(mds):
            l, h = divmod(k, H)
            a1.scatter(x, y, color=cmap(l / max(L - 1, 1)), marker=MARKERS.get(beh[k], "x"), s=40)
        for name, mk in MARKERS.items():
            if name in beh:
                a1.scatter([], [], color="gray", marker=mk, label=name)
        sm = __import__("matplotlib").cm.ScalarMappable(cmap=cmap)
        sm.set_clim(1, L)
        fig.colorbar(sm, ax=a1, label=LAYER, ticks=range(1, L + 1))
        a1.legend(fontsize=7, title="behaviour", title_fontsize=7)
        a1.set_title("MDS of the summed JS divergence between heads (Clark Fig. 6)", fontsize=9)
        a1.set_xlabel("MDS axis 1")
        a1.set_ylabel("MDS axis 2")
        a2 = fig.add_subplot(1, 2, 2)
        head_matrix(fig, a2, js, L, H, title="summed JS divergence between heads",
                    label="summed JS divergence (nats)", vmin=0)
        png = save_figure(fig, out_dir, "head_mds")
        page = head_mds_page(out_dir, mds, js, beh, L, H, provenance)
        sections.append(("Which heads behave alike? Distances and MDS map (Clark)",
                         f"<p>Interactive (hover a head, click for its nearest heads): <a href='{page}'>{page}</a>. "
                         "D(a, b) = sum over every real query row of every text of JS(P_a, P_b), "
                         "P = 0.999 A + 0.001/n (nats, not its square root); metric MDS "
                         "(scikit-learn, precomputed, n_init 5, max_iter 1000, eps 1e-10, seed 0). "
                         "In the picture colour: layer, marker: Clark's behaviours; on the interactive page "
                         "colour: behaviour, the layer on hover (behaviours: broad: entropy > 3.8 nats; "
                         "next/previous >= 0.5; [CLS]/[SEP]/'.' or ',' >= 0.6, the last on the two tokens' mass together).</p>", [png]))

    pats = block["patterns"]
    labels = block["pattern_labels"]
    idx = np.array([[labels.index(p["label"]) for p in row] for row in pats])
    fig, ax = new_figure(0.6 * H + 4, 0.45 * L + 2)
    from matplotlib.colors import ListedColormap
    ax.imshow(idx, cmap=ListedColormap(LABEL_COLORS[:len(labels)]), vmin=-0.5, vmax=len(labels) - 0.5,
              aspect="auto")
    for (i, j), v in np.ndenumerate(idx):
        ax.text(j, i, "".join(w[0] for w in labels[v].split()[:2]).upper(), ha="center", va="center",
                fontsize=7)
    for c, name in zip(LABEL_COLORS, labels):
        ax.scatter([], [], color=c, marker="s", label=name)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    layer_head_axes(ax, L, H)
    ax.set_title("gate label per head (our rule over the features)", fontsize=9)
    png = save_figure(fig, out_dir, "head_patterns")
    feats = ["diagonal", "cls_sep", "top_column", "top3_columns", "back3", "forward3", "previous",
             "next", "k90_median", "normalised_entropy"]
    rows = [[l + 1, h, pats[l][h]["label"]] + [pats[l][h][f] for f in feats]
            for l in range(L) for h in range(H)]
    counts = {name: int((idx == i).sum()) for i, name in enumerate(labels)}
    sections.append(("What each head attends to: gate patterns (ours)",
                     "<p>Features are primary; the label is our documented rule (docs/metrics.md, attention heads), not "
                     "the geometry-of-BERT authors' criteria, which could not be read: closed gate "
                     "D + S >= 0.6; directional (C1 >= 0.5 or C3 >= 0.6) and median k90 <= 3; "
                     "backward / forward contextual B3 / F3 >= 0.5; open: median normalised entropy "
                     ">= 0.78 or median k90 >= mean n / 2; cluster head and instance gate are not "
                     "evaluated. Counts: " + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "</p>"
                     + "<details><summary>features of every head</summary>"
                     + table_html([LAYER, HEAD, "label"] + feats, rows) + "</details>", [png]))

    if "directionality" in block:
        d = block["directionality"]
        keys = [k for k in ("skew_fraction", "asymmetry", "positive_cos_share", "spearman_qnorm_entropy")
                if k in d]
        fig, _ = new_figure(4.2 * len(keys), 3.4)
        fig.clf()
        for i, k in enumerate(keys):
            ax = fig.add_subplot(1, len(keys), i + 1)
            _heat(ax, fig, _arr(d[k]), k.replace("_", " "), "coolwarm" if k.startswith("spearman") else "viridis",
                  -1 if k.startswith("spearman") else None, 1 if k.startswith("spearman") else None,
                  label=k.replace("_", " "))
            if i:  # the layer axis named once: each colour bar's label had printed over the next panel's
                ax.set_ylabel("")
        fig.tight_layout()
        png = save_figure(fig, out_dir, "head_directionality")
        sections.append(("Directionality of subspace selection: do queries and keys read different directions? (ours)",
                         "<p>Two readings proposed for the paper's undefined notion: skew fraction "
                         "||(M - M^T)/2||_F / ||M||_F of M = W_Q,h^T W_K,h (weights) and the asymmetry "
                         "||A - A^T||_F / (2 ||A||_F) of each text's map; the share of each row's mass on "
                         "keys with cos(q, k) > 0, and the Spearman correlation between ||q_i|| and the "
                         "row entropy per text (negative: larger queries select more sharply).</p>", [png]))

    maps = block.get("sample_maps")
    if isinstance(maps, dict):                     # written by embgeom text next to report.json
        import json
        import os

        with open(os.path.join(out_dir, maps["file"]), encoding="utf-8") as f:
            maps = json.load(f)
    if maps:
        import os

        write_attention_view(os.path.join(out_dir, ATTENTION_VIEW), maps, L, H, provenance=provenance,
                             title="embgeom text: attention between the tokens of the kept texts")
        sections.append(("Attention maps of sample texts (click a head)",
                         f"<p>Token to token, one layer and any heads at a time (bertviz-style): "
                         f"<a href='{ATTENTION_VIEW}'>{ATTENTION_VIEW}</a>.</p>" + headmaps_html(maps, L, H), []))
    return sections


def head_mds_page(out_dir: str, mds, js, behaviour: list[str], L: int, H: int,
                  provenance: dict | None = None, show: int = 10) -> str:
    """head_mds.html: the MDS map of the heads (interactive.write_scatter_html), each point named
    'L{l} h{h}' (layers 1..L, heads from 0) with its index (l - 1) * H + h and coloured by Clark's
    behaviour; a click lists the heads nearest to it by the summed JS divergence. Returns the
    file name."""
    import os

    from .interactive import write_scatter_html

    js = np.asarray(js, dtype=float)
    n = js.shape[0]
    order = np.argsort(np.where(np.eye(n, dtype=bool), np.inf, js), axis=1, kind="stable")[:, :max(n - 1, 0)]
    write_scatter_html(os.path.join(out_dir, "head_mds.html"), mds,
                       [b for b in behaviour], [f"L{k // H + 1} h{k % H}" for k in range(n)],
                       title="MDS of the heads by summed JS divergence (Clark Fig. 6)",
                       note="One point per head: L = layer (1..L), h = head (from 0); the id is "
                            "(layer - 1) * H + head; colour: Clark's behaviour (click a legend entry to hide it).",
                       xlabel="MDS 1", ylabel="MDS 2", provenance=provenance, ids=range(n), knn_show=show,
                       knn=(order, np.take_along_axis(js, order, axis=1)),
                       knn_note="nearest heads by summed JS divergence (nats)")
    return "head_mds.html"


def matrices_section(out_dir: str, block: dict):
    """`--matrices`: the spectral means per layer (mean over heads, range over heads), and per
    head the median k90 and the attention block's numerical rank."""
    panels = (("rows_cone", "cone index I/n of the attention rows", "I / n"),
              ("small_singular", "singular values < 1e-3 (count)", "count"),
              ("von_neumann", "von Neumann entropy of the eigenvalues", "nats"))
    fig, _ = new_figure(12, 3.4)
    fig.clf()
    for i, (key, title, unit) in enumerate(panels):
        v = _arr(block[key])
        ax = fig.add_subplot(1, 3, i + 1)
        _layer_band(ax, v)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit)
        layer_axis(ax, v.shape[0])
        ax.legend(fontsize=7)
    png = save_figure(fig, out_dir, "attention_matrices")
    k90 = np.asarray(block["k90_quantiles"]["values"], dtype=float)[..., list(block["k90_quantiles"]["q"]).index(0.5)]
    fig, axes = new_figure(12, 0.35 * k90.shape[0] + 2.4)
    fig.clf()
    _heat(fig.add_subplot(1, 2, 1), fig, k90, "median k90 (rows' fewest entries reaching 0.9)", fmt="{:.0f}",
          label="entries")
    _heat(fig.add_subplot(1, 2, 2), fig, _arr(block["ranks"]["softmax"]), "numerical rank of the attention block",
          fmt="{:.1f}", label="rank (mean over texts)")
    png2 = save_figure(fig, out_dir, "attention_matrices_heads")
    spectra = block.get("spectra_texts", block["texts"])
    over = (f"the first {fmt_number(spectra)} of {fmt_number(block['texts'])} texts"
            if spectra != block["texts"] else f"{fmt_number(spectra)} texts")
    return ("Attention blocks as matrices (geometry-of-BERT code)",
            f"<p>{defined('attention_matrices')}: means over {over} (k90 over every text); mean real "
            f"tokens per text {fmt_number(block['ranks']['mean_tokens'], 3)}. The weights' analyses "
            "(rank, singular values and eigenvalue signs of W_Q,h W_K,h^T, the q/k/v norm histograms "
            "beside the projections' largest singular values) are in report.json, "
            "<code>attention_matrices</code>.</p>", [png, png2])


def gaussianity_section(out_dir: str, entries: list[dict]):
    depth = [e["depth"] for e in entries]
    fig, _ = new_figure(12, 3.4)
    fig.clf()
    for i, (key, title) in enumerate((("share_rejected", "share rejecting normality (K^2, Bonferroni)"),
                                      ("mean_skew", "mean skewness"),
                                      ("mean_excess_kurtosis", "mean excess kurtosis"))):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(depth, [e[key] for e in entries], "o-", label="tokens")
        ax.plot(depth, [e["text_mean"][key] for e in entries], "s--", label="text mean vectors")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel({"share_rejected": "share of vectors rejecting normality", "mean_skew": "skewness",
                       "mean_excess_kurtosis": "excess kurtosis"}[key])
        depth_axis(ax, len(depth))
        ax.legend(fontsize=7)
    png = save_figure(fig, out_dir, "gaussianity")
    rows = [[e["depth"], e["count"], e["share_rejected"], e["mean_skew"], e["mean_excess_kurtosis"],
             e["text_mean"]["share_rejected"], e["text_mean"]["mean_skew"],
             e["text_mean"]["mean_excess_kurtosis"]] for e in entries]
    return ("Are hidden states Gaussian? K^2 by depth (ours)",
            f"<p>{defined('gaussianity')}: D'Agostino-Pearson K^2 (scipy.stats.normaltest's p-value) on each real token's hidden-state "
            "components, rejected at p &lt; 0.05 / N (N real tokens in the corpus); skewness and "
            "excess kurtosis with scipy's defaults; the same for each text's mean vector "
            "(p &lt; 0.05 / number of texts).</p>"
            + table_html([DEPTH, "tokens", "share rejected", "mean skew", "mean excess kurtosis",
                          "text means: rejected", "skew", "kurtosis"], rows), [png])


def context_section(out_dir: str, cs: dict):
    hist = np.asarray(cs["layer_distance_hist"], dtype=float)
    if hist.size == 0:
        return None
    L = hist.shape[0]
    fig, _ = new_figure(12, 3.4)
    fig.clf()
    a1 = fig.add_subplot(1, 2, 1)
    width = min(hist.shape[1], 40)
    for l in range(L):
        tot = max(hist[l].sum(), 1)
        a1.plot(np.arange(width), hist[l, :width] / tot, "-", label=f"layer {l + 1}",
                color=__import__("matplotlib").colormaps["viridis"](l / max(L - 1, 1)))
    a1.set_xlabel("|i - j| to the most similar token")
    a1.set_ylabel("share of tokens (all heads)")
    a1.legend(fontsize=6, ncol=2)
    a2 = fig.add_subplot(1, 2, 2)
    layers = np.arange(1, L + 1)
    for key, lab in (("same_sentence_share", "inside the same sentence"),
                     ("period_separator_share", "on '.' or [SEP]"), ("separator_share", "on [SEP]")):
        if key in cs:
            a2.plot(layers, np.nanmean(_arr(cs[key]), 1), "o-", label=lab)
    layer_axis(a2, L)
    a2.set_ylim(0, 1.02)
    a2.set_title("share of most-similar pairs (mean over heads)", fontsize=9)
    a2.set_ylabel("share of most-similar pairs")
    a2.legend(fontsize=7)
    png = save_figure(fig, out_dir, "context_distances")
    return ("Context similarity: distances and sentences (arXiv 2512.21956)",
            "<p>Distribution of |i - j| from each real token to its most similar other token under "
            "O O<sup>T</sup> per layer (all heads), and the share of those pairs inside the token's "
            "sentence (ends: '.', '!', '?', [SEP]) or landing on '.' or [SEP].</p>", [png])


def similar_section(out_dir: str, cs: dict):
    """The --similar pairs: |i - j| distribution per layer and the shares per layer."""
    sim = cs.get("similar")
    if not sim:
        return None
    hist = np.asarray(sim["layer_distance_hist"], dtype=float)
    L = len(sim["pairs"])
    fig, _ = new_figure(12, 3.4)
    fig.clf()
    a1 = fig.add_subplot(1, 2, 1)
    if hist.size:
        width = min(hist.shape[1], 40)
        for l in range(L):
            a1.plot(np.arange(width), hist[l, :width] / max(hist[l].sum(), 1), "-", label=f"layer {l + 1}",
                    color=__import__("matplotlib").colormaps["viridis"](l / max(L - 1, 1)))
        a1.legend(fontsize=6, ncol=2)
    a1.set_xlabel("|i - j| of a high-similarity pair")
    a1.set_ylabel("share of pairs (all heads)")
    a2 = fig.add_subplot(1, 2, 2)
    for key, lab in (("same_sentence_share", "inside the same sentence"),
                     ("period_separator_share", "on '.' or [SEP]"), ("separator_share", "on [SEP]"),
                     ("repeated_token_share", "one token repeated")):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # (no pair selected: a layer of NaN)
            a2.plot(np.arange(1, L + 1), np.nanmean(_arr(sim[key]), 1), "o-", label=lab)
    layer_axis(a2, L)
    a2.set_ylim(0, 1.02)
    a2.set_ylabel("share of high-similarity pairs")
    a2.legend(fontsize=7)
    png = save_figure(fig, out_dir, "context_similar")
    pairs = np.asarray(sim["pairs"], dtype=float)
    return (f"Context similarity: high-similarity pairs ({sim['rule']}, ours)",
            f"<p>Pairs chosen by the rule <code>{sim['rule']}</code> (tau:X: cos(o<sub>i</sub>, o<sub>j</sub>) "
            "&ge; X, both orders; topk:K: each token's K largest S[i, j]); "
            f"{fmt_number(pairs.sum())} ordered pairs over all heads. Left: their |i - j|; right: the "
            "share inside one sentence, landing on '.' or [SEP], and joining two occurrences of one "
            "token.</p>", [png])


def context_maps_section(out_dir: str, cs: dict, max_tokens: int = 64):
    """One L x H grid of S = O O^T per kept text (each head scaled by its largest |S|)."""
    import os

    maps = cs.get("maps")
    if not maps:
        return None
    pngs = []
    def scaled(m):
        scale = np.abs(m).max() if m.size else 1.0
        return m / (scale if scale > 0 else 1.0)

    text_ids = [int(k) for k in maps["text_ids"]]  # (numbers only: they name files and go into the page)
    with np.load(os.path.join(out_dir, maps["file"])) as data:  # (an npz holds its file open until closed)
        shown = {k: data[f"text{k}_S"][..., :max_tokens, :max_tokens].astype(float) for k in text_ids}
    for k, S in shown.items():
        pngs.append(_head_grid(out_dir, f"context_maps_{k}", S, scaled, dict(cmap="RdBu_r", vmin=-1, vmax=1),
                               ("token j", "token i"), "S[i, j] / max |S| of the head",
                               title=f"text {k}: S = O O\u1d40 per layer and head"))
    ids = ", ".join(str(k) for k in text_ids)
    # (headings are escaped text: the transpose as a Unicode superscript, not <sup>)
    return ("Context similarity maps S = O O\u1d40 per head (arXiv 2512.21956)",
            f"<p>Texts {ids} (0-based; real tokens, at most {max_tokens} drawn); "
            f"{html.escape(maps['file'])} holds every map (text<i>k</i>_S: layer, head, i, j; text<i>k</i>_tokens).</p>",
            pngs)


def _head_grid(out_dir: str, name: str, maps, shown, style: dict, axes: tuple[str, str], label: str,
               title: str = "") -> str:
    """One L x H grid of per-head maps (L, H, n, n) drawn as shown(map) with one colour bar, the
    axes named once for the grid (per panel they were too small to read)."""
    L, H = maps.shape[:2]
    fig, _ = new_figure(1.8 * H + 1.5, 1.8 * L + 1.0)
    fig.clf()
    # constrained layout keeps the grid-wide axis names and the colour bar next to the panels
    # (without it the square panels float in the figure, far from both)
    fig.set_layout_engine("constrained")
    for l in range(L):
        for h in range(H):
            ax = fig.add_subplot(L, H, l * H + h + 1)
            im = ax.imshow(shown(maps[l, h]), **style)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{l + 1} h{h}", fontsize=9)
    fig.supxlabel(f"{axes[0]} (left to right) in every panel", fontsize=11)
    fig.supylabel(f"{axes[1]} (top to bottom) in every panel", fontsize=11)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.colorbar(im, ax=fig.axes, label=label)
    return save_figure(fig, out_dir, name)


def class_maps_section(out_dir: str, block: dict, means: dict, theta: float, labels: list[str]):
    """One L x H grid per label of its class-mean attention map; entries below theta hidden; the
    authors' entropies of each label's maps per layer (mean over heads). labels: the analysed
    texts' labels, whose sorted set gives every figure's colours (block["texts"] also names the
    classes --correct-only kept no text of, and had shifted the colours)."""
    pngs, names = [], set()
    for k, (g, m) in enumerate(means.items()):
        # the label in the file name, shortened, and numbered where two labels would share one
        # ("a b" and "a-b"; "A" and "a" on a case-blind disk): each label's picture had overwritten
        # the other's, and a number already taken ("a_b_2", then "a b" and "a.b") had again
        base = "".join(c if c.isalnum() else "_" for c in str(g))[:80]
        safe, n = base, k
        while safe.lower() in names:
            safe, n = f"{base}_{n}", n + 1
        names.add(safe.lower())
        pngs.append(_head_grid(out_dir, f"class_maps_{safe}", np.asarray(m, dtype=float),
                               lambda a: np.ma.masked_less(a, theta), dict(cmap="Blues", vmin=0, vmax=1),
                               ("key", "query"), f"class-mean attention (entries < {theta:g} hidden)",
                               title=literal(f"label {g}: class-mean attention per layer and head")))
    ent = block.get("entropies") or {}
    if ent:
        panels = (("value_entropy_padded", f"value-histogram entropy, padded to {block['padded_to']} (nats)"),
                  ("value_entropy", f"value-histogram entropy, {block['length']} x {block['length']} (nats)"),
                  ("von_neumann", "von Neumann entropy of the eigenvalues"))
        fig, _ = new_figure(12, 3.4)
        fig.clf()
        coloured = {str(g) for g in labels} | {str(g) for g in ent}  # (ent's labels are among labels)
        for k, (key, title) in enumerate(panels):
            ax = fig.add_subplot(1, 3, k + 1)
            for g, e in ent.items():
                y = np.asarray(e["layer_mean"][key], dtype=float)
                # each label in its colour of the report's other figures (by sorted label)
                ax.plot(np.arange(1, y.size + 1), y, "o-", color=label_color(g, coloured), label=literal(g))
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("entropy (nats), mean over heads")
            layer_axis(ax, len(y))
            ax.legend(fontsize=7)
        pngs.append(save_figure(fig, out_dir, "class_map_entropy"))
    counts = ", ".join(f"{html.escape(str(g))}: {fmt_number(c)}" for g, c in block["texts"].items())
    missing = "" if any(block["texts"].values()) else f"<p>Note: {no_class_maps_note(block['length'])}.</p>"
    return ("Class-mean attention maps (geometry-of-BERT authors' code)",
            f"<p>Mean attention map of each label's texts with {block['length']} real tokens "
            f"(texts: {counts}); [SEP] rows and columns zeroed, [CLS] kept; entries below "
            f"&theta; = {theta:g} left blank. {block['file']} holds the maps (layer, head, query, key). "
            "Entropies of each map as the authors' code computes them (arXiv 2502.12033), mean over "
            "heads per layer: the 20-bin value histogram of the map zero-padded to the model's input "
            "length (their inputs are padded to it) and of the real-token block alone; von Neumann: "
            "-&sum; v ln v with v = |&lambda;| / (&sum; |&lambda;|&sup2;)<sup>1/2</sup> over the map's "
            "eigenvalues (padding adds zero eigenvalues and changes nothing). report.json: "
            "<code>class_maps.entropies</code>.</p>" + missing,
            pngs)
