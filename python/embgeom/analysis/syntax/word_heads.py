"""Word-level attention and syntax heads as Clark
et al. measure them (arXiv 1906.04341, section 4.2; docs/metrics.md, attention heads).

Each sentence's words (the syntactic words of a CoNLL-U file: multiword-token ranges and empty
nodes are skipped) are split into word pieces as the space-joined sentence's tokenization has
them (word_pieces) and run through the model as [CLS] pieces [SEP]. Token attention becomes word
attention as the paper describes it: attention TO a split word is the sum over its pieces,
attention FROM it the mean of its pieces' rows ([CLS] and [SEP] are words of their own). Per head
and sentence the word map has its diagonal
excluded and its [CLS]/[SEP] rows and columns dropped; the prediction for word i is the word it
attends to most ("dep->head") or the word that attends most to it ("head->dep", the transposed
map). Accuracy of a relation = correct predictions of the gold head / words with that relation
over the corpus; the report gives the best of all heads x 2 directions per relation (picked on
the same data, as the paper does), and the best fixed-offset baseline (offsets -3..2).
"""
from __future__ import annotations

import math
import time

import torch

from ... import validation
from ...progress import as_progress
from ..text.adapters import num_layers
from .treebank import Sentence



DIRECTIONS = ("dep->head", "head->dep")


OFFSETS = (-3, -2, -1, 1, 2)


POSS_RELATIONS = ("poss", "nmod:poss")


POSS_CLITICS = ("'s", "s'")


def word_pieces(tokenizer, word_lists: list[list[str]]) -> list[list[list[int]]]:
    """Per text, per word, its piece ids as the text's own tokenization has them: the words
    joined by single spaces and tokenized once, each piece given to the word its last character
    falls in (a piece of the space before a word, sentencepiece's lone "▁", to that word).
    A word tokenized alone had lost the space before it, which byte-level BPE (RoBERTa, DeBERTa,
    ModernBERT) writes into the word's first piece: mid-sentence "the" became 't', 'he' where
    the sentence has 'Ġthe'. [UNK] for a word that yields no piece. Tokenizers without character
    offsets (slow ones) tokenize each word alone, after a space but the first. word_lists: the
    words of each text (a sentence, a document)."""
    out = []
    for words in word_lists:
        if not words:
            out.append([])
            continue
        if getattr(tokenizer, "is_fast", False):
            # (verbose=False: no warning for a text past the model's maximum; it is skipped, and
            # counted, later)
            enc = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)
            ends, at = [], -1
            for w in words:
                at += 1 + len(w)
                ends.append(at)            # one past the word's last character
            pieces, w = [[] for _ in words], 0
            for tok, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]):
                while w < len(words) - 1 and end > ends[w]:
                    w += 1
                pieces[w].append(tok)
        else:
            pieces = tokenizer([w if k == 0 else " " + w for k, w in enumerate(words)],
                               add_special_tokens=False)["input_ids"]
        out.append([p if p else [tokenizer.unk_token_id] for p in pieces])
    return out


def fitting_order(pieces: list[list[list[int]]], limit: int) -> tuple[list[int], list[int]]:
    """(order, lengths): the texts whose [CLS] pieces [SEP] fit in `limit` tokens, shortest first
    (the batches pad least), and every text's length in tokens. Longer texts are skipped whole."""
    lengths = [2 + sum(len(p) for p in ps) for ps in pieces]
    order = [i for i in sorted(range(len(pieces)), key=lambda i: lengths[i]) if lengths[i] <= limit]
    return order, lengths


def word_setup(model, tokenizer, word_lists: list[list[str]], batch_size: int, max_length: int | None):
    """What every word-attention analysis starts from: (L, H, the token limit, each text's
    word pieces); batch_size checked (the commands say --batch-size through validation.renamed)."""
    from ..text.trace import model_max_length

    validation.positive_int(batch_size, "batch_size", allow_zero=False)
    L, H = num_layers(model), model.config.num_attention_heads
    return L, H, model_max_length(model, tokenizer, max_length), word_pieces(tokenizer, word_lists)


# the working memory of one batch's word maps: about this many bytes per (map, token, token)
# entry (the stacked float32 attentions, their masked copy, float64 copies, the token -> word
# sums and the maps); measured 0.8 GB a 512-token text on a 6 x 12-head model
WORD_MAP_ENTRY_BYTES = 40
WORD_MAP_BUDGET_BYTES = 2 << 30   # a batch holds fewer texts than --batch-size where it would pass this


def word_batches(order: list[int], lengths: list[int], batch_size: int, maps: int) -> list[list[int]]:
    """The texts `order` (shortest first) cut into batches of at most batch_size texts whose word
    maps fit WORD_MAP_BUDGET_BYTES (at least one text a batch): 64 sentences of 500 words had
    asked for 50 GB at the default batch size."""
    batches, chunk, longest = [], [], 0
    for i in order:
        T = max(longest, lengths[i])   # the batch's padded length with text i in it
        if chunk and (len(chunk) == batch_size
                      or (len(chunk) + 1) * maps * T * T * WORD_MAP_ENTRY_BYTES > WORD_MAP_BUDGET_BYTES):
            batches.append(chunk)
            chunk, T = [], lengths[i]
        chunk.append(i)
        longest = T
    return batches + ([chunk] if chunk else [])


def word_attention_batches(model, tokenizer, pieces, order, lengths, *, batch_size: int, bar=None):
    """The forward passes behind every word-level analysis: the texts `order` (indices into
    pieces / lengths) in batches of batch_size (fewer where long texts' maps would pass
    WORD_MAP_BUDGET_BYTES), each as [CLS] pieces [SEP] with token types 0.
    Yields (chunk, wa): chunk = the text indices of the batch, wa (B, L*H, Wn, Wn) float64 their
    word maps (`word_attention`: index 0 = [CLS], 1..W the words, W+1 = [SEP], padded slots 0)."""
    K = num_layers(model) * model.config.num_attention_heads
    dev = next(model.parameters()).device
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id or 0
    for chunk in word_batches(order, lengths, batch_size, K):
        B, T = len(chunk), max(lengths[i] for i in chunk)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        groups = torch.full((B, T), -1, dtype=torch.long)
        n_words = torch.zeros(B, dtype=torch.long)
        for r, i in enumerate(chunk):
            toks, grp = [cls_id], [0]
            for w, p in enumerate(pieces[i], 1):
                toks += p
                grp += [w] * len(p)
            W = len(pieces[i])
            toks.append(sep_id)
            grp.append(W + 1)
            ids[r, :len(toks)] = torch.tensor(toks)
            groups[r, :len(grp)] = torch.tensor(grp)
            n_words[r] = W + 2
        mask = groups >= 0
        with torch.inference_mode():
            out = model(input_ids=ids.to(dev), attention_mask=mask.long().to(dev),
                        token_type_ids=torch.zeros_like(ids).to(dev), output_attentions=True,
                        return_dict=True)
        attn = torch.stack(out.attentions, 1).reshape(B, K, T, T).cpu()    # (B, L*H, T, T)
        attn = attn * mask[:, None, None, :]
        yield chunk, word_attention(attn, groups, n_words)
        if bar is not None:
            bar.update(B)


def word_attention(attn: torch.Tensor, groups: torch.Tensor, n_words: torch.Tensor) -> torch.Tensor:
    """Token -> word attention. attn (B, K, T, T) (K maps per sentence, padded tokens masked);
    groups (B, T) int64 word index of each token (0 = [CLS], 1..W words, W+1 = [SEP], -1 pad);
    n_words (B,) W + 2. Returns (B, K, Wn, Wn) float64, Wn = max W + 2: columns summed over a
    word's pieces, rows averaged over them; slots past a sentence's [SEP] are 0."""
    B, K, T, _ = attn.shape
    Wn = int(n_words.max())
    G = torch.zeros(B, T, Wn, dtype=torch.float64, device=attn.device)
    real = groups >= 0
    G[real.nonzero(as_tuple=True) + (groups[real],)] = 1.0
    counts = G.sum(1)                                                      # (B, Wn)
    a = attn.double()
    to_words = a @ G[:, None]                                              # (B, K, T, Wn)
    # rows summed, then divided by the piece count (Clark's np.mean): divided first, each term
    # was rounded, and an exact tie between two words came out an ulp apart
    return (G.transpose(1, 2)[:, None] @ to_words) / counts.clamp(min=1)[:, None, :, None]


def predictions(word_attn: torch.Tensor, n_words: torch.Tensor) -> torch.Tensor:
    """word_attn (B, K, Wn, Wn) -> (B, K, 2, Wn - 2) int64 predicted heads (1-based) of words
    1..W for both directions; [CLS]/[SEP] rows and columns and the diagonal excluded; ties to the
    first word; words past W get 0."""
    B, K, Wn, _ = word_attn.shape
    W = Wn - 2
    m = word_attn[:, :, 1:Wn - 1, 1:Wn - 1]                                # words only (SEP of the
    idx = torch.arange(W, device=word_attn.device)                        # longest sentence dropped)
    valid = idx[None, :] < (n_words - 2)[:, None]                          # (B, W)
    keep = valid[:, None, None, :] & valid[:, None, :, None]
    keep = keep & ~torch.eye(W, dtype=torch.bool, device=word_attn.device)
    neg = torch.tensor(-math.inf, dtype=m.dtype, device=m.device)
    dep_head = torch.where(keep, m, neg).argmax(-1) + 1                     # row i -> most attended j
    head_dep = torch.where(keep, m.transpose(-1, -2), neg).argmax(-1) + 1  # who attends most to i
    out = torch.stack([dep_head, head_dep], dim=2)                         # (B, K, 2, W)
    return torch.where(valid[:, None, None, :], out, torch.zeros_like(out))


def syntax_heads(model, tokenizer, sentences: list[Sentence], *, batch_size: int = 64,
                 max_length: int | None = None, progress=False, word_maps: list | None = None) -> dict:
    """Per-relation syntactic-head accuracy (see the module docstring). Returns the report.json
    block `syntax` (accuracies float, best = [layer (1..L), head (from 0), direction]; docs/metrics.md,
    layers, depths and heads). word_maps, if a list, is filled with one entry per sentence: its
    (L*H, W+1, W+1) float32 word-to-word map over [CLS] (index 0, the probe's ROOT) and its words
    ([SEP] dropped), None if skipped."""
    start = time.perf_counter()
    L, H, limit, pieces = word_setup(model, tokenizer, [s.words for s in sentences], batch_size, max_length)
    K = L * H
    rel_names = sorted({r for s in sentences for r in s.relations})
    rel_id = {r: i for i, r in enumerate(rel_names)}
    R = len(rel_names)
    correct = torch.zeros(K, 2, R + 1, dtype=torch.float64)                # last slot: all words
    offset_ok = torch.zeros(len(OFFSETS), R + 1, dtype=torch.float64)
    total = torch.zeros(R + 1, dtype=torch.float64)
    order, lengths = fitting_order(pieces, limit)
    skipped = len(sentences) - len(order)
    if word_maps is not None:
        word_maps[:] = [None] * len(sentences)
    prog = as_progress(progress, "embgeom syntax")
    with prog.bar(len(order), "forward passes", unit="sentence") as bar:
        for chunk, wa in word_attention_batches(model, tokenizer, pieces, order, lengths,
                                                batch_size=batch_size, bar=bar):
            B = len(chunk)
            n_words = torch.tensor([len(sentences[i].words) + 2 for i in chunk])
            pred = predictions(wa, n_words)                                    # (B, K, 2, Wmax)
            if word_maps is not None:
                for r, i in enumerate(chunk):
                    W = len(sentences[i].words)
                    word_maps[i] = wa[r, :, :W + 1, :W + 1].float().clone()      # [CLS] + words
            Wmax = pred.shape[-1]
            # each word's position (1-based) as the offset baseline reads it: the clitic's for a
            # possessor followed by 's / s', as for the heads below (Clark's rule applies to every
            # predictor, the offsets included)
            opos = torch.arange(1, Wmax + 1).repeat(B, 1)
            gold = torch.zeros(B, Wmax, dtype=torch.long)
            rel = torch.full((B, Wmax), -1, dtype=torch.long)
            for r, i in enumerate(chunk):
                s = sentences[i]
                W = len(s.words)
                gold[r, :W] = torch.tensor(s.heads)
                rel[r, :W] = torch.tensor([rel_id[x] for x in s.relations])
                # Clark's special case: a possessor followed by 's / s' is scored on the clitic's row
                for w in range(W - 1):
                    if s.relations[w] in POSS_RELATIONS and s.words[w + 1] in POSS_CLITICS:
                        pred[r, :, :, w] = pred[r, :, :, w + 1]
                        opos[r, w] = w + 2
            valid = rel >= 0
            ok = (pred == gold[:, None, None, :]) & valid[:, None, None, :]     # (B, K, 2, W)
            okf = ok.double().permute(1, 2, 0, 3).reshape(K, 2, -1)
            rel_flat = rel.clamp(min=0).reshape(-1)
            correct[..., :R].index_add_(2, rel_flat, okf)                      # invalid slots add 0
            correct[..., R] += okf.sum(-1)
            total[:R].index_add_(0, rel_flat, valid.double().reshape(-1))
            total[R] += valid.sum()
            # Clark's offset_predictor: the word o away, clamped to the sentence (0 = ROOT before
            # its first word, its last word past its end)
            last = torch.tensor([len(sentences[i].words) for i in chunk])[:, None]
            for o_i, o in enumerate(OFFSETS):
                hit = (torch.minimum((opos + o).clamp(min=0), last) == gold) & valid
                offset_ok[o_i, :R].index_add_(0, rel_flat, hit.double().reshape(-1))
                offset_ok[o_i, R] += hit.sum()
    if total[R] == 0:
        raise ValueError(f"TREEBANK: no sentence fits in {limit} tokens ([CLS] and [SEP] included; "
                         f"{'--max-length' if max_length else 'the model maximum'})")
    acc = correct / total.clamp(min=1)                                     # (K, 2, R+1)
    off = offset_ok / total.clamp(min=1)

    def entry(r: int) -> dict:
        flat = acc[:, :, r].reshape(-1)                                    # order: layer, head, dir
        best = int(flat.argmax())                                          # first best
        k, d = divmod(best, 2)
        o = int(off[:, r].argmax())
        # no head (offset) right on any word (root: no head predicts ROOT): none to name
        return {"count": int(total[r]), "best": [k // H + 1, k % H, DIRECTIONS[d]] if flat[best] > 0 else None,
                "accuracy": float(flat[best]),
                "offset_baseline": {"offset": OFFSETS[o] if off[o, r] > 0 else None, "accuracy": float(off[o, r])}}

    return {
        "definitions": "docs/metrics.md, attention heads; Clark et al. arXiv 1906.04341 section 4.2 (word-level "
                       "attention: to a word summed over its pieces, from it averaged)",
        "n_sentences": len(order), "skipped_too_long": skipped, "n_words": int(total[R]),
        "relations": {name: entry(i) for i, name in enumerate(rel_names) if total[i] > 0},
        "all": entry(R),
        "all_accuracy": acc[:, :, R].reshape(L, H, 2),
        "seconds": time.perf_counter() - start,
    }
