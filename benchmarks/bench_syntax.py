"""`embgeom syntax` cost: a 2,000-sentence treebank through the default model (target: under
2 minutes on 2 CPU cores).

  python benchmarks/bench_syntax.py [--sentences 2000 --batch 64]

The treebank is the shipped sample (embgeom/data/sample.conllu) repeated with variation: every
NOUN, ADJ and VERB form is replaced by a random form of the same UPOS from the sample, so the
trees stay valid and the word pieces vary. Rows go to benchmarks/results/text.csv (--no-csv:
nothing written) and record the CPU (model, instruction set), embgeom's CPU path and torch's
threads.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, peak_rss_mb, provenance  # noqa: E402

from embgeom import load_model  # noqa: E402
from embgeom.analysis.syntax import treebank, word_heads  # noqa: E402


def make_treebank(path: str, n: int, seed: int = 0) -> None:
    import conllu

    with open(treebank.sample_path(), encoding="utf-8") as f:
        base = conllu.parse(f.read())
    forms: dict[str, list[str]] = {}
    for s in base:
        for t in s:
            forms.setdefault(t["upos"], []).append(t["form"])
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for k in range(n):
            s = base[k % len(base)]
            lines = [f"# sent_id = bench-{k + 1}"]
            for t in s:
                form = t["form"]
                if k >= len(base) and t["upos"] in ("NOUN", "ADJ", "VERB"):
                    form = rng.choice(forms[t["upos"]])
                lines.append("\t".join([str(t["id"]), form, "_", t["upos"], "_", "_", str(t["head"]),
                                        t["deprel"], "_", "_"]))
            out.write("\n".join(lines) + "\n\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--model", default=None)
    p.add_argument("--no-csv", action="store_true", help="append nothing to benchmarks/results/text.csv")
    args = p.parse_args()
    path = os.path.join(tempfile.mkdtemp(), "bench.conllu")
    make_treebank(path, args.sentences)
    t0 = time.perf_counter()
    sentences = treebank.read_conllu(path)
    t_read = time.perf_counter() - t0
    model, tokenizer = load_model(args.model)
    t1 = time.perf_counter()
    block = word_heads.syntax_heads(model, tokenizer, sentences, batch_size=args.batch)
    t_run = time.perf_counter() - t1
    words = block["n_words"]
    print(f"threads={torch.get_num_threads()} sentences={block['n_sentences']} words={words}: "
          f"read {t_read:.1f}s, syntax_heads {t_run:.1f}s (target < 120 s end to end); "
          f"all: L{block['all']['best'][0] + 1} h{block['all']['best'][1]} {block['all']['accuracy']:.3f}")
    if not args.no_csv:
        append_rows("text.csv", [dict(metric="syntax", provider="syntax_heads", n=args.sentences, m=words,
                                      d=model.config.hidden_size, dtype="float32",
                                      median_ms=round((t_read + t_run) * 1e3, 1), peak_mb=round(peak_rss_mb(), 1),
                                      **provenance(next(model.parameters()).device))])


if __name__ == "__main__":
    main()
