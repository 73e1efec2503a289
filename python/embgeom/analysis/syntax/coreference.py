"""Coreference heads as Clark et al. measure them (arXiv 1906.04341, section 4.3, Table 2;
docs/metrics.md, `embgeom coref`): antecedent selection accuracy.

Each document (syntax/mentions.py) runs as [CLS] pieces [SEP] and becomes a word-level map
exactly as for syntax heads (word_heads.word_attention_batches: attention TO a word summed over
its pieces, FROM a word averaged). Mentions are in text order, by (start, end). The candidate
antecedents of mention q are the mentions before it whose head word is not q's head word (a
head word attending to itself is no selection); q is scored when a candidate is in q's cluster.
Per head k, q selects the candidate whose head word receives the most attention from q's head
word (row head(q), the map's diagonal never used); ties go to the nearest candidate. Correct =
the selected mention is in q's cluster. Baselines (Clark's first two rows): "nearest" = the
nearest candidate; "head match" = the nearest candidate whose head word equals q's
(case-folded string equality), else the nearest.
"""
from __future__ import annotations

import time

import torch

from ...progress import as_progress
from .mentions import Document
from .word_heads import fitting_order, word_attention_batches, word_setup


def targets(doc: Document) -> list[tuple[int, list[int]]]:
    """Per scored mention q (index into doc.mentions): (q, candidates), candidates the indices of
    the earlier mentions with another head word, nearest first; only q with a candidate in its
    cluster."""
    out = []
    ms = doc.mentions
    for q, m in enumerate(ms):
        cands = [p for p in range(q - 1, -1, -1) if ms[p].head != m.head]
        if any(ms[p].cluster == m.cluster for p in cands):
            out.append((q, cands))
    return out


def baseline_choices(doc: Document, q: int, cands: list[int]) -> tuple[int, int]:
    """(nearest, head match) candidate of mention q."""
    key = doc.tokens[doc.mentions[q].head].casefold()
    same = [p for p in cands if doc.tokens[doc.mentions[p].head].casefold() == key]
    return cands[0], (same[0] if same else cands[0])


def coreference_heads(model, tokenizer, docs: list[Document], *, batch_size: int = 8,
                      max_length: int | None = None, progress=False) -> dict:
    """The report.json block `coref` (docs/metrics.md, `embgeom coref`). Documents longer than
    the model's maximum (or max_length) in tokens are skipped and counted, as `embgeom syntax`
    skips long sentences."""
    start = time.perf_counter()
    L, H, limit, pieces = word_setup(model, tokenizer, [d.tokens for d in docs], batch_size, max_length)
    K = L * H
    order, lengths = fitting_order(pieces, limit)
    skipped = [docs[i].name for i in sorted(set(range(len(docs))) - set(order))]
    correct = torch.zeros(K, dtype=torch.float64)
    nearest_ok = head_match_ok = scored = mentions = 0
    prog = as_progress(progress, "embgeom coref")
    with prog.bar(len(order), "forward passes", unit="document") as bar:
        for chunk, wa in word_attention_batches(model, tokenizer, pieces, order, lengths,
                                                batch_size=batch_size, bar=bar):
            for r, i in enumerate(chunk):
                doc = docs[i]
                ms = doc.mentions
                mentions += len(ms)
                for q, cands in targets(doc):
                    cl = ms[q].cluster
                    rows = wa[r, :, 1 + ms[q].head]                            # (K, Wn): word index + 1
                    cols = torch.tensor([1 + ms[p].head for p in cands])
                    pick = rows[:, cols].argmax(-1)                             # first max = nearest
                    good = torch.tensor([ms[p].cluster == cl for p in cands])
                    correct += good[pick].double()
                    near, match = baseline_choices(doc, q, cands)
                    nearest_ok += ms[near].cluster == cl
                    head_match_ok += ms[match].cluster == cl
                    scored += 1
    if scored == 0:
        raise ValueError("MENTIONS: no mention has an earlier mention of its cluster (with another head "
                         "word) in the documents that fit the model" + (f" ({len(skipped)} skipped as too "
                         "long)" if skipped else ""))
    acc = correct / scored
    best = int(acc.argmax())                                                   # first best: layer, head
    return {
        "definitions": "docs/metrics.md, embgeom coref; Clark et al. arXiv 1906.04341 section 4.3 "
                       "(antecedent selection: the candidate whose head word the mention's head word "
                       "attends to most; word-level attention as for syntax heads)",
        "head_rule": "the span's head word if given ([start, end, head]), else its last word",
        "n_documents": len(order), "skipped_too_long": len(skipped), "skipped": skipped,
        "n_mentions": mentions, "n_scored": scored,
        # null where no head selects any antecedent right, as syntax's best (a head had been named)
        "best": [best // H + 1, best % H] if acc[best] > 0 else None, "accuracy": float(acc[best]),
        "baselines": {"nearest": nearest_ok / scored, "head_match": head_match_ok / scored},
        "all_accuracy": acc.reshape(L, H),
        "seconds": time.perf_counter() - start,
    }
