"""Clark's attention-only probe (analysis/syntax/probe.py) on word-level attention built directly:
the loss against a loop-per-word float64 computation, a head that equals the gold trees gives
accuracy 1.0, the single-head baseline against loops, the split and its errors, determinism.
The model-driven checks (tiny random BERT, the shipped sample, the CLI) are in tests/test_syntax.py."""
from __future__ import annotations

import math
import random

import pytest
import torch

from embgeom.analysis.syntax import probe
from embgeom.analysis.syntax.treebank import Sentence, check_tree


def _random_tree(rng: random.Random, n: int) -> list[int]:
    order = list(range(1, n + 1))
    rng.shuffle(order)
    heads = [0] * n
    for k, w in enumerate(order[1:], 1):
        heads[w - 1] = order[rng.randrange(k)]
    check_tree(heads, "test")
    return heads


def _data(seed=0, n_sent=30, K=6, gold_head=None):
    """Random row-stochastic word maps (K, W+1, W+1), index 0 = [CLS] (the probe's ROOT); if
    gold_head is given, that head's map is the gold tree's one-hot (word i's row has 1 at
    head(i), the root word's at [CLS])."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    sentences, maps = [], []
    for _ in range(n_sent):
        W = rng.randint(2, 9)
        heads = _random_tree(rng, W)
        m = torch.softmax(torch.randn(K, W + 1, W + 1, generator=g, dtype=torch.float64), -1)
        if gold_head is not None:
            m[gold_head] = 0
            m[gold_head, 0, 0] = 1.0
            for i, h in enumerate(heads, 1):
                m[gold_head, i, h] = 1.0
        maps.append(m.float())
        sentences.append(Sentence([f"w{i}" for i in range(W)], heads, ["dep"] * W))
    return maps, sentences


def _loop_loss(maps, sentences, w, u):
    total, n = 0.0, 0
    for m, s in zip(maps, sentences):
        m = m.double()
        W = len(s.words)
        for i in range(1, W + 1):                       # every word, ROOT = column 0
            scores = {j: sum(float(w[k]) * float(m[k, i, j]) + float(u[k]) * float(m[k, j, i])
                             for k in range(m.shape[0])) for j in range(W + 1) if j != i}
            top = max(scores.values())
            logz = top + math.log(sum(math.exp(v - top) for v in scores.values()))
            total += logz - scores[s.heads[i - 1]]
            n += 1
    return total / n


def test_loss_matches_loops():
    maps, sentences = _data(seed=1, n_sent=6, K=4)
    g = torch.Generator().manual_seed(3)
    w, u = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    packed = probe.pack(maps, [s.heads for s in sentences])
    got = float(probe.loss(packed, w, u))
    assert abs(got - _loop_loss(maps, sentences, w, u)) < 1e-12
    # at zero weights every candidate (ROOT and the W - 1 other words) is equally likely
    z = torch.zeros(4, dtype=torch.float64)
    want = sum(len(s.words) * math.log(len(s.words)) for s in sentences) / sum(len(s.words) for s in sentences)
    assert abs(float(probe.loss(packed, z, z)) - want) < 1e-12
    # in chunks of one sentence (a long treebank's blocks): the same loss
    old, probe.CHUNK_BYTES = probe.CHUNK_BYTES, 1
    try:
        assert abs(float(probe.loss(packed, w, u)) - got) < 1e-12
    finally:
        probe.CHUNK_BYTES = old


def test_head_equal_to_gold_gives_accuracy_one():
    maps, sentences = _data(seed=2, n_sent=40, K=6, gold_head=4)
    r = probe.attention_probe(maps, sentences, 0.8, n_heads=3)
    assert r["uas_test"] == 1.0 and r["uas_train"] == 1.0
    assert r["loss_end"] < r["loss_start"]
    assert r["train_sentences"] == 32 and r["test_sentences"] == 8
    assert r["root_candidate"] == "[CLS]" and "excluded_root" not in r
    assert r["train_words"] == sum(len(s.words) for s in sentences[:32])      # every word, roots too
    assert r["test_words"] == sum(len(s.words) for s in sentences[32:])
    # head 4 = layer 2 (1-based), head 1 of 3, dep->head; exact on both splits
    assert r["best_single_head_test"] == {"best": [2, 1, "dep->head"], "accuracy": 1.0, "picked_on": "test"}
    assert r["best_single_head_train_picked"]["best"] == [2, 1, "dep->head"]
    assert r["w"].shape == (2, 3) and r["parameters"] == 12


def test_single_heads_match_loops():
    maps, sentences = _data(seed=4, n_sent=10, K=5)
    got = probe.single_heads(probe.pack(maps, [s.heads for s in sentences]))
    want = torch.zeros(5, 2, dtype=torch.float64)
    for m, s in zip(maps, sentences):
        W = len(s.words)
        for k in range(5):
            for d in range(2):
                mm = m[k].double() if d == 0 else m[k].double().T
                for i in range(1, W + 1):
                    best = max((j for j in range(W + 1) if j != i), key=lambda j: (float(mm[i, j]), -j))
                    want[k, d] += best == s.heads[i - 1]
    assert torch.equal(got, want)


def test_training_lowers_the_loss_and_is_deterministic():
    maps, sentences = _data(seed=5, n_sent=30, K=8)
    a = probe.attention_probe(maps, sentences, 0.7, n_heads=4)
    b = probe.attention_probe(maps, sentences, 0.7, n_heads=4)
    assert a["loss_end"] < a["loss_start"]
    packed = probe.pack(maps[:21], [s.heads for s in sentences[:21]])
    assert abs(float(probe.loss(packed, a["w"].reshape(-1), a["u"].reshape(-1))) - a["loss_end"]) < 1e-9
    assert a["converged"] and a["iterations"] < a["max_iter"]
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["u"], b["u"])
    for key in ("uas_test", "uas_train", "loss_start", "loss_end", "iterations", "best_single_head_test"):
        assert a[key] == b[key], key


def test_skipped_sentences_are_left_out_of_the_split():
    maps, sentences = _data(seed=6, n_sent=12, K=3)
    maps[0] = None
    maps[5] = None
    r = probe.attention_probe(maps, sentences, 0.5, n_heads=3)
    assert r["train_sentences"] == 5 and r["test_sentences"] == 5


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, float("nan")])
def test_bad_split(fraction):
    with pytest.raises(ValueError, match="--probe-split") as e:
        probe.split_indices(10, fraction)
    assert "\n" not in str(e.value)


def test_split_leaving_one_side_empty():
    assert probe.split_indices(10, 0.8) == (list(range(8)), [8, 9])
    for f in (0.99, 0.01):
        with pytest.raises(ValueError, match="each side needs at least one"):
            probe.split_indices(10, f)


def test_root_is_the_cls_column():
    """Index 0 of a word map is [CLS], ROOT's candidate: every word is scored, the root word's gold
    index is 0, the [CLS] row scores nothing, and a map without the [CLS] row is refused."""
    maps, sentences = _data(seed=7, n_sent=6, K=2)
    packed = probe.pack(maps, [s.heads for s in sentences])
    # grouped by length, nothing padded: every sentence's map and heads once, as given
    assert sorted(len(s.words) + 1 for s in sentences) == [A.shape[-1] for A, g in packed.groups for _ in g]
    held = [(A[r], g[r]) for A, g in packed.groups for r in range(g.shape[0])]
    for m, s in zip(maps, sentences):
        assert any(torch.equal(a, m) and g[1:].tolist() == s.heads for a, g in held)
    for A, gold, cand in packed.chunks():
        n = A.shape[-1]
        assert (gold[:, 0] == -1).all() and (gold[:, 1:] >= 0).all() and (gold[:, 1:] == 0).any(1).all()
        assert not cand[0].any() and cand[1:, 0].all()                        # ROOT = the [CLS] column
        assert not cand.diagonal().any() and int(cand.sum()) == (n - 1) * (n - 1)   # never itself
    with pytest.raises(ValueError, match="heads for a word map"):
        probe.pack([maps[0][:, 1:, 1:]], [sentences[0].heads])


def test_a_capped_fit_says_it_did_not_converge():
    maps, sentences = _data(seed=5, n_sent=30, K=8)
    capped = probe.attention_probe(maps, sentences, 0.7, n_heads=4, max_iter=2)
    assert capped["iterations"] <= 2 and capped["converged"] is False
    full = probe.attention_probe(maps, sentences, 0.7, n_heads=4)
    assert full["converged"] is True and full["loss_end"] < capped["loss_end"]
