"""`embgeom coref MENTIONS.jsonl --out DIR`: coreference heads, each head's antecedent selection
accuracy against mention clusters (docs/metrics.md, `embgeom coref`); writes report.json, a PNG
and report.html.
"""
from __future__ import annotations

import os
import sys

from ..analysis.syntax.coreference import coreference_heads
from ..analysis.syntax.mentions import read_mentions
from ..analysis.text.adapters import num_layers
from ..io import check_output_folder, output_folder
from ..report.coref_page import write_coref_report
from .model_options import (add_model_options, check_run_options, finish_report, model_input,
                            note_skipped_too_long, progress_for)

FORMAT = ("one JSON object per line: {\"tokens\": [words], \"clusters\": [[[start, end], ...], ...]}, "
          "spans 0-based word indices with END INCLUSIVE ([i, i] is the one word i); [start, end, head] "
          "names the head word, else the span's last word is its head; optional \"id\"")


def add_arguments(p) -> None:
    p.description = (p.description or "") + (
        ". Clark et al. (arXiv 1906.04341, section 4.3): for each mention with an earlier mention of its "
        "cluster, each head selects the earlier mention whose head word its head word attends to most; "
        "accuracy per head beside the nearest-mention and head-word-match baselines. Input: " + FORMAT + ".")
    p.add_argument("mentions", metavar="MENTIONS", help="JSON-lines file of documents and mention clusters "
                   "(" + FORMAT + "; a sample ships as embgeom/data/coref.jsonl)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    add_model_options(p, batch_size=8, max_length_help="skip documents longer than N tokens (Clark et al. "
                      "truncated CoNLL-2012 documents to 128 tokens; cut yours before)")


def main(args) -> int:
    from ..formatting import counted, fmt, seconds
    from ..models import DEFAULT_MODEL, load_model
    from ..provenance import Provenance

    prov = Provenance(args, inputs={"MENTIONS": args.mentions})
    prog = progress_for(args, "embgeom coref")
    check_run_options(args)
    check_output_folder(args.out, command="coref", inputs=[("MENTIONS", args.mentions), model_input(args.model)])
    docs = read_mentions(args.mentions)
    with output_folder(args.out, command="coref") as out:
        with prog.phase("loading the model"):
            model, tokenizer = load_model(args.model, device=args.device)
        prov.set_model(args.model, model)
        block = coreference_heads(model, tokenizer, docs, batch_size=args.batch_size,
                                  max_length=args.max_length, progress=prog)
        report = {"model": args.model or DEFAULT_MODEL, "mentions": os.path.abspath(args.mentions),
                  "layers": num_layers(model), "heads": model.config.num_attention_heads,
                  "coref": block}
        finish_report(out, report, prov, prog, lambda: write_coref_report(out, report))
    note_skipped_too_long("coref", block["skipped_too_long"], "document", args, "report.json coref.skipped names them")
    b = block["baselines"]
    print(f"embgeom coref: {counted(block['n_documents'], 'document')}, {fmt(block['n_scored'])} of "
          f"{fmt(block['n_mentions'])} mentions with an antecedent in {seconds(prov.seconds())}; best head "
          f"{'L{} h{}'.format(*block['best']) if block['best'] else 'none'} {block['accuracy']:.3f} "
          f"(nearest {b['nearest']:.3f}, "
          f"head match {b['head_match']:.3f}) -> {os.path.join(args.out, 'report.html')}", file=sys.stderr)
    return 0
