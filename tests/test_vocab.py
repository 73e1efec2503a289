"""`embgeom vocab` on a tiny random BERT: every table against a direct numpy computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import embgeom
from embgeom.cli import main
from embgeom.analysis.vocab.sections import AGREEMENT_ROWS, MEAN_MEASURES, OUTSIDE
from embgeom.commands.vocab import run


@pytest.fixture(scope="module")
def vocab_report(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    assert main(["vocab", "--model", tiny_bert_dir, "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def mats(tiny_bert):
    model, tokenizer = tiny_bert
    emb = model.embeddings
    word = emb.word_embeddings.weight.detach().double().numpy()
    tokens = tokenizer.convert_ids_to_tokens(list(range(word.shape[0])))
    keep = np.array([not (t.startswith("[") and t.endswith("]")) for t in tokens])  # specials + [unusedN]
    return {"word": word, "pos": emb.position_embeddings.weight.detach().double().numpy(),
            "tt": emb.token_type_embeddings.weight.detach().double().numpy(), "tokens": tokens,
            "ids": np.nonzero(keep)[0]}


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ranked(values, ids, k, descending):
    """(id, value) of the k largest/smallest, ties by id."""
    order = sorted(range(len(values)), key=lambda i: ((-values[i] if descending else values[i]), ids[i]))
    return [(int(ids[i]), float(values[i])) for i in order[:k]]


def test_files_and_token_selection(vocab_report, mats):
    out, rep = vocab_report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 4 and {"pairs_hist.png", "positional_cosine.png", "pca.png"} <= set(pngs)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and "http" not in html
    assert rep["tokens"]["excluded"] == 7 and rep["tokens"]["unused"] == 2 and rep["tokens"]["special"] == 5
    assert rep["tokens_analysed"] == len(mats["ids"])
    assert set(rep["timing"]) >= {"model_load", "pairs", "plots", "page", "to_page", "total"} and rep["peak_rss_mb"] > 0
    # the page states the time up to itself, as report.json's timing.to_page has it
    assert rep["timing"]["to_page"] <= rep["timing"]["total"]
    from embgeom.formatting import fmt
    assert f"{fmt(rep['timing']['to_page'], 3)} s up to this page" in html


def test_pairs_tables(vocab_report, mats):
    _, rep = vocab_report
    ids, tokens = mats["ids"], mats["tokens"]
    c = _unit(mats["word"][ids]) @ _unit(mats["word"][ids]).T
    iu, ju = np.triu_indices(len(ids), 1)
    vals = c[iu, ju]
    p = rep["pairs"]
    assert p["count"] == len(vals)
    assert abs(p["mean"] - vals.mean()) < 1e-6
    top = sorted(zip(-vals, ids[iu], ids[ju]))[:10]
    assert [[a, b] for a, b, _ in p["top_pairs"]] == [[int(i), int(j)] for _, i, j in top]
    assert np.allclose([v for *_, v in p["top_pairs"]], [-v for v, *_ in top], atol=1e-6)
    assert [r[:2] for r in p["top_tokens"]] == [[tokens[i], tokens[j]] for _, i, j in top]
    bottom = sorted(zip(vals, ids[iu], ids[ju]))[:10]
    assert [[a, b] for a, b, _ in p["bottom_pairs"]] == [[int(i), int(j)] for _, i, j in bottom]
    near = sorted(zip(np.abs(vals), ids[iu], ids[ju]))[:10]
    assert [[a, b] for a, b, _ in p["near_pairs"]] == [[int(i), int(j)] for _, i, j in near]
    assert p["outside"]["count"] == int(((vals < OUTSIDE[0]) | (vals > OUTSIDE[1])).sum())
    assert sum(p["hist"]["counts"]) == len(vals)


def test_mean_embedding_tables(vocab_report, mats):
    _, rep = vocab_report
    ids = mats["ids"]
    x = mats["word"][ids]
    mu = x.mean(0)
    dot = x @ mu
    cos = dot / (np.linalg.norm(x, axis=1) * np.linalg.norm(mu))
    want = {"euclidean": np.linalg.norm(x - mu, axis=1), "cosine": cos, "abs_cosine": np.abs(cos),
            "dot": dot, "abs_dot": np.abs(dot), "norm": np.linalg.norm(x, axis=1)}
    assert set(MEAN_MEASURES) == set(want)
    for name, v in want.items():
        for side, desc in (("top", True), ("bottom", False)):
            got = rep["mean_embedding"][name][side]
            exp = _ranked(v, ids, 10, desc)
            assert [r[0] for r in got] == [i for i, _ in exp], (name, side)
            assert [r[1] for r in got] == [mats["tokens"][i] for i, _ in exp]
            assert np.allclose([r[2] for r in got], [e for _, e in exp], atol=1e-9)


def test_positional_and_token_position(vocab_report, mats):
    _, rep = vocab_report
    pos, ids = mats["pos"], mats["ids"]
    cp = _unit(pos) @ _unit(pos).T
    prof = [np.diagonal(cp, k).mean() for k in range(len(pos))]
    assert np.allclose(rep["positional"]["offset_profile"], prof, atol=1e-9)
    ev = np.linalg.svd(pos - pos.mean(0), compute_uv=False) ** 2
    assert np.allclose(rep["pca"]["position"]["explained_variance"], ev / ev.sum(), atol=1e-9)
    xw = mats["word"][ids]
    evw = np.linalg.svd(xw - xw.mean(0), compute_uv=False) ** 2
    assert np.allclose(rep["pca"]["word"]["explained_variance"], evw / evw.sum(), atol=1e-9)

    cross = _unit(mats["word"][ids]) @ _unit(pos).T
    outside = (cross < OUTSIDE[0]) | (cross > OUTSIDE[1])
    tp = rep["token_position"]["outside"]
    assert tp["count"] == int(outside.sum())
    assert tp["per_position"] == outside.sum(0).tolist()
    ii, jj = np.nonzero(outside)  # row-major: ordered by (token, position)
    want = [[int(ids[i]), mats["tokens"][ids[i]], int(j)] for i, j in zip(ii, jj)][:len(tp["pairs"])]
    assert [r[:3] for r in tp["pairs"]] == want
    top = rep["token_position"]["top_pairs"][0]
    i, j = np.unravel_index(np.argmax(cross), cross.shape)
    assert top[:3] == [int(ids[i]), mats["tokens"][ids[i]], int(j)] and abs(top[3] - cross[i, j]) < 1e-6


def test_a_position_range_reports_absolute_positions(tiny_bert_dir, mats, tmp_path):
    """--positions A:B: the positional and token x position sections name positions A..B-1 (they
    had been numbered from 0: position 511 of --positions 384:512 read 127), and say where they
    start; the page and the cosine picture say A..B-1 too."""
    a, b = 5, 20
    out = tmp_path / "v"
    assert main(["vocab", "--model", tiny_bert_dir, "--positions", f"{a}:{b}", "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    pos, ids = mats["pos"][a:b], mats["ids"]
    cross = _unit(mats["word"][ids]) @ _unit(pos).T
    tp = rep["token_position"]
    assert tp["first_position"] == a and len(tp["outside"]["per_position"]) == b - a
    i, j = np.unravel_index(np.argmax(cross), cross.shape)
    assert tp["top_pairs"][0][:3] == [int(ids[i]), mats["tokens"][ids[i]], a + int(j)]
    assert all(a <= r[2] < b for r in tp["outside"]["pairs"] + tp["bottom_pairs"])
    cp = _unit(pos) @ _unit(pos).T
    np.fill_diagonal(cp, -np.inf)
    p, q = np.unravel_index(np.argmax(cp), cp.shape)
    positional = rep["positional"]
    assert positional["first_position"] == a and positional["first_position_id"] == 0
    assert positional["max"][:2] == [a + int(min(p, q)), a + int(max(p, q))]
    assert all(a <= r[0] < r[1] < b for r in positional["top_pairs"] + positional["bottom_pairs"])
    assert f"{b - a} positions, {a}..{b - 1} (position p is position id 0 + p" in (out / "report.html").read_text()


def test_a_zero_position_row_has_no_direction():
    """A zero position embedding is left out of every cosine of the position geometry (it had
    counted as cosine 0: offset_profile[0] 0.98 instead of 1, curves at 0.0), written null."""
    from embgeom.analysis.vocab import positions

    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 8))
    x[6] = 0
    g = positions.table_geometry(x)
    assert g["offset_profile"][0] == pytest.approx(1.0, abs=1e-15)
    keep = np.r_[0:6, 7:20]
    u = _unit(x[keep])
    c = u @ u.T
    assert g["cosine_mean"] == pytest.approx(c[~np.eye(19, dtype=bool)].mean(), abs=1e-12)
    curves = positions.cosine_curves(torch.from_numpy(x), rows=[1, 6], window=10)
    assert curves["raw"][0][6] is None and all(v is None for v in curves["raw"][1])
    assert curves["shifted"][0][5] is None and curves["shifted"][0][0] == pytest.approx(1.0)


def test_token_type(vocab_report, mats):
    _, rep = vocab_report
    tt = mats["tt"]
    t = rep["token_type"]
    assert np.allclose(t["cosine"], _unit(tt) @ _unit(tt).T, atol=1e-9)
    assert np.allclose(t["dot"], tt @ tt.T, atol=1e-9)
    d = np.linalg.norm(tt[:, None] - tt[None], axis=2)
    assert np.allclose(t["distance"], d, atol=1e-7)
    vs = _unit(tt) @ _unit(mats["word"][mats["ids"]]).T
    assert np.allclose([s["mean"] for s in t["vs_word"]], vs.mean(1), atol=1e-6)
    assert np.allclose([s["max"] for s in t["vs_word"]], vs.max(1), atol=1e-6)


def test_neighbors_match_numpy_and_engine(vocab_report, mats):
    _, rep = vocab_report
    ids = mats["ids"]
    nb = rep["neighbors"]
    ag = nb["agreement"]
    assert ag["agree"] and ag["rows_checked"] == min(AGREEMENT_ROWS, len(ids))
    c = _unit(mats["word"][ids]) @ _unit(mats["word"][ids]).T
    row = {int(v): r for r, v in enumerate(ids)}
    assert "king" in nb["probes"] and "paris" in nb["missing_probes"]
    for word, got in nb["probes"].items():
        r = row[mats["tokens"].index(word)]
        v = c[r].copy()
        v[r] = -np.inf
        want = _ranked(v, ids, nb["k"], True)
        assert [g[0] for g in got] == [i for i, _ in want]


def _saved_variant(tiny_bert_dir, tmp_path, change, dtype=torch.float32):
    """The tiny BERT with its weights changed by change(model) under no_grad, saved in `dtype`."""
    import shutil

    from transformers import BertModel

    path = tmp_path / "variant"
    shutil.copytree(tiny_bert_dir, path)
    model = BertModel.from_pretrained(tiny_bert_dir, attn_implementation="eager").to(dtype)
    with torch.no_grad():
        change(model)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def test_a_probe_word_on_a_zero_row_has_no_neighbours(tiny_bert_dir, mats, tmp_path):
    # FAISS pads a zero row's list with id -1, which ids[-1] had turned into the last analysed
    # token, k times
    king = mats["tokens"].index("king")
    path = _saved_variant(tiny_bert_dir, tmp_path, lambda m: m.embeddings.word_embeddings.weight[king].zero_())
    rep = run(path, str(tmp_path / "out"))
    assert rep["neighbors"]["probes"]["king"] == []
    queen = rep["neighbors"]["probes"]["queen"]
    assert len(queen) == rep["neighbors"]["k"] and all(t != "king" for _, t, _ in queen)


def test_a_float64_model_keeps_its_digits(tiny_bert_dir, mats, tmp_path):
    # the embedding matrices had been rounded to float32 first: two token-type rows 6e-11 apart
    # were at distance 0.0
    gen = torch.Generator().manual_seed(4)

    def close_token_types(m):
        t = m.embeddings.token_type_embeddings.weight
        t[1] = t[0] + 1e-12 * torch.randn(t.shape[1], generator=gen, dtype=torch.float64)

    path = _saved_variant(tiny_bert_dir, tmp_path, close_token_types, torch.float64)
    rep = run(path, str(tmp_path / "out"))
    from safetensors.torch import load_file

    tt = load_file(f"{path}/model.safetensors")["embeddings.token_type_embeddings.weight"].numpy()
    want = float(np.linalg.norm(tt[0] - tt[1]))
    assert 1e-12 < want < 1e-10
    assert rep["token_type"]["distance"][0][1] == pytest.approx(want, rel=1e-6)


def test_all_tokens_keeps_specials(tiny_bert_dir, tmp_path):
    rep = run(tiny_bert_dir, str(tmp_path), all_tokens=True)
    assert rep["tokens"]["excluded"] == 0 and rep["tokens_analysed"] == rep["vocab_size"]
    # [PAD]'s embedding is initialised to zero: excluded from the pairs, and said so
    assert rep["pairs"]["excluded_rows"] == [0]
    n = rep["vocab_size"] - 1
    assert rep["pairs"]["count"] == n * (n - 1) // 2


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["vocab", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err


def _geometry(x):
    """Off-diagonal cosine mean / min / max, mean cosine per offset, PCA components for 90%."""
    u = _unit(x)
    cos = u @ u.T
    off = cos[~np.eye(len(x), dtype=bool)]
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    share = np.cumsum(s) / s.sum()
    return {"cosine_mean": off.mean(), "cosine_min": off.min(), "cosine_max": off.max(),
            "offset_profile": [np.diagonal(cos, k).mean() for k in range(len(x))],
            "components_for_90pct": int(np.argmax(share >= 0.9 - 1e-12)) + 1}


def test_sinusoidal_positions(vocab_report, mats):
    """The thesis' figure 6: Vaswani et al.'s fixed encodings (and the thesis' formula read
    literally) for positions 0..127 at width 512, by an element-wise loop; the same geometry of
    the learned table and of the sinusoidal one at its positions and width."""
    from embgeom.analysis.vocab.positions import sinusoidal

    def by_loop(P, d, printed=False):
        x = np.zeros((P, d))
        for p in range(P):
            for k in range(d):
                e = 2 * k if printed else (k if k % 2 == 0 else k - 1)
                x[p, k] = (np.sin if k % 2 == 0 else np.cos)(p / 10000 ** (e / d))
        return x

    np.testing.assert_allclose(sinusoidal(range(128), 512), by_loop(128, 512), atol=1e-12, rtol=0)
    np.testing.assert_allclose(sinusoidal(range(5, 9), 6, "printed"), by_loop(9, 6, True)[5:], atol=1e-12)
    out, rep = vocab_report
    sn = rep["position_geometry"]["sinusoidal"]
    assert sn["figure6"]["positions"] == [0, 128] and sn["figure6"]["width"] == 512
    for formula in ("vaswani", "printed"):
        got, want = sn["figure6"][formula], _geometry(by_loop(128, 512, formula == "printed"))
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, atol=1e-9, err_msg=f"{formula}.{k}")
    v = sn["figure6"]["vaswani"]
    assert v["norm_min"] == pytest.approx(16.0) and v["norm_max"] == pytest.approx(16.0)  # sqrt(512 / 2)
    P, D = mats["pos"].shape
    assert sn["matched"]["range"] == [0, P] and sn["matched"]["width"] == D
    for name, x in (("matched", by_loop(P, D)), ("learned", mats["pos"])):
        for k, val in _geometry(x).items():
            np.testing.assert_allclose(sn[name][k], val, atol=1e-9, err_msg=f"{name}.{k}")
    assert {"positions_sinusoidal.png", "positions_sinusoidal_vs_learned.png"} <= {p.name for p in out.glob("*.png")}
    with pytest.raises(ValueError, match="formula"):
        sinusoidal(range(3), 4, "other")


def test_probe_words_are_the_tokens_of_words_after_a_space():
    """'▁dog' (sentencepiece) and 'Ġdog' (byte-level BPE) are the word dog in a text; bare 'man'
    is the piece of 'wo' + 'man' there. Probes had looked for the bare strings only: none found
    on XLM-R, the word-internal piece on ALBERT."""
    from embgeom.analysis.vocab.sections import section_neighbors

    tokens = ["<pad>", "▁dog", "dog", "man", "▁man", "Ġcat", "cat", "king", "x", "y"]
    g = torch.Generator().manual_seed(0)
    words = torch.randn(len(tokens), 8, generator=g)
    ids = torch.arange(len(tokens))
    res = embgeom.pairwise_stats(words, row_topk=3, bins=0, topk=0, bottomk=0)
    out = section_neighbors(words, ids, tokens, res.row_topk, k=3)
    assert out["probe_tokens"] == {"man": "▁man", "king": "king", "dog": "▁dog", "cat": "Ġcat"}
    want = embgeom.knn(words, 3, queries=torch.tensor([4, 7, 1, 5]))
    for w, row in zip(("man", "king", "dog", "cat"), want.indices.tolist()):
        assert [i for i, _, _ in out["probes"][w]] == row
    assert "man" not in out["missing_probes"] and "queen" in out["missing_probes"]


def test_fast_precision_is_the_word_pairs_alone_and_the_page_gives_its_bound(vocab_report, tiny_bert_dir, tmp_path):
    """--precision fast takes bf16 products for the word pairs only (where the CPU has them): the
    position, token x position and token-type sections are exact mode's to the bit, and the
    page says how far the word pairs' mean and std may be from exact mode's (they had been
    shown to 4 digits with no word that they came from bf16 products)."""
    from embgeom.report.vocab_page import write_page

    exact_dir, exact = vocab_report
    out = tmp_path / "fast"
    assert main(["vocab", "--model", tiny_bert_dir, "--out", str(out), "--precision", "fast", "--quiet"]) == 0
    fast = json.loads((out / "report.json").read_text())
    for key in ("positional", "token_position", "token_type"):
        fast[key].pop("seconds", None)
        assert fast[key] == {k: v for k, v in exact[key].items() if k != "seconds"}, key
    page = (out / "report.html").read_text()
    bound = fast["pairs"].get("error_bound")
    assert ("fast products" in page) == bool(bound)
    # the note itself, whatever this CPU's fast product is
    rep = json.loads(json.dumps(exact))
    rep["pairs"]["error_bound"] = 0.004213
    (tmp_path / "page").mkdir()
    html_path = write_page(str(tmp_path / "page"), rep, {p.stem: str(p) for p in exact_dir.glob("*.png")})
    text = open(html_path).read()
    assert "fast products" in text and "within 0.0042 of its exact fp32 value" in text
