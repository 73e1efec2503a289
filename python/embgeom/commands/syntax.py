"""`embgeom syntax TREEBANK.conllu --out DIR`: syntax heads, word-level attention against a CoNLL-U
treebank (docs/metrics.md, attention heads); writes report.json, PNGs and report.html.
"""
from __future__ import annotations

import os
import sys

from ..analysis.syntax.treebank import read_conllu
from ..analysis.syntax.word_heads import syntax_heads
from ..io import check_output_folder, output_folder
from ..report.syntax_page import write_syntax_report
from .model_options import add_model_options, check_batch_size, progress_for


def add_arguments(p) -> None:
    p.add_argument("treebank", metavar="TREEBANK", help="CoNLL-U file (e.g. a Universal Dependencies "
                   "treebank; a sample ships as embgeom/data/sample.conllu)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    add_model_options(p, batch_size=64, max_length_help="skip sentences longer than N tokens")


def main(args) -> int:
    from ..formatting import fmt, seconds
    from ..models import DEFAULT_MODEL, load_model
    from ..provenance import Provenance
    from ..report import write_json

    prov = Provenance(args, inputs={"TREEBANK": args.treebank})
    prog = progress_for(args, "embgeom syntax")
    check_batch_size(args)
    check_output_folder(args.out)
    sentences = read_conllu(args.treebank)
    with output_folder(args.out, command="syntax") as out:
        with prog.phase("loading the model"):
            model, tokenizer = load_model(args.model, device=args.device)
        prov.set_model(args.model, model)
        block = syntax_heads(model, tokenizer, sentences, batch_size=args.batch_size,
                             max_length=args.max_length, progress=prog)
        report = {"model": args.model or DEFAULT_MODEL, "treebank": os.path.abspath(args.treebank),
                  "layers": model.config.num_hidden_layers, "heads": model.config.num_attention_heads,
                  "syntax": block}
        with prog.phase("plots and page"):
            report["provenance"] = prov.record()
            write_syntax_report(out, report)
        report["provenance"] = prov.record()
        write_json(os.path.join(out, "report.json"), report)
    a = block["all"]
    print(f"embgeom syntax: {fmt(block['n_sentences'])} sentences, {fmt(block['n_words'])} words in "
          f"{seconds(prov.seconds())} (forward passes {seconds(block['seconds'])}); best head overall L{a['best'][0]} h{a['best'][1]} "
          f"{a['best'][2]} {a['accuracy']:.3f} (offset {a['offset_baseline']['offset']:+d}: "
          f"{a['offset_baseline']['accuracy']:.3f}) -> {os.path.join(args.out, 'report.html')}",
          file=sys.stderr)
    return 0
