"""Context similarity beyond the argmax (issue 23, item 6): `embgeom text --similar` and the S
maps of `--head-maps`, against a float64 hand computation of O = A V per head from
transformers' own attentions and hidden states, one text at a time without padding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embgeom.analysis.heads.similarity import parse_similar
from embgeom.cli import main

TEXTS = ["the cat sat . the cat ran .", "a dog ! a dog was big .", "she was in the house ? he was not .",
         "red , green and blue . red again", "one two three two one", "big\tsmall house"]
ENDS = {".", "!", "?"}


def run(tiny_bert_dir, tmp, *flags):
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--batch-size", "4",
                 "--no-progress", *flags]) == 0
    return out, json.loads((out / "report.json").read_text())


def head_outputs(model, tokenizer, text):
    """(tokens, ids, O (L, H, n, d) float64) of one text."""
    a, b = (text.split("\t") + [None])[:2]
    enc = tokenizer(a, b, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_attentions=True, output_hidden_states=True)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    d = model.config.hidden_size // H
    O = []
    for l in range(L):
        x = out.hidden_states[l][0].double().numpy()
        lin = model.encoder.layer[l].attention.self.value
        v = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        O.append([out.attentions[l][0, h].double().numpy() @ v[:, h * d:(h + 1) * d] for h in range(H)])
    ids = enc["input_ids"][0].tolist()
    return tokenizer.convert_ids_to_tokens(ids), ids, np.array(O)


def by_hand(model, tokenizer, rule):
    kind, value = rule
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    c = {k: np.zeros((L, H)) for k in ("pairs", "dist", "same", "sep", "period", "rep")}
    for t in TEXTS:
        toks, ids, O = head_outputs(model, tokenizer, t)
        n = len(toks)
        sid, cur = [], 0
        for tok in toks:
            sid.append(cur)
            cur += tok in ENDS or tok == "[SEP]"
        for l in range(L):
            for h in range(H):
                o = O[l, h]
                S = o @ o.T
                pairs = []
                for i in range(n):
                    if kind == "tau":
                        pairs += [(i, j) for j in range(n) if j != i and
                                  S[i, j] / np.sqrt(S[i, i] * S[j, j]) >= value]
                    else:
                        order = sorted((j for j in range(n) if j != i), key=lambda j: (-S[i, j], j))
                        pairs += [(i, j) for j in order[:value]]
                for i, j in pairs:
                    c["pairs"][l, h] += 1
                    c["dist"][l, h] += abs(i - j)
                    c["same"][l, h] += sid[i] == sid[j]
                    c["sep"][l, h] += toks[j] == "[SEP]"
                    c["period"][l, h] += toks[j] in (".", "[SEP]")
                    c["rep"][l, h] += ids[i] == ids[j]
    return c


@pytest.mark.parametrize("rule", ["topk:2", "tau:0.2"])
def test_similar_pairs_against_float64(tiny_bert, tiny_bert_dir, tmp_path, rule):
    model, tokenizer = tiny_bert
    _, rep = run(tiny_bert_dir, tmp_path, "--similar", rule)
    sim = rep["context_similarity"]["similar"]
    c = by_hand(model, tokenizer, parse_similar(rule))
    assert sim["rule"] == rule
    np.testing.assert_array_equal(np.array(sim["pairs"]), c["pairs"])
    assert c["pairs"].min() > 0
    for key, k in (("mean_distance", "dist"), ("same_sentence_share", "same"), ("separator_share", "sep"),
                   ("period_separator_share", "period"), ("repeated_token_share", "rep")):
        np.testing.assert_allclose(np.array(sim[key], dtype=float), c[k] / c["pairs"], rtol=0, atol=1e-12,
                                   err_msg=key)
    assert np.array(sim["distance_hist"]).sum() == c["pairs"].sum()
    assert np.array(sim["layer_distance_hist"]).sum(1).tolist() == c["pairs"].sum(1).tolist()


def test_argmax_repeated_share_and_maps(tiny_bert, tiny_bert_dir, tmp_path):
    model, tokenizer = tiny_bert
    out, rep = run(tiny_bert_dir, tmp_path, "--head-maps", "2")
    cs = rep["context_similarity"]
    c = by_hand(model, tokenizer, ("topk", 1))          # the argmax is topk:1
    np.testing.assert_allclose(np.array(cs["repeated_token_share"], dtype=float), c["rep"] / c["pairs"],
                               atol=1e-12)
    assert "similar" not in cs
    assert cs["maps"]["texts"] == 2
    data = np.load(out / "context_maps.npz")
    for k in range(2):
        toks, _, O = head_outputs(model, tokenizer, TEXTS[k])
        assert data[f"text{k}_tokens"].tolist() == toks == cs["maps"]["tokens"][k]
        S = np.einsum("lhid,lhjd->lhij", O, O)
        np.testing.assert_allclose(data[f"text{k}_S"], S, rtol=1e-4, atol=1e-4 * np.abs(S).max())
        assert (out / f"context_maps_{k}.png").exists()
    assert "context_maps_0.png" in (out / "report.html").read_text()


@pytest.mark.parametrize("bad", ["tau", "tau:2", "topk:0", "topk:x", "k:3", "tau:nan"])
def test_bad_similar(tiny_bert_dir, tmp_path, capsys, bad):
    with pytest.raises(ValueError, match="--similar"):
        parse_similar(bad)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a b\n", encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir,
                 "--similar", bad, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--similar" in err[0]
    assert not (tmp_path / "o").exists()


def _argmax64(o, mask):
    """Float64 brute force: per (b, h) and real row i of a text with >= 2 real tokens, the real
    j != i with the largest o_i . o_j, ties to the smaller j; None elsewhere."""
    B, H, T, _ = o.shape
    s = o.double() @ o.double().transpose(-1, -2)
    out = {}
    for b in range(B):
        real = torch.nonzero(mask[b]).flatten().tolist()
        if len(real) < 2:
            continue
        for h in range(H):
            for i in real:
                best = max((j for j in real if j != i), key=lambda j: (float(s[b, h, i, j]), -j))
                out[b, h, i] = best
    return out


def _context_case():
    g = torch.Generator().manual_seed(7)
    B, H, T, d = 3, 5, 9, 4
    o = torch.randn(B, H, T, d, generator=g)
    o[0, :, 3] = o[0, :, 1]  # equal scores: ties go to the smaller position
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 1:] = False  # a one-token text: no rows
    sep = torch.zeros(B, T, dtype=torch.bool)
    sep[:, 5] = True
    ids = torch.randint(0, 11, (B, T), generator=g)
    return o, mask, sep, ids


def test_context_similarity_in_chunks_of_heads_equals_one_block(monkeypatch):
    """torch's path computes the scores S a few (T, T) blocks at a time (cache-sized): chunks
    that do not divide B x H, padding, ties (duplicate head outputs) and a one-token text give
    the same argmax as one block over every head, and the float64 argmax."""
    from embgeom.analysis.text import attention

    o, mask, sep, ids = _context_case()
    B, H, T, _ = o.shape
    whole = attention.context_argmax_torch(o, mask)
    want = _argmax64(o, mask)
    assert all(int(whole[b, h, i]) == j for (b, h, i), j in want.items())
    for blocks in (1, 2, 4):  # 15 (b, h) blocks: chunks of 1, 2 (ragged) and 4 (ragged)
        monkeypatch.setattr(attention, "CONTEXT_CHUNK_BYTES", blocks * T * T * 4)
        assert torch.equal(attention.context_argmax_torch(o, mask, workspace={}), whole)


@pytest.mark.parametrize("with_sentences", [True, False])
def test_context_summaries_kernel_equals_torch(with_sentences, monkeypatch):
    """context_similarity's sums from the C++ core's context_summaries equal torch's (integers,
    exactly): padding, a one-token text (no rows, focus 0), ties in the hits (the smaller
    position), repeated ids, sentences and stop tokens or none."""
    from embgeom.analysis.text import attention

    if attention.registry.cpp_kernel("context_summaries") is None:
        pytest.skip("the C++ core is not built")
    o, mask, sep, ids = _context_case()
    B, H, T, _ = o.shape
    g = torch.Generator().manual_seed(5)
    period = (torch.rand(B, T, generator=g) < 0.2) & mask if with_sentences else None
    sentence = attention.sentence_index(period | sep) if with_sentences else None
    got = attention.context_similarity(o, mask, sep, ids, 11, sentence=sentence, period=period)
    core = attention.registry.cpp()
    monkeypatch.setattr(attention.registry, "cpp_kernel",  # torch's sums, the same argmax
                        lambda name, *t: None if name == "context_summaries" else getattr(core, name, None))
    want = attention.context_similarity(o, mask, sep, ids, 11, sentence=sentence, period=period)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _near_tie_case(T, d):
    """Head outputs (4, 3, T, d) and a mask: text 1 padded, text 2 one token; from T = 9 exact
    ties (rows 2 and 7 of text 0) and near-ties below float32's resolution (text 3: o_5 = o_4,
    o_0 = o_4 (1 + 1e-7) in float64 terms)."""
    g = torch.Generator().manual_seed(T * 100 + d)
    B, H = 4, 3
    o = torch.randn(B, H, T, d, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T // 2 + 1:] = False
    mask[2, 1:] = False
    if T >= 9:
        o[0, :, 7] = o[0, :, 2]
        base = o[3, :, 4].double()
        for h in range(H):
            o[3, h, 5] = o[3, h, 4]
            o[3, h, 0] = (base[h] * 1.0000001).float()
    return o, mask


@pytest.mark.parametrize("T,d", [(1, 4), (2, 3), (9, 4), (37, 64), (130, 32)])
def test_context_argmax_kernel_is_the_float64_argmax(T, d, cpu_cap):
    """The C++ kernel (CPU float32, every vector level) against float64 brute force: padding, a
    one-token text, duplicate rows (exact ties: the smaller position), and near-ties closer than
    float32 can tell apart (keys differing by 1e-9 relative), where only the float64 rescoring
    decides. Strided head outputs, as the hooks hand them over."""
    from embgeom.analysis.text import attention

    _C = pytest.importorskip("embgeom._C")
    want_path = {"avx512": "avx512", "avx2": "avx2"}.get(cpu_cap, "portable")
    assert _C.cpu_info()["context_argmax"].startswith(want_path)

    o, mask = _near_tie_case(T, d)
    got = attention.context_argmax(o, mask)
    want = _argmax64(o, mask)
    strided = o.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, d) memory, as the hooks'
    assert torch.equal(attention.context_argmax(strided, mask), got)
    bad = [(k, int(got[k]), j) for k, j in want.items() if int(got[k]) != j]
    assert not bad, bad[:5]
    if T >= 9:  # the padded / one-token rows point at themselves
        assert int(got[2, 0, 0]) == 0


@pytest.mark.parametrize("T", [5, 20])
def test_context_argmax_kernel_leaves_nan_rows_out(T, cpu_cap):
    """A token whose head output holds NaN is nobody's answer and gets none (it points at
    itself), on every vector level alike and on torch's path: the other rows take the float64
    argmax over the rest.
    Before, a NaN key in the first column became the portable path's maximum and took every
    row's answer away."""
    from embgeom.analysis.text import attention

    pytest.importorskip("embgeom._C")
    o = torch.randn(1, 2, T, 4, generator=torch.Generator().manual_seed(T))
    o[0, :, 0, 1] = float("nan")
    mask = torch.ones(1, T, dtype=torch.bool)
    keep = list(range(1, T))
    want = _argmax64(o[:, :, keep], mask[:, keep])
    for got in (attention.context_argmax(o, mask), attention.context_argmax_torch(o, mask)):
        for (b, h, i), j in want.items():
            assert int(got[b, h, keep[i]]) == keep[j], (h, keep[i])
        assert got[0, :, 0].tolist() == [0, 0]


@pytest.mark.parametrize("rows,want", [
    # a product past float32's range (-1e40 > -3e40): every float32 score -inf had left no answer
    ([[1e20], [-1e20], [-3e20]], [1, 2, 1]),
    # finite scores near -FLT_MAX: the bound had fallen to -inf and taken the row's own key
    ([[1.8446743e19], [-1.8446743e19]] + [[-1.8446743e19]] * 3, [1, 2, 1, 1, 1]),
    # products that underflow: the bound lacked the subnormal spacing (o0 . o2 > o0 . o1)
    ([[1e-22, 0.0], [-8.5629e-23, 0.0], [-8.3327e-23, 0.0]], [2, 2, 1]),
    # an inf key: the rows fall back to float64 products (not the row itself, nothing past T);
    # the inf row's products are all -inf: ties, the smaller position
    ([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0], [3.0, 3.0], [float("-inf"), 1.0]], [3, 3, 3, 1, 0]),
])
def test_context_argmax_kernel_outside_float32_range(rows, want, cpu_cap):
    """Scores that overflow or underflow float32, or rows holding inf: the float64 argmax on
    every vector level (reported by a fuzzing run: self answers, and on the AVX2 and portable
    paths indices read from past the scores, 9205357640488583168)."""
    from embgeom.analysis.text import attention

    pytest.importorskip("embgeom._C")
    o = torch.tensor(rows, dtype=torch.float32)[None, None]
    got = attention.context_argmax(o, torch.ones(1, o.shape[2], dtype=torch.bool))
    assert got[0, 0].tolist() == want


@pytest.mark.parametrize("T,d", [(2, 3), (9, 4), (37, 64), (130, 32)])
def test_context_argmax_torch_is_the_float64_argmax(T, d):
    """torch's path (GPUs, or no C++ core) rescores the keys near each row's float32 maximum in
    float64, as the kernel does: exact ties to the smaller position, near-ties closer than float32
    can tell apart decided by float64 (a differential run had found 19 of 1,524 rows where the
    float32 argmax took the smaller position), padding and one-token texts."""
    from embgeom.analysis.text import attention

    o, mask = _near_tie_case(T, d)
    got = attention.context_argmax_torch(o, mask)
    bad = [(k, int(got[k]), j) for k, j in _argmax64(o, mask).items() if int(got[k]) != j]
    assert not bad, bad[:5]


@pytest.mark.parametrize("rows,want", [
    ([[1e20], [-1e20], [-3e20]], [1, 2, 1]),
    ([[1.8446743e19], [-1.8446743e19]] + [[-1.8446743e19]] * 3, [1, 2, 1, 1, 1]),
    ([[1e-22, 0.0], [-8.5629e-23, 0.0], [-8.3327e-23, 0.0]], [2, 2, 1]),
    ([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0], [3.0, 3.0], [float("-inf"), 1.0]], [3, 3, 3, 1, 0]),
    ([[1e16], [-1e16], [-1e16]], [1, 2, 1]),  # scores below -1e30 (once the padding's offset)
])
def test_context_argmax_torch_outside_float32_range(rows, want):
    """The torch path on the kernel's out-of-range cases, and scores below -1e30, where the
    padded keys' offset (gone since) had made a padded key the answer: the float64 argmax."""
    from embgeom.analysis.text import attention

    o = torch.tensor(rows, dtype=torch.float32)[None, None]
    T = o.shape[2]
    o = torch.cat([o, torch.ones(1, 1, 1, o.shape[3])], 2)        # one padded key
    mask = torch.ones(1, T + 1, dtype=torch.bool)
    mask[0, T] = False
    assert attention.context_argmax_torch(o, mask)[0, 0, :T].tolist() == want


def test_context_argmax_torch_equals_the_kernel_on_odd_rows():
    """torch's path against the C++ kernel where a review found it apart: a padded row holding
    NaN (its NaN maximum had given every row index T, out of range), a two-token text with a NaN
    row, a padded row of norm 1e31 (it had outscored the padding's -1e30 offset), and two tokens
    whose product is -1e32 (below that offset: the padded key had been the answer)."""
    from embgeom.analysis.text import attention

    pytest.importorskip("embgeom._C")
    g = torch.Generator().manual_seed(0)
    cases = []
    o = torch.randn(1, 1, 4, 3, generator=g)
    o[0, 0, 3] = float("nan")
    cases.append((o, torch.tensor([[True, True, True, False]])))
    o = torch.randn(1, 1, 2, 3, generator=g)
    o[0, 0, 0, 0] = float("nan")
    cases.append((o, torch.ones(1, 2, dtype=torch.bool)))
    o = torch.randn(1, 1, 3, 3, generator=g)
    o[0, 0, 2] = o[0, 0, 0] * 1e31 / o[0, 0, 0].norm()
    cases.append((o, torch.tensor([[True, True, False]])))
    o = torch.zeros(1, 1, 3, 2)
    o[0, 0, 0, 0], o[0, 0, 1, 0] = 1e16, -1e16
    cases.append((o, torch.tensor([[True, True, False]])))
    for o, mask in cases:
        got = attention.context_argmax_torch(o, mask)
        want = attention.context_argmax(o, mask)                 # the C++ kernel on CPU float32
        assert got.tolist() == want.tolist(), (o, mask)
        assert int(got.min()) >= 0 and int(got.max()) < o.shape[2]


def test_context_argmax_kernel_of_empty_batches():
    """No texts, heads or tokens: an empty answer (numpy's zero strides had been refused as
    rows that are not contiguous)."""
    from embgeom.analysis.text import attention

    pytest.importorskip("embgeom._C")
    for shape in ((0, 2, 3, 4), (2, 0, 3, 4), (2, 3, 0, 4)):
        o = torch.zeros(shape)
        got = attention.context_argmax(o, torch.ones(shape[0], shape[2], dtype=torch.bool))
        assert got.shape == shape[:3]


def test_tau_at_one_and_minus_one_takes_parallel_and_opposite_rows():
    """Identical (and exactly scaled) rows have cos exactly 1 and opposite rows -1: the dot product
    of the unit rows had given 1 - 1.1e-16 and -1 - 4.4e-16, so tau:1 dropped identical pairs and
    tau:-1 opposite ones (in about a quarter of random draws)."""
    from embgeom.analysis.heads.similarity import select_pairs

    g = torch.Generator().manual_seed(5)
    missed = 0
    for _ in range(100):
        a = torch.randn(7, generator=g, dtype=torch.float64).float()
        o = torch.stack([a, a, 4 * a, -a / 2, torch.randn(7, generator=g), torch.zeros(7)])[None, None]
        mask = torch.ones(1, 6, dtype=torch.bool)
        at_one = select_pairs(o, mask, ("tau", 1.0))[0, 0]
        want = torch.zeros(6, 6, dtype=torch.bool)
        want[:3, :3] = True
        want.fill_diagonal_(False)
        missed += int(not torch.equal(at_one, want))
        every = select_pairs(o, mask, ("tau", -1.0))[0, 0]        # every pair of nonzero rows
        want = torch.ones(6, 6, dtype=torch.bool)
        want[5, :] = want[:, 5] = False
        want.fill_diagonal_(False)
        missed += int(not torch.equal(every, want))
        assert torch.equal(at_one, at_one.T)
    assert missed == 0
