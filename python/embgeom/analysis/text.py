"""`embgeom text CORPUS --out DIR`: per-layer / per-head analysis of a corpus (docs/metrics.md, text report).

Writes DIR/report.json (keys of TraceResult.to_dict, plus "cls_pairs" with --pairs), PNG plots
and one self-contained DIR/report.html; progress over the corpus on stderr.
"""
from __future__ import annotations

import os
import sys

from ..report import new_figure, save_figure, table_html, write_html, write_json
from . import text_clouds, text_heads


def add_arguments(p) -> None:
    p.add_argument("corpus", metavar="CORPUS", help="UTF-8 text file, one text per line (blank lines skipped)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--model", default=None, help="Hugging Face name or local path (default: the bundled "
                   "all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="truncate texts to N tokens "
                   "(default: the model's maximum)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--pairs", metavar="FILE", help='JSONL {"group": g, "a": text, "b": text}: [CLS] '
                   "difference vectors per group")
    p.add_argument("--no-progress", action="store_true")
    text_clouds.add_arguments(p)
    text_heads.add_arguments(p)


def main(args) -> int:
    import warnings

    from .clouds import read_labels
    from .trace import cls_differences, model_max_length, read_lines, read_pairs, trace
    from ..models import DEFAULT_MODEL, load_model

    if not os.path.isfile(args.corpus):
        raise ValueError(f"CORPUS: no such file: {args.corpus}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    # the whole file is checked (UTF-8, not empty) before the model loads
    if not any(True for _ in read_lines(args.corpus)):
        raise ValueError(f"CORPUS: {args.corpus} has no non-blank line (empty corpus)")
    pairs = read_pairs(args.pairs) if args.pairs else None
    if args.trajectories < 0:
        raise ValueError(f"--trajectories: expected >= 0, got {args.trajectories}")
    keeping = bool(args.keep or args.trajectories or args.labels)
    n_texts = sum(1 for _ in read_lines(args.corpus)) if keeping else None
    labels = read_labels(args.labels, n_texts) if args.labels else None
    model, tokenizer = load_model(args.model, device=args.device)
    os.makedirs(args.out, exist_ok=True)
    keeper = text_clouds.Keeper(args.out, n_texts, model.config.num_hidden_layers, model.config.hidden_size,
                                keep_cls=bool(args.keep or args.labels), trajectories=args.trajectories,
                                tokenizer=tokenizer) if keeping else None
    extras = text_heads.TextExtras(args, model, tokenizer, model_max_length(model, tokenizer, args.max_length))
    observers = extras.observers + ([keeper] if keeper is not None else [])
    with warnings.catch_warnings(record=True) as caught, extras.active():
        warnings.simplefilter("always")
        result = trace(model, tokenizer, args.corpus, batch_size=args.batch_size,
                       max_length=args.max_length, progress=not args.no_progress, observers=observers)
    for w in caught[:1]:
        print(f"embgeom text: warning: {w.message}", file=sys.stderr)
    result.model = args.model or DEFAULT_MODEL
    report = result.to_dict()
    report.update(extras.report(result))
    if pairs is not None:
        report["cls_pairs"] = cls_differences(model, tokenizer, pairs, batch_size=args.batch_size,
                                              max_length=args.max_length, keep=True)
    extra = text_clouds.finish(args, args.out, keeper, report, pairs, labels,
                               lambda: list(read_lines(args.corpus)))
    write_json(os.path.join(args.out, "report.json"), report)
    extras.write_files(args.out)
    write_report(args.out, result, report, extra)
    if args.profile:
        extras.print_profile(result.seconds)
    print(f"embgeom text: {result.n_texts} texts, {result.n_tokens} tokens in {result.seconds:.1f}s "
          f"-> {os.path.join(args.out, 'report.html')}", file=sys.stderr)
    return 0


def _heatmap(out_dir, name, data, title, xlabel, ylabel, cmap="viridis", vmin=None, vmax=None):
    import numpy as np

    data = np.asarray(data, dtype=float)
    fig, ax = new_figure(max(4.0, 0.45 * data.shape[1] + 2), max(3.0, 0.4 * data.shape[0] + 1.5))
    im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_figure(fig, out_dir, name)


def text_heads_sections(out_dir: str, report: dict) -> list:
    from ..report.heads import context_section, gaussianity_section, heads_sections

    out = []
    ctx = context_section(out_dir, report["context_similarity"])
    if ctx is not None:
        out.append(ctx)
    if "attention_heads" in report:
        out += heads_sections(out_dir, report["attention_heads"])
    if "gaussianity" in report:
        out.append(gaussianity_section(out_dir, report["gaussianity"]))
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
    ax.plot(layers, heads.mean(1), "s-", label="head output (mean over heads)")
    ax.fill_between(layers, heads.min(1), heads.max(1), alpha=0.15, color="C1", label="head output range")
    ax.plot(layers, f(ci["multihead_output"]), "^-", label="multi-head output")
    ax.plot(layers, f(ci["layer_output"]), "d-", label="layer output (hidden state l)")
    ax.set_xlabel("layer")
    ax.set_ylabel("cone index I/n (mean over texts)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(layers)
    ax.legend(fontsize=8)
    pngs["cone"] = save_figure(fig, out_dir, "cone_index")

    ent = r.entropy.cpu().numpy()
    pngs["entropy"] = _heatmap(out_dir, "entropy", ent, f"attention row entropy (nats); uniform "
                               f"baseline {r.uniform_baseline:.2f}", "head", "layer")
    pngs["js"] = _heatmap(out_dir, "js_distance", r.js_distance.cpu().numpy(),
                          "Jensen-Shannon distance between heads (index = layer*H + head)",
                          "head", "head", cmap="magma", vmin=0)

    fig, _ = new_figure(13, 2.8)
    fig.clf()
    for i, key in enumerate(("cls", "sep", "punct", "prev", "next")):
        ax = fig.add_subplot(1, 5, i + 1)
        im = ax.imshow(r.attention_to[key].cpu().numpy(), vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_title(f"to {key}")
        ax.set_xlabel("head")
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(im, ax=fig.axes)
    pngs["attention_to"] = save_figure(fig, out_dir, "attention_to")

    pngs["context"] = _heatmap(out_dir, "context_distance", r.context_mean_distance.cpu().numpy(),
                               "context similarity: mean |i - j| to the most similar token",
                               "head", "layer", cmap="cividis")

    fig, _ = new_figure(10, 3.5)
    fig.clf()
    a1 = fig.add_subplot(1, 3, 1)
    a1.plot(layers, r.step_distance.cpu().numpy(), "o-")
    a1.set_title("step distance ||h_l - h_(l-1)||")
    a2 = fig.add_subplot(1, 3, 2)
    a2.plot(layers, r.step_cosine.cpu().numpy(), "o-")
    a2.set_title("step cosine")
    a3 = fig.add_subplot(1, 3, 3)
    a3.plot(np.arange(L + 1), r.norm.cpu().numpy(), "o-")
    a3.set_title("norm ||h_l||")
    for a in (a1, a2, a3):
        a.set_xlabel("layer")
    pngs["evolution"] = save_figure(fig, out_dir, "evolution")

    if "cls_pairs" in report:
        cp = report["cls_pairs"]
        pngs["pairs"] = _heatmap(out_dir, "cls_pairs", cp["cosine"].cpu().numpy(),
                                 "cosine between mean [CLS] difference vectors", "group", "group",
                                 cmap="coolwarm", vmin=-1, vmax=1)

    summary = table_html(
        ["model", "texts", "tokens", "layers", "heads", "truncated", "seconds"],
        [[r.model, r.n_texts, r.n_tokens, L, H, r.truncated, round(r.seconds, 1)]])
    per_layer = table_html(
        ["layer", "cone in", "cone heads (mean)", "cone multi-head", "cone out", "entropy (mean)",
         "to [CLS]", "to [SEP]", "to punct", "to prev", "to next", "context |i-j|", "step cos"],
        [[l + 1, float(r.cone_layer_input[l]), float(np.nanmean(heads[l])), float(r.cone_multihead_output[l]),
          float(r.cone_layer_output[l]), float(ent[l].mean())]
         + [float(r.attention_to[k][l].mean()) for k in ("cls", "sep", "punct", "prev", "next")]
         + [float(r.context_mean_distance[l].nanmean()), float(r.step_cosine[l])] for l in range(L)])
    focus = table_html(["layer"] + [f"h{h}" for h in range(H)],
                               [[l + 1] + list(r.focus_token[l]) for l in range(L)])
    sections = [
        ("Summary", summary + per_layer, []),
        ("Cone index (docs/metrics.md, cone index)", "<p>Per text I/n over its real tokens, mean over texts.</p>", [pngs["cone"]]),
        ("Attention entropy (M3)", "<p>Row entropy averaged over every real query row.</p>", [pngs["entropy"]]),
        ("Attention targets (M3)", "<p>Mean attention mass per real query row.</p>", [pngs["attention_to"]]),
        ("Head distances (M3)", "<p>JS distance between heads' mean attention over [CLS], [SEP] and "
         "relative offsets.</p>", [pngs["js"]]),
        ("Context similarity (M4)", "<p>Most similar other token under O O<sup>T</sup>; focus token "
         "per head (most often the focus of a text):</p>" + focus, [pngs["context"]]),
        ("Layer evolution", "<p>Means over every real token.</p>", [pngs["evolution"]]),
    ]
    if "pairs" in pngs:
        cp = report["cls_pairs"]
        sections.append(("[CLS] difference vectors", table_html(
            ["group", "pairs", "||mean difference||"],
            [[g, int(n), float(v)] for g, n, v in zip(cp["groups"], cp["counts"].tolist(), cp["mean_norm"].tolist())]),
            [pngs["pairs"]]))
    sections += text_heads_sections(out_dir, report)
    sections.extend(extra_sections)
    write_html(os.path.join(out_dir, "report.html"), f"embgeom text: {r.model}", sections)
    return list(pngs.values())
