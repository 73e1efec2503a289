"""Point clouds: the exact graph against brute force, projections deterministic under a seed,
silhouette / within / between against scikit-learn and numpy, kept vectors against
transformers' own hidden_states, the vocabulary position geometry."""
from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
import pytest
import torch

import embgeom
from embgeom.analysis.clouds import geometry, projection
from embgeom.analysis.vocab import positions
from embgeom.cli import main
from embgeom.neighbours import recall_at_k
from helpers import scatter_page

pytestmark = pytest.mark.filterwarnings("ignore:trace. texts longer")

CORPUS = ["the cat sat on the mat .", "a dog ran to the house .", "", "the king and the queen .",
          "she was in the city ?", "red , green and blue .", "the man read a new book .",
          "one two three", "we go and come"]
LABELS = ["animal", "animal", "royal", "place", "colour", "person", "number", "verb"]


def _clusters(n_per=20, d=16, groups=3, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(n_per, d)) + 4 * np.eye(d)[g] for g in range(groups)])
    x[5] = x[3]                                         # a duplicate row: tied neighbours
    return x.astype(np.float32), [f"g{g}" for g in range(groups) for _ in range(n_per)]


def _brute_knn(x, k):
    u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    # descending similarity, ties by column index (a stable sort of -s)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("n,k", [(2, 1), (60, 7), (60, 59)])
def test_exact_knn_vs_brute_force(n, k):
    x, _ = _clusters()
    x = x[:n]
    idx, sim, _ = projection.exact_knn(x, k)
    want_i, want_s = _brute_knn(x, k)
    np.testing.assert_allclose(sim, want_s, atol=1e-5)
    # equal up to ties: indices differ only where the values tie
    same = idx == want_i
    assert np.all(same | np.isclose(sim, want_s, atol=1e-6))
    assert recall_at_k(idx, want_i) >= 0.99


def test_exact_knn_errors():
    x, _ = _clusters()
    with pytest.raises(ValueError, match="k: expected"):
        projection.exact_knn(x, 60)
    x[2] = 0
    with pytest.raises(ValueError, match="zero rows"):
        projection.exact_knn(x, 3)


def _brute_knn_euclidean(x, k):
    from scipy.spatial.distance import cdist

    x64 = x.astype(np.float64)
    d = cdist(x64, x64, "sqeuclidean")
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]   # ascending distance, ties by column
    return order, np.sqrt(np.take_along_axis(d, order, 1))


def _hopf_link(n=200):
    """Two unit circles, each through the other's centre (R. Luisto's thesis, Figure 2)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    z = 0 * t
    return np.concatenate([np.stack([np.cos(t), np.sin(t), z], 1),
                           np.stack([1 + np.cos(t), z, np.sin(t)], 1)]).astype(np.float32)


@pytest.mark.parametrize("case", ["clusters", "far", "duplicates", "identical", "integers", "float64", "hopf"])
def test_exact_knn_euclidean_is_float64_brute_force(case, monkeypatch):
    """metric="euclidean": the k nearest by float64 distance, ties by column, on odd shapes: a
    cloud far from the origin (its fp32 distances would cancel but for the centring: certified
    from fp32), duplicates (zero distances, long ties: the float64 search), small integers (exact
    ties), float64 input, a Hopf link (a ray through both circles: cosine would call (1, 0, 0) and
    (2, 0, 0) identical), identical rows (one long tie: the float64 search)."""
    rng = np.random.default_rng(4)
    x = {"clusters": _clusters()[0],
         "far": (1e4 + rng.standard_normal((130, 5)) * 1e-2).astype(np.float32),
         "duplicates": np.repeat(rng.standard_normal((23, 3)), 4, 0).astype(np.float32),
         "identical": np.repeat(rng.standard_normal((1, 6)) * 1e3, 40, 0).astype(np.float32),
         "integers": rng.integers(-2, 3, (97, 4)).astype(np.float32),
         "float64": rng.standard_normal((70, 9)),
         "hopf": _hopf_link(100)}[case]
    searched = []
    real = projection.knn_float64_rows
    monkeypatch.setattr(projection, "knn_float64_rows", lambda *a, **kw: searched.append(a[1].size) or real(*a, **kw))
    for k in (1, 6, len(x) - 1):
        idx, dist, _ = projection.exact_knn(x, k, metric="euclidean")
        want_i, want_d = _brute_knn_euclidean(x, k)
        np.testing.assert_allclose(dist, want_d, rtol=1e-14, atol=1e-14)
        # the reference's ids, except where two float64 sums of one distance round apart (the
        # circles' mirror points: sqrt(2) from both sides, to an ulp): there our id's own
        # distance equals the reference's at that rank
        from scipy.spatial.distance import cdist

        full = np.sqrt(cdist(x.astype(np.float64), x.astype(np.float64), "sqeuclidean"))
        rows, ranks = np.nonzero(idx != want_i)
        assert rows.size <= 0.01 * idx.size
        np.testing.assert_allclose(full[rows, idx[rows, ranks]], want_d[rows, ranks], rtol=1e-14, atol=1e-14)
        # the float64 search alone (every row), on the same terms
        got = real(x.astype(np.float64), np.arange(len(x)), k, chunk=17, metric="euclidean")
        rows, ranks = np.nonzero(got != want_i)
        assert rows.size <= 0.01 * got.size
        np.testing.assert_allclose(full[rows, got[rows, ranks]], want_d[rows, ranks], rtol=1e-14, atol=1e-14)
    if case in ("clusters", "far"):
        assert not searched                             # every row certified from fp32
    if case == "identical":
        assert searched and searched[0] == len(x)       # zero distances certify nothing
    if case == "hopf":
        a, b = (_hopf_link(100)[i] for i in (0, 100))
        assert np.allclose(a, [1, 0, 0]) and np.allclose(b, [2, 0, 0])
        assert set(projection.exact_knn(x, 2, metric="euclidean")[0][100]) == {101, 199}


def test_project_euclidean_keeps_the_hopf_link_apart():
    """Under cosine the two circles of a Hopf link touch ((1, 0, 0) and (2, 0, 0) are one
    direction); under Euclidean distance no point's neighbours cross to the other circle, and
    the layout separates them."""
    x = _hopf_link(100)
    labels = ["a"] * 100 + ["b"] * 100
    cos = embgeom.project(x, "umap", labels=labels, k=5, seed=0)
    assert 0 in cos.indices[100] and 100 in cos.indices[0]          # glued along one ray
    p = embgeom.project(x, "umap", labels=labels, k=5, seed=0, metric="euclidean")
    side = np.arange(200) >= 100
    assert (side[p.indices] == side[:, None]).all()
    assert p.metric == "euclidean" and p.similarities is None and p.distances.shape == (200, 5)
    assert p.to_dict()["metric"] == "euclidean" and p.silhouette["projection"] > 0.3
    np.testing.assert_array_equal(p.indices, projection.exact_knn(x, 5, metric="euclidean")[0])
    t = embgeom.project(x, "tsne", labels=labels, perplexity=5, seed=0, metric="euclidean")
    assert (side[t.indices] == side[:, None]).all()
    df = p.to_pandas()
    assert list(df.columns) == ["x", "y", "label", "nearest", "nearest_distance"] and len(df) == 200
    assert "euclidean" in p._repr_html_() and "Projection" in p._repr_html_()
    # 'l2' names the same metric (the Index's spelling)
    np.testing.assert_array_equal(embgeom.project(x, "umap", k=5, seed=0, metric="l2").embedding, p.embedding)
    with pytest.raises(ValueError, match="metric: expected one of"):
        embgeom.project(x, "umap", metric="manhattan")


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
def test_projection_deterministic_and_graph_exact(method):
    x, labels = _clusters()
    a = embgeom.project(x, method=method, labels=labels, k=8, perplexity=5, seed=3)
    b = embgeom.project(torch.from_numpy(x), method=method, labels=labels, k=8, perplexity=5, seed=3)
    assert a.embedding.shape == (60, 2) and a.embedding.dtype == np.float32
    np.testing.assert_array_equal(a.embedding, b.embedding)
    assert np.isfinite(a.embedding).all()
    if method == "tsne":                                 # threads do not change the result
        c = embgeom.project(x, method=method, perplexity=5, seed=3, n_jobs=1)
        np.testing.assert_array_equal(a.embedding, c.embedding)
    if method != "pca":
        k = 8 if method == "umap" else 15                # t-SNE: k = 3 * perplexity
        want_i, _ = _brute_knn(x, k)
        assert a.k == k and a.indices.shape == (60, k)
        assert recall_at_k(a.indices, want_i) >= 0.99
    else:
        assert a.explained_variance.shape == (16,) and abs(a.explained_variance.sum() - 1) < 1e-9
        assert set(a.pca_curves) == {"all", "by_label"} and set(a.pca_curves["by_label"]) == {"g0", "g1", "g2"}
    from sklearn.metrics import silhouette_score
    assert a.silhouette["original"] == pytest.approx(silhouette_score(np.asarray(x, np.float64), labels, metric="cosine"), abs=1e-6)
    assert a.silhouette["projection"] == pytest.approx(silhouette_score(a.embedding.astype(np.float64), labels), abs=1e-6)


def test_graph_rescoring_of_float32_rows_keeps_near_collinear_digits():
    """The graph's float64 similarities of float32 rows (_C.pair_values) against numpy's float64
    unit rows, on a cloud whose cosine distances are ~1e-6: 1 - s to 1e-7 relative."""
    _C = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(3)
    base = rng.standard_normal(48)
    x = (base + 1e-3 * rng.standard_normal((40, 48))).astype(np.float32)
    idx = np.array([[j for j in (np.arange(40) + i + 1) % 40][:7] for i in range(40)])
    got = projection.rescore_pairs(_C.pair_values, x, idx)
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    want = np.einsum("id,ikd->ik", u, u[idx])
    assert (1 - want).max() < 1e-5
    np.testing.assert_allclose(1 - got, 1 - want, rtol=1e-7)
    np.testing.assert_allclose(got, projection.rescore64(x.astype(np.float64), idx), rtol=0, atol=1e-15)


def test_tsne_affinities_are_the_cosine_kernel():
    """t-SNE's conditional affinities on the exact graph: p_j|i proportional to
    exp(-beta_i (1 - s_ij)) (openTSNE's own cosine kernel from 1,000 rows on, scikit-learn's),
    not exp(-beta_i (1 - s_ij)^2): log p is linear in 1 - s along every row, on a near-collinear
    cloud too (1 - s down to 1e-7, where sqrt(2 - 2 s) needs s in float64)."""
    pytest.importorskip("openTSNE")
    x, _ = _clusters()
    near = x[:20] + 1e-4 * np.random.default_rng(5).standard_normal(x[:20].shape).astype(np.float32)
    for cloud in (x, np.concatenate([near, near[:1] * np.float32(1 + 1e-7)])):
        idx, sim, _ = projection.exact_knn(cloud, 9)
        aff = projection.tsne_affinities(idx, sim, perplexity=3, symmetrize=False)
        P = aff.P.toarray()
        u = 1.0 - sim
        for i in range(len(cloud)):
            logp = np.log(P[i, idx[i]])
            slope, icpt = np.polyfit(u[i], logp, 1)
            assert slope < 0
            np.testing.assert_allclose(logp, slope * u[i] + icpt, atol=1e-6 * (1 + abs(logp).max()))


def test_threaded_tsne_fft_is_numpys_fft_bit_for_bit(monkeypatch):
    """openTSNE's FFT gradient with its 2-D transforms on two threads (threaded_tsne_fft): each
    transform equals numpy.fft's bit for bit, and so does the whole layout, on an input whose
    embedding spreads over several grid sizes."""
    pytest.importorskip("openTSNE")
    pytest.importorskip("scipy")
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("numpy 1.x's FFTs are the C pocketfft: threaded_tsne_fft stays off")
    fft = projection._ThreadedFFT(2)
    rng = np.random.default_rng(2)
    for shape in ((2, 2), (6, 10), (35, 35), (300, 300), (1134, 1134)):
        a = rng.standard_normal(shape)
        f = np.fft.rfft2(a)
        assert np.array_equal(fft.rfft2(a), f), shape
        assert np.array_equal(fft.irfft2(f), np.fft.irfft2(f)), shape
    assert np.array_equal(fft.rfft2(a, s=(8, 8)), np.fft.rfft2(a, s=(8, 8)))   # other calls: numpy's
    assert fft.fft is np.fft.fft
    x, _ = _clusters()
    x = np.concatenate([x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for _ in range(20)])
    idx, sim, _ = projection.exact_knn(x, 30)
    calls = []
    original = projection._ThreadedFFT.irfft2
    monkeypatch.setattr(projection._ThreadedFFT, "irfft2", lambda self, a: calls.append(a.shape) or original(self, a))
    kw = dict(perplexity=10, seed=1, n_jobs=2, n_iter=150, early_exaggeration_iter=50,
              negative_gradient_method="fft")  # (openTSNE's own choice below 10,000 rows: Barnes-Hut)
    threaded = projection.tsne_layout(x, idx, sim, **kw)
    assert calls and max(calls)[0] > 100                  # the grid grew past its first size
    monkeypatch.setattr(projection, "threaded_tsne_fft", lambda workers: contextlib.nullcontext())
    np.testing.assert_array_equal(threaded, projection.tsne_layout(x, idx, sim, **kw))
    import openTSNE._matrix_mul.matrix_mul as mm
    assert mm.np is np                                    # restored after the fit


def test_layout_progress_bars_leave_the_layout_unchanged():
    """The t-SNE iteration bar (openTSNE callbacks) and UMAP's epoch bar only draw: the same
    layout as without them, and the t-SNE bar reaches its total."""
    import io

    from embgeom.progress import Progress

    x, _ = _clusters()
    idx, sim, _ = projection.exact_knn(x, 20)
    kw = dict(perplexity=5, seed=1, n_jobs=1, n_iter=100, early_exaggeration_iter=50)
    stream = io.StringIO()
    shown = Progress(enabled=True, prefix="test", stream=stream)
    np.testing.assert_array_equal(projection.tsne_layout(x, idx, sim, **kw),
                                  projection.tsne_layout(x, idx, sim, progress=shown, **kw))
    assert "test: t-SNE iterations" in stream.getvalue() and "150/150" in stream.getvalue()
    pytest.importorskip("umap")
    np.testing.assert_array_equal(projection.umap_layout(x, idx, sim, seed=2, n_epochs=60),
                                  projection.umap_layout(x, idx, sim, seed=2, n_epochs=60, progress=shown))
    # (UMAP's bar clears its line when done: it runs under the layout phase's clock)
    assert "test: UMAP epochs" in stream.getvalue() and "/60 [" in stream.getvalue()


def test_pca_matches_sklearn():
    from sklearn.decomposition import PCA

    x, _ = _clusters()
    ratio, proj = projection.pca(x, 2)
    sk = PCA(2).fit(x.astype(np.float64))
    np.testing.assert_allclose(ratio[:2], sk.explained_variance_ratio_, rtol=1e-6)
    got = proj * np.sign(proj[0])                        # components are defined up to sign
    want = sk.transform(x.astype(np.float64))
    np.testing.assert_allclose(got, want * np.sign(want[0]), atol=1e-4)


def test_missing_package_names_pip_package(monkeypatch):
    x, _ = _clusters()
    monkeypatch.setitem(sys.modules, "openTSNE", None)
    with pytest.raises(ValueError, match="pip install openTSNE"):
        embgeom.project(x, method="tsne", perplexity=5)


def test_within_between_vs_numpy():
    x, labels = _clusters(n_per=7, groups=3)
    x[0] = 0                                             # a zero row is left out
    w, b = geometry.within_between_cosine(x, labels)
    keep = np.any(x != 0, axis=1)
    u = x[keep].astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    lab = np.asarray(labels)[keep]
    iu, ju = np.triu_indices(len(u), 1)
    cos = (u @ u.T)[iu, ju]
    same = lab[iu] == lab[ju]
    assert w == pytest.approx(cos[same].mean(), abs=1e-12)
    assert b == pytest.approx(cos[~same].mean(), abs=1e-12)


def test_within_between_identical_rows_exactly_one():
    # the sums' form rounds above 1 on identical rows (1 + 2^-50): the means are clamped as
    # every cosine is
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = np.repeat(rng.standard_normal((1, 384)).astype(np.float32), 6, axis=0)
        assert geometry.within_between_cosine(x, list("aaabbb")) == (1.0, 1.0)


def test_label_pairs_keep_apart_labels_holding_bars_and_backslashes():
    # "x" with "y|z" and "x|y" with "z" had both been per_pair["x|y|z"]: one pair silently lost
    names = ["x", "x|y", "y|z", "z", "a\\", "\\|b"]
    labels = names * 2
    rng = np.random.default_rng(5)
    cls = rng.standard_normal((len(labels), 2, 8)).astype(np.float32)
    g = geometry.group_geometry(cls, labels, bins=10)
    pairs = g["last"]["per_pair"]
    assert len(pairs) == len(names) * (len(names) - 1) // 2
    lab = np.asarray(labels)
    for key, st in pairs.items():
        a, b = st["labels"]
        assert key == geometry.pair_key(a, b) and a < b
        want = geometry.set_stats(cls[lab == a, 1], cls[lab == b, 1], bins=10)
        assert st["cosine"] == want["cosine"]
    assert pairs["x|y\\|z"]["labels"] == ["x", "y|z"] and pairs["x\\|y|z"]["labels"] == ["x|y", "z"]
    assert geometry.pair_key("a\\", "\\|b") == "a\\\\|\\\\\\|b"


def test_set_stats_vs_numpy():
    x, labels = _clusters(n_per=9, groups=2)
    a, b = x[:9].astype(np.float64), x[9:].astype(np.float64)
    s = geometry.set_stats(x[:9], x[9:], bins=10)
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    ub = b / np.linalg.norm(b, axis=1, keepdims=True)
    assert s["cosine"]["count"] == 81 and s["cosine"]["mean"] == pytest.approx((ua @ ub.T).mean(), abs=1e-6)
    dist = np.linalg.norm(a[:, None] - b[None], axis=-1)
    assert s["euclidean"]["mean"] == pytest.approx(dist.mean(), rel=1e-5)
    assert s["euclidean"]["max"] == pytest.approx(dist.max(), rel=1e-5)
    assert sum(s["euclidean"]["hist"]["counts"]) == 81
    t = geometry.set_stats(x[:9], bins=10)
    iu, ju = np.triu_indices(9, 1)
    assert t["cosine"]["count"] == 36 and t["cosine"]["mean"] == pytest.approx((ua @ ua.T)[iu, ju].mean(), abs=1e-6)


def test_project_cli(tmp_path, capsys):
    x, labels = _clusters()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    (tmp_path / "texts.txt").write_text("\n".join(f"row {i} </script>" for i in range(60)) + "\n")
    out = tmp_path / "out"
    assert main(["project", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "labels.txt"),
                 "--texts", str(tmp_path / "texts.txt"), "--method", "tsne", "--perplexity", "5",
                 "--seed", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert {"method", "n", "d", "k", "seconds", "knn_seconds", "silhouette"} <= set(rep)
    assert (rep["method"], rep["n"], rep["d"], rep["k"]) == ("tsne", 60, 16, 15)
    proj = np.load(out / "projection.npy")
    assert proj.shape == (60, 2) and proj.dtype == np.float32
    knn = np.load(out / "knn.npz")
    assert knn["indices"].dtype == np.int64 and knn["indices"].shape == knn["similarities"].shape == (60, 15)
    np.testing.assert_array_equal(proj, embgeom.project(x, "tsne", perplexity=5, seed=1).embedding)
    html = (out / "projection.html").read_text()
    # Plotly, its JavaScript inlined once: nothing fetched (no <script src>, no <link>)
    assert html.count("* plotly.js v") == 1 and "<script src" not in html and "<link" not in html
    assert "</script> " not in html.split("id='data'>")[1].split("</script>")[0]   # escaped payload
    # a click lists the neighbours of knn.npz; the page zooms, pans and searches
    data = scatter_page(out / "projection.html")
    assert data["knn"]["i"] == knn["indices"][:, :10].tolist()
    np.testing.assert_allclose(data["knn"]["s"], knn["similarities"][:, :10], atol=1e-4)
    np.testing.assert_allclose([r[:2] for r in data["rows"]], proj, atol=1e-4)
    assert [r[2] for r in data["rows"]] == labels
    assert data["config"]["scrollZoom"] and data["figure"]["layout"]["dragmode"] == "pan"
    assert data["t"][3] == "row 3 </script>"
    assert "id='q'" in html and "id='provenance'" in html
    assert (out / "projection.png").stat().st_size > 0
    # 3-D input (cls.npy) with --depth; errors exit 2 with one line
    np.save(tmp_path / "c.npy", np.stack([x, 2 * x], 1))
    assert main(["project", str(tmp_path / "c.npy"), "--method", "pca", "--depth", "0", "--out", str(out)]) == 0
    assert main(["project", str(tmp_path / "c.npy"), "--depth", "5", "--out", str(out)]) == 2
    (tmp_path / "short.txt").write_text("a\nb\n")
    assert main(["project", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "short.txt"), "--out", str(out)]) == 2
    assert "expected 60" in capsys.readouterr().err
    # --metric euclidean: knn.npz holds distances, the page says which graph
    assert main(["project", str(tmp_path / "x.npy"), "--method", "umap", "--k", "4", "--metric", "euclidean",
                 "--out", str(out)]) == 0
    knn = np.load(out / "knn.npz")
    assert set(knn) == {"indices", "distances"}
    np.testing.assert_array_equal(knn["indices"], _brute_knn_euclidean(x, 4)[0])
    assert json.loads((out / "report.json").read_text())["metric"] == "euclidean"
    assert "exact Euclidean graph" in scatter_page(out / "projection.html")["knn"]["note"]


def test_text_keeps_vectors(tiny_bert_dir, tiny_bert, tmp_path):
    """cls.npy and trajectories.npz equal transformers' hidden_states of each text run alone;
    groups equal scikit-learn's silhouette and numpy's within/between means."""
    from sklearn.metrics import silhouette_score

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"group": "g", "a": "the king", "b": "the queen"}\n'
                     '{"group": "g", "a": "a man", "b": "a woman"}\n'
                     '{"group": "h", "a": "big", "b": "small"}\n', encoding="utf-8")
    out = tmp_path / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--batch-size", "3",
                 "--keep", "cls", "--trajectories", "2", "--labels", str(tmp_path / "labels.txt"),
                 "--pairs", str(pairs), "--no-progress"]) == 0
    model, tokenizer = tiny_bert
    texts = [t for t in CORPUS if t]
    cls = np.load(out / "cls.npy")
    assert cls.shape == (8, 3, 64) and cls.dtype == np.float32
    traj = np.load(out / "trajectories.npz")
    with torch.no_grad():
        for i, t in enumerate(texts):
            enc = tokenizer(t, return_tensors="pt")
            hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states, 2)[0]   # (T, L+1, D)
            np.testing.assert_allclose(cls[i], hs[0].numpy(), atol=2e-5)
            if i < 2:
                rows = traj["text"] == i
                np.testing.assert_allclose(traj["states"][rows], hs.numpy(), atol=2e-5)
                assert traj["token"][rows].tolist() == tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    rep = json.loads((out / "report.json").read_text())
    g = rep["groups"]
    assert g["labels"] == sorted(set(LABELS))
    for l in range(3):
        x = cls[:, l]
        want = silhouette_score(x.astype(np.float64), LABELS, metric="cosine") if np.ptp(x, 0).max() > 0 else None
        if want is not None:
            assert g["silhouette"][l] == pytest.approx(want, abs=1e-6)
        u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
        iu, ju = np.triu_indices(8, 1)
        c = (u @ u.T)[iu, ju]
        same = np.asarray(LABELS)[iu] == np.asarray(LABELS)[ju]
        assert g["within_cosine"][l] == pytest.approx(c[same].mean(), abs=1e-6)
        assert g["between_cosine"][l] == pytest.approx(c[~same].mean(), abs=1e-6)
    assert set(g["last"]["per_label"]["animal"]) == {"cosine", "euclidean", "norms"}
    assert "animal|colour" in g["last"]["per_pair"]
    diff = np.load(out / "pair_differences.npz")
    assert diff["vectors"].shape == (3, 64) and diff["group"].tolist() == ["g", "g", "h"]
    with torch.no_grad():
        last = lambda s: model(**tokenizer(s, return_tensors="pt")).last_hidden_state[0, 0].detach().numpy()  # noqa: E731
    np.testing.assert_allclose(diff["vectors"][2], last("big") - last("small"), atol=2e-5)
    assert "vectors" not in rep["cls_pairs"]
    names = {p.name for p in out.iterdir()}
    assert {"trajectories_pca.png", "trajectories_steps.png", "groups_pca.png", "groups_pca.html",
            "groups_depth.png", "pair_differences_pca.png"} <= names
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len([n for n in names if n.endswith(".png")])
    assert "<a href='groups_pca.html'>" in html  # every side page linked from report.html


def test_text_bad_labels(tiny_bert_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat .\na dog .\n", encoding="utf-8")
    (tmp_path / "l.txt").write_text("one\n")
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir,
                 "--labels", str(tmp_path / "l.txt")]) == 2
    assert "has 1 labels, expected 2" in capsys.readouterr().err


def test_helix_period_and_curves():
    p = np.arange(200, dtype=np.float64)
    path = np.stack([0.05 * p, np.cos(2 * np.pi * p / 40), np.sin(2 * np.pi * p / 40)], 1)
    h = positions.helix_period(path)
    assert h["period"] == pytest.approx(40, rel=1e-3) and h["plane"] == "2-3"
    best = h["planes"]["2-3"]
    assert best["turns"] * best["period"] == pytest.approx(199) and best["turns"] == pytest.approx(199 / 40, rel=1e-3)
    pos = torch.randn(30, 8, dtype=torch.float64)
    c = positions.cosine_curves(pos, window=12, offset=5)
    u = pos / pos.norm(dim=1, keepdim=True)
    assert c["rows"][0] == 6 and c["window"] == 12
    assert c["raw"][0][4] == pytest.approx(float(u[1] @ u[4]))
    assert c["shifted"][2][3] == pytest.approx(float(u[3] @ u[6]))
    assert positions.cosine_curves(pos, rows=[25], window=12)["shifted"][0][5:] == [None] * 7
    assert positions.parse_range("0:24", 32) == (0, 24) and positions.parse_range(":", 32) == (0, 32)
    with pytest.raises(ValueError, match="--positions"):
        positions.parse_range("5:40", 32)


def test_vocab_position_geometry(tiny_bert_dir, tiny_bert, tmp_path):
    out = tmp_path / "v"
    assert main(["vocab", "--model", tiny_bert_dir, "--out", str(out), "--positions", "2:30"]) == 0
    rep = json.loads((out / "report.json").read_text())
    g = rep["position_geometry"]
    model, tokenizer = tiny_bert
    word = model.embeddings.word_embeddings.weight.detach().double()
    pos = model.embeddings.position_embeddings.weight.detach().double()
    a, b = word[tokenizer.cls_token_id], pos[0]
    cv = g["cls_vs_position0"]
    assert cv["euclidean"] == pytest.approx(float((a - b).norm()))
    assert cv["max_coordinate"] == pytest.approx(float((a - b).abs().max()))
    assert g["range"] == [2, 30] and rep["positional"]["positions"] == 28 and g["cosine_curves"]["rows"][0] == 3
    for name in ("positions_raw.png", "positions_cosine_curves.png", "joint_pca.png", "positions_sinusoidal.png"):
        assert (out / name).exists()
    # the sinusoidal table beside the learned one covers the same positions 2..29
    sn = g["sinusoidal"]
    assert sn["matched"]["range"] == [2, 30] and sn["matched"]["positions"] == sn["learned"]["positions"] == 28
    p = np.arange(2, 30)[:, None]
    k = np.arange(pos.shape[1])
    x = np.where(k % 2 == 0, np.sin(p / 10000 ** ((k - k % 2) / pos.shape[1])),
                 np.cos(p / 10000 ** ((k - k % 2) / pos.shape[1])))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert sn["matched"]["offset_profile"][3] == pytest.approx(np.diagonal(u @ u.T, 3).mean())
    assert main(["vocab", "--model", tiny_bert_dir, "--out", str(out), "--positions", "9:3"]) == 2


def test_project_cli_refuses_options_its_method_ignores(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32))
    x = str(tmp_path / "x.npy")
    for flags, message in ((["--method", "pca", "--k", "4"], "--k: only for --method umap"),
                           (["--method", "umap", "--perplexity", "4"], "--perplexity: only for --method tsne"),
                           (["--method", "pca", "--depth", "1"], "--depth: X is (12, 5)"),
                           (["--method", "pca", "--backend", "bogus"], "--backend: only for --method umap or tsne"),
                           (["--method", "tsne", "--perplexity", "0.2"], "perplexity: expected a finite number >= 1/3")):
        assert main(["project", x, "--out", str(tmp_path / "o"), "--quiet"] + flags) == 2, flags
        assert message in capsys.readouterr().err
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert main(["project", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "is not a .npy file (no NumPy header)" in capsys.readouterr().err


def test_project_degenerate_inputs():
    from embgeom.analysis.clouds.projection import project

    with pytest.raises(ValueError, match="t-SNE is undefined for these rows: all 20 point in one direction"):
        project(np.ones((20, 4), np.float32), method="tsne")
    # two groups of 20 copies at perplexity 2 (6 neighbours, all copies): not one point
    groups = np.repeat(np.random.default_rng(10).normal(size=(2, 5)), 20, axis=0)
    for metric in ("cosine", "euclidean"):
        with pytest.raises(ValueError, match=r"every row's 6 nearest neighbours are copies of it; raise the "
                                             r"perplexity \(2: 6 neighbours\)"):
            project(groups, method="tsne", perplexity=2, metric=metric)
    p = project(np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32), method="umap")
    assert p.embedding.shape == (3, 2) and np.isfinite(p.embedding).all()


def test_project_far_near_collinear_and_identical_clouds():
    """t-SNE lays out near-collinear and far-offset clouds (cosine distances 1e-7, below the 1e-6
    it had taken for 'every distance 0'); identical rows are one point under Euclidean distance
    whatever N (the mean's rounding had left 1e-16 rows and a refusal about their norms); the
    Euclidean silhouette of a far cloud is its silhouette near the origin (sklearn's
    |x|^2 + |y|^2 - 2 x.y had cancelled: 0.52 for 0.41); t-SNE of one column is refused naming x."""
    from sklearn.metrics import silhouette_score

    from embgeom.analysis.clouds.projection import project

    rng = np.random.default_rng(3)
    base = rng.standard_normal(16)
    near = base + 1e-4 * rng.standard_normal((40, 16))                        # distances ~1e-8..1e-7
    p = project(near, method="tsne", perplexity=5)
    assert np.isfinite(p.embedding).all() and (1 - p.similarities).max() < 1e-6
    for n in (8, 10):
        same = np.tile(rng.standard_normal((1, 5)), (n, 1))
        assert np.isfinite(project(same, method="umap", metric="euclidean", k=3).embedding).all()
        with pytest.raises(ValueError, match=f"all {n} are one point"):
            project(same, method="tsne", metric="euclidean", perplexity=2)
    x, labels = _clusters()
    x = x.astype(np.float64)
    want = silhouette_score(x, labels, metric="euclidean")
    for offset, scale in ((1e4, 1e-4), (1e8, 1e-2)):
        far = offset + scale * x
        got = geometry.silhouette(far, labels, "euclidean")
        assert got == pytest.approx(want, abs=1e-6), (offset, got, want)
    with pytest.raises(ValueError, match="x: t-SNE needs rows of at least 2 columns"):
        project(rng.standard_normal((20, 1)), method="tsne", perplexity=3)


def test_page_coordinates_keep_the_spread_of_tiny_and_far_clouds():
    """The scatter page rounds coordinates to 1e-5 of the points' spread: a PCA of spread 1e-6,
    or a cloud at 1e3 with that spread, keeps its points apart (rounded to 5 decimals, every
    point of it had been drawn at one place while the .npy and .png held the spread)."""
    pytest.importorskip("plotly")
    from embgeom.report.interactive import coordinate_decimals, scatter_figure

    rng = np.random.default_rng(0)
    for offset in (0.0, 1e3):
        xy = offset + 1e-6 * rng.standard_normal((50, 2))
        fig, _ = scatter_figure(xy)
        drawn = np.column_stack([fig.data[0].x, fig.data[0].y])
        assert np.abs(drawn - xy).max() <= 1e-6 * 1e-5
        assert len({tuple(p) for p in drawn.tolist()}) == 50
    assert coordinate_decimals(np.array([[0.0, 0.0], [3.0, 1.0]])) == 5
    assert coordinate_decimals(np.array([[0.0, 0.0], [300.0, 1.0]])) == 3
    assert coordinate_decimals(np.zeros((3, 2))) == 5 and coordinate_decimals(np.zeros((0, 2))) == 5


def test_silhouette_of_clusters_far_apart_and_in_chunks(monkeypatch):
    """Two tight pairs of labels (spread 1e-4, 1e-3 apart) at +1e4 and -1e4: no single translation
    brings both near the origin, and the product formula's distances had cancelled (0.5332 for
    0.5194; 0.24 at +-1e5). Distances from differences where it cancels give the definition's
    value; computed a few rows at a time, equal to scikit-learn's on ordinary clouds (a label
    of one point counts 0), cosine and Euclidean."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    d = 16
    e1, e2 = np.eye(d)[0], np.eye(d)[1]
    centres = [1e4 * e1, 1e4 * e1 + 1e-3 * e2, -1e4 * e1, -1e4 * e1 + 1e-3 * e2]
    for far in (1.0, 10.0):
        x = np.vstack([far * c + 1e-4 * rng.standard_normal((20, d)) for c in centres])
        labels = [g for g in "abcd" for _ in range(20)]
        diff = x[:, None, :] - x[None, :, :]
        want = silhouette_score(np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)), labels, metric="precomputed")
        assert geometry.silhouette(x, labels, "euclidean") == pytest.approx(want, abs=1e-9)
    x, labels = _clusters()
    x = x.astype(np.float64)
    labels = list(labels[:-1]) + ["alone"]
    monkeypatch.setattr(geometry, "SILHOUETTE_CHUNK", 7 * len(labels))  # 7 rows a step
    for metric in ("cosine", "euclidean"):
        assert geometry.silhouette(x, labels, metric) == pytest.approx(silhouette_score(x, labels, metric=metric),
                                                                        abs=1e-12)
    # float64 rows at +-1e6, sub-clusters 1e-6 apart: the translation rounds the far group's rows,
    # so the direct distances are taken of the rows as given (2.2e-6 off before)
    c = rng.standard_normal((2, 4)) * 1e-6
    far = np.concatenate([off + c[k] + 2e-7 * rng.standard_normal((6, 4)) for off in (1e6, -1e6) for k in range(2)])
    diff = far[:, None, :] - far[None, :, :]
    sub = np.repeat(np.arange(4), 6)
    want = silhouette_score(np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)), sub, metric="precomputed")
    assert geometry.silhouette(far, sub, "euclidean") == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="metric: expected 'cosine' or 'euclidean', got 'manhattan'"):
        geometry.silhouette(x, labels, "manhattan")
    with pytest.raises(ValueError, match=r"labels: expected one per row \(60\), got 59"):
        geometry.silhouette(x, labels[:-1], "cosine")


def test_pca_ratios_keep_their_digits_below_the_products_rounding():
    """A cloud along one direction with a 1e-9 spread across it: the covariance's eigenvalues gave
    1.6e-16 for 1.4e-18 (every small ratio noise, or 0); from the singular values each small ratio
    keeps its digits. Four points in six dimensions: centred, rank 3, the last ratio exactly 0.
    A well-conditioned cloud (the fast path through X^T X) agrees with the SVD, and the vocabulary
    report's principal_components is the same computation."""
    from embgeom.analysis.vocab.sections import principal_components

    rng = np.random.default_rng(0)
    v = rng.standard_normal(8)
    v /= np.linalg.norm(v)
    for x in (rng.standard_normal((200, 1)) * v + 1e-9 * rng.standard_normal((200, 8)),
              rng.standard_normal((300, 8)) * np.arange(1, 9)):
        s = np.linalg.svd(x - x.mean(0), compute_uv=False)
        want = s ** 2 / (s ** 2).sum()
        ratio, _, comps = projection.pca_fit(x, 8)
        np.testing.assert_allclose(ratio, want, rtol=1e-5, atol=0)  # (the mean's rounding: ~1e-7)
        np.testing.assert_allclose(np.abs(comps.T @ comps), np.eye(8), atol=1e-9)
        got, path = principal_components(torch.from_numpy(x), axes=2)
        np.testing.assert_allclose(got.numpy(), ratio, rtol=1e-12, atol=0)
        np.testing.assert_allclose(path.numpy(), (x - x.mean(0)) @ comps[:, :2], rtol=1e-9, atol=1e-9)
    ratio, _, _ = projection.pca_fit(rng.standard_normal((4, 6)) + 100.0, 2)
    assert ratio.shape == (4,) and ratio[3] == 0.0 and ratio[:3].sum() == pytest.approx(1.0, abs=1e-15)


def test_pca_sign_of_an_axis_with_tied_loadings_does_not_follow_the_row_order():
    """An axis (1, -1, 0) / sqrt 2: its two loadings differ in the last bits, and which one was
    'largest' had followed the rows' order (15 of 50 orders flipped the axis); tied loadings now
    leave the sign to the first of them."""
    rng = np.random.default_rng(0)
    t = rng.standard_normal(40)
    x = np.c_[t, -t, 0.01 * rng.standard_normal(40)]
    first = projection.pca_fit(x, 1)[2][:, 0]
    assert first[0] > 0
    for seed in range(30):
        order = np.random.default_rng(seed).permutation(40)
        assert np.sign(projection.pca_fit(x[order], 1)[2][0, 0]) == 1, seed


def test_project_pca_report_keeps_every_component_and_a_label_named_all():
    """Every explained-variance ratio (report.json kept the first 64), the whole cloud's curve
    beside a label named 'all' (the label's curve had replaced it), and a zero row left out of
    the cosine silhouette with a note (sklearn puts it at distance 1 from every row)."""
    from sklearn.metrics import silhouette_score

    from embgeom.analysis.clouds.projection import project

    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 100))
    labels = ["all"] * 100 + ["other"] * 100
    x[100:] = 3 * x[100:, ::-1]
    p = project(x, method="pca", labels=labels)
    d = json.loads(json.dumps(p.to_dict()))
    ev = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    np.testing.assert_allclose(d["explained_variance"], ev / ev.sum(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(d["pca_cumulative"]["all"], np.cumsum(ev / ev.sum()), rtol=1e-9)
    own = np.linalg.svd(x[:100] - x[:100].mean(0), compute_uv=False) ** 2
    np.testing.assert_allclose(d["pca_cumulative"]["by_label"]["all"], np.cumsum(own / own.sum()), rtol=1e-9)
    x[0] = 0.0
    p = project(x, method="pca", labels=labels)
    want = silhouette_score(x[1:], labels[1:], metric="cosine")
    assert p.silhouette["original"] == pytest.approx(want, abs=1e-12)
    assert p.notes == ["silhouette.original leaves out 1 zero row(s) (no direction: no cosine distance)"]


def test_trajectory_step_cosine_of_unchanged_states_is_one():
    # a state that a layer leaves as it was: cos 1 exactly (dot / (|h| |h|) rounded past 1 by an ulp)
    rng = np.random.default_rng(8)
    h = rng.standard_normal((200, 1, 384)) * rng.uniform(0.01, 100, (200, 1, 1))
    got = geometry.trajectory_steps(np.repeat(h, 3, axis=1))["step_cosine"]
    assert got.max() == 1.0 and got.min() >= 1.0 - 1e-15


def test_text_step_cosine_of_unchanged_states_is_one():
    # the text trace's evolution sums: a layer that leaves its input as it was scores 1, not 1 + ulp
    # (one token a batch: a sum over many would round the ulps away)
    from embgeom.analysis.text.trace import Batch, TraceAccumulator

    g = torch.Generator().manual_seed(2)
    mask = torch.ones(1, 1, dtype=torch.bool)
    flags = torch.zeros(1, 1, dtype=torch.bool)
    for _ in range(40):
        acc = TraceAccumulator(1, 1, 1, 10, "cpu", metrics=("evolution",))
        h = torch.randn(1, 1, 384, generator=g) * 30
        acc.update(Batch(torch.zeros(1, 1, dtype=torch.long), mask, flags, flags, flags, (h, h.clone()), (), (), (), 0))
        assert 1.0 - 1e-15 <= acc.s["step_cos"][0].item() <= 1.0


def test_pca_coordinates_past_float32_are_refused_by_name():
    """Rows near float32's largest value have PCA coordinates past it: the cast to the layout's
    float32 had warned of an overflow and then called the layout NaN."""
    import warnings

    from embgeom.analysis.clouds.projection import project

    x = np.full((5, 4), 3e38, np.float32)
    x[0, 0] = x[1, 1] = -3e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"^x: the rows' PCA coordinates reach 4.24e\+38, past float32's range"):
            project(x, method="pca")


def test_pca_axes_without_spread_are_flat(monkeypatch, tmp_path):
    """Two [CLS] difference vectors span one axis: the second had been rounding noise (1e-15)
    filling the plot's height, and each arrow from the origin's image, at an arbitrary height on
    that axis, left the picture (matplotlib < 3.8.3 hung drawing it; later ones refused an image
    of 644 x 982,273,248 pixels). Rows and origin now lie at 0 on it."""
    import embgeom.report.text_page as tp
    from embgeom.analysis.clouds.projection import pca_fit

    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((2, 384))
    ratio, _, comps = pca_fit(vectors, 3)
    assert ratio.tolist() == [1.0, 0.0] and not comps[:, 1:].any()
    rank2 = np.r_[vectors, vectors.mean(0, keepdims=True)]           # a third point on their line
    assert not pca_fit(rank2, 2)[2][:, 1].any()
    seen = {}
    monkeypatch.setattr(tp, "scatter_png", lambda out_dir, name, xy, labels, arrows, **kw: seen.update(
        xy=xy, arrows=arrows) or "x.png")
    tp.pair_plot(str(tmp_path), vectors.astype(np.float32), ["g", "h"])
    assert not seen["xy"][:, 1].any() and all(a[0][1] == 0 and a[1][1] == 0 for a in seen["arrows"].values())


@pytest.mark.parametrize("missing", ["umap", "openTSNE"])
def test_a_missing_layout_package_is_said_before_any_work(missing, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    # UMAP and t-SNE run last: without their package `project` had built the neighbour graph and
    # `vocab --projections` run every other section (20 s on the default model) before saying so
    import sys

    from embgeom.analysis.clouds import projection
    from embgeom.cli import main
    from embgeom.commands import vocab

    monkeypatch.setitem(sys.modules, missing, None)   # (an import of it raises ImportError)
    work = []
    monkeypatch.setattr(projection, "exact_knn", lambda *a, **k: work.append("graph"))
    monkeypatch.setattr(vocab, "analyse", lambda *a, **k: work.append("vocab"))
    package = {"umap": "umap-learn", "openTSNE": "openTSNE"}[missing]
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32))
    method = {"umap": "umap", "openTSNE": "tsne"}[missing]
    runs = (["project", str(tmp_path / "x.npy"), "--method", method, "--out", str(tmp_path / "p")],
            ["vocab", "--projections", "--model", tiny_bert_dir, "--out", str(tmp_path / "v")])
    for argv in runs:
        assert main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"embgeom: error: {package} is not installed; `pip install {package}` "
                       "(or `pip install 'embgeom[clouds]'`)"], argv
        assert not (tmp_path / "v").exists()
    assert work == []


def _screen(text: str) -> list[str]:
    """The lines a terminal shows after `text` (carriage return, newline, cursor up)."""
    import re

    rows, r, c = [[]], 0, 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|.|\n", text, flags=re.S):
        if token.startswith("\x1b["):
            if token.endswith("A"):
                r = max(0, r - int(token[2:-1] or 1))
            elif token.endswith("K"):
                del rows[r][c:]
        elif token == "\r":
            c = 0
        elif token == "\n":
            r, c = r + 1, 0
        else:
            while len(rows[r]) <= c:
                rows[r].append(" ")
            rows[r][c] = token
            c += 1
        while len(rows) <= r:
            rows.append([])
    return ["".join(row).rstrip() for row in rows if "".join(row).strip()]


def test_umap_progress_leaves_one_clean_line_per_phase():
    """UMAP's own epoch bar runs under the layout phase's clock; it had closed with its line left
    and the clock's last line had been written over it ('UMAP layout 00:16|#####| 494/500')."""
    import io

    from embgeom.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    pytest.importorskip("umap")
    pytest.importorskip("tqdm")
    term = Terminal()
    x, _ = _clusters()
    embgeom.project(x, "umap", k=5, seed=0, progress=Progress(enabled=True, prefix="p", stream=term))
    lines = _screen(term.getvalue())
    assert any(line.startswith("p: UMAP layout") for line in lines), lines
    assert not [line for line in lines if "epoch" in line], lines
