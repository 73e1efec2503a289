"""attention_heads, gaussianity and the context-similarity completions on a tiny random BERT:
every number against a direct float64 computation from transformers' own attentions and hidden
states, one text at a time without padding (so the batched, padded, streamed path is checked
against the plain definitions of docs/metrics.md, attention heads)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from embgeom.analysis.heads import measures as hd
from embgeom.analysis.heads.gaussianity import GaussianityAccumulator
from embgeom.analysis.text.trace import iter_batches, trace

TEXTS = [
    "the cat sat on the mat . the dog ran !",
    "a dog !",
    "the king and the queen , the man and the woman ; they walk to the river ( and the city ) .",
    "red",
    "she was in the house ? he was not . it is .",
    "it is a big old tree , and it is green .",
    "we go to the city",
]
BATCH = 3


def _close(got, want, name, atol=2e-5):
    got = torch.as_tensor(np.asarray(got, dtype=float), dtype=torch.float64)
    want = torch.as_tensor(np.asarray(want, dtype=float), dtype=torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}\ngot  {got}\nwant {want}"


def _direct(model, tokenizer, text):
    """One text, no padding: ids, attentions (L, H, n, n), hidden states (L+1, n, D), q, k
    (L, H, n, d) from hooks on the projections; float64."""
    enc = tokenizer([text], return_tensors="pt")
    qk = {}
    hooks = []
    for l, layer in enumerate(model.encoder.layer):
        sa = layer.attention.self
        hooks.append(sa.query.register_forward_hook(lambda m, i, o, l=l: qk.setdefault(l, {}).update(q=o)))
        hooks.append(sa.key.register_forward_hook(lambda m, i, o, l=l: qk.setdefault(l, {}).update(k=o)))
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    H = model.config.num_attention_heads
    n = enc["input_ids"].shape[1]
    split = lambda t: t[0].double().view(n, H, -1).transpose(0, 1)  # noqa: E731
    return dict(ids=enc["input_ids"][0], attn=torch.stack([a[0].double() for a in out.attentions]),
                hs=torch.stack([h[0].double() for h in out.hidden_states]),
                q=torch.stack([split(qk[l]["q"]) for l in range(len(qk))]),
                k=torch.stack([split(qk[l]["k"]) for l in range(len(qk))]))


def _value_entropy_pdcut(a):
    """The authors' compute_Shannon_entropy: pd.cut(values, 20) re-done in numpy (right-closed
    bins, the lowest edge lowered by 0.1% of the range), p = count / n^2, natural log."""
    x = a.reshape(-1).numpy()
    mn, mx = x.min(), x.max()
    if mn == mx:
        return 0.0
    edges = np.linspace(mn, mx, 21)
    edges[0] -= (mx - mn) * 0.001
    idx = np.searchsorted(edges, x, side="left") - 1
    p = np.bincount(idx, minlength=20) / x.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _k90(row):
    c = np.cumsum(np.sort(row)[::-1])
    return int((c < 0.9).sum() + 1)


def test_k90_paths_equal_the_authors_cumsum():
    """k90 on the C++ running sums (float32 CPU maps), numpy's float64 cumsum (float64 maps) and
    torch's sort (bf16 maps: the fallback) give the geometry-of-BERT code's count (numpy's
    cumsum of the sorted row, float64) row for row: rows below 0.9 in all (padding), one-hot and
    uniform rows, a row reaching 0.9 at its 10th entry; rows with a NaN or a negative entry are
    counted as numpy counts the negated sorted row (NaN last)."""
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(2, 3, 29, 29, generator=g) * 3, -1)
    a[0, 0, 0] = 0.0                                          # a padded row: never reaches 0.9
    a[0, 0, 1] = torch.nn.functional.one_hot(torch.tensor(7), 29).float()
    a[0, 0, 2] = 1.0 / 29                                     # uniform
    a[0, 0, 3, :10] = 0.09
    a[0, 0, 3, 10:] = 0.1 / 19
    a[0, 1, 4, 5] = float("nan")
    a[1, 2, 6, :4] = -0.05

    def authors(x):  # the entries in descending order, their float64 running sums
        cum = np.cumsum(np.sort(x.float().numpy(), -1)[..., ::-1].astype(np.float64), -1)
        return np.count_nonzero(cum < hd.K90_MASS, -1) + 1

    def negated(x):  # the same counts from the negated entries sorted ascending (NaN last)
        cum = np.cumsum(np.sort(-x.float().numpy(), -1).astype(np.float64), -1)
        return np.count_nonzero(cum > -hd.K90_MASS, -1) + 1

    want = negated(a)
    np.testing.assert_array_equal(hd.k90(a).numpy(), want)                        # C++ sums
    np.testing.assert_array_equal(hd.k90(a.double()).numpy(), want)               # numpy cumsum
    clean = (torch.isfinite(a).all(-1) & (a >= 0).all(-1)).numpy()
    assert (~clean).sum() == 2
    np.testing.assert_array_equal(want[clean], authors(a)[clean])
    assert int(hd.k90(a)[0, 0, 0]) == 30 and int(hd.k90(a)[0, 0, 1]) == 1 and int(hd.k90(a)[0, 0, 3]) == 10
    b = a.bfloat16()
    np.testing.assert_array_equal(hd.k90(b).numpy()[clean], authors(b)[clean])   # torch's sort


def _expected(model, tokenizer, texts):
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    K = L * H
    js = torch.zeros(K, K, dtype=torch.float64)
    f = {k: torch.zeros(L, H, dtype=torch.float64) for k in
         ("clark", "cls", "sep", "diag", "prev", "next", "b3", "f3", "cs", "c1", "c3", "ve", "pos",
          "asym", "rho", "rho_n", "raw")}
    k90s = [[[] for _ in range(H)] for _ in range(L)]
    nents = [[[] for _ in range(H)] for _ in range(L)]
    rows = ln_n = sep_texts = 0
    for text in texts:
        d = _direct(model, tokenizer, text)
        A = d["attn"]
        n = A.shape[-1]
        rows += n
        ln_n += math.log(n)
        ids = d["ids"]
        sep = ids == tokenizer.sep_token_id
        special = sep | (ids == tokenizer.cls_token_id)
        sep_texts += int(sep.any())
        # Clark JS: every pair, every row, explicit KL to the mixture
        P = (0.999 * A + 0.001 / n).reshape(K, n, n)
        for a in range(K):
            for b in range(K):
                M = 0.5 * (P[a] + P[b])
                kl = lambda p: (p * (p / M).log()).sum(-1)  # noqa: E731
                js[a, b] += (0.5 * (kl(P[a]) + kl(P[b]))).sum()
        S = 0.9999 * A + 0.0001 / n
        ent = -(S * S.log()).sum(-1)                               # (L, H, n)
        f["clark"] += ent.mean(-1)
        f["cls"] += ent[..., 0]
        if sep.any():
            f["sep"] += A[..., sep, :][..., sep].sum(-1).mean(-1)
        i = torch.arange(n)
        f["diag"] += A[..., i, i].sum(-1)
        for w in (1, 2, 3):
            back = A[..., i[w:], i[w:] - w].sum(-1)
            fwd = A[..., i[:n - w], i[:n - w] + w].sum(-1)
            f["b3"] += back
            f["f3"] += fwd
            if w == 1:
                f["prev"] += back
                f["next"] += fwd
        f["cs"] += A[..., special].sum(-1).sum(-1)
        col = A.mean(-2)                                           # (L, H, n)
        srt = col.sort(-1, descending=True).values
        f["c1"] += srt[..., 0]
        f["c3"] += srt[..., :3].sum(-1)
        raw = -torch.special.xlogy(A, A).sum(-1)
        f["raw"] += raw.sum(-1)
        qn = d["q"].norm(dim=-1)
        for l in range(L):
            for h in range(H):
                a = A[l, h]
                k90s[l][h] += [_k90(r) for r in a.numpy()]
                if n >= 2:
                    nents[l][h] += (raw[l, h] / math.log(n)).tolist()
                f["ve"][l, h] += _value_entropy_pdcut(a)
                f["asym"][l, h] += (a - a.T).norm() / (2 * a.norm())
                dots = d["q"][l, h] @ d["k"][l, h].T
                cos = dots / (d["q"][l, h].norm(dim=-1)[:, None] * d["k"][l, h].norm(dim=-1)[None])
                f["pos"][l, h] += (a * (cos > 0)).sum()
                if n >= 3:
                    from scipy.stats import spearmanr

                    f["rho"][l, h] += spearmanr(qn[l, h].numpy(), raw[l, h].numpy()).statistic
                    f["rho_n"][l, h] += 1
    T = len(texts)
    med = lambda v: float(np.sort(v)[(len(v) - 1) // 2])  # noqa: E731  lower median
    return dict(js=js, clark=f["clark"] / T, cls=f["cls"] / T, uniform=ln_n / T,
                sep=f["sep"] / sep_texts, diagonal=f["diag"] / rows, previous=f["prev"] / rows,
                next=f["next"] / rows, back3=f["b3"] / rows, forward3=f["f3"] / rows,
                cls_sep=f["cs"] / rows, top_column=f["c1"] / T, top3_columns=f["c3"] / T,
                value_entropy=f["ve"] / T, positive=f["pos"] / rows, asymmetry=f["asym"] / T,
                spearman=f["rho"] / f["rho_n"], row_entropy=f["raw"] / rows,
                k90=[[med(k90s[l][h]) for h in range(H)] for l in range(L)],
                nent=[[med(nents[l][h]) for h in range(H)] for l in range(L)])


@pytest.fixture(scope="module")
def heads_result(tiny_bert):
    model, tokenizer = tiny_bert
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    with hd.capture_qk(model) as qk:
        acc = hd.HeadsAccumulator(L, H, 32, "cpu", js=True, directionality=True, qk=qk, sample_maps=2)
        res = trace(model, tokenizer, TEXTS, batch_size=BATCH, observers=[acc])
    return res, acc.result(model, tokenizer, res.attention_to), _expected(model, tokenizer, TEXTS)


def test_clark_measures(heads_result):
    _, got, want = heads_result
    _close(got["js_divergence"], want["js"], "js_divergence", 1e-4)
    assert torch.equal(got["js_divergence"], got["js_divergence"].T)
    assert (got["js_divergence"].diagonal() == 0).all()
    _close(got["clark_entropy"], want["clark"], "clark_entropy", 1e-5)
    _close(got["cls_entropy"], want["cls"], "cls_entropy", 1e-5)
    _close(got["uniform_entropy"], want["uniform"], "uniform_entropy", 1e-12)
    _close(got["sep_to_sep"], want["sep"], "sep_to_sep", 1e-6)
    _close(got["row_entropy"], want["row_entropy"], "row_entropy", 1e-5)


def test_mds_of_the_js_matrix(heads_result):
    from sklearn.manifold import MDS

    _, got, want = heads_result
    K = want["js"].shape[0]
    assert got["mds"].shape == (K, 2)
    # the same MDS run on the direct matrix lands on the same points (up to the solver's noise)
    again = hd.mds_embedding(want["js"])
    _close(got["mds"], again, "mds", 1e-3)
    # and the embedding reproduces the dissimilarities about as well as an independent sklearn run
    dist = torch.cdist(got["mds"], got["mds"])
    stress = float(((dist - want["js"]) ** 2).sum() / 2)
    try:
        ref = MDS(n_components=2, metric_mds=True, metric="precomputed", init="random", n_init=5,
                  max_iter=1000, eps=1e-10, random_state=1).fit(want["js"].numpy())
    except TypeError:
        ref = MDS(n_components=2, metric=True, dissimilarity="precomputed", n_init=5, max_iter=1000,
                  eps=1e-10, random_state=1).fit(want["js"].numpy())
    assert stress <= 1.5 * ref.stress_ + 1e-9         # both local optima of the same problem
    # a dissimilarity matrix that is planar is reproduced exactly (stress ~ 0)
    pts = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    emb = hd.mds_embedding(torch.cdist(pts, pts))
    _close(torch.cdist(emb, emb), torch.cdist(pts, pts), "mds of planar points", 1e-4)
    assert sum(len(r) for r in got["mds_behaviour"]) == K


def test_pattern_features_and_labels(heads_result, tiny_bert):
    _, got, want = heads_result
    L, H = len(got["patterns"]), len(got["patterns"][0])
    for key, wk in (("diagonal", "diagonal"), ("previous", "previous"), ("next", "next"),
                    ("back3", "back3"), ("forward3", "forward3"), ("cls_sep", "cls_sep"),
                    ("top_column", "top_column"), ("top3_columns", "top3_columns")):
        _close([[p[key] for p in row] for row in got["patterns"]], want[wk], key, 1e-5)
    _close([[p["k90_median"] for p in row] for row in got["patterns"]], want["k90"], "k90_median", 0)
    _close([[p["normalised_entropy"] for p in row] for row in got["patterns"]], want["nent"],
           "normalised_entropy", 1.0 / hd.ENTROPY_BINS)
    for row in got["patterns"]:
        for p in row:
            assert p["label"] == hd.gate_label(p, got["mean_length"]) and p["label"] in hd.GATE_LABELS
            assert set(p) == set(hd.PATTERN_FEATURES) | {"label"}
    _close(got["value_entropy"], want["value_entropy"], "value_entropy", 1e-9)
    assert (got["value_entropy"] <= math.log(20) + 1e-12).all()
    assert len(got["sample_maps"]) == 2 and got["sample_maps"][0]["maps"].shape[:2] == (L, H)


def test_gate_label_rules():
    base = dict(diagonal=0.1, cls_sep=0.1, top_column=0.1, top3_columns=0.2, k90_median=10,
                back3=0.1, forward3=0.1, normalised_entropy=0.5)
    assert hd.gate_label({**base, "diagonal": 0.3, "cls_sep": 0.3}, 40) == "closed gate"
    assert hd.gate_label({**base, "top_column": 0.55, "k90_median": 3}, 40) == "directional gate"
    assert hd.gate_label({**base, "top_column": 0.55, "k90_median": 4}, 40) == "none"
    assert hd.gate_label({**base, "back3": 0.5}, 40) == "backward contextual gate"
    assert hd.gate_label({**base, "forward3": 0.5}, 40) == "forward contextual gate"
    assert hd.gate_label({**base, "normalised_entropy": 0.8}, 40) == "open gate"
    assert hd.gate_label({**base, "k90_median": 20}, 40) == "open gate"


def test_directionality(heads_result, tiny_bert):
    model, _ = tiny_bert
    _, got, want = heads_result
    d = got["directionality"]
    _close(d["positive_cos_share"], want["positive"], "positive_cos_share", 1e-5)
    _close(d["asymmetry"], want["asymmetry"], "asymmetry", 1e-5)
    _close(d["spearman_qnorm_entropy"], want["spearman"], "spearman_qnorm_entropy", 1e-9)
    H = model.config.num_attention_heads
    for l, layer in enumerate(model.encoder.layer):
        wq = layer.attention.self.query.weight.detach().double()
        wk = layer.attention.self.key.weight.detach().double()
        dh = wq.shape[0] // H
        for h in range(H):
            # the head's score matrix without biases is X M X^T, M = Wq_h^T Wk_h
            M = wq[h * dh:(h + 1) * dh].T @ wk[h * dh:(h + 1) * dh]
            x = torch.randn(5, wq.shape[1], dtype=torch.float64)
            q = x @ wq[h * dh:(h + 1) * dh].T
            k = x @ wk[h * dh:(h + 1) * dh].T
            assert torch.allclose(q @ k.T, x @ M @ x.T)
            want_sigma = (0.5 * (M - M.T)).norm() / M.norm()
            _close(d["skew_fraction"][l, h], want_sigma, f"skew_fraction[{l}][{h}]", 1e-12)


def test_context_completions(heads_result, tiny_bert):
    model, tokenizer = tiny_bert
    res, _, _ = heads_result
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    same = torch.zeros(L, H, dtype=torch.float64)
    per = torch.zeros(L, H, dtype=torch.float64)
    hist = torch.zeros(L, H, 32, dtype=torch.int64)
    rows = torch.zeros(L, H, dtype=torch.float64)
    for text in TEXTS:
        enc = tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            (b,) = list(iter_batches(model, tokenizer, [text], batch_size=1))
        ids = enc["input_ids"][0].tolist()
        n = len(ids)
        if n < 2:
            continue
        toks = tokenizer.convert_ids_to_tokens(ids)
        sid, cur = [], 0
        for t in toks:
            sid.append(cur)
            if t in (".", "!", "?", "[SEP]"):
                cur += 1
        for l in range(L):
            o = b.head_outputs[l][0].double().transpose(0, 1)          # (H, n, d)
            for h in range(H):
                s = o[h] @ o[h].T
                s.fill_diagonal_(-math.inf)
                j = s.argmax(-1).tolist()
                for i in range(n):
                    rows[l, h] += 1
                    hist[l, h, abs(i - j[i])] += 1
                    same[l, h] += sid[i] == sid[j[i]]
                    per[l, h] += toks[j[i]] in (".", "[SEP]")
    cs = res.to_dict()["context_similarity"]
    _close(cs["same_sentence_share"], same / rows, "same_sentence_share", 1e-12)
    _close(cs["period_separator_share"], per / rows, "period_separator_share", 1e-12)
    width = len(cs["distance_hist"][0][0])
    assert hist[..., width:].sum() == 0
    assert cs["distance_hist"] == hist[..., :width].tolist()
    assert cs["layer_distance_hist"] == hist[..., :width].sum(1).tolist()


def test_gaussianity_against_scipy(tiny_bert):
    from scipy import stats

    model, tokenizer = tiny_bert
    L = model.config.num_hidden_layers
    acc = GaussianityAccumulator(L + 1, model.config.hidden_size)
    trace(model, tokenizer, TEXTS, batch_size=BATCH, observers=[acc], metrics=("evolution",))
    got = acc.result()
    assert [g["depth"] for g in got] == list(range(L + 1))
    direct = [_direct(model, tokenizer, t)["hs"] for t in TEXTS]
    N = sum(h.shape[1] for h in direct)
    for l in range(L + 1):
        tok = torch.cat([h[l] for h in direct]).numpy()
        means = torch.stack([h[l].mean(0) for h in direct]).numpy()
        for x, g, count in ((tok, got[l], N), (means, got[l]["text_mean"], len(TEXTS))):
            p = stats.normaltest(x, axis=1).pvalue
            assert g["count"] == count
            _close(g["share_rejected"], float((p < 0.05 / count).mean()), f"share_rejected[{l}]", 1e-12)
            _close(g["mean_skew"], float(stats.skew(x, axis=1).mean()), f"mean_skew[{l}]", 1e-4)
            _close(g["mean_excess_kurtosis"], float(stats.kurtosis(x, axis=1).mean()),
                   f"mean_excess_kurtosis[{l}]", 1e-3)


def test_js_vectorised_equals_pair_loop():
    torch.manual_seed(1)
    B, H, T, L = 2, 3, 6, 2
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    att = []
    for _ in range(L):
        s = torch.randn(B, H, T, T).masked_fill(~mask[:, None, None, :], -1e9)
        att.append(torch.softmax(s, -1))
    got = hd.clark_js_sums(att, mask, row_chunk=4)            # chunks split a text's rows
    K = L * H
    want = torch.zeros(K, K, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())
        P = torch.stack([a[b, :, :n, :n].double() for a in att]).reshape(K, n, n) * 0.999 + 0.001 / n
        for x in range(K):
            for y in range(K):
                M = 0.5 * (P[x] + P[y])
                want[x, y] += 0.5 * ((P[x] * (P[x] / M).log()).sum() + (P[y] * (P[y] / M).log()).sum())
    _close(got, want, "clark_js_sums", 1e-5)


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_js_of_nearly_identical_heads_keeps_its_digits(kernel, monkeypatch):
    """Two heads whose logits differ by noise 1e-3 (JS about 1e-7 per row): the sum had been 13 %
    low. The identity ln 2 (sum p + sum q) / 2 + ... had taken sum p = 1 per row (float32
    softmax rows are 1 within 1e-7: a bias of ln 2 / 2 x their sum), and p ln p was summed per
    row in float32. Each key's term is now taken without cancellation: 1e-5 of the definition."""
    from embgeom.backends import registry

    if kernel == "torch":
        monkeypatch.setattr(registry, "cpp_kernel", lambda *a, **k: None)
    torch.manual_seed(0)
    B, T = 8, 128
    logits = torch.randn(B, 1, T, T) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    for noise, tol in ((1e-3, 1e-5), (1e-2, 1e-5), (1.0, 1e-6)):
        attn = torch.softmax(torch.cat([logits, logits + noise * torch.randn(B, 1, T, T)], 1), -1)
        got = float(hd.clark_js_sums([attn], mask)[0, 1])
        P = 0.999 * attn.double() + 0.001 / T
        M = P.mean(1)
        want = float(0.5 * ((P[:, 0] * (P[:, 0] / M).log()).sum() + (P[:, 1] * (P[:, 1] / M).log()).sum()))
        assert got == pytest.approx(want, rel=tol), (noise, got, want)


def test_js_distance_of_nearly_equal_heads_against_mpmath():
    """The text report's head distance sqrt(JS) of two mean distributions 1e-7 apart (JS ~1e-15):
    a difference of float64 entropies had been 0.9 % off at a distance of 4e-8; against 50-digit
    arithmetic it keeps 1e-9 now, and 1e-12 for ordinary distances."""
    import mpmath

    from embgeom.analysis.text.attention import js_distance

    rng = np.random.default_rng(5)
    p = rng.random(40) + 0.1
    for gap, tol in ((1e-7, 1e-9), (0.3, 1e-12)):
        q = p * (1 + gap * rng.standard_normal(40))
        got = float(js_distance(torch.from_numpy(np.stack([p, q])))[0, 1])
        with mpmath.workdps(50):
            a = [mpmath.mpf(float(v)) / mpmath.fsum(p.tolist()) for v in p]
            b = [mpmath.mpf(float(v)) / mpmath.fsum(q.tolist()) for v in q]
            js = mpmath.fsum(x * mpmath.log(2 * x / (x + y)) + y * mpmath.log(2 * y / (x + y)) for x, y in zip(a, b)) / 2
            want = float(mpmath.sqrt(js))
        assert got == pytest.approx(want, rel=tol), (gap, got, want)


def test_value_histogram_kernel_equals_torch():
    """The C++ core's value histogram (float32 maps on the CPU) gives the torch path's counts and
    bin of 0 exactly: padding, one-token and empty texts, constant and one-hot maps, entries on
    bin edges, widened to 0 or not; and the entropies agree, padded or not."""
    core = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(4)
    B, H, T = 6, 3, 9
    a = rng.random((B, H, T, T)).astype(np.float32)
    a /= a.sum(-1, keepdims=True)
    a[0, 0] = 0.25                                            # constant
    a[0, 1] = np.eye(T, dtype=np.float32)                     # one-hot rows
    a[1, 2] = (np.arange(T * T).reshape(T, T) % 21 / 20).astype(np.float32)  # on the edges 0.05 k
    a[2, 0] = -a[2, 0]                                        # negative values: the widening moves hi
    mask = np.ones((B, T), dtype=bool)
    mask[3, 5:] = False                                       # padding
    mask[4, 1:] = False                                       # one token
    mask[5] = False                                           # no token
    attn, m = torch.from_numpy(a), torch.from_numpy(mask)
    for widen in (False, True):
        counts, zero_bin = core.value_histogram(a, mask.astype(np.uint8), widen)
        want_c, want_z = hd._value_counts(attn, m, widen)
        np.testing.assert_array_equal(counts, want_c.numpy().astype(np.int64), err_msg=str(widen))
        if widen:
            np.testing.assert_array_equal(zero_bin, want_z[..., 0].numpy())
    for pad in (None, 12):
        got = hd.value_histogram_entropy(attn, m, pad_to=pad)
        want = hd.value_histogram_entropy(attn.double(), m, pad_to=pad)   # float64: the torch path
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12)


def test_value_histogram_of_maps_holding_nan_or_inf():
    """A map whose real entries hold NaN or inf has no value histogram: its entropy is NaN on the
    C++ and torch paths alike, the other maps' unchanged (the core had binned a NaN at INT_MIN and
    crashed; torch's path had called the map constant, entropy 0). Padded entries are not read."""
    core = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(5)
    a = rng.random((2, 3, 6, 6)).astype(np.float32)
    a[0, 1, 2, 3] = np.nan
    a[1, 0, 0, 0] = np.inf
    a[1, 2, 5, 5] = np.nan                                    # padded: row and column 5 of text 1
    mask = np.ones((2, 6), dtype=bool)
    mask[1, 5] = False
    attn, m = torch.from_numpy(a), torch.from_numpy(mask)
    for widen in (False, True):
        counts, zero_bin = core.value_histogram(a, mask.astype(np.uint8), widen)
        assert zero_bin[0, 1] == zero_bin[1, 0] == -1 and counts[0, 1].sum() == counts[1, 0].sum() == 0
        assert _value_counts_bad(attn, m, widen) == [[False, True, False], [True, False, False]]
    for pad in (None, 8):
        got = hd.value_histogram_entropy(attn, m, pad_to=pad)
        want = hd.value_histogram_entropy(attn.double(), m, pad_to=pad)  # the torch path
        assert torch.isnan(got).tolist() == [[False, True, False], [True, False, False]]
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12)


def _value_counts_bad(attn, mask, widen):
    return (hd._value_counts(attn, mask, widen)[1][..., 0] < 0).tolist()


@pytest.mark.parametrize("T", [1, 7, 8, 17, 40])
def test_js_pair_sums_kernel(T, monkeypatch):
    """_C.js_pair_sums against the float64 definition on every vector level (tails of 8 and 16
    keys, padded keys at 1/2 adding nothing, a head equal to another: 0, a head within 1e-4 of
    another: its JS to 1e-6, no cancellation), the lower triangle and diagonal left 0; the torch
    path's js_terms the same."""
    core = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(T)
    K, R = 5, 11
    P = rng.random((K, R, T)).astype(np.float32) + np.float32(1e-3)
    P /= P.sum(-1, keepdims=True)
    P[2] = P[0]
    P[3] = P[0] * (1 + 1e-4 * rng.standard_normal((R, T))).astype(np.float32)
    if T > 3:
        P[:, :, -2:] = 0.5                                    # padded keys
    P[4, :, 0] = 0.0                                          # an entry 0 in one row only: x = -1
    p, q = P[:, None].astype(np.float64), P[None].astype(np.float64)
    s = p + q
    with np.errstate(divide="ignore", invalid="ignore"):
        want = (0.5 * (np.where(p > 0, p * np.log(2 * p / s), 0) + np.where(q > 0, q * np.log(2 * q / s), 0)))
    want = want.sum(axis=(-1, -2))
    iu = np.triu_indices(K, 1)
    isa = core.cpu_info()["isa_supported"]
    levels = ["generic"] + [lv for lv in ("avx2", "avx512") if (lv, isa) in (("avx2", "avx2"), ("avx2", "avx512"),
                                                                            ("avx512", "avx512"))]
    for level in levels:
        monkeypatch.setenv("EMBGEOM_CPU", level)
        got = core.js_pair_sums(P)
        assert core.cpu_info()["js_pair_sums"] in (level, "portable-" + level), level
        np.testing.assert_allclose(got[iu], want[iu], rtol=2e-6, atol=1e-15, err_msg=level)
        assert (got[np.tril_indices(K)] == 0).all() and got[0, 2] == 0
    from embgeom.numerics import js_terms

    terms = js_terms(torch.from_numpy(P)[:, None], torch.from_numpy(P)[None]).double().sum((-1, -2)).numpy()
    np.testing.assert_allclose(terms[iu], want[iu], rtol=2e-6, atol=1e-15)
    # an entry below float32's smallest normal number in two equal rows: 0, not NaN (1 / s had
    # overflowed in the vector lanes: 0 x inf)
    tiny = np.full((2, 1, max(T, 2)), 0.5 / max(T, 2), np.float32)
    tiny[:, 0, 1] = np.float32(1e-40)
    for level in levels:
        monkeypatch.setenv("EMBGEOM_CPU", level)
        assert core.js_pair_sums(tiny)[0, 1] == 0.0, level
    assert float(js_terms(torch.from_numpy(tiny[0]), torch.from_numpy(tiny[1])).sum()) == 0.0


def test_gaussianity_stats_equal_scipys():
    """The one-pass K^2, skew and kurtosis against scipy.stats.normaltest / skew / kurtosis on
    normal, skewed, heavy-tailed and nearly constant rows, at the K^2 test's smallest size."""
    from scipy import stats

    from embgeom.analysis.heads.gaussianity import _stats, _stats_from_moments

    rng = np.random.default_rng(7)
    for D in (20, 384):
        x = np.concatenate([rng.standard_normal((50, D)), rng.exponential(size=(50, D)),
                            rng.standard_t(3, size=(50, D)), 1.0 + 1e-9 * rng.standard_normal((5, D))])
        p, sk, ku = _stats(x)
        np.testing.assert_allclose(p, stats.normaltest(x, axis=1).pvalue, rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(sk, stats.skew(x, axis=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ku, stats.kurtosis(x, axis=1), rtol=1e-9, atol=1e-12)
        # the C++ moments of float32 rows (the token path), against scipy on the same values
        core = pytest.importorskip("embgeom._C")
        x32 = np.concatenate([x[:155], 1.0 + 1e-3 * rng.standard_normal((5, D))]).astype(np.float32)
        mo = core.row_moments(np.pad(x32, ((0, 0), (0, 3)))[:, :D])  # rows with a stride
        p, sk, ku = _stats_from_moments(D, *mo.T)
        x64 = x32.astype(np.float64)
        with warnings.catch_warnings():  # scipy's note on the nearly constant rows
            warnings.simplefilter("ignore", RuntimeWarning)
            want = stats.normaltest(x64, axis=1).pvalue, stats.skew(x64, axis=1), stats.kurtosis(x64, axis=1)
        np.testing.assert_allclose(p, want[0], rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(sk, want[1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ku, want[2], rtol=1e-9, atol=1e-12)


def test_spearman_of_a_constant_ranking_is_nan():
    """A head whose |q| is the same for every token (a zeroed query head) has no Spearman
    correlation (scipy: NaN); its ordinal ranks had been the token order, and 1.0 came out."""
    from scipy.stats import spearmanr

    from embgeom.analysis.heads.measures import spearman

    g = torch.Generator().manual_seed(0)
    varying = torch.rand(2, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    flat = torch.zeros(2, 7, dtype=torch.float64)
    flat[1, 5:] = 3.0                                                  # padding differs: still constant
    assert torch.isnan(spearman(flat, varying, mask)).all() and torch.isnan(spearman(varying, flat, mask)).all()
    got = spearman(varying, varying.flip(-1), mask)
    for b, n in ((0, 7), (1, 5)):
        assert float(got[b]) == pytest.approx(spearmanr(varying[b, :n], varying.flip(-1)[b, :n]).statistic, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spearman_takes_ties_as_scipy_does(dtype):
    """Rows of entropy exactly 0 (saturated softmax rows) tie: ties take the mean of their ranks,
    as scipy.stats.spearmanr's; ordinal ranks had ordered them by position, and the same tokens
    padded to another length gave -0.132, -0.157 or -0.164."""
    from scipy.stats import spearmanr

    from embgeom.analysis.heads.measures import spearman

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (3, 11), generator=g).to(dtype)          # many ties
    y = torch.rand(3, 11, generator=g, dtype=torch.float64).to(dtype)
    y[:, ::3] = 0.0
    n = (11, 8, 5)
    want = [spearmanr(x[b, :k].double(), y[b, :k].double()).statistic for b, k in enumerate(n)]
    for pad in (0, 1, 9):                                             # the batch's padded length
        xp = torch.cat([x, torch.full((3, pad), 7.0, dtype=dtype)], 1)
        yp = torch.cat([y, torch.zeros(3, pad, dtype=dtype)], 1)
        mask = torch.arange(11 + pad)[None, :] < torch.tensor(n)[:, None]
        got = spearman(xp, yp, mask)
        for b in range(3):
            assert float(got[b]) == pytest.approx(want[b], abs=1e-6 if dtype == torch.float32 else 1e-12)


def test_library_warnings_stay_off_the_commands_stderr(tiny_bert_dir, tmp_path):
    """Heads that all attend alike (--clark-js: every JS divergence 0) had flooded stderr with
    scikit-learn's MDS RuntimeWarnings (9,990 lines); --similar tau:1 (no pair selected) with
    numpy's 'Mean of empty slice'; a CJK or 300-character label with matplotlib's glyph and
    tight-layout notes. The command prints its one last line."""
    import shutil
    import subprocess
    import sys

    from transformers import BertModel

    model = tmp_path / "alike"
    shutil.copytree(tiny_bert_dir, model)
    bert = BertModel.from_pretrained(tiny_bert_dir, attn_implementation="eager")
    with torch.no_grad():
        for layer in bert.encoder.layer:   # uniform attention: every head the same
            for lin in (layer.attention.self.query, layer.attention.self.key):
                lin.weight.zero_()
                lin.bias.zero_()
    bert.save_pretrained(str(model), safe_serialization=True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat .\na dog ran , fast .\nthe king and the queen\nhe was not .\n", encoding="utf-8")
    labels = tmp_path / "l.txt"
    labels.write_text("東京\n東京\n" + "x" * 300 + "\n" + "x" * 300 + "\n", encoding="utf-8")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "embgeom", "text", str(corpus), "--model", str(model),
                           "--out", str(tmp_path / "out"), "--clark-js", "--similar", "tau:1",
                           "--labels", str(labels)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embgeom text: 4 texts"), lines[:20]


def test_clark_js_without_scikit_learn_is_refused_before_the_forward_passes(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    # its MDS (scikit-learn) runs at the end: without the package `text --clark-js` had ended in a
    # traceback after every forward pass
    import sys

    from embgeom.analysis.text import trace as trace_module
    from embgeom.cli import main

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)   # (an import of it raises ImportError)
    forwards = []
    real = trace_module.iter_batches
    monkeypatch.setattr(trace_module, "iter_batches", lambda *a, **k: forwards.append(1) or real(*a, **k))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat .\na dog ran , fast .\n", encoding="utf-8")
    assert main(["text", str(corpus), "--clark-js", "--model", tiny_bert_dir, "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["embgeom: error: --clark-js: scikit-learn is not installed (the MDS of the heads); "
                   "`pip install scikit-learn` (or `pip install 'embgeom[heads]'`)"]
    assert not forwards
    with pytest.raises(ValueError, match="^clark_js: scikit-learn is not installed"):
        hd.HeadsAccumulator(2, 2, 8, "cpu", js=True)


def test_gaussianity_leaves_a_flat_state_out_of_the_means_and_counts_it():
    """A state whose components are all equal has no skewness: one such token had made its
    depth's mean_skew and mean_excess_kurtosis NaN (null in report.json) and counted in N as
    not rejected."""
    from types import SimpleNamespace

    from scipy import stats

    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 5, 32, generator=g)
    h[0, 2] = 0.25                                   # one flat token
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    acc = GaussianityAccumulator(1, 32)
    acc.update(SimpleNamespace(hidden_states=(h,), mask=mask))
    got = acc.result()[0]
    rows = torch.cat([h[0, [0, 1, 3, 4]], h[1, :3]]).double().numpy()
    assert got["count"] == 7 and got["flat"] == 1 and got["text_mean"]["flat"] == 0
    _close(got["mean_skew"], float(stats.skew(rows, axis=1).mean()), "mean_skew", 1e-9)
    _close(got["mean_excess_kurtosis"], float(stats.kurtosis(rows, axis=1).mean()), "kurtosis", 1e-9)
    p = stats.normaltest(rows, axis=1).pvalue
    _close(got["share_rejected"], float((p < 0.05 / 7).mean()), "share_rejected", 1e-12)


def test_gaussianity_of_flat_states_only_is_nan_and_an_older_state_resumes():
    """A depth whose every state is flat has no skewness: NaN (it had read 0.0 once flat states
    were left out); a saved state from before the flat count restores with none counted."""
    from types import SimpleNamespace

    acc = GaussianityAccumulator(1, 32)
    acc.update(SimpleNamespace(hidden_states=(torch.full((1, 3, 32), 0.25),), mask=torch.ones(1, 3, dtype=torch.bool)))
    got = acc.result()[0]
    assert got["count"] == 0 and got["flat"] == 3 and math.isnan(got["mean_skew"])
    assert math.isnan(got["mean_excess_kurtosis"])
    older = acc.checkpoint_state()
    older = {**older, "sums": {k: {"skew": v["skew"], "kurtosis": v["kurtosis"]} for k, v in older["sums"].items()}}
    again = GaussianityAccumulator(1, 32)
    again.restore_state(older)
    assert again.sums["token"]["flat"] == [0]
