"""Clark et al.'s attention-only probing classifier (arXiv 1906.04341, section 5; docs/metrics.md,
`embgeom syntax --probe`).

For word i of a sentence the probe gives every candidate head j a probability
p(head(i) = j) proportional to exp(sum_k w_k a^k_ij + u_k a^k_ji), where a^k is head k's word-level
attention (syntax/word_heads.py: to a word summed over its pieces, from it averaged), over every
layer and head k (K = L*H) and both directions: 2K parameters w, u.

Candidates for word i: ROOT and the other words of its sentence (j != i). ROOT is the [CLS]
word: its column and row of the word map (index 0, as CoNLL-U's head 0) give the features
a^k_i,[CLS] and a^k_[CLS],i, so the root word of each sentence is trained on and scored like every
other word and UAS counts every word. This is ours: the paper (as read) does not say how its probe
attaches the root; [CLS] is the one position that is no word and sits at ROOT's index. [SEP] is no
candidate. A single head's prediction chooses from the same candidates.

Split: the first round(F * S) sentences in file order (of the S that fit the model) train, the
rest test; no shuffling, so no seed. Training: w = u = 0,
then torch LBFGS (strong Wolfe line search) in float64 on the mean cross-entropy over the train
words, no regularisation, a fixed iteration cap: the same data give the same numbers.

Beside it, the best single head on the same test words: each of the K heads x 2 directions
predicts the candidate it attends to most (dep->head) or that attends most to the word
(head->dep), ties to the first word; reported both picked on the test words themselves (as
Clark's Table 1 picks) and picked on the train words then scored on test. Clark's `poss` clitic
rule of the per-relation table is not applied here (the probe does not use it either).
"""
from __future__ import annotations

import time

import torch

from .treebank import Sentence
from .word_heads import DIRECTIONS

DEFAULT_SPLIT = 0.8


MAX_ITER = 200


def check_split(fraction: float) -> None:
    """ValueError unless 0 < fraction < 1."""
    if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
        raise ValueError(f"--probe-split: expected a fraction of the sentences to train on, strictly "
                         f"between 0 and 1, got {fraction}")


def split_indices(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """First round(fraction * n) of 0..n-1 train, the rest test; ValueError if either is empty."""
    check_split(fraction)
    n_train = int(round(fraction * n))
    if n_train < 1 or n_train >= n:
        raise ValueError(f"--probe-split {fraction}: {n} sentences give {n_train} to train and "
                         f"{n - n_train} to test; each side needs at least one")
    return list(range(n_train)), list(range(n_train, n))


def pack(maps: list[torch.Tensor], heads: list[list[int]]):
    """maps: per sentence (K, W+1, W+1) word-to-word attention over [CLS] (index 0, ROOT) and its
    W words (1..W; no [SEP]); heads: gold heads (1-based, 0 = root). Returns A (S, K, Wm, Wm)
    float64 (zero padded), gold (S, Wm) int64 candidate index = the gold head itself (0 = ROOT;
    -1 for the [CLS] row and padding, which are not scored) and cand (S, Wm, Wm) bool: j is a
    candidate for word i (i a word, j ROOT or another word)."""
    S, K = len(maps), maps[0].shape[0]
    Wm = max(m.shape[-1] for m in maps)
    A = torch.zeros(S, K, Wm, Wm, dtype=torch.float64)
    gold = torch.full((S, Wm), -1, dtype=torch.long)
    real = torch.zeros(S, Wm, dtype=torch.bool)
    for s, (m, h) in enumerate(zip(maps, heads)):
        W1 = m.shape[-1]
        if len(h) != W1 - 1:
            raise ValueError(f"probe: sentence {s} has {len(h)} heads for a word map over {W1 - 1} words + [CLS]")
        A[s, :, :W1, :W1] = m.double()
        gold[s, 1:W1] = torch.tensor(h, dtype=torch.long)
        real[s, :W1] = True
    words = real.clone()
    words[:, 0] = False                                                    # the [CLS] row scores nothing
    cand = words[:, :, None] & real[:, None, :] & ~torch.eye(Wm, dtype=torch.bool)[None]
    return A, gold, cand


def logits(A: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """(S, Wm, Wm) scores sum_k w_k A^k_ij + u_k A^k_ji, -inf where j is no candidate for i."""
    z = torch.einsum("skij,k->sij", A, w) + torch.einsum("skji,k->sij", A, u)
    return z.masked_fill(~cand, float("-inf"))


def features(A, gold, cand):
    """The scored words' features: X (N, Wm, 2K) with X[n, j] = (A^k_ij for all k, A^k_ji for all k)
    for word i of row n, candidate mask (N, Wm) and gold index (N,); N = words with gold >= 0."""
    scored = gold >= 0
    X = torch.cat([A.permute(0, 2, 3, 1), A.transpose(-1, -2).permute(0, 2, 3, 1)], -1)
    return X[scored], cand[scored], gold[scored]


def loss(A, gold, cand, w, u) -> torch.Tensor:
    """Mean cross-entropy of the gold heads over the scored words (gold >= 0)."""
    return _loss(features(A, gold, cand), torch.cat([w, u]))


def _loss(feats, theta) -> torch.Tensor:
    X, c, g = feats
    z = (X @ theta).masked_fill(~c, float("-inf"))                         # (N, Wm)
    return -torch.log_softmax(z, -1).gather(1, g[:, None]).mean()


def train(A, gold, cand, *, max_iter: int = MAX_ITER) -> dict:
    """w, u (K,) float64 minimising `loss` from zero with LBFGS; also the loss at the start and
    end and the number of iterations."""
    K = A.shape[1]
    feats = features(A, gold, cand)
    theta = torch.zeros(2 * K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        v = _loss(feats, theta)
        v.backward()
        return v

    with torch.no_grad():
        start = float(_loss(feats, theta))
    opt.step(closure)
    with torch.no_grad():
        end = float(_loss(feats, theta))
    th = theta.detach()
    return {"w": th[:K].clone(), "u": th[K:].clone(), "loss_start": start, "loss_end": end,
            "iterations": int(opt.state[theta].get("n_iter", 0))}


def accuracy(A, gold, cand, w, u) -> tuple[int, int]:
    """(correct, scored) of the probe's argmax head (ties to the first candidate)."""
    with torch.no_grad():
        pred = logits(A, w, u, cand).argmax(-1)
    scored = gold >= 0
    return int((pred == gold)[scored].sum()), int(scored.sum())


def single_heads(A, gold, cand) -> torch.Tensor:
    """(K, 2) correct counts of each head's argmax, dep->head and head->dep."""
    neg = torch.tensor(float("-inf"), dtype=A.dtype)
    scored = gold >= 0
    c = cand[:, None]
    out = []
    for m in (A, A.transpose(-1, -2)):
        pred = torch.where(c, m, neg).argmax(-1)                           # (S, K, Wm)
        out.append(((pred == gold[:, None]) & scored[:, None]).sum((0, 2)))
    return torch.stack(out, -1).double()


def attention_probe(maps: list[torch.Tensor | None], sentences: list[Sentence], fraction: float,
                    n_heads: int, *, max_iter: int = MAX_ITER) -> dict:
    """The report.json block `syntax.probe`. maps[i]: sentence i's (K, W+1, W+1) word map ([CLS]
    then the words, `pack`), None for a
    sentence that was skipped (too long); n_heads = H (for layer/head numbering)."""
    start = time.perf_counter()
    kept = [i for i, m in enumerate(maps) if m is not None]
    tr, te = split_indices(len(kept), fraction)
    tr, te = [kept[i] for i in tr], [kept[i] for i in te]
    Atr, gtr, ctr = pack([maps[i] for i in tr], [sentences[i].heads for i in tr])
    Ate, gte, cte = pack([maps[i] for i in te], [sentences[i].heads for i in te])
    if int((gtr >= 0).sum()) == 0 or int((gte >= 0).sum()) == 0:
        raise ValueError(f"--probe-split {fraction}: the train or the test sentences have no word to score")
    fit = train(Atr, gtr, ctr, max_iter=max_iter)
    ok_tr, n_tr = accuracy(Atr, gtr, ctr, fit["w"], fit["u"])
    ok_te, n_te = accuracy(Ate, gte, cte, fit["w"], fit["u"])
    H = n_heads
    acc_te = (single_heads(Ate, gte, cte) / n_te).reshape(-1)               # order: layer, head, dir
    acc_tr = (single_heads(Atr, gtr, ctr) / n_tr).reshape(-1)

    def head(flat_index: int) -> list:
        k, d = divmod(flat_index, 2)
        return [k // H + 1, k % H, DIRECTIONS[d]]

    b_te, b_tr = int(acc_te.argmax()), int(acc_tr.argmax())
    K = fit["w"].shape[0]
    return {
        "definitions": "docs/metrics.md, embgeom syntax --probe; Clark et al. arXiv 1906.04341 section 5 "
                       "(attention-only probe): p(head(i)=j) ~ exp(sum_k w_k a^k_ij + u_k a^k_ji); "
                       "candidates = ROOT (the [CLS] word, ours) and the other words of the sentence; "
                       "every word scored",
        "split": fraction, "train_sentences": len(tr), "test_sentences": len(te),
        "train_words": n_tr, "test_words": n_te,
        "root_candidate": "[CLS]",
        "uas_test": ok_te / n_te, "uas_train": ok_tr / n_tr,
        "best_single_head_test": {"best": head(b_te), "accuracy": float(acc_te[b_te]),
                                  "picked_on": "test"},
        "best_single_head_train_picked": {"best": head(b_tr), "accuracy_test": float(acc_te[b_tr]),
                                          "accuracy_train": float(acc_tr[b_tr])},
        "loss_start": fit["loss_start"], "loss_end": fit["loss_end"], "iterations": fit["iterations"],
        "max_iter": max_iter, "parameters": 2 * K,
        "w": fit["w"].reshape(-1, H), "u": fit["u"].reshape(-1, H),
        "seconds": time.perf_counter() - start,
    }
