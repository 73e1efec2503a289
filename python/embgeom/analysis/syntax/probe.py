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
words, no regularisation, a fixed iteration cap (`converged` says whether it stopped on its
tolerances before it): the same data give the same numbers.

Beside it, the best single head on the same test words: each of the K heads x 2 directions
predicts the candidate it attends to most (dep->head) or that attends most to the word
(head->dep), ties to the first word; reported both picked on the test words themselves (as
Clark's Table 1 picks) and picked on the train words then scored on test. Clark's `poss` clitic
rule of the per-relation table is not applied here (the probe does not use it either).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .treebank import Sentence
from .word_heads import DIRECTIONS

DEFAULT_SPLIT = 0.8


MAX_ITER = 1000   # LBFGS iterations (the shipped sample's probe with the default model converges in 617)


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


@dataclass
class Packed:
    """Sentences grouped by their length n = W + 1 ([CLS] and W words), none padded: per group
    the word maps A (S_g, K, n, n) float32 and the gold candidate indices gold (S_g, n) int64 (the
    gold head itself, 0 = ROOT; -1 for the [CLS] row, which is not scored). Memory is the maps'
    own bytes, L*H*(W+1)^2*4 per sentence: a padded (S, K, Wm, Wm) float64 block had cost every
    sentence the longest one's map, twice (about 300 GB for a BERT-base probe on UD English EWT)."""

    groups: list[tuple[torch.Tensor, torch.Tensor]]
    K: int

    @property
    def words(self) -> int:
        return sum(int((g >= 0).sum()) for _, g in self.groups)

    def chunks(self):
        """(A float64, gold, cand (n, n) bool) over blocks of at most CHUNK_BYTES of float64 maps:
        j is a candidate for word i when i is a word (not the [CLS] row) and j != i."""
        for A, gold in self.groups:
            n = A.shape[-1]
            cand = ~torch.eye(n, dtype=torch.bool)
            cand[0] = False
            step = max(1, CHUNK_BYTES // (A.shape[1] * n * n * 8))
            for s in range(0, A.shape[0], step):
                yield A[s:s + step].double(), gold[s:s + step], cand


CHUNK_BYTES = 64 << 20


def pack(maps: list[torch.Tensor], heads: list[list[int]]) -> Packed:
    """maps: per sentence (K, W+1, W+1) word-to-word attention over [CLS] (index 0, ROOT) and its
    W words (1..W; no [SEP]); heads: gold heads (1-based, 0 = root)."""
    K = maps[0].shape[0]
    by_len: dict[int, list[int]] = {}
    for s, (m, h) in enumerate(zip(maps, heads)):
        if len(h) != m.shape[-1] - 1:
            raise ValueError(f"probe: sentence {s} has {len(h)} heads for a word map over {m.shape[-1] - 1} words + [CLS]")
        by_len.setdefault(m.shape[-1], []).append(s)
    groups = []
    for n in sorted(by_len):
        idx = by_len[n]
        A = torch.stack([maps[s].float() for s in idx])
        gold = torch.tensor([[-1] + list(heads[s]) for s in idx], dtype=torch.long)
        groups.append((A, gold))
    return Packed(groups, K)


def _logits(A: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """(S, n, n) scores sum_k w_k A^k_ij + u_k A^k_ji, -inf where j is no candidate for i."""
    z = torch.einsum("skij,k->sij", A, w) + torch.einsum("skji,k->sij", A, u)
    return z.masked_fill(~cand, float("-inf"))


def _nll_sum(A, gold, cand, w, u) -> torch.Tensor:
    """Summed cross-entropy of the gold heads over the words of one chunk (rows 1..)."""
    z = _logits(A, w, u, cand)[:, 1:]
    return -torch.log_softmax(z, -1).gather(-1, gold[:, 1:, None]).sum()


def loss(packed: Packed, w, u) -> torch.Tensor:
    """Mean cross-entropy of the gold heads over the scored words."""
    with torch.no_grad():
        return sum(_nll_sum(A, g, c, w, u) for A, g, c in packed.chunks()) / packed.words


def train(packed: Packed, *, max_iter: int = MAX_ITER) -> dict:
    """w, u (K,) float64 minimising `loss` from zero with LBFGS; also the loss at the start and
    end, the number of iterations and whether LBFGS stopped on its tolerances (converged) rather
    than at max_iter (or its evaluation cap). Each evaluation runs over the chunks, each chunk's
    gradient added as it is done, so memory is one chunk's beside the maps."""
    K, N = packed.K, packed.words
    theta = torch.zeros(2 * K, dtype=torch.float64, requires_grad=True)
    max_eval = max_iter * 5 // 4
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, max_eval=max_eval, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        total = 0.0
        for A, g, c in packed.chunks():
            part = _nll_sum(A, g, c, theta[:K], theta[K:]) / N
            part.backward()
            total += float(part.detach())
        return torch.tensor(total, dtype=torch.float64)

    start = float(loss(packed, theta.detach()[:K], theta.detach()[K:]))
    opt.step(closure)
    th = theta.detach()
    end = float(loss(packed, th[:K], th[K:]))
    state = opt.state[theta]
    iterations, evaluations = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    converged = iterations < max_iter and evaluations < max_eval
    return {"w": th[:K].clone(), "u": th[K:].clone(), "loss_start": start, "loss_end": end,
            "iterations": iterations, "evaluations": evaluations, "max_eval": max_eval, "converged": converged}


def accuracy(packed: Packed, w, u) -> tuple[int, int]:
    """(correct, scored) of the probe's argmax head (ties to the first candidate)."""
    ok = 0
    with torch.no_grad():
        for A, g, c in packed.chunks():
            ok += int((_logits(A, w, u, c)[:, 1:].argmax(-1) == g[:, 1:]).sum())
    return ok, packed.words


def single_heads(packed: Packed) -> torch.Tensor:
    """(K, 2) correct counts of each head's argmax, dep->head and head->dep."""
    out = torch.zeros(packed.K, 2, dtype=torch.float64)
    for A, g, c in packed.chunks():
        neg = torch.tensor(float("-inf"), dtype=A.dtype)
        for d, m in enumerate((A, A.transpose(-1, -2))):
            pred = torch.where(c, m, neg)[:, :, 1:].argmax(-1)               # (S, K, n - 1)
            out[:, d] += (pred == g[:, None, 1:]).sum((0, 2))
    return out


def cap_met(pr: dict) -> str:
    """The cap an unconverged probe (report.json syntax.probe) stopped at, in words: 826 iterations
    that met the evaluation cap had been said "the cap of 1,000 iterations"."""
    if pr["iterations"] >= pr["max_iter"] or "max_eval" not in pr:
        return f"the cap of {pr['max_iter']:,} iterations"
    return f"the cap of {pr['max_eval']:,} loss evaluations, after {pr['iterations']:,} iterations"


def attention_probe(maps: list[torch.Tensor | None], sentences: list[Sentence], fraction: float,
                    n_heads: int, *, max_iter: int = MAX_ITER) -> dict:
    """The report.json block `syntax.probe`. maps[i]: sentence i's (K, W+1, W+1) word map ([CLS]
    then the words, `pack`), None for a
    sentence that was skipped (too long); n_heads = H (for layer/head numbering)."""
    start = time.perf_counter()
    kept = [i for i, m in enumerate(maps) if m is not None]
    tr, te = split_indices(len(kept), fraction)
    tr, te = [kept[i] for i in tr], [kept[i] for i in te]
    train_set = pack([maps[i] for i in tr], [sentences[i].heads for i in tr])
    test_set = pack([maps[i] for i in te], [sentences[i].heads for i in te])
    if train_set.words == 0 or test_set.words == 0:
        raise ValueError(f"--probe-split {fraction}: the train or the test sentences have no word to score")
    fit = train(train_set, max_iter=max_iter)
    ok_tr, n_tr = accuracy(train_set, fit["w"], fit["u"])
    ok_te, n_te = accuracy(test_set, fit["w"], fit["u"])
    H = n_heads
    acc_te = (single_heads(test_set) / n_te).reshape(-1)                     # order: layer, head, dir
    acc_tr = (single_heads(train_set) / n_tr).reshape(-1)

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
        "max_iter": max_iter, "evaluations": fit["evaluations"], "max_eval": fit["max_eval"],
        "converged": fit["converged"], "parameters": 2 * K,
        "w": fit["w"].reshape(-1, H), "u": fit["u"].reshape(-1, H),
        "seconds": time.perf_counter() - start,
    }
