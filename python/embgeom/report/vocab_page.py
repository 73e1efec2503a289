"""The pictures and report.html of `embgeom vocab` (position geometry included).
"""
from __future__ import annotations

import html
import os

import numpy as np
import torch

from ..analysis.vocab.sections import MEAN_MEASURES, OUTSIDE, TABLE_K
from . import new_figure, save_figure, table_html, write_html
from ..formatting import fmt
from .definitions import defined
from .plots import save_axes


def write_plots(out_dir: str, plots: dict, provenance: dict | None = None) -> dict[str, str]:
    pngs = {}
    hist = plots["hist"]
    fig, ax = new_figure()
    edges = hist.edges()
    # one step patch, not 2000 bar patches (seconds of drawing per report)
    ax.stairs(hist.counts.cpu().numpy(), edges.numpy(), fill=True)
    ax.set_yscale("log")
    pngs["pairs_hist"] = save_axes(fig, ax, out_dir, "pairs_hist", xlabel="cosine similarity",
                                   ylabel="token pairs", title="all pairs of word embeddings")

    fig = new_figure(12, 6)[0]
    fig.clf()
    for i, name in enumerate(MEAN_MEASURES):
        ax = fig.add_subplot(2, 3, i + 1)
        v = plots["mean_measures"][name]
        ax.hist(v[torch.isfinite(v)].cpu().numpy(), bins=100)
        ax.set_title(name.replace("_", " ") + (" of row" if name == "norm" else " to mean"))
        ax.set_xlabel(name.replace("_", " "))
        ax.set_ylabel("tokens")
    fig.tight_layout()
    pngs["mean_embedding"] = save_figure(fig, out_dir, "mean_embedding")

    if "pos_cos" in plots:
        first = plots.get("pos_first", 0)   # (--positions A:B: positions A..B-1)
        last = first + plots["pos_cos"].shape[0]
        fig, ax = new_figure(6, 5)
        im = ax.imshow(plots["pos_cos"].numpy(), cmap="RdBu_r", vmin=-1, vmax=1,
                       extent=(first - 0.5, last - 0.5, last - 0.5, first - 0.5))
        fig.colorbar(im, ax=ax, label="cosine")
        pngs["positional_cosine"] = save_axes(fig, ax, out_dir, "positional_cosine", xlabel="position",
                                              ylabel="position", title="cosine of position embeddings")

        fig, ax = new_figure()
        ax.plot(np.array(plots["pos_offset"], dtype=float))  # (None: an offset without a value)
        pngs["positional_offset"] = save_axes(fig, ax, out_dir, "positional_offset", xlabel="offset k",
                                              ylabel="mean cosine(p, p + k)",
                                              title="relative-offset profile of position embeddings")

        fig = new_figure(6, 5)[0]
        fig.clf()
        ax = fig.add_subplot(projection="3d")
        path = plots["pos_path"].numpy()
        ax.plot(path[:, 0], path[:, 1], path[:, 2], lw=0.6, color="grey")
        sc = ax.scatter(path[:, 0], path[:, 1], path[:, 2], c=range(first, first + len(path)), s=4, cmap="viridis")
        # the colour bar apart from the axes (pad): beside them it covered the z-axis title
        fig.colorbar(sc, ax=ax, label="position", shrink=0.7, pad=0.2)
        # labels set off from the tick labels (they overlapped them)
        ax.set_xlabel("PC 1", labelpad=10)
        ax.set_ylabel("PC 2", labelpad=10)
        ax.set_zlabel("PC 3", labelpad=10)
        ax.tick_params(labelsize=7)
        ax.set_title("position embeddings, first 3 principal components")
        pngs["positional_pca3d"] = save_figure(fig, out_dir, "positional_pca3d")

    fig, ax = new_figure()
    for name, ratio in (("word", plots["word_ratio"]), ("position", plots.get("pos_ratio"))):
        if ratio is not None and ratio.numel():
            ax.plot(range(1, ratio.numel() + 1), ratio.cumsum(0).numpy(), label=name)
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.02)
    ax.legend()
    pngs["pca"] = save_figure(fig, out_dir, "pca")
    if "position_geometry" in plots:

        pngs.update(position_plots(out_dir, plots["position_geometry"], plots.get("projections"),
                                   provenance=provenance))
    return pngs


def write_page(out_dir: str, report: dict, pngs: dict) -> str:
    t = table_html
    p = report["pairs"]
    tk = report["tokens"]
    intro = (f"<p>{html.escape(str(report['model']))}: vocabulary {fmt(report['vocab_size'])} x {fmt(report['hidden'])}; "
             f"{fmt(report['tokens_analysed'])} tokens analysed "
             + ("(all tokens)" if tk["all_tokens"] else
                f"({tk['special']} special and {tk['unused']} [unusedN] tokens left out; --all-tokens keeps them)")
             + f". {fmt(report['timing']['to_page'], 3)} s up to this page (report.json timing.to_page; "
             f"timing.total adds the page), peak memory {fmt(round(report['peak_rss_mb']))} MiB.</p>")
    steps = [[k, v] for k, v in report["timing"].items() if k != "to_page"]
    sections = [("Overview", intro + t(["step", "seconds"], steps), [])]
    fast = (f" (fast products: every cosine the mean, the std and the histogram take lies within "
            f"{fmt(p['error_bound'], 2)} of its exact fp32 value, and so do they; the listed pairs and the "
            "outside count are exact)" if p.get("error_bound") else "")
    pairs_body = (f"<p>{fmt(p['count'])} pairs ({defined('pairs')}); mean {defined('cosine')} {fmt(p['mean'])}, "
                  f"std {fmt(p['std'])}{fast}; {fmt(p['outside']['count'])} pairs outside [{OUTSIDE[0]}, {OUTSIDE[1]}].</p>"
                  "<h3>most similar</h3>" + t(["token a", "token b", "cosine"], p["top_tokens"])
                  + "<h3>least similar</h3>" + t(["token a", "token b", "cosine"], p["bottom_tokens"])
                  + "<h3>nearest to 0</h3>" + t(
                      ["token a", "token b", "cosine (float64; the pairs are those whose float32 cosine is nearest 0)"],
                      p["near_zero_tokens"]))
    sections.append(("How similar are the word embeddings? All pairs", pairs_body, [pngs["pairs_hist"]]))
    me = report["mean_embedding"]
    me_body = "".join(
        f"<h3>{MEAN_MEASURES[name]}</h3>" + t(["id", "token", "largest", "id", "token", "smallest"],
                                                  [a + b for a, b in zip(me[name]["top"], me[name]["bottom"])])
        for name in MEAN_MEASURES)
    sections.append(("Which tokens are closest to the mean embedding?",
                     f"<p>norm of the {defined('mean_embedding')} {fmt(me['mean_norm'])}. Each table: the "
                     "tokens with the largest and the smallest value of its measure (for the Euclidean "
                     "distance the largest are the farthest from the mean; for the cosines the largest "
                     "the most aligned with it).</p>" + me_body,
                     [pngs["mean_embedding"]]))
    if "absent" in report["positional"]:
        sections.append(("Position embeddings", f"<p>absent: {report['positional']['absent']}</p>", []))
    else:
        pos = report["positional"]
        first = pos.get("first_position", 0)
        body = (f"<p>{pos['positions']} positions, {first}..{first + pos['positions'] - 1} (position p is "
                f"position id {pos['first_position_id']} + p: position 0 is the first token's); mean cosine {fmt(pos['mean'])} (std {fmt(pos['std'])}; "
                f"{defined('offset_profile')} below); "
                f"{pos['components_for_90pct']} principal components explain 90% of the variance.</p>")
        sections.append(("Position embeddings", body, [pngs["positional_cosine"], pngs["positional_offset"],
                                                       pngs["positional_pca3d"]]))
        tp = report["token_position"]
        body = (f"<p>{fmt(tp['count'])} token x position pairs; mean cosine {fmt(tp['mean'])}; "
                f"{fmt(tp['outside']['count'])} outside [{OUTSIDE[0]}, {OUTSIDE[1]}].</p>"
                + "<h3>most similar</h3>" + t(["token id", "token", "position", "cosine"], tp["top_pairs"])
                + "<h3>least similar</h3>" + t(["token id", "token", "position", "cosine"], tp["bottom_pairs"]))
        sections.append(("Do word and position embeddings share directions? Token x position", body, []))
    if "absent" in report["token_type"]:
        sections.append(("Token-type embeddings", f"<p>absent: {report['token_type']['absent']}</p>", []))
    else:
        tt = report["token_type"]
        body = t(["type", "norm"], [[i, v] for i, v in enumerate(tt["norms"])])
        body += t(["type", "vs", "mean cos", "std", "min", "max"],
                  [[i, key[3:], s["mean"], s["std"], s["min"], s["max"]]
                   for key in ("vs_word", "vs_position") for i, s in enumerate(tt[key])])
        sections.append(("Token-type embeddings", body, []))
    pca = report["pca"]
    body = t(["matrix", "50%", "90%", "99%"], [[name, *v["components_for"].values()] for name, v in pca.items()])
    sections.append(("How many directions carry the variance? Principal components",
                     f"<p>{defined('pca', 'Components needed')} for 50, 90 and 99 % of the variance.</p>" + body,
                     [pngs["pca"]]))
    nb = report["neighbors"]
    used = nb.get("probe_tokens", {})
    rows = [[w if used.get(w, w) == w else f"{w} ({used[w]})",
             ", ".join(f"{tok} ({fmt(v, 3)})" for _, tok, v in lst)] for w, lst in nb["probes"].items()]
    ag = nb.get("agreement") or {}
    body = t(["probe", f"{nb.get('k', TABLE_K)} nearest tokens (cosine), FAISS exact"], rows)
    if ag:
        body += (f"<p>FAISS exact vs pairwise_stats(row_topk): {ag['equal_up_to_ties']} of {ag['rows_checked']} "
                 f"rows agree up to ties ({ag['identical']} identical), largest value difference "
                 f"{fmt(ag['max_abs_value_diff'], 3)}.</p>")
    sections.append(("Nearest neighbours of probe words", body, []))
    if "position_geometry" in report:

        sections.append(position_section(report, pngs))
    path = os.path.join(out_dir, "report.html")
    write_html(path, f"embgeom vocab: {report['model']}", sections, provenance=report.get("provenance"))
    return path


def position_plots(out_dir: str, plots: dict, proj_arrays: dict | None,
                   provenance: dict | None = None) -> dict[str, str]:
    from .interactive import scatter_png, write_scatter_html

    pngs = {}
    a, b = plots["range"]
    fig, ax = new_figure(9, 4)
    # a few large coordinates would make the rest one shade: a symmetric range at the 99.5th
    # percentile of |value|, the colour bar saying so
    raw = np.asarray(plots["pos"], dtype=float)
    lim = float(np.nanpercentile(np.abs(raw), 99.5)) or 1.0
    im = ax.imshow(raw, aspect="auto", cmap="RdBu_r", interpolation="nearest", vmin=-lim, vmax=lim,
                   extent=(0, raw.shape[1], b - 0.5, a - 0.5))
    # the colour bar's long note goes under the plot: as its label it outgrew the figure
    fig.colorbar(im, ax=ax, extend="both", label="value")
    ax.set_xlabel(f"coordinate\ncolours clipped at +-{fmt(lim, 3)} (the 99.5th percentile of |value|); "
                  f"values range {fmt(float(np.nanmin(raw)), 3)}..{fmt(float(np.nanmax(raw)), 3)}")
    ax.set_ylabel("position")
    ax.set_title("position embeddings, raw values")
    pngs["positions_raw"] = save_figure(fig, out_dir, "positions_raw")

    c = plots["curves"]
    fig = new_figure(12, 4)[0]
    fig.clf()
    for k, key in enumerate(("raw", "shifted")):
        ax = fig.add_subplot(1, 2, k + 1)
        for r, vals in zip(c["rows"], c[key]):
            v = np.array([np.nan if x is None else x for x in vals])
            xs = np.arange(len(v)) + (a if key == "raw" else 0)
            ax.plot(xs, v, lw=0.9, label=f"p={r}")
        ax.set_xlabel("position q" if key == "raw" else "shift s")
        ax.set_ylabel("cos(p, q)" if key == "raw" else "cos(p, p + s)")
        ax.set_title("cosine of position p against the first positions" if key == "raw"
                     else "the same, shifted to start at p")
        ax.legend(fontsize=6, ncol=2)
    pngs["positions_cosine_curves"] = save_figure(fig, out_dir, "positions_cosine_curves")

    if "sinusoidal" in plots:
        pngs.update(sinusoidal_plots(out_dir, plots["sinusoidal"]))

    lab = ["word"] * plots["n_words"] + ["position"] * (plots["joint"].shape[0] - plots["n_words"])
    pngs["joint_pca"] = scatter_png(out_dir, "joint_pca", plots["joint"], lab,
                                    title="word and position embeddings, joint PCA", xlabel="PC 1", ylabel="PC 2")
    for key, (xy, labels, texts, ids, knn) in (proj_arrays or {}).items():
        title = key.replace("_", " ") + " (exact cosine graph)"
        axis = "UMAP" if key.endswith("umap") else "t-SNE"
        pngs[key] = scatter_png(out_dir, key, xy, labels, title=title, xlabel=f"{axis} 1", ylabel=f"{axis} 2")
        write_scatter_html(os.path.join(out_dir, f"{key}.html"), xy, labels, texts, title=title, ids=ids, knn=knn,
                           knn_file=f"{key}_knn.npz",
                           xlabel=f"{axis} 1", ylabel=f"{axis} 2", provenance=provenance,
                           note="hover and search show token ids (position ids for positions), as the tables do")
    return pngs


def sinusoidal_plots(out_dir: str, sp: dict) -> dict[str, str]:
    """positions_sinusoidal.png: the thesis' figure 6 (the fixed sinusoidal encodings of the first
    128 positions at width 512 and their pairwise cosines), Vaswani's formula above and the
    thesis' formula read literally below; positions_sinusoidal_vs_learned.png: the mean cosine
    by offset of the learned table and of the sinusoidal one at its positions and width."""
    pngs = {}
    fig = new_figure(12, 9)[0]
    fig.clf()
    titles = {"vaswani": "Vaswani et al. (arXiv 1706.03762)", "printed": "the thesis' formula read literally"}
    for row, (formula, x) in enumerate(sp["figure6"].items()):
        ax = fig.add_subplot(2, 2, 2 * row + 1)
        im = ax.imshow(x, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="value")
        ax.set_xlabel("coordinate")
        ax.set_ylabel("position")
        ax.set_title(f"sinusoidal encodings, {titles[formula]}", fontsize=9)
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        ax = fig.add_subplot(2, 2, 2 * row + 2)
        im = ax.imshow(u @ u.T, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="cosine")
        ax.set_xlabel("position")
        ax.set_ylabel("position")
        ax.set_title("their pairwise cosine similarities", fontsize=9)
    fig.tight_layout()
    pngs["positions_sinusoidal"] = save_figure(fig, out_dir, "positions_sinusoidal")
    a, _ = sp["range"]
    fig, ax = new_figure(8, 4)
    for key, label in (("learned_profile", "learned (the model's table)"),
                       ("matched_profile", "sinusoidal, same positions and width")):
        ax.plot(np.arange(len(sp[key])), np.array(sp[key], dtype=float), lw=1, label=label)
    ax.set_xlabel("offset k")
    ax.set_ylabel("mean cos(p, p + k)")
    ax.set_title(f"mean cosine by offset, positions from {a}")
    ax.legend(fontsize=8)
    pngs["positions_sinusoidal_vs_learned"] = save_figure(fig, out_dir, "positions_sinusoidal_vs_learned")
    return pngs


def position_section(report: dict, pngs: dict) -> tuple[str, str, list[str]]:

    g = report["position_geometry"]
    h = g["helix"]
    cv = g["cls_vs_position0"]
    body = f"<p>positions {g['range'][0]}..{g['range'][1] - 1}. Helix period (3-D PCA path): "
    body += (f"{fmt(h['period'], 4)} positions (plane PC{h['plane']}, R^2 {fmt(h['planes'][h['plane']]['r2'], 4)})"
             if h["period"] else "none found (no PCA plane turns a full circle)") + ". "
    body += ("In each plane of two principal components, the angle of each position around the path's "
             "centre is unwrapped and fitted by a line in the position: the period is the positions "
             "per full turn of that line, turns its full turns over the range (period x turns = "
             "positions - 1), R^2 the fit's.</p>")
    body += table_html(["plane", "period (positions)", "R^2", "turns"],
                       [[k, v["period"], v["r2"], v["turns"]] for k, v in h["planes"].items()])
    if cv:
        body += ("<p>The [CLS] word embedding beside position 0's embedding (both are added to the "
                 "first token's input):</p>")
        body += table_html(["||[CLS]||", "||position 0||", "Euclidean distance", "max-coordinate distance", "cosine"],
                           [[cv["cls_norm"], cv["position0_norm"], cv["euclidean"], cv["max_coordinate"], cv["cosine"]]])
    sn = g.get("sinusoidal")
    if sn:
        m, learned = sn["matched"], sn["learned"]
        body += ("<p>Fixed sinusoidal encodings (thesis figure 6: positions 0..127 at width 512, "
                 "Vaswani's formula and the thesis' printed one) and the same geometry of the learned "
                 "table beside the sinusoidal table at its positions and width:</p>")
        cols = ["table", "positions", "width", "mean cosine", "min cosine", "components for 90%", "helix period"]
        rows = [[name, t["positions"], t["width"], t["cosine_mean"], t["cosine_min"], t["components_for_90pct"],
                 t["helix"]["period"]] for name, t in (("figure 6, Vaswani", sn["figure6"]["vaswani"]),
                                                     ("figure 6, printed formula", sn["figure6"]["printed"]),
                                                     ("sinusoidal, matched", m), ("learned", learned))]
        body += table_html(cols, rows)
    keys = ["positions_raw", "positions_cosine_curves", "joint_pca"] + \
        [k for k in ("positions_sinusoidal", "positions_sinusoidal_vs_learned") if k in pngs] + \
        [k for k in ("words_umap", "words_tsne", "positions_umap", "positions_tsne") if k in pngs]
    if "projections" in report:
        pages = [f"{k}.html" for k in ("words_umap", "words_tsne", "positions_umap", "positions_tsne") if k in pngs]
        body += ("<p>Interactive projections (hover: token / position): "
                 + ", ".join(f"<a href='{f}'>{f}</a>" for f in pages) + ".</p>")
    else:
        body += "<p>UMAP / t-SNE of the word and position embeddings: run with --projections.</p>"
    heading = "The shape of the position embeddings" + (", and projections" if "projections" in report else "")
    return (f"{heading} (thesis 4.2.3, 4.2.5)", body, [pngs[k] for k in keys])
