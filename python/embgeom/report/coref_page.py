"""The picture and report.html of `embgeom coref`.
"""
from __future__ import annotations

import os


def write_coref_report(out_dir: str, report: dict) -> None:
    import numpy as np

    from . import new_figure, save_figure, table_html, write_html
    from .definitions import defined
    from .plots import layer_head_axes

    c = report["coref"]
    acc = np.asarray(c["all_accuracy"].cpu() if hasattr(c["all_accuracy"], "cpu") else c["all_accuracy"])
    fig, ax = new_figure(0.45 * acc.shape[1] + 3, 0.35 * acc.shape[0] + 2.5)
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("antecedent selection accuracy per head", fontsize=9)
    layer_head_axes(ax, acc.shape[0], acc.shape[1])
    png = save_figure(fig, out_dir, "coref_heads")
    summary = table_html(["model", "documents", "mentions", "scored mentions", "skipped (too long)", "forward passes and scoring (s)"],
                         [[report["model"], c["n_documents"], c["n_mentions"], c["n_scored"],
                           c["skipped_too_long"], c["seconds"]]])
    b = c["baselines"]
    best = f"L{c['best'][0]} h{c['best'][1]}" if c["best"] else "none (no head is right on any mention)"
    if c["best"]:  # heads with the best head's accuracy (few scored mentions tie often)
        tied = [f"L{l + 1} h{h}" for l, h in zip(*np.nonzero(acc == acc.max())) if (l + 1, h) != tuple(c["best"][:2])]
        if tied:
            best += f" (tied with {', '.join(tied[:5])}{f' and {len(tied) - 5} more' if len(tied) > 5 else ''})"
    rows = [[f"best head: {best}", c["accuracy"]],
            ["nearest mention", b["nearest"]],
            ["nearest mention with the same head word (else nearest)", b["head_match"]]]
    body = (f"<p>{defined('coref')}: Clark et al. (arXiv 1906.04341, section 4.3, Table 2). For each mention "
            "with an earlier mention of its cluster, each head selects, among the earlier mentions, the one "
            "whose head word the mention's head word attends to most (word-level attention as for syntax "
            "heads); correct when that mention is in the same cluster. Head word: " + c["head_rule"] +
            " (Clark et al. use the syntactic head). The best head is picked on the same data, as in the "
            "paper; L = layer (1..L), h = head (from 0), as in report.json.</p>"
            + table_html(["selector", "accuracy"], rows))
    write_html(os.path.join(out_dir, "report.html"), f"embgeom coref: {report['model']}",
               [("Summary", summary, []), ("Coreference heads", body, [png])],
               provenance=report.get("provenance"))
