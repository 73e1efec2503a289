"""`embgeom text --matrices` (issue 23, item 2): every number of report.json's
`attention_matrices` against numpy float64, one text at a time without padding, from
transformers' own attentions, hidden states and weights."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from embgeom.analysis.heads.matrices import K90_QUANTILES, NORM_EDGES
from embgeom.cli import main

TEXTS = ["the cat sat on the mat .", "a dog !", "she was in the house ? he was not .",
         "red , green and blue .", "one two three", "big\tsmall house"]


@pytest.fixture(scope="module")
def report(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrices")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--batch-size", "4",
                 "--matrices", "--no-progress"]) == 0
    return json.loads((out / "report.json").read_text())["attention_matrices"]


def by_hand(model, tokenizer):
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    D = model.config.hidden_size
    d = D // H
    sums = {k: np.zeros((L, H)) for k in ("rows_cone", "small_singular", "von_neumann")}
    k90 = [[[] for _ in range(H)] for _ in range(L)]
    norms = {k: [[[] for _ in range(H)] for _ in range(L)] for k in "qkv"}
    layers = model.encoder.layer
    for t in TEXTS:
        a, b = (t.split("\t") + [None])[:2]
        enc = tokenizer(a, b, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_attentions=True, output_hidden_states=True)
        for l in range(L):
            x = out.hidden_states[l][0].double().numpy()
            self_attn = layers[l].attention.self
            for kind, lin in zip("qkv", (self_attn.query, self_attn.key, self_attn.value)):
                y = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
                for h in range(H):
                    norms[kind][l][h] += np.linalg.norm(y[:, h * d:(h + 1) * d], axis=1).tolist()
            for h in range(H):
                A = out.attentions[l][0, h].double().numpy()
                n = A.shape[0]
                u = A / np.linalg.norm(A, axis=1, keepdims=True)
                sums["rows_cone"][l, h] += np.linalg.norm(u.sum(0)) / n
                sums["small_singular"][l, h] += (np.linalg.svd(A, compute_uv=False) < 1e-3).sum()
                lam = np.abs(np.linalg.eigvals(A))
                v = lam / np.sqrt((lam ** 2).sum())
                v = v[v > 0]
                sums["von_neumann"][l, h] += -(v * np.log(v)).sum()
                for row in A:
                    srt = np.sort(row)[::-1]
                    k90[l][h].append(int(np.argmax(np.cumsum(srt) >= 0.9)) + 1)
    means = {k: v / len(TEXTS) for k, v in sums.items()}
    quant = np.zeros((L, H, len(K90_QUANTILES)))
    for l in range(L):
        for h in range(H):
            srt = sorted(k90[l][h])
            for qi, q in enumerate(K90_QUANTILES):
                quant[l, h, qi] = srt[max(math.ceil(q * len(srt)) - 1, 0)]
    return means, quant, norms


def test_attention_blocks(tiny_bert, report):
    model, tokenizer = tiny_bert
    means, quant, norms = by_hand(model, tokenizer)
    assert report["texts"] == len(TEXTS)
    for k, v in means.items():
        np.testing.assert_allclose(report[k], v, atol=1e-6, rtol=0, err_msg=k)
    assert report["k90_quantiles"]["q"] == list(K90_QUANTILES)
    np.testing.assert_array_equal(report["k90_quantiles"]["values"], quant)
    edges = NORM_EDGES.numpy()
    qkv = report["qkv_norms"]
    for kind in "qkv":
        for l in range(len(norms[kind])):
            for h in range(len(norms[kind][l])):
                vals = np.asarray(norms[kind][l][h])
                assert qkv[kind]["mean"][l][h] == pytest.approx(vals.mean(), rel=1e-5)
                assert qkv[kind]["max"][l][h] == pytest.approx(vals.max(), rel=1e-5)
                want = np.bincount(np.searchsorted(edges, vals, side="right"), minlength=len(edges) + 1)
                assert qkv[kind]["hist"][l][h] == want.tolist()


def test_weights(tiny_bert, report):
    model, _ = tiny_bert
    H = model.config.num_attention_heads
    w = report["weights"]
    for l, layer in enumerate(model.encoder.layer):
        sa = layer.attention.self
        W = {k: m.weight.detach().double().numpy() for k, m in zip("qkv", (sa.query, sa.key, sa.value))}
        d = W["q"].shape[0] // H
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            M = W["q"][sl].T @ W["k"][sl]
            s = np.linalg.svd(M, compute_uv=False)
            assert w["rank"][l][h] == np.linalg.matrix_rank(M) == d
            np.testing.assert_allclose(w["singular_values"][l][h], s[:d], rtol=1e-9)
            lam = np.linalg.eigvals(M)
            lam = lam[np.abs(lam) > 1e-9 * s[0]]                  # the d non-zero ones
            real = np.abs(lam.imag) <= 1e-9 * s[0]
            signs = w["eigenvalue_signs"]
            assert signs["positive"][l][h] == int((real & (lam.real > 0)).sum())
            assert signs["negative"][l][h] == int((real & (lam.real < 0)).sum())
            assert signs["complex"][l][h] == int((~real).sum())
            assert signs["positive"][l][h] + signs["negative"][l][h] + signs["complex"][l][h] == d
            skew = np.linalg.norm((M - M.T) / 2) / np.linalg.norm(M)
            assert w["skew_fraction"][l][h] == pytest.approx(skew, rel=1e-9)
            for k in "qkv":
                assert w["sigma_max"][k][l][h] == pytest.approx(np.linalg.svd(W[k][sl], compute_uv=False)[0], rel=1e-9)
                assert report["qkv_norms"][k]["sigma_max"][l][h] == w["sigma_max"][k][l][h]


def rank32(M: np.ndarray) -> int:
    """numpy.linalg.matrix_rank in float64 with numpy's default tolerance for a float32 matrix
    (s_max * max(m, n) * eps(float32)): the model computed these matrices in float32."""
    s = np.linalg.svd(M, compute_uv=False)
    return int(np.linalg.matrix_rank(M, tol=s.max() * max(M.shape) * np.finfo(np.float32).eps))


def test_ranks(tiny_bert, report):
    """attention_matrices.ranks: per text the ranks of the real-token softmax block, V (with the
    bias), softmax V and the layer output, means over texts; W_V per head; against numpy."""
    model, tokenizer = tiny_bert
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    d = model.config.hidden_size // H
    want = {"softmax": np.zeros((L, H)), "v": np.zeros((L, H)), "head_output": np.zeros((L, H)),
            "layer_output": np.zeros(L)}
    tokens = 0
    for t in TEXTS:
        a, b = (t.split("\t") + [None])[:2]
        enc = tokenizer(a, b, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_attentions=True, output_hidden_states=True)
        tokens += enc["input_ids"].shape[1]
        for l in range(L):
            x = out.hidden_states[l][0].double().numpy()
            lin = model.encoder.layer[l].attention.self.value
            v = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
            want["layer_output"][l] += rank32(out.hidden_states[l + 1][0].double().numpy())
            for h in range(H):
                A = out.attentions[l][0, h].double().numpy()
                vh = v[:, h * d:(h + 1) * d]
                want["softmax"][l, h] += rank32(A)
                want["v"][l, h] += rank32(vh)
                want["head_output"][l, h] += rank32(A @ vh)
    r = report["ranks"]
    assert r["eps"] == float(np.finfo(np.float32).eps) and r["mean_tokens"] == tokens / len(TEXTS)
    for k, v in want.items():
        np.testing.assert_array_equal(r[k], v / len(TEXTS), err_msg=k)
    for l, layer in enumerate(model.encoder.layer):
        W = layer.attention.self.value.weight.detach().double().numpy()
        assert r["w_v"][l] == [rank32(W[h * d:(h + 1) * d]) for h in range(H)]


def test_numerical_rank_tolerance():
    """The tolerance is numpy's default for the matrix's dtype: a rank-3 matrix plus float32
    round-off has rank 3 under the float32 rule (as numpy gives on the float32 array) and full
    rank under the float64 one."""
    from embgeom.analysis.heads.matrices import numerical_rank

    rng = np.random.default_rng(0)
    M = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 12))
    M32 = M.astype(np.float32)
    s = torch.linalg.svdvals(torch.from_numpy(M32.astype(np.float64)))
    assert int(numerical_rank(s, 20, 12, float(np.finfo(np.float32).eps))) == 3 == np.linalg.matrix_rank(M32)
    assert int(numerical_rank(s, 20, 12, float(np.finfo(np.float64).eps))) == \
        np.linalg.matrix_rank(M32.astype(np.float64)) == 12
    assert int(numerical_rank(torch.zeros(4), 4, 4, 1e-7)) == 0
