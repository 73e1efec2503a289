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


def run_matrices(model_dir, tmp, texts, *flags, batch_size=4):
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", model_dir, "--batch-size", str(batch_size),
                 "--matrices", "--no-progress", *flags]) == 0
    return json.loads((out / "report.json").read_text())["attention_matrices"]


@pytest.fixture(scope="module")
def report(tiny_bert_dir, tmp_path_factory):
    return run_matrices(tiny_bert_dir, tmp_path_factory.mktemp("matrices"), TEXTS)


SPECTRA = ("rows_cone", "small_singular", "von_neumann")


def test_spectra_of_the_first_texts(tiny_bert_dir, report, tmp_path, capsys):
    """--matrices-texts 3 over batches of 2: the spectral measures and ranks are those of a run
    over the first 3 texts alone (the limit falls inside the second batch); k90 and the norms
    still cover every text; the limit is refused below 1 and without --matrices."""
    got = run_matrices(tiny_bert_dir, tmp_path, TEXTS, "--matrices-texts", "3", batch_size=2)
    (tmp_path / "first").mkdir()
    first = run_matrices(tiny_bert_dir, tmp_path / "first", TEXTS[:3])
    assert (got["texts"], got["spectra_texts"], first["spectra_texts"]) == (len(TEXTS), 3, 3)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")   # the section says so
    assert "means over the first 3 of 6 texts" in page
    assert all((tmp_path / "out" / f"attention_matrices{s}.png").exists() for s in ("", "_heads"))
    for k in SPECTRA:
        np.testing.assert_allclose(got[k], first[k], atol=1e-6, rtol=0, err_msg=k)
    for k in ("softmax", "v", "head_output", "layer_output", "mean_tokens"):
        np.testing.assert_array_equal(got["ranks"][k], first["ranks"][k], err_msg=k)
    assert got["k90_quantiles"] == report["k90_quantiles"]                # every text (batches of 4 there)
    for kind in "qkv":
        assert got["qkv_norms"][kind]["hist"] == report["qkv_norms"][kind]["hist"]
        for k in ("mean", "min", "max"):
            np.testing.assert_allclose(got["qkv_norms"][kind][k], report["qkv_norms"][kind][k], rtol=1e-6)
    corpus = tmp_path / "corpus.txt"
    for flags, message in ((["--matrices", "--matrices-texts", "0"], "--matrices-texts: expected N >= 1, got 0"),
                           (["--matrices-texts", "2"], "--matrices-texts: needs --matrices")):
        argv = ["text", str(corpus), "--out", str(tmp_path / "bad"), "--model", "/nonexistent", *flags]
        assert main(argv) == 2                          # refused before the model loads
        assert message in capsys.readouterr().err


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


def _svd_counts(x: np.ndarray, eps: float, small: float) -> tuple[int, int]:
    """numpy.linalg.matrix_rank with numpy's default tolerance for eps, and the singular values
    below small, both on numpy.linalg.svd."""
    s = np.linalg.svd(x, compute_uv=False)
    return int((s > s[0] * max(x.shape) * eps).sum()), int((s < small).sum())


def _with_singular_values(rng, m, n, s):
    """An m x n float64 matrix with the given singular values (orthonormal factors)."""
    u = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return (u * np.asarray(s)) @ v.T


@pytest.mark.parametrize("path", ["avx512", "avx2", "generic", "numpy"])
def test_gram_counts_equal_svd_counts(monkeypatch, path):
    """sv_counts (the eigenvalues of the smaller Gram matrix, an SVD only for matrices with a
    squared singular value within its error band of a threshold) counts exactly what numpy's SVD
    counts: random tall, wide and square matrices, float32 rank-deficient products, duplicate
    rows, an all-zero matrix, peaked softmax blocks, and singular values placed within 1e-9,
    1e-6 and 1e-3 (relative) of both thresholds (the SVD must decide the first two). On the C++
    core's tridiagonal forms and Sturm counts at each vector level (EMBGEOM_CPU; a level above
    the CPU's runs its best), and on numpy's eigvalsh without them."""
    from embgeom.analysis.heads import matrices
    from embgeom.analysis.heads.matrices import SMALL_SINGULAR, sv_counts

    if path == "numpy":
        monkeypatch.setattr(matrices, "_gram_counts", lambda *args: None)
    else:
        from embgeom.backends.registry import cpp_kernel

        if cpp_kernel("sym_tridiagonal") is None:
            pytest.skip("the C++ core is not built")
        monkeypatch.setenv("EMBGEOM_CPU", path)

    svd_rows = []
    real_svd = np.linalg.svd

    def spy(a, *args, **kw):
        svd_rows.append(a.shape[0] if a.ndim == 3 else 1)
        return real_svd(a, *args, **kw)

    monkeypatch.setattr(matrices.np.linalg, "svd", spy)
    rng = np.random.default_rng(3)
    eps = float(np.finfo(np.float32).eps)
    stacks, must_svd = [], set()
    for m, n in ((40, 8), (8, 40), (25, 25), (128, 32), (33, 384)):
        stacks.append(rng.standard_normal((5, m, n)))
        r = min(m, n) // 2                                                 # rank-deficient, float32
        low = (rng.standard_normal((5, m, r)) @ rng.standard_normal((5, r, n))).astype(np.float32)
        stacks.append(low.astype(np.float64))
        dup = rng.standard_normal((5, m, n))
        dup[:, 1::2] = dup[:, 0:1]                                         # duplicate rows
        stacks.append(dup)
        stacks.append(np.zeros((1, m, n)))
        must_svd.add(len(stacks) - 1)                                      # rank 0 from the SVD
    scores = 12 * rng.standard_normal((6, 30, 30))                        # peaked softmax rows
    att = np.exp(scores - scores.max(-1, keepdims=True))
    stacks.append(att / att.sum(-1, keepdims=True))
    for m, n in ((30, 30), (50, 12)):
        t = max(m, n) * eps                                                # rank threshold / s_max
        for rel in (1e-9, 1e-6, 1e-3):
            for sign in (-1, 1):
                s = np.geomspace(1, 1e-9, min(m, n))
                s[3], s[5] = t * (1 + sign * rel), SMALL_SINGULAR * (1 + sign * rel)
                stacks.append(_with_singular_values(rng, m, n, np.sort(s)[::-1])[None])
                if rel < 1e-4:                                             # inside the band
                    must_svd.add(len(stacks) - 1)
    for i, x in enumerate(stacks):
        before = len(svd_rows)
        rank, small = sv_counts(x, eps, SMALL_SINGULAR)
        assert len(svd_rows) > before or i not in must_svd, (i, x.shape)
        want = np.array([_svd_counts(xi, eps, SMALL_SINGULAR) for xi in x])
        np.testing.assert_array_equal(rank, want[:, 0], err_msg=str(x.shape))
        np.testing.assert_array_equal(small, want[:, 1], err_msg=str(x.shape))
        r_only, s_none = sv_counts(x, eps)
        np.testing.assert_array_equal(r_only, want[:, 0])
        assert not s_none.any()


def test_block_spectra():
    """block_spectra: counts as sv_counts, eigenvalue magnitudes numpy's."""
    from embgeom.analysis.heads.matrices import SMALL_SINGULAR, block_spectra, lapack_map

    rng = np.random.default_rng(4)
    scores = 6 * rng.standard_normal((3, 4, 17, 17))
    a = np.exp(scores - scores.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    eps = float(np.finfo(np.float32).eps)
    rank, small, lam = lapack_map(lambda x: block_spectra(x, eps), [torch.from_numpy(a)], 2)[0]
    assert rank.shape == small.shape == (3, 4) and lam.shape == (3, 4, 17)
    flat = a.reshape(-1, 17, 17)
    want = np.array([_svd_counts(x, eps, SMALL_SINGULAR) for x in flat]).reshape(3, 4, 2)
    np.testing.assert_array_equal(rank.numpy(), want[..., 0])
    np.testing.assert_array_equal(small.numpy(), want[..., 1])
    np.testing.assert_allclose(np.sort(lam.numpy(), -1), np.sort(np.abs(np.linalg.eigvals(a)), -1), rtol=0,
                               atol=1e-13)


def _eigen_cases():
    """(name, (k, n, n) float64 blocks): attention-like rows (softmax of scores at several
    temperatures), Gaussian matrices (complex pairs), and the degenerate ones: zero, identity,
    equal rows (rank one), a rotation, triangular (already in Schur form), a Jordan block,
    a cyclic shift (every eigenvalue on the unit circle: the double-shift QR stalls there
    without its exceptional shifts), a 1 x 1 and a 2 x 2 block."""
    rng = np.random.default_rng(12)
    out = []
    for n in (1, 2, 3, 5, 8, 17, 40, 128):
        for t in (0.5, 3.0, 12.0):
            s = t * rng.standard_normal((9, n, n))
            a = np.exp(s - s.max(-1, keepdims=True))
            out.append((f"attention n={n} t={t}", a / a.sum(-1, keepdims=True)))
        out.append((f"gaussian n={n}", rng.standard_normal((11, n, n))))
    out += [("zero", np.zeros((3, 6, 6))), ("identity", np.tile(np.eye(7), (2, 1, 1))),
            ("equal rows", np.full((1, 9, 9), 1 / 9)), ("rotation", np.array([[[0.0, -1.0], [1.0, 0.0]]])),
            ("triangular", np.triu(rng.standard_normal((5, 10, 10)))),
            ("jordan", (2 * np.eye(12) + np.eye(12, k=1))[None]),
            ("cyclic", np.roll(np.eye(10), 1, axis=1)[None]),
            ("scaled", 1e-200 * rng.standard_normal((3, 6, 6))), ("big", 1e200 * rng.standard_normal((3, 6, 6)))]
    return out


@pytest.mark.parametrize("level", ["native", "avx2", "generic"])
def test_eigenvalue_magnitudes_equal_numpy(level, monkeypatch):
    """The core's lockstep QR (eigvals_abs) gives numpy.linalg.eigvals' magnitudes (sorted; to
    1e-12 of the block's largest row sum, its eigenvalues' bound) on every case at every vector
    level, converged, and in groups of 8 with a partial last group (k not a multiple of 8). The
    worst case, peaked 128-token attention rows, differs by 5.6e-13: against 30-digit eigenvalues
    (mpmath) the core's error there is 3.7e-13 and LAPACK's 4.6e-13; without balancing the core's
    was 3.5e-11. numpy's LAPACK answer moves with the host's kernels: on an AVX2-only Zen 3 it
    differed from the core's (the same at every level) by 1.6e-12 there, so the bound is 3e-12."""
    from embgeom import _C

    if level != "native":
        monkeypatch.setenv("EMBGEOM_CPU", level)
    from embgeom.analysis.heads.matrices import eigenvalue_magnitudes

    n = 64   # a causal (lower-triangular) softmax block: LAPACK permutes its eigenvalues out
    causal = np.tril(np.exp(np.random.default_rng(5).standard_normal((3, n, n))))
    causal /= causal.sum(-1, keepdims=True)
    for name, a in _eigen_cases() + [("causal", causal)]:
        mags, ok = _C.eigvals_abs(a, 1)
        # a row or column without off-diagonal entries isolates an eigenvalue: left to LAPACK
        off = np.abs(a) * (1 - np.eye(a.shape[-1]))
        isolated = ((off.sum(-1) == 0) | (off.sum(-2) == 0)).any(-1) & (a.shape[-1] > 1)
        assert np.array_equal(ok, ~isolated), name
        want = np.sort(np.abs(np.linalg.eigvals(a)), -1)
        bound = np.maximum(np.abs(a).sum(-1).max(-1, keepdims=True), 1e-300)
        np.testing.assert_allclose(np.sort(mags[ok], -1) / bound[ok], want[ok] / bound[ok], rtol=0, atol=3e-12,
                                   err_msg=name)
        np.testing.assert_allclose(np.sort(eigenvalue_magnitudes(a), -1) / bound, want / bound, rtol=0, atol=3e-12,
                                   err_msg=name)
    # (the triangular block's eigenvalues are its diagonal: the sweeps had lost 2 % of them)
    np.testing.assert_allclose(np.sort(eigenvalue_magnitudes(causal), -1),
                               np.sort(np.abs(np.diagonal(causal, axis1=1, axis2=2)), -1), rtol=1e-13)
    assert _C.eigvals_abs(np.zeros((0, 4, 4)), 1)[0].shape == (0, 4)


def test_eigenvalue_magnitudes_fall_back_to_numpy(monkeypatch):
    """A block the core gives up on (not converged, or not finite) is computed by numpy: here
    the core is made to give up on every other block; a NaN block is reported, not returned."""
    from embgeom import _C
    from embgeom.analysis.heads import matrices
    from embgeom.backends import registry

    rng = np.random.default_rng(3)
    a = rng.standard_normal((13, 9, 9))
    bad = np.array([True, False] * 6 + [True])

    class Core:
        @staticmethod
        def eigvals_abs(x, threads):
            mags, ok = _C.eigvals_abs(x, threads)
            mags[bad] = np.nan
            return mags, ok & ~bad

    monkeypatch.setattr(registry, "cpp", lambda: Core)
    got = matrices.eigenvalue_magnitudes(a)
    np.testing.assert_allclose(np.sort(got, -1), np.sort(np.abs(np.linalg.eigvals(a)), -1), rtol=0, atol=1e-12)
    nan = a[:2].copy()
    nan[1, 3, 4] = np.nan
    mags, ok = _C.eigvals_abs(nan, 1)
    assert ok.tolist() == [True, False] and np.isnan(mags[1]).all()
    # 1 x 1 and 2 x 2 blocks with a NaN: the scale's maximum had passed over it and ok said 1
    for n in (1, 2):
        x = np.full((1, n, n), 0.5)
        x[0, n - 1, 0] = np.nan
        assert _C.eigvals_abs(x, 1)[1].tolist() == [False]
    # a block holding NaN or inf: NaN magnitudes, with the core or without (numpy refuses them)
    a[4, 0, 0], a[7, 2, 1] = np.nan, np.inf
    for core in (_C, None):
        monkeypatch.setattr(registry, "cpp", lambda core=core: core)
        got = matrices.eigenvalue_magnitudes(a)
        assert np.isnan(got).any(1).tolist() == [i in (4, 7) for i in range(13)]


def test_matrices_refuse_maps_holding_nan():
    """Attention maps holding NaN (a broken model's output) stop `--matrices` with the layer
    named, where LAPACK's SVD had raised "SVD did not converge"."""
    from types import SimpleNamespace

    from embgeom.analysis.heads.matrices import MatricesAccumulator

    attn = torch.softmax(torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    attn[1, 0, 2, 3] = float("nan")
    batch = SimpleNamespace(mask=torch.ones(2, 5, dtype=torch.bool), attentions=(attn.clone(), attn))
    batch.attentions[0][1, 0, 2, 3] = 0.0
    acc = MatricesAccumulator(2, 2, 8, torch.device("cpu"), spectra_texts=1)
    with pytest.raises(ValueError, match="layer 2's attention maps hold NaN or inf"):
        acc.update(batch)
    # refused before counting (the NaN text is past the spectra's limit: k90 would have taken it)
    assert acc.texts == acc.spectra_texts == acc.real_tokens == 0 and int(acc.k90.sum()) == 0
