"""`embgeom syntax TREEBANK.conllu --out DIR`: syntax heads, word-level attention against a CoNLL-U
treebank (docs/metrics.md, attention heads); writes report.json, PNGs and report.html.
"""
from __future__ import annotations

import os
import sys

from ..analysis.syntax.treebank import read_conllu
from ..analysis.text.adapters import num_layers
from ..analysis.syntax.word_heads import syntax_heads
from ..io import check_output_folder, output_folder
from ..report.syntax_page import write_syntax_report
from .model_options import (add_model_options, check_run_options, finish_report, model_input,
                            note_skipped_too_long, progress_for)


def add_arguments(p) -> None:
    p.add_argument("treebank", metavar="TREEBANK", help="CoNLL-U file (e.g. a Universal Dependencies "
                   "treebank; a sample ships as embgeom/data/sample.conllu)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--probe", action="store_true",
                   help="also train Clark's attention-only probing classifier (a softmax over candidate "
                   "heads scored by a learned weighting of every head's attention, both directions) on "
                   "the first part of the treebank and report its UAS on the rest beside the best single head")
    p.add_argument("--probe-split", type=float, default=None, metavar="F",
                   help="fraction of the sentences (first in file order) the probe trains on; the rest "
                   "test it (default 0.8; needs --probe)")
    add_model_options(p, batch_size=64, max_length_help="skip sentences longer than N tokens")


def main(args) -> int:
    from ..formatting import counted, fmt, seconds
    from ..models import DEFAULT_MODEL, load_model
    from ..provenance import Provenance

    prov = Provenance(args, inputs={"TREEBANK": args.treebank})
    prog = progress_for(args, "embgeom syntax")
    check_run_options(args)
    split = probe_split(args)
    check_output_folder(args.out, command="syntax", inputs=[("TREEBANK", args.treebank), model_input(args.model)])
    sentences = read_conllu(args.treebank)
    with output_folder(args.out, command="syntax") as out:
        with prog.phase("loading the model"):
            model, tokenizer = load_model(args.model, device=args.device)
        prov.set_model(args.model, model)
        maps = [] if args.probe else None
        block = syntax_heads(model, tokenizer, sentences, batch_size=args.batch_size,
                             max_length=args.max_length, progress=prog, word_maps=maps)
        if args.probe:
            from ..analysis.syntax.probe import attention_probe
            with prog.phase("training the probe"):
                block["probe"] = attention_probe(maps, sentences, split, model.config.num_attention_heads)
            del maps
        report = {"model": args.model or DEFAULT_MODEL, "treebank": os.path.abspath(args.treebank),
                  "layers": num_layers(model), "heads": model.config.num_attention_heads,
                  "syntax": block}
        finish_report(out, report, prov, prog, lambda: write_syntax_report(out, report))
    note_skipped_too_long("syntax", block["skipped_too_long"], "sentence", args, "report.json syntax.skipped_too_long")
    a = block["all"]
    offset = a["offset_baseline"]["offset"]
    if "probe" in block:
        pr = block["probe"]
        b = pr["best_single_head_test"]
        print(f"embgeom syntax: probe (attention only, {fmt(pr['parameters'])} weights, trained on "
              f"{fmt(pr['train_sentences'])} sentences) UAS test {pr['uas_test']:.3f} ({fmt(pr['test_words'])} words, "
              f"roots included, ROOT = [CLS]), train {pr['uas_train']:.3f}; best single head on test "
              f"L{b['best'][0]} h{b['best'][1]} {b['best'][2]} {b['accuracy']:.3f}", file=sys.stderr)
        if not pr["converged"]:
            from ..analysis.syntax.probe import cap_met

            print(f"embgeom syntax: note: the probe's LBFGS stopped at {cap_met(pr)}, short of its tolerances: its weights "
                  "and UAS are the last iterate's, not the loss's minimum (report.json syntax.probe.converged)",
                  file=sys.stderr)
    # the last line names the report, after the probe's lines
    print(f"embgeom syntax: {counted(block['n_sentences'], 'sentence')}, {counted(block['n_words'], 'word')} in "
          f"{seconds(prov.seconds())} (forward passes {seconds(block['seconds'])}); best head overall "
          f"{'L{} h{} {}'.format(*a['best']) if a['best'] else 'none'} {a['accuracy']:.3f} (offset {'none' if offset is None else f'{offset:+d}'}: "
          f"{a['offset_baseline']['accuracy']:.3f}) -> {os.path.join(args.out, 'report.html')}",
          file=sys.stderr)
    return 0


def probe_split(args) -> float | None:
    """The checked --probe-split (default 0.8 with --probe); one-line errors before the model loads."""
    if args.probe_split is not None and not args.probe:
        raise ValueError("--probe-split needs --probe")
    if not args.probe:
        return None
    from ..analysis.syntax.probe import DEFAULT_SPLIT, check_split

    split = DEFAULT_SPLIT if args.probe_split is None else args.probe_split
    check_split(split)
    return split
