"""Near-collinear clouds (cosine distances ~1e-6): every reported statistic of `text --labels`,
`text --trajectories`, `project` and the float64 sections of `vocab` against an independent
float64 computation in numpy (issue 23, item 1). A float32 difference of near-equal numbers keeps
one or two digits here, so these tests fail on a float32 path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import embgeom
from embgeom.analysis.clouds import geometry, projection
from embgeom.analysis.text.trace import Batch, TraceAccumulator
from embgeom.analysis.vocab import sections
from embgeom.cli import main
from helpers import CPU_CAPS

TIGHT = 1e-9


def near_collinear(n_per=8, groups=3, d=32, spread=1e-3, seed=0, dtype=np.float32):
    """Rows of norm ~5 around one direction, labelled groups offset inside a cone of angle
    ~spread: pairwise cosine distances between 1e-8 and 1e-6."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(d)
    v /= np.linalg.norm(v)
    centers = rng.standard_normal((groups, d))
    lab = np.repeat(np.arange(groups), n_per)
    x = 5 * v[None] + 5 * spread * (0.6 * centers[lab] + 0.5 * rng.standard_normal((len(lab), d))) / np.sqrt(d)
    return x.astype(dtype), [f"g{i}" for i in lab]


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def silhouette_np(x, labels, metric):
    """Mean silhouette by its definition (Rousseeuw 1987), float64 loops over points."""
    x = np.asarray(x, np.float64)
    lab = np.asarray(labels)
    if metric == "cosine":
        u = unit(x)
        dist = 1.0 - u @ u.T
    else:
        dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    s = []
    for i in range(len(x)):
        same = (lab == lab[i]) & (np.arange(len(x)) != i)
        if not same.any():
            s.append(0.0)
            continue
        a = dist[i, same].mean()
        b = min(dist[i, lab == g].mean() for g in set(lab.tolist()) if g != lab[i])
        s.append((b - a) / max(a, b))
    return float(np.mean(s))


def pair_stats_np(a, b=None, bins=100, lo=-1.0, hi=1.0, metric="cosine"):
    a = np.asarray(a, np.float64)
    bb = a if b is None else np.asarray(b, np.float64)
    if metric == "cosine":
        v = unit(a) @ unit(bb).T
    else:
        v = np.sqrt(((a[:, None] - bb[None]) ** 2).sum(-1))
    v = v[np.triu_indices(len(a), 1)] if b is None else v.ravel()
    counts = np.zeros(bins, np.int64)
    for value in v:
        counts[min(int(np.floor((value - lo) * (bins / (hi - lo)))), bins - 1)] += 1
    return v, counts


def test_the_inputs_defeat_float32():
    """The test cloud is one where float32 distances go wrong (so the tests below have teeth)."""
    from sklearn.metrics import silhouette_score

    x, labels = near_collinear()
    u = unit(x)
    dist = (1 - u @ u.T)[np.triu_indices(len(x), 1)]
    assert dist.max() < 2e-6
    assert abs(silhouette_score(x, labels, metric="cosine") - silhouette_np(x, labels, "cosine")) > 1e-3


def test_text_labels_groups_vs_float64():
    depths = 3
    rng = np.random.default_rng(1)
    # depth 0 ordinary, depths 1..2 near-collinear (as [CLS] in the first layers)
    cls = np.zeros((24, depths, 32), np.float32)
    cls[:, 0], labels = rng.standard_normal((24, 32)).astype(np.float32), near_collinear()[1]
    cls[:, 1] = near_collinear(seed=2)[0]
    cls[:, 2] = near_collinear(seed=3, spread=5e-4)[0]
    g = geometry.group_geometry(cls, labels, bins=50)
    lab = np.asarray(labels)
    for l in range(depths):
        x = cls[:, l].astype(np.float64)
        assert g["silhouette"][l] == pytest.approx(silhouette_np(x, labels, "cosine"), abs=TIGHT)
        c = unit(x) @ unit(x).T
        iu, ju = np.triu_indices(len(x), 1)
        same = lab[iu] == lab[ju]
        assert g["within_cosine"][l] == pytest.approx(c[iu, ju][same].mean(), abs=1e-13)
        assert g["between_cosine"][l] == pytest.approx(c[iu, ju][~same].mean(), abs=1e-13)
    last = cls[:, -1].astype(np.float64)
    hi_of = lambda a, b: np.linalg.norm(a, axis=1).max() + np.linalg.norm(b, axis=1).max()  # noqa: E731
    for name in g["labels"]:
        rows = last[lab == name]
        got = g["last"]["per_label"][name]
        for metric, lo, hi in (("cosine", -1.0, 1.0), ("euclidean", 0.0, hi_of(rows, rows))):
            v, counts = pair_stats_np(rows, bins=50, lo=lo, hi=hi, metric=metric)
            s = got[metric]
            assert s["count"] == v.size
            assert s["mean"] == pytest.approx(v.mean(), rel=1e-13, abs=1e-15)
            assert s["std"] == pytest.approx(v.std(), rel=1e-6, abs=1e-15)
            assert s["min"] == pytest.approx(v.min(), rel=1e-13) and s["max"] == pytest.approx(v.max(), rel=1e-13)
            assert s["hist"]["counts"] == counts.tolist()
        nrm = np.linalg.norm(rows, axis=1)
        assert got["norms"]["mean"] == pytest.approx(nrm.mean(), rel=1e-13)
        assert got["norms"]["std"] == pytest.approx(nrm.std(), rel=1e-6, abs=1e-15)
    for key, s in g["last"]["per_pair"].items():
        a, b = s["labels"]
        assert key == geometry.pair_key(a, b)
        ra, rb = last[lab == a], last[lab == b]
        for metric, lo, hi in (("cosine", -1.0, 1.0), ("euclidean", 0.0, hi_of(ra, rb))):
            v, counts = pair_stats_np(ra, rb, bins=50, lo=lo, hi=hi, metric=metric)
            assert s[metric]["mean"] == pytest.approx(v.mean(), rel=1e-13, abs=1e-15)
            assert s[metric]["std"] == pytest.approx(v.std(), rel=1e-6, abs=1e-15)
            assert s[metric]["hist"]["counts"] == counts.tolist()


def _steps_np(states):
    h = np.asarray(states, np.float64)
    nrm = np.linalg.norm(h, axis=-1)
    step = np.linalg.norm(h[:, 1:] - h[:, :-1], axis=-1)
    cos = (h[:, 1:] * h[:, :-1]).sum(-1) / (nrm[:, 1:] * nrm[:, :-1])
    return step, cos, nrm


def test_text_trajectories_vs_float64(tmp_path):
    from embgeom.report.text_page import trajectory_plots

    # 10 tokens, 4 depths: each depth a tiny rotation of the previous one (1 - cos ~ 1e-6)
    rng = np.random.default_rng(4)
    states = np.zeros((10, 4, 32), np.float32)
    states[:, 0] = rng.standard_normal((10, 32))
    for l in range(1, 4):
        states[:, l] = states[:, l - 1] + 1e-3 * np.linalg.norm(states[:, l - 1], axis=1, keepdims=True) \
            * rng.standard_normal((10, 32)) / np.sqrt(32)
    path = tmp_path / "trajectories.npz"
    np.savez(path, states=states, text=np.repeat([0, 1], 5), position=np.tile(np.arange(5), 2),
             token=np.array([f"t{i}" for i in range(10)]), texts=np.array(["a", "b"]))
    _, summary = trajectory_plots(str(tmp_path), str(path))
    step, cos, nrm = _steps_np(states)
    assert 1e-7 < (1 - cos).min() and (1 - cos).max() < 1e-5
    np.testing.assert_allclose(summary["step_distance_mean"], step.mean(0), rtol=1e-12)
    np.testing.assert_allclose(1 - np.asarray(summary["step_cosine_mean"]), 1 - cos.mean(0), rtol=1e-8)
    np.testing.assert_allclose(summary["norm_mean"], nrm.mean(0), rtol=1e-12)

    # the corpus-level `evolution` of `embgeom text` on the same states as one batch of 2 texts:
    # the C++ kernel at every vector level, and torch's float64 path (GPU, other dtypes)
    from embgeom.analysis.text import trace as trace_mod

    hs = tuple(torch.from_numpy(states[:, l].reshape(2, 5, 32).copy()) for l in range(4))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    none = torch.zeros(2, 5, dtype=torch.bool)
    b = Batch(input_ids=torch.zeros(2, 5, dtype=torch.long), mask=mask, cls=none, sep=none, punct=none,
              hidden_states=hs, attentions=(), head_outputs=(), multihead_outputs=(), truncated=0)
    keep = mask.reshape(-1).numpy()
    paths = [("cpp", cap) for cap in CPU_CAPS] + [("torch", None)]
    for path, cap in paths:
        with pytest.MonkeyPatch.context() as mp:
            if path == "torch":
                mp.setattr(trace_mod.registry, "cpp", lambda: None)
            else:
                mp.setenv("EMBGEOM_CPU", cap)
            acc = TraceAccumulator(3, 1, 8, 4, "cpu", metrics=("evolution",))
            acc.update(b)
            r = acc.result()
        np.testing.assert_allclose(1 - r.step_cosine.numpy(), 1 - cos[keep].mean(0), rtol=1e-8, err_msg=path)
        np.testing.assert_allclose(r.step_distance.numpy(), step[keep].mean(0), rtol=1e-12, err_msg=path)
        np.testing.assert_allclose(r.norm.numpy(), nrm[keep].mean(0), rtol=1e-12, err_msg=path)


@pytest.mark.parametrize("N,D", [(0, 5), (1, 1), (7, 37), (33, 384)])
def test_row_pair_sums_kernel_vs_float64(N, D, cpu_cap):
    """The evolution kernel against numpy float64 on near-equal rows (steps of 1e-6 relative),
    tails of every length, strided rows."""
    from embgeom.analysis.text.trace import step_sums

    rng = np.random.default_rng(N * 1000 + D)
    a = rng.standard_normal((2, N + 3, D)).astype(np.float32)[:, :N]      # rows of a wider buffer
    b = (a + 1e-6 * rng.standard_normal(a.shape)).astype(np.float32)
    got = [t.numpy() for t in step_sums(torch.from_numpy(a), torch.from_numpy(b))]
    A, B_ = a.astype(np.float64), b.astype(np.float64)
    want = [(A * A).sum(-1), (B_ * B_).sum(-1), ((B_ - A) ** 2).sum(-1), (A * B_).sum(-1)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-300)


def _pca_np(x):
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ev = s ** 2
    comps = vt.T
    comps = comps * np.sign(comps[np.abs(comps).argmax(0), np.arange(comps.shape[1])])[None]
    return ev / ev.sum(), xc @ comps[:, :2]


def test_project_pca_vs_float64(tmp_path):
    x, labels = near_collinear(dtype=np.float64)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    out = tmp_path / "out"
    assert main(["project", str(tmp_path / "x.npy"), "--method", "pca", "--labels",
                 str(tmp_path / "labels.txt"), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    ratio, proj = _pca_np(x)
    np.testing.assert_allclose(rep["explained_variance"][:5], ratio[:5], rtol=1e-8)
    np.testing.assert_allclose(rep["pca_cumulative"]["all"][:5], np.cumsum(ratio)[:5], rtol=1e-8)
    np.testing.assert_allclose(np.load(out / "projection.npy"), proj, rtol=1e-5, atol=1e-7 * np.abs(proj).max())
    assert rep["silhouette"]["original"] == pytest.approx(silhouette_np(x, labels, "cosine"), abs=TIGHT)
    emb = np.load(out / "projection.npy").astype(np.float64)
    assert rep["silhouette"]["projection"] == pytest.approx(silhouette_np(emb, labels, "euclidean"), abs=TIGHT)


def test_exact_graph_similarities_vs_float64():
    """The graph UMAP and t-SNE are fed is float64's: on a near-collinear cloud (cosine distances
    ~1e-6, where fp32 keeps one or two digits) every row's k neighbours are float64's k best,
    ties by column, similarities float64; float32 and float64 inputs alike. (Without the
    float64 search every row of this cloud had a neighbour or a place other than float64's.)"""
    x, _ = near_collinear(n_per=100, d=384, dtype=np.float64)
    for rows in (x, x.astype(np.float32)):
        c = unit(rows.astype(np.float64)) @ unit(rows.astype(np.float64)).T
        np.fill_diagonal(c, -np.inf)
        for k in (1, 5, 12):
            idx, sim, _ = projection.exact_knn(rows, k)
            for i in range(len(rows)):
                # the neighbours as float64 ranks them (within 1e-15 of a tie by column)
                want = np.lexsort((np.arange(len(rows)), -c[i]))[:k]
                assert np.all((idx[i] == want) | (np.abs(c[i, idx[i]] - c[i, want]) < 1e-15)), (k, i)
                np.testing.assert_allclose(1 - sim[i], 1 - c[i, idx[i]], rtol=1e-8)
                assert all((sim[i][a], -idx[i][a]) >= (sim[i][a + 1], -idx[i][a + 1]) for a in range(k - 1))


def test_fp32_candidates_are_certified_or_searched_in_float64(monkeypatch):
    """Rows whose fp32 candidates are certain keep them; the others are searched in float64
    (on a well-spread cloud almost every row is certain)."""
    searched = []
    real = projection.knn_float64_rows

    def spy(x64, rows, k, **kw):
        searched.append(len(rows))
        return real(x64, rows, k, **kw)

    monkeypatch.setattr(projection, "knn_float64_rows", spy)
    spread = np.random.default_rng(3).standard_normal((400, 24))
    projection.exact_knn(spread, 6)
    assert sum(searched) < 40
    searched.clear()
    x, _ = near_collinear(dtype=np.float64)
    projection.exact_knn(x, 6)
    assert sum(searched) > 0


def test_float64_search_breaks_long_ties_by_column():
    """Identical rows (every candidate uncertain, every similarity tied) and rows of small
    integers (many exact ties): the float64 search returns each row's k best by value, ties by
    column, as a full lexsort does."""
    same = np.tile(np.random.default_rng(0).standard_normal((1, 16)), (300, 1))
    idx, sim, _ = projection.exact_knn(same, 6)
    np.testing.assert_array_equal(idx, [[c for c in range(7) if c != i][:6] for i in range(300)])
    np.testing.assert_allclose(sim, 1.0)
    ints = np.random.default_rng(1).integers(-1, 2, (400, 6)).astype(np.float64)
    ints[~ints.any(1)] = 1.0
    # the values: every pair's fixed-order cosine (a matrix product's blocking sets identical
    # rows an ulp apart by where they sit)
    every = np.tile(np.arange(400), (400, 1))
    c = projection.cosines64(projection.scaled_rows(ints), every)
    np.fill_diagonal(c, -np.inf)
    got = projection.knn_float64_rows(ints, np.arange(400), 9)
    for i in range(400):
        np.testing.assert_array_equal(got[i], np.lexsort((np.arange(400), -c[i]))[:9])


@pytest.mark.parametrize("seed", [14, 15, 16])
def test_identical_float64_rows_tie_wherever_they_sit(seed):
    """A float64 cloud with a group of identical rows scattered among others: every row lists the
    group's members with one similarity, by column, and where k falls inside the group, the
    lowest columns (rescored by matrix products, they had come an ulp apart by position: wrong
    order, and at k the wrong members)."""
    rng = np.random.default_rng(seed)
    d, g, m = int(rng.integers(3, 40)), int(rng.integers(20, 80)), int(rng.integers(10, 60))
    b = rng.normal(size=(1, d))
    x = np.vstack([rng.normal(size=(m, d)), np.repeat(b, g, 0)])
    x = x[rng.permutation(len(x))]
    dup = np.flatnonzero((x == b).all(1))
    for k in (g // 2, g - 1, min(g + m // 2, len(x) - 1)):
        idx, sim, _ = projection.exact_knn(x, k)
        for i in dup[:5]:
            group = np.isin(idx[i], dup)
            assert len(set(sim[i][group].tolist())) == 1, (k, i)            # one value
            listed = idx[i][group]
            assert listed.tolist() == sorted(listed.tolist())
            others = dup[dup != i]
            assert listed.tolist() == others[:listed.size].tolist()          # the lowest columns
        for i in np.setdiff1d(np.arange(len(x)), dup)[:5]:
            listed = idx[i][np.isin(idx[i], dup)]
            assert listed.tolist() == dup[:listed.size].tolist(), (k, i)

def test_half_precision_tensors_are_read_exactly():
    """bfloat16 and float16 tensors (a model's own dtype) go through as their exact values:
    the same neighbours and similarities as their float64 widening, no TypeError from numpy."""
    rows = torch.from_numpy(np.random.default_rng(5).standard_normal((120, 32)))
    for half in (torch.bfloat16, torch.float16):
        x = rows.to(half)
        idx, sim, _ = projection.exact_knn(x, 4)
        want_idx, want_sim, _ = projection.exact_knn(x.double().numpy(), 4)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(sim, want_sim)
        np.testing.assert_array_equal(geometry.as_matrix64(x), x.double().numpy())
        assert geometry.as_matrix(x).dtype == np.float32

def test_vocab_float64_sections():
    """The vocab sections computed in float64 (token types, mean embedding, PCA) on
    near-collinear rows."""
    words, _ = near_collinear(n_per=10, dtype=np.float32)
    w = torch.from_numpy(words)
    tt = w[:2].clone()
    out = sections.section_token_type(tt, None, None, backend=None)
    t = tt.double().numpy()
    np.testing.assert_allclose(out["distance"], np.sqrt(((t[:, None] - t[None]) ** 2).sum(-1)), rtol=1e-12)
    np.testing.assert_allclose(1 - np.asarray(out["cosine"]), 1 - unit(t) @ unit(t).T, rtol=1e-8, atol=1e-15)
    m = sections.mean_embedding_measures(w)
    x = words.astype(np.float64)
    mu = x.mean(0)
    np.testing.assert_allclose(m["euclidean"].numpy(), np.linalg.norm(x - mu, axis=1), rtol=1e-10)
    cos = x @ mu / (np.linalg.norm(x, axis=1) * np.linalg.norm(mu))
    np.testing.assert_allclose(1 - m["cosine"].numpy(), 1 - cos, rtol=1e-8)
    ratio, _ = sections.principal_components(w)
    np.testing.assert_allclose(ratio.numpy()[:5], _pca_np(x)[0][:5], rtol=1e-8)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_engine_moments_of_near_collinear_cosines(backend):
    """Cosines all within 1e-5 of 1: the engine's mean and std equal those of its own fp32 values
    (every pair read back through row_topk = N - 1) to 1e-9. Summed around a shift of 0, the
    variance had cancelled (std 0.8 % off on the cpp backend)."""
    rng = np.random.default_rng(0)
    x = (np.ones(33) + 1e-3 * rng.standard_normal((300, 33))).astype(np.float32)
    r = embgeom.pairwise_stats(x, backend=backend, bins=0, topk=0, bottomk=0, row_topk=299)
    idx, val = r.row_topk.indices.numpy(), r.row_topk.values.double().numpy()
    rows = np.repeat(np.arange(300), 299)
    upper = idx.ravel() > rows
    v = val.ravel()[upper]
    assert v.size == r.count == 300 * 299 // 2 and v.min() > 1 - 1e-5
    assert r.mean == pytest.approx(v.mean(), rel=1e-12, abs=0)
    assert r.std == pytest.approx(v.std(), rel=1e-9, abs=0)
