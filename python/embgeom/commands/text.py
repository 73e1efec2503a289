"""`embgeom text CORPUS --out DIR`: per-layer / per-head analysis of a corpus (docs/metrics.md, text report).

Writes DIR/report.json (keys of TraceResult.to_dict, plus "cls_pairs" with --pairs), PNG plots
and one self-contained DIR/report.html; progress over the corpus on stderr.

Options: --keep cls, --trajectories N, --labels FILE and --pairs FILE keep vectors
(analysis/text/keeper.py); --heads, --clark-js, --directionality, --head-maps N, --similar RULE, --matrices,
--gaussianity and --profile add the head extras (analysis/heads/text_extras.py).
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from ..analysis.clouds.geometry import group_geometry
from ..analysis.heads.text_extras import TextExtras, parse_show_texts
from ..analysis.text.adapters import num_layers
from ..analysis.text.keeper import Keeper
from ..analysis.text.labelled import no_class_maps_note, one_class_note
from .. import validation
from ..formatting import counted, fmt, seconds
from ..io import check_output_folder, check_output_path, output_folder
from ..report import table_html
from ..report.definitions import defined
from ..report.text_page import group_plots, pair_plot, trajectory_plots, write_report
from .model_options import add_model_options, check_run_options, finish_report, model_input, progress_for

DEFAULT_THETA = 0.01  # --theta: class-mean map entries below it are hidden in the heat maps



def add_arguments(p) -> None:
    p.add_argument("corpus", metavar="CORPUS", help="UTF-8 text file, one text per line (blank lines "
                   "skipped); a line with a TAB is a sentence pair A<TAB>B: [CLS] A [SEP] B [SEP], "
                   "token types 0 / 1")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    add_model_options(p, batch_size=32, max_length_help="truncate texts to N tokens")
    p.add_argument("--checkpoint", metavar="PATH", help="save the sums of finished batches here (at most a "
                   "minute apart, and on Ctrl-C or SIGTERM); the same command resumes after them (kept [CLS] rows in "
                   "PATH.cls.npy, --pairs' finished pairs in PATH.pairs)")
    p.add_argument("--pairs", metavar="FILE", help='JSONL {"group": g, "a": text, "b": text}: [CLS] '
                   "difference vectors per group (a text with a TAB is a sentence pair, as in the corpus)")
    add_keep_arguments(p)
    add_head_arguments(p)


def main(args) -> int:
    from ..validation import renamed

    from . import flags_of

    with renamed(**flags_of(args, positional=("corpus",))):  # errors and checkpoint differences by flag
        return _main(args)


def _main(args) -> int:
    import re
    import warnings

    from ..analysis.text.inputs import numbered_lines, read_labels, read_lines, read_pairs, require_file
    from ..analysis.text.labelled import CLASS_MAPS_FILE, ClassMaps, LabelSplit, check_label_classes, predict_labels
    from ..analysis.text.trace import (TRUNCATED_WARNING, cls_differences, model_max_length, special_only_note,
                                       split_pair, trace)
    from ..report.head_sections import class_maps_section
    from ..models import DEFAULT_MODEL, load_model
    from ..provenance import Provenance

    prov = Provenance(args, inputs={"CORPUS": args.corpus, "--labels": args.labels, "--pairs": args.pairs})
    prog = progress_for(args, "embgeom text")
    require_file(args.corpus, "CORPUS")
    check_run_options(args)
    check_output_folder(args.out, command="text", inputs=[("CORPUS", args.corpus), ("--labels", args.labels),
                                                          ("--pairs", args.pairs), ("--checkpoint", args.checkpoint),
                                                          model_input(args.model)])
    if args.checkpoint:
        check_output_path(args.checkpoint, "--checkpoint",   # its folder, before the model loads
                          inputs=[("CORPUS", args.corpus), ("--labels", args.labels), ("--pairs", args.pairs)],
                          beside=(".lock", ".cls.npy", ".pairs.lock"))
    # the whole file is read (UTF-8 to the last line, not empty) before the model loads
    n_texts = 0
    for n_texts, (number, line) in enumerate(numbered_lines(args.corpus, "CORPUS"), 1):
        split_pair(line, f"CORPUS: {args.corpus} line {number} (text id {n_texts - 1})")
    if n_texts == 0:
        raise ValueError(f"CORPUS: {args.corpus} has no non-blank line (empty corpus)")
    pairs = read_pairs(args.pairs) if args.pairs else None
    if args.trajectories < 0:
        raise ValueError(f"--trajectories: expected >= 0, got {args.trajectories}")
    from ..analysis.heads.similarity import parse_similar

    parse_similar(args.similar)
    keeping = bool(args.keep or args.trajectories or args.labels)
    labels = read_labels(args.labels, n_texts) if args.labels else None
    parse_show_texts(args.show_texts, n_texts)  # ids and the regex checked before the model loads
    check_label_options(args)
    texts = list(read_lines(args.corpus, "CORPUS")) if args.correct_only else None
    ckpt = pairs_ckpt = None
    try:
        with output_folder(args.out, command="text") as out:
            with prog.phase("loading the model"):
                with validation.renamed(classifier="--correct-only"):
                    model, tokenizer = load_model(args.model, device=args.device, classifier=args.correct_only)
            max_len = model_max_length(model, tokenizer, args.max_length)
            if args.class_maps is not None and args.class_maps > max_len:
                # (before any forward pass: the whole corpus had run to find no text that long)
                raise ValueError(f"--class-maps: {args.class_maps} real tokens, more than an input holds here: at most "
                                 f"{max_len} (the model's longest input, or --max-length)")
            if args.checkpoint:
                with prog.phase("checkpoint: fingerprint of the corpus and the model"):
                    ckpt = text_checkpoint(args, model, tokenizer, max_len, labels)
                    ckpt.load()
            selection = None
            if args.correct_only:
                check_label_classes(labels, model, args.labels)
                kept = saved_selection(ckpt, n_texts) if ckpt is not None else None
                if kept is None:
                    with prog.phase("predicting classes (--correct-only)"):
                        predicted = predict_labels(model, tokenizer, texts, batch_size=args.batch_size,
                                                   max_length=args.max_length)
                    kept = [i for i, (p, g) in enumerate(zip(predicted, labels)) if p == g]
                    if ckpt is not None:
                        ckpt.extra["kept"] = kept
                selection = {"texts": n_texts, "kept": len(kept), "accuracy": len(kept) / n_texts,
                             "kept_per_label": {g: sum(labels[i] == g for i in kept) for g in sorted(set(labels))},
                             "texts_per_label": {g: labels.count(g) for g in sorted(set(labels))},
                             "kept_ids": kept}  # (the corpus ids of cls.npy's rows)
                if not kept:
                    raise ValueError(f"--correct-only: no text of {args.corpus} is classified as its label "
                                     f"(0 of {n_texts} kept)")
                texts, labels = [texts[i] for i in kept], [labels[i] for i in kept]
                n_texts = len(kept)
                model = model.base_model
            prov.set_model(args.model, model)
            keeper = Keeper(out, n_texts, num_layers(model), model.config.hidden_size,
                            keep_cls=bool(args.keep or args.labels), trajectories=args.trajectories,
                            tokenizer=tokenizer, rows_path=ckpt.side_path("cls.npy") if ckpt else None) \
                if keeping else None
            extras = TextExtras(args, model, tokenizer, max_len, text_ids=kept if selection is not None else None)
            split = LabelSplit(labels, model, tokenizer, max_len) if labels is not None else None
            class_maps = ClassMaps(labels, args.class_maps, num_layers(model),
                                   model.config.num_attention_heads, pad_to=max_len,
                                   classes=list(selection["kept_per_label"]) if selection else None) \
                if args.class_maps else None
            observers = extras.observers + [o for o in (keeper, split, class_maps) if o is not None]
            # trace's own truncation warning becomes the line below; any other warning (torch's,
            # transformers') reaches the user as Python shows it (-W error raises it)
            with warnings.catch_warnings(), extras.active():
                warnings.filterwarnings("ignore", message=re.escape(TRUNCATED_WARNING.split("{")[0]),
                                        category=UserWarning)
                result = trace(model, tokenizer, texts if selection is not None else args.corpus,
                               batch_size=args.batch_size, max_length=args.max_length, progress=prog,
                               observers=observers, checkpoint=ckpt)
            if result.truncated:
                print(f"embgeom text: warning: {counted(result.truncated, 'text')} longer than {max_len} tokens "
                      "truncated (report.json truncated)", file=sys.stderr)
            with ckpt.blamed(bool(ckpt.resumed_texts)) if ckpt is not None else contextlib.nullcontext():
                result.model = args.model or DEFAULT_MODEL
                report = result.to_dict()
                if extras.observers:
                    with prog.phase("head measures"):
                        report.update(extras.report(result))
                        extras.add_context(report)
                if selection is not None:
                    report["correct_only"] = selection
                if split is not None:
                    with prog.phase("per-label metrics"):
                        report["by_label"] = split.result()
                if class_maps is not None:
                    with prog.phase("class-mean maps' entropies"):  # (L, H) eigenvalue problems per label
                        report["class_maps"] = {**class_maps.result(), "theta": args.theta}
                    class_maps.write(os.path.join(out, CLASS_MAPS_FILE))
                if pairs is not None:
                    if ckpt is not None:
                        pairs_ckpt = pairs_checkpoint(args, ckpt)
                    with prog.phase("[CLS] difference vectors"):
                        report["cls_pairs"] = cls_differences(model, tokenizer, pairs, batch_size=args.batch_size,
                                                              max_length=args.max_length, keep=True,
                                                              checkpoint=pairs_ckpt)
                report["provenance"] = prov.record()  # the footer of the scatter pages finish() writes
                with prog.phase("kept vectors (groups, trajectories)"):
                    extra = finish(args, out, keeper, report, pairs, labels,
                                   lambda: texts if texts is not None else list(read_lines(args.corpus, "CORPUS")))
                    if class_maps is not None:
                        extra.append(class_maps_section(out, report["class_maps"], class_maps.means(), args.theta,
                                                         labels))
                def page():
                    extras.write_files(out)
                    write_report(out, result, report, extra)

                finish_report(out, report, prov, prog, page)
    finally:
        for held in (ckpt, pairs_ckpt):
            if held is not None:
                held.close()   # PATH free for the next run (a second run would have been refused)
    if args.profile:
        extras.print_profile(result.seconds)
    if class_maps is not None and not any(report["class_maps"]["texts"].values()):
        print(f"embgeom text: note: {no_class_maps_note(args.class_maps)}", file=sys.stderr)
    if labels is not None and len(set(labels)) < 2:
        print(f"embgeom text: note: {one_class_note(selection)}", file=sys.stderr)
    if result.special_only:
        print(f"embgeom text: note: {special_only_note(result.special_only)}", file=sys.stderr)
    if args.max_length is not None and args.max_length > max_len:
        print(f"embgeom text: note: --max-length {args.max_length} lowered to {max_len}, the longest input "
              "the model takes", file=sys.stderr)
    resumed = f", {fmt(ckpt.resumed_texts)} of them from {args.checkpoint}" if ckpt and ckpt.resumed_texts else ""
    if pairs_ckpt is not None and pairs_ckpt.resumed_pairs:
        resumed += f" ({fmt(pairs_ckpt.resumed_pairs)} --pairs pairs from {pairs_ckpt.path})"
    print(f"embgeom text: {counted(result.n_texts, 'text')}{resumed}, {counted(result.n_tokens, 'token')} in "
          f"{seconds(prov.seconds())} (forward passes {seconds(result.seconds)}"
          f"{', this run and the earlier ones' if resumed else ''}) -> "
          f"{os.path.join(args.out, 'report.html')}", file=sys.stderr)
    return 0


# options that change only how the report is drawn or told, not the sums a checkpoint keeps, and
# the paths of what it hashes (the corpus, labels and model may move: their contents count)
NOT_IN_CHECKPOINT = ("out", "checkpoint", "quiet", "no_progress", "progress", "profile", "theta", "pairs",
                     "func", "argv", "started", "corpus", "labels", "model", "device")


def saved_selection(ckpt, n_texts: int) -> list[int] | None:
    """--correct-only's kept text ids from a checkpoint (None before its first save)."""
    kept = ckpt.extra.get("kept")
    if kept is None:
        return None
    if not isinstance(kept, list) or not all(type(i) is int and 0 <= i < n_texts for i in kept) \
            or any(a >= b for a, b in zip(kept, kept[1:])):
        raise ValueError(f"checkpoint: {ckpt.path} is not a valid embgeom checkpoint (its --correct-only "
                         "selection is not a list of text ids); delete it or pass another path")
    return kept


def text_checkpoint(args, model, tokenizer, max_len: int, labels: list[str] | None):
    """The TraceCheckpoint of this command line: the corpus and labels (their texts, as read:
    `labels`), the model, and every option that changes what is summed (max_len: the input
    length the run takes)."""
    from ..analysis.run_checkpoint import model_digest, numerics, plain_settings
    from ..analysis.text.resume import TraceCheckpoint, texts_digest

    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_CHECKPOINT}
    # settings as the run takes them, so that two spellings of one run share a checkpoint:
    # --labels keeps the [CLS] rows with or without --keep cls; --max-length is the length used
    # (none asked, the model's longest; more than that, lowered to it)
    settings["keep"] = sorted(set(args.keep or ()) | ({"cls"} if args.labels else set()))
    settings["max_length"] = max_len
    # --clark-js, --directionality, --head-maps N and --show-texts imply --heads; --show-texts
    # without --head-maps draws the texts it names (TextExtras)
    settings["head_maps"] = args.head_maps or parse_show_texts(args.show_texts)[1]
    settings["heads"] = bool(args.heads or args.clark_js or args.directionality or settings["head_maps"] > 0)
    # the labels as read, as the corpus is its texts (a copy with CRLF line ends had been refused)
    inputs = {"corpus": texts_digest(args.corpus),
              "labels": None if labels is None else texts_digest(labels)}
    return TraceCheckpoint(args.checkpoint, {
        "command": "text", "inputs": inputs, "model": model_digest(model, tokenizer),
        "settings": plain_settings(settings),
        "numerics": numerics(next(model.parameters()).device)})


def pairs_checkpoint(args, ckpt):
    """The PairsCheckpoint of --pairs beside the corpus checkpoint `ckpt` (PATH.pairs): the pairs
    file's content, the model and arithmetic of ckpt, and the options that change the vectors."""
    from ..analysis.run_checkpoint import file_digest
    from ..analysis.text.resume import PairsCheckpoint

    ident = ckpt.fp.identity
    return PairsCheckpoint(ckpt.side_path("pairs"), {
        "command": "text --pairs", "inputs": {"pairs": file_digest(args.pairs)}, "model": ident["model"],
        "settings": {"batch_size": args.batch_size, "max_length": ident["settings"]["max_length"]},
        "numerics": ident["numerics"]})


def add_keep_arguments(p) -> None:
    p.add_argument("--keep", choices=["cls"], action="append", default=[],
                   help="keep vectors: cls -> DIR/cls.npy (n_texts, L+1, D) float32")
    p.add_argument("--trajectories", type=int, default=0, metavar="N",
                   help="keep every token's L+1 states for the first N texts (DIR/trajectories.npz)")
    p.add_argument("--labels", metavar="FILE", help="one label per text (non-blank corpus line): "
                   "geometry of the labelled [CLS] sets (implies --keep cls) and every trace metric "
                   "per label (by_label; the default metrics computed once more per class)")
    p.add_argument("--class-maps", type=int, default=None, metavar="N",
                   help="with --labels: class-mean attention maps of the texts with N real tokens "
                        "([SEP] rows and columns zeroed; class_maps.npz, heat maps)")
    p.add_argument("--theta", type=float, default=None, metavar="X",
                   help="with --class-maps: entries of the class-mean maps below X are hidden in the heat "
                        f"maps (default {DEFAULT_THETA})")
    p.add_argument("--correct-only", action="store_true",
                   help="with --labels and a model with a sequence-classification head: analyse only "
                        "the texts whose predicted class (id2label) equals their label")


def check_label_options(args) -> None:
    """One-line ValueErrors for the label options and --matrices-texts, before the model loads."""
    import math

    if args.class_maps is not None and not args.labels:
        raise ValueError("--class-maps: needs --labels FILE")
    if args.class_maps is not None and args.class_maps < 2:
        raise ValueError(f"--class-maps: expected a text length >= 2 tokens, got {args.class_maps}")
    if args.correct_only and not args.labels:
        raise ValueError("--correct-only: needs --labels FILE")
    if args.theta is not None and not args.class_maps:
        raise ValueError("--theta: needs --class-maps N (it hides entries of the class-mean maps)")
    if args.theta is None:
        args.theta = DEFAULT_THETA
    if not math.isfinite(args.theta) or not 0.0 <= args.theta <= 1.0:
        raise ValueError(f"--theta: expected 0 <= X <= 1, got {args.theta}")
    if args.matrices_texts is not None and not args.matrices:
        raise ValueError("--matrices-texts: needs --matrices")
    if args.matrices_texts is not None and args.matrices_texts < 1:
        raise ValueError(f"--matrices-texts: expected N >= 1, got {args.matrices_texts}")


def finish(args, out_dir: str, keeper: Keeper | None, report: dict, pairs: list[dict] | None,
           labels: list[str] | None, corpus_texts) -> list[tuple[str, str, list[str]]]:
    """After the run: groups and trajectories in `report`, pictures, and the HTML sections
    (heading, body, PNGs). corpus_texts: a callable returning the texts (hover text)."""
    sections = []
    cls_path = os.path.join(out_dir, "cls.npy")
    if keeper is not None:
        kept_cls = keeper.keep_cls
        keeper.close()
        if kept_cls:
            shape = np.load(cls_path, mmap_mode="r").shape
            report["kept"] = {"cls": {"file": "cls.npy", "shape": list(shape), "dtype": "float32"}}
            sections.append(("Kept [CLS] vectors", f"<p>cls.npy: {shape} float32 (text, depth, hidden; "
                             "depth 0 = embedding output).</p>", []))
    if args.trajectories and keeper is not None and keeper.traj:
        pngs, summary = trajectory_plots(out_dir, os.path.join(out_dir, "trajectories.npz"))
        report["trajectories"] = summary
        sections.append(("Token trajectories: each token's path through the layers (thesis 4.3)",
                         f"<p>{summary['tokens']} tokens of the first {summary['texts']} texts; "
                         "red dots: depth 0. trajectories.npz holds the states.</p>", pngs))
    if labels is not None:
        cls = np.load(cls_path, mmap_mode="r")
        groups = group_geometry(cls, labels)
        texts = corpus_texts()
        pngs, notes = group_plots(out_dir, cls_path, labels, groups, texts,
                                  provenance=report.get("provenance"))
        report["groups"] = groups
        rows = [[g, c, groups["last"]["per_label"][g].get("cosine", {}).get("mean"),
                 groups["last"]["per_label"][g]["norms"]["mean"]] for g, c in zip(groups["labels"], groups["counts"])]
        pages = [f for f in ("groups_pca.html", "groups_umap.html") if os.path.exists(os.path.join(out_dir, f))]
        body = (f"<p>{defined('silhouette', 'silhouette')} (cosine) at the last depth "
                f"{fmt(groups['silhouette'][-1])}; mean cosine within labels {fmt(groups['within_cosine'][-1])}, "
                f"between {fmt(groups['between_cosine'][-1])}. Interactive: "
                + ", ".join(f"<a href='{f}'>{f}</a>" for f in pages) + ".</p>"
                + table_html(["label", "texts", "mean cosine within", "mean norm"], rows)
                + "".join(f"<p>{n}</p>" for n in notes)
                + (f"<p>Note: {one_class_note(report.get('correct_only'))}.</p>" if len(groups["labels"]) < 2 else ""))
        sections.append(("Labelled [CLS] sets: do texts with one label sit together? (thesis 4.4.1, 4.4.3)",
                         body, pngs))
    if pairs is not None and "cls_pairs" in report and "vectors" in report["cls_pairs"]:
        vec = report["cls_pairs"].pop("vectors").cpu().double().numpy()
        pg = [p["group"] for p in pairs]
        np.savez(os.path.join(out_dir, "pair_differences.npz"), vectors=vec.astype(np.float32),
                 group=np.array(pg), a=np.array([p["a"] for p in pairs]), b=np.array([p["b"] for p in pairs]))
        sections.append(("[CLS] difference vectors of sentence pairs, PCA (thesis 4.4.2)",
                         "<p>Each point is cls(a) - cls(b) of one pair (pair_differences.npz).</p>",
                         [pair_plot(out_dir, vec, pg)]))
    return sections


def add_head_arguments(p) -> None:
    g = p.add_argument_group("attention heads and Gaussianity (opt-in; docs/metrics.md, attention heads)")
    g.add_argument("--heads", action="store_true",
                   help="attention_heads: Clark's entropies and [SEP]->[SEP], gate-pattern features and "
                        "labels, value-histogram entropy (about 0.5-0.7x the forward pass)")
    g.add_argument("--clark-js", action="store_true",
                   help="Clark's summed JS divergence between all heads and its MDS map (implies --heads; "
                        "(L*H)^2 x tokens work: about 1.3-2.3x the forward pass for a 6x12 model, 3x on AVX2)")
    g.add_argument("--directionality", action="store_true",
                   help="skew fraction, asymmetry, positive-cos share, Spearman(|q|, entropy) "
                        "(implies --heads; hooks the query/key projections)")
    g.add_argument("--head-maps", type=int, default=0, metavar="N",
                   help="draw the L x H attention maps of the first N texts in report.html (N >= 1 implies --heads), "
                        "and their context-similarity maps S = O O^T per head (context_maps.npz, heat maps)")
    g.add_argument("--show-texts", metavar="SEL",
                   help="the texts whose attention maps to keep (report.html grid and attention_view.html, "
                        "a bertviz-style token-to-token view): comma-separated text ids (0-based over the "
                        "non-blank lines) or a regular expression searched in each text; at most --head-maps "
                        "of them (default: every id, or the first 4 matches of a regex; implies --heads)")
    g.add_argument("--similar", metavar="RULE",
                   help="high-similarity pairs for context_similarity.similar (ours): tau:X every pair with "
                        "cos(o_i, o_j) >= X, or topk:K each token's K largest S[i, j]; their |i - j| "
                        "histogram, same-sentence, [SEP] and repeated-token shares")
    g.add_argument("--matrices", action="store_true",
                   help="attention_matrices: cone index of the attention rows, singular values < 1e-3, "
                        "von Neumann entropy, k90 quantiles per head; rank, singular values and eigenvalue "
                        "signs of W_Q,h W_K,h^T, |q|/|k|/|v| histograms; numerical ranks of the softmax, V, "
                        "W_V, head and layer outputs (geometry-of-BERT authors' code; about 4-5x the forward "
                        "pass, --matrices-texts bounds it)")
    g.add_argument("--matrices-texts", type=int, metavar="N",
                   help="with --matrices: the per-text spectra (attention-block cone, singular values, von "
                        "Neumann entropy, numerical ranks; a few ms of LAPACK a block) of the first N texts only "
                        "(default: every text; the geometry-of-BERT code took 30 samples); k90 and the norms "
                        "still cover every text")
    g.add_argument("--gaussianity", action="store_true",
                   help="K^2 normality test, skew and kurtosis of every real token's hidden state per depth")
    g.add_argument("--profile", action="store_true", help="print the seconds spent on each extra metric")
