"""The pictures and report.html of `embgeom syntax`.
"""
from __future__ import annotations

import os

from ..analysis.syntax.probe import cap_met
from ..analysis.syntax.word_heads import DIRECTIONS


def write_syntax_report(out_dir: str, report: dict) -> None:
    import numpy as np

    from . import new_figure, save_figure, table_html, write_html
    from .definitions import defined
    from .plots import layer_head_axes

    s = report["syntax"]
    acc = np.asarray(s["all_accuracy"].cpu() if hasattr(s["all_accuracy"], "cpu") else s["all_accuracy"])
    fig, _ = new_figure(11, 0.35 * acc.shape[0] + 2.5)
    fig.clf()
    for d, name in enumerate(DIRECTIONS):
        ax = fig.add_subplot(1, 2, d + 1)
        # one scale (0..1) for both directions: equal colours are equal accuracies
        im = ax.imshow(acc[:, :, d], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        fig.colorbar(im, ax=ax, label="accuracy")
        ax.set_title(f"accuracy over all words, {name}", fontsize=9)
        layer_head_axes(ax, acc.shape[0], acc.shape[1])
    png = save_figure(fig, out_dir, "syntax_heads")
    rows = []
    for name, e in sorted(s["relations"].items(), key=lambda kv: -kv[1]["count"]) + [("all", s["all"])]:
        b = e["best"]  # None: no head gets any word right (root: no head predicts ROOT); so for offsets
        rows.append([name, e["count"], f"L{b[0]} h{b[1]}" if b else "none", b[2] if b else "-", e["accuracy"],
                     "none" if e["offset_baseline"]["offset"] is None else f"{int(e['offset_baseline']['offset']):+d}",
                     e["offset_baseline"]["accuracy"]])
    summary = table_html(["model", "sentences", "words", "skipped (too long)", "forward passes and scoring (s)"],
                         [[report["model"], s["n_sentences"], s["n_words"], s["skipped_too_long"],
                           s["seconds"]]])
    body = (f"<p>{defined('syntax')}: Clark et al. (arXiv 1906.04341, section 4.2): for each relation the head and direction "
            "whose most-attended word is the gold head most often (best of all heads x 2 directions, "
            "chosen on this data), against the best fixed offset -3..2 (none where no offset is right on any word). Best head: L = layer (1..L), "
            "h = head (from 0), as in report.json; none where no head is right on any word (root: no head "
            "predicts ROOT; Clark's table leaves root out, its \"all\" keeps the root words). Relations with few instances are noisy (the paper reports those "
            "with at least 100).</p>"
            + table_html(["relation", "count", "best head", "direction", "accuracy", "baseline offset",
                          "baseline accuracy"], rows))
    sections = [("Summary", summary, []), ("Syntax heads per relation", body, [png])]
    if "probe" in s:
        sections.append(("Attention-only probe", probe_html(s["probe"], table_html), []))
    write_html(os.path.join(out_dir, "report.html"), f"embgeom syntax: {report['model']}", sections,
               provenance=report.get("provenance"))


def probe_html(pr: dict, table_html) -> str:
    """The probe's line: UAS on test and train beside the best single head on the same test words."""
    b, t = pr["best_single_head_test"], pr["best_single_head_train_picked"]
    rows = [["probe (attention only, %d weights)" % pr["parameters"], pr["uas_test"],
             pr["uas_train"]],
            [f"best single head picked on test: L{b['best'][0]} h{b['best'][1]} {b['best'][2]}",
             b["accuracy"], ""],
            [f"best single head picked on train: L{t['best'][0]} h{t['best'][1]} {t['best'][2]}",
             t["accuracy_test"], t["accuracy_train"]]]
    return ("<p>Clark et al. (arXiv 1906.04341, section 5): p(head(i) = j) proportional to "
            "exp(sum_k w_k a<sup>k</sup><sub>ij</sub> + u_k a<sup>k</sup><sub>ji</sub>) over every head k of every "
            "layer, candidates j = ROOT ([CLS]) and the other words of the sentence. Trained (LBFGS, float64, from zero, "
            f"{pr['iterations']} iterations, "
            + ("converged" if pr.get("converged") else f"<b>stopped at {cap_met(pr)}, not converged</b>")
            + f", cross-entropy {pr['loss_start']:.3f} -> {pr['loss_end']:.3f}) on the "
            f"first {pr['train_sentences']} sentences ({pr['train_words']} words), tested on the other "
            f"{pr['test_sentences']} ({pr['test_words']} words). Every word is scored: the candidates of a "
            "word are ROOT and the other words, ROOT being the [CLS] word (its column and row of the word map; "
            "ours, the paper does not say how it attaches the root). Clark's 'Attn + GloVe' variant is not "
            "computed.</p>"
            + table_html(["classifier", "UAS test", "UAS train"], rows))
