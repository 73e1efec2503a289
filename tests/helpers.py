"""Inputs and tolerance-aware comparisons against the float64 reference.

A kernel computes values in fp32; the reference in fp64 from the same inputs. Each pair gets its
own allowance (`pair_tolerance`: fp32 rounding of a d-term dot product of rows of those norms,
docs/metrics.md "tolerances"). A value within its allowance of a bin edge or threshold may land
on either side, and near-ties may swap places in a ranked list. The checks therefore require:
counts between what is certainly in and what is possibly in; every reference pair clearly inside
a list present; nothing clearly outside it present. Exact ties (small-integer vectors, where
fp32 is exact) are compared exactly.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from embgeom import reference


def without_keys(value, keys):
    """A JSON value with the dict entries named in `keys` removed at every depth (the facts of
    one run, such as timings and the command line, when two runs' reports are compared)."""
    if isinstance(value, dict):
        return {k: without_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [without_keys(v, keys) for v in value]
    return value


def make_embeddings(n, d, *, dtype=torch.float32, zero_rows=0, duplicate_rows=0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    # a shared direction makes cosines spread like real embeddings (anisotropy)
    x += 0.5 * torch.randn(1, d, generator=g, dtype=torch.float64)
    for r in range(min(zero_rows, n)):
        x[(r * 7 + 1) % n] = 0
    for r in range(min(duplicate_rows, n - 1)):
        x[n - 1 - r] = x[r]
    return x.to(dtype).to(device)


def make_sequences(B, T, D, seed=0):
    """(B, T, D) embeddings and a (B, T) mask with padding (sequence 1), an all-pad sequence
    (sequence 2) and a zero row inside the mask (sequence 0, position 1)."""
    x = make_embeddings(B * T, D, seed=seed).reshape(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, T // 2:] = False
    if B > 2:
        mask[2] = False
    x[0, min(1, T - 1)] = 0
    return x, mask


def make_attention(B, H, T, mask, seed=0, scale=3.0):
    """(B, H, T, T) float64 attention probabilities over the real keys of `mask`; rows of an
    all-pad sequence are zero."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, H, T, T, generator=g, dtype=torch.float64)
    logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
    return torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)


def small_int_embeddings(n, d, seed=0, low=-2, high=3):
    """Dot products of these are exact in fp32: ties are real ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, d), generator=g).float()


def pair_tolerance(x, y=None, metric: str = "cosine") -> torch.Tensor:
    """(N, M) float64 allowance |fp32 value - float64 value| per pair: 4e-7 (d + 8) |a||b| + 1e-6
    for dot products (|a||b| = 1 for cosine), and for euclidean the square root of that with
    |a|^2 + |b|^2 in place of |a||b| (|sqrt(s) - sqrt(t)| <= sqrt(|s - t|))."""
    x = torch.as_tensor(x).detach().double().cpu()
    y = x if y is None else torch.as_tensor(y).detach().double().cpu()
    d = x.shape[1]
    nx, ny = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1)
    if metric == "cosine":
        scale = torch.ones(x.shape[0], y.shape[0], dtype=torch.float64)
    elif metric == "dot":
        scale = nx[:, None] * ny[None, :]
    else:
        scale = nx[:, None] ** 2 + ny[None, :] ** 2
    t = 4e-7 * (d + 8) * scale + 1e-6
    return t.sqrt() if metric == "euclidean" else t


def _key(kind, v, near=None):
    if kind == "top":
        return -v
    if kind == "bottom":
        return v
    if kind == "near":
        return abs(v - near)
    raise ValueError(kind)


def check_pair_list(got, values, mask, kind, k, tol, near=None, exact_ties=False):
    """got: PairList; values/mask: reference (N, M) fp64 values and counted-pair mask;
    tol: (N, M) per-pair allowances (pair_tolerance)."""
    idx = mask.nonzero()
    ref_vals = values[idx[:, 0], idx[:, 1]]
    keys = _key(kind, ref_vals, near)
    order = sorted(range(len(keys)), key=lambda t: (float(keys[t]), int(idx[t, 0]), int(idx[t, 1])))
    want = [(int(idx[t, 0]), int(idx[t, 1])) for t in order[:k]]
    got_pairs = list(zip(got.i.tolist(), got.j.tolist()))
    assert len(got_pairs) == len(want), f"{kind}: got {len(got_pairs)} pairs, want {len(want)}"
    if exact_ties:
        assert got_pairs == want, f"{kind}: got {got_pairs}, want {want}"
    if not want:
        return
    last = order[len(want) - 1]
    kth = float(keys[last])
    kth_tol = float(tol[idx[last, 0], idx[last, 1]])
    got_keys, got_tols = [], []
    for (i, j), v in zip(got_pairs, got.values.tolist()):
        t = float(tol[i, j])
        assert bool(mask[i, j]), f"{kind}: ({i}, {j}) is not a counted pair"
        assert abs(v - float(values[i, j])) <= t, f"{kind}: value of ({i},{j}) {v} vs {float(values[i, j])}"
        got_keys.append(float(_key(kind, float(values[i, j]), near)))
        got_tols.append(t)
        assert got_keys[-1] <= kth + t + kth_tol, f"{kind}: ({i},{j}) should not be in the list"
    for a, b, ta, tb in zip(got_keys, got_keys[1:], got_tols, got_tols[1:]):
        assert a <= b + ta + tb, f"{kind}: not in order"
    got_set = set(got_pairs)
    for t in order[:len(want)]:
        i, j = int(idx[t, 0]), int(idx[t, 1])
        if float(keys[t]) < kth - float(tol[i, j]) - kth_tol:
            assert (i, j) in got_set, f"{kind}: missing {(i, j)} (value {float(ref_vals[t])})"


def check_row_lists(got, values, mask, self_mode, k, largest, tol, exact_ties=False):
    """got: RowTopK; per row i, the k best columns j (self excluded), ties by column;
    tol: (N, M) per-pair allowances."""
    full = (mask | mask.T) if self_mode else mask
    if self_mode:
        tol = torch.maximum(tol, tol.T)
    n = values.shape[0]
    for i in range(n):
        cols = full[i].nonzero().flatten().tolist()
        order = sorted(cols, key=lambda j: ((-values[i, j]) if largest else values[i, j], j))[:k]
        got_idx = [j for j in got.indices[i].tolist()]
        got_val = got.values[i].tolist()
        want_len = len(order)
        assert all(j >= 0 for j in got_idx[:want_len]), f"row {i}: padding too early {got_idx}"
        assert all(j == -1 for j in got_idx[want_len:]), f"row {i}: expected -1 padding {got_idx}"
        assert all(math.isnan(v) for v in got_val[want_len:]), f"row {i}: expected NaN padding"
        if exact_ties:
            assert got_idx[:want_len] == order, f"row {i}: got {got_idx}, want {order}"
        if not order:
            continue
        kth = float(values[i, order[-1]])
        kth_tol = float(tol[i, order[-1]])
        for j, v in zip(got_idx[:want_len], got_val[:want_len]):
            t = float(tol[i, j])
            assert bool(full[i, j]), f"row {i}: column {j} not a valid neighbour"
            assert abs(v - float(values[i, j])) <= t
            assert (v >= kth - t - kth_tol) if largest else (v <= kth + t + kth_tol), f"row {i}: {j} should not be listed"
        got_set = set(got_idx[:want_len])
        for j in order:
            t = float(tol[i, j]) + kth_tol
            clearly = float(values[i, j]) > kth + t if largest else float(values[i, j]) < kth - t
            if clearly:
                assert j in got_set, f"row {i}: missing neighbour {j}"


def check_histogram(got, ref_values, lo, hi, bins, tol):
    """Each bin count must lie between the number of values safely inside it and the number
    possibly inside it (within its allowance tol of an edge: one per value, or a scalar);
    under/overflow likewise; totals exact."""
    v = np.asarray(ref_values, dtype=np.float64)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), v.shape)
    w = (hi - lo) / bins
    counts = np.asarray(got.counts.cpu())
    assert counts.sum() + got.underflow + got.overflow == v.size
    lo_bin = np.floor((v - tol - lo) / w).astype(np.int64)
    hi_bin = np.floor((v + tol - lo) / w).astype(np.int64)
    for name, count, safe, possible in (
        ("underflow", got.underflow, (v < lo - tol).sum(), (v < lo + tol).sum()),
        ("overflow", got.overflow, (v > hi + tol).sum(), (v > hi - tol).sum()),
    ):
        assert safe <= count <= possible, f"{name}: {count} not in [{safe}, {possible}]"
    inside = (v >= lo - tol) & (v <= hi + tol)
    lo_bin, hi_bin = np.clip(lo_bin, 0, bins - 1), np.clip(hi_bin, 0, bins - 1)
    certain = np.zeros(bins, np.int64)
    possible = np.zeros(bins, np.int64)
    sure = inside & (lo_bin == hi_bin) & (v >= lo + tol) & (v <= hi - tol)
    np.add.at(certain, lo_bin[sure], 1)
    for a, b in zip(lo_bin[inside], hi_bin[inside]):
        possible[a:b + 1] += 1
    bad = np.nonzero((counts < certain) | (counts > possible))[0]
    assert bad.size == 0, f"bins {bad[:5]}: got {counts[bad[:5]]}, certain {certain[bad[:5]]}, possible {possible[bad[:5]]}"


def check_stats(got, x, y=None, *, exact_ties=False, **kw):
    """Compare every requested output of a PairwiseStats with embgeom.reference, each pair
    within its own allowance (pair_tolerance; fast mode adds the reported histogram error
    bound to the moments and the histogram, whose values come from the fast products)."""
    want = reference.pairwise_stats(x, y, **kw)
    values, mask = want["values"], want["mask"]
    tol = pair_tolerance(x, y, kw.get("metric", "cosine"))
    assert got.count == want["count"]
    assert got.mode == want["mode"]
    assert got.excluded_rows == want["excluded_rows"]
    fast_bound = got.error_bound if got.precision == "fast" else 0.0  # (with or without a histogram)
    sel = values[mask]
    sel_tol = tol[mask] + fast_bound
    if want["count"]:
        # |mean(a) - mean(b)| <= mean|a - b|; |std(a) - std(b)| <= rms(a - b)
        assert abs(got.mean - want["mean"]) <= float(sel_tol.mean()) + 1e-12
        assert abs(got.std - want["std"]) <= float(sel_tol.square().mean().sqrt()) + 1e-12
        for name in ("min", "max"):
            i, j, v = getattr(got, name)
            assert bool(mask[i, j])
            assert abs(v - float(values[i, j])) <= float(tol[i, j])
            assert abs(float(values[i, j]) - want[name][2]) <= float(tol[i, j]) + float(tol[want[name][0], want[name][1]])
            if exact_ties:
                assert [i, j] == want[name][:2]
    else:
        assert got.min is None and got.max is None
    if kw.get("bins", 2000):
        lo, hi = kw.get("range", (-1.0, 1.0))
        check_histogram(got.hist, sel.numpy(), lo, hi, kw.get("bins", 2000), sel_tol.numpy())
    for name, kind, k in (("top_pairs", "top", kw.get("topk", 10)), ("bottom_pairs", "bottom", kw.get("bottomk", 10))):
        if k:
            check_pair_list(getattr(got, name), values, mask, kind, k, tol, exact_ties=exact_ties)
    if kw.get("near") is not None and kw.get("near_k", 10):
        check_pair_list(got.near_pairs, values, mask, "near", kw.get("near_k", 10), tol, near=kw["near"],
                        exact_ties=exact_ties)
    for name, k, largest in (("row_topk", kw.get("row_topk", 0), True), ("row_bottomk", kw.get("row_bottomk", 0), False)):
        if k:
            check_row_lists(getattr(got, name), values, mask, y is None, k, largest, tol, exact_ties=exact_ties)
    if kw.get("outside") is not None:
        a, b = kw["outside"]
        # the cpp engine rescores pairs within the fast bound of a threshold (exact counts);
        # the GPU engines count from the fast products (docs/metrics.md, precision modes)
        slack = tol + (fast_bound if got.backend in ("triton", "cuda") else 0.0)
        sure = mask & ((values < a - slack) | (values > b + slack))
        maybe = mask & ((values < a + slack) | (values > b - slack))
        assert int(sure.sum()) <= got.outside.count <= int(maybe.sum())
        if exact_ties:
            assert got.outside.count == want["outside"]["count"]
            assert got.outside.row_counts.tolist() == want["outside"]["row_counts"].tolist()
            assert got.outside.pairs.to_list() == [[i, j, got_v] for (i, j, _), got_v in
                                                  zip(want["outside"]["pairs"], got.outside.pairs.values.tolist())]
        pairs = list(zip(got.outside.pairs.i.tolist(), got.outside.pairs.j.tolist()))
        assert pairs == sorted(pairs)
        assert len(pairs) == min(kw.get("outside_limit", 1000), got.outside.count)
        for i, j in pairs:
            assert bool(maybe[i, j])
    return want


def assert_engine_states_equal(a, b, *, float_rel=1e-12, skip=()):
    """Two EngineStates field by field: arrays exactly, floats to float_rel (sum order)."""
    from dataclasses import fields

    for f in fields(a):
        if f.name in skip:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, tuple) or isinstance(vb, tuple):
            assert (va is None) == (vb is None), f.name
            for p, q in zip(va, vb):
                np.testing.assert_array_equal(np.asarray(p), np.asarray(q), err_msg=f.name)
        elif isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=f.name)
        elif isinstance(va, float):
            same_nan = math.isnan(va) and math.isnan(vb)  # (shifted sums an engine did not keep)
            assert same_nan or math.isclose(va, vb, rel_tol=float_rel, abs_tol=float_rel), f.name
        else:
            assert va == vb, f.name


# ---------------------------------------------------------------------------------------------
# backends x devices: one parametrisation for every backend suite (tests/test_backends.py)
# ---------------------------------------------------------------------------------------------

def supported_cpu_caps() -> list[str]:
    """The vector levels of the C++ core this host supports (EMBGEOM_CPU values), lowest first."""
    try:
        from embgeom import _C

        best = _C.cpu_info()["isa_supported"]
    except Exception:  # noqa: BLE001 - no C++ core: its tests skip anyway
        return ["generic"]
    order = ["generic", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best in order else ["generic"]


CPU_CAPS = supported_cpu_caps()


def blas_products() -> bool:
    """The C++ engine's exact product comes from OpenBLAS at the current EMBGEOM_CPU."""
    from embgeom import _C

    return _C.cpu_info()["gemm_exact"].startswith("openblas")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_params(op: str, backends=("cpp", "torch", "triton", "cuda")):
    """pytest params (backend, device) for `op`: every pair that can run on this host runs, the
    others are listed as skipped with the reason. Triton on CPU tensors runs only in the
    TRITON_INTERPRET=1 pass (`-m triton_interp`); `cpp` runs once per vector level the host
    supports (a `cpu_cap` mark: conftest sets EMBGEOM_CPU)."""
    from embgeom.backends import registry

    registry.ensure_registered()
    has_cuda = torch.cuda.is_available()
    out = []
    for device in ("cpu", "cuda"):
        for name in backends:
            marks, why = [], []
            if device == "cuda":
                if not has_cuda:
                    why.append("no usable CUDA device")
                elif _interpreting():
                    why.append("TRITON_INTERPRET=1 is set: GPU cases need compiled Triton")
            elif name == "triton":
                marks.append(pytest.mark.triton_interp)
                if not _interpreting():
                    why.append("triton on CPU tensors runs in the TRITON_INTERPRET=1 pass")
            elif name == "cuda":
                continue  # CUDA tensors only: no CPU case to list
            if not why:
                probe = torch.zeros(1, 1, device=device)
                why = registry.BACKENDS[name].reasons(op, probe)
            if why:
                marks.append(pytest.mark.skip(reason="; ".join(why)))
            if name == "cpp" and device == "cpu":
                out += [pytest.param(name, device, marks=[*marks, pytest.mark.cpu_cap(cap)], id=f"cpp[{cap}]-cpu")
                        for cap in CPU_CAPS]
                continue
            out.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return out


def scatter_page(path) -> dict:
    """The JSON block (<script id='data'>) of a scatter page of report/interactive.py: "figure"
    (the Plotly figure: data, layout), "t", "ids", "knn", ...; plus "rows": per input row
    (x, y, label name) read back from the figure's label traces (customdata = the row)."""
    import json
    import re

    text = open(path, encoding="utf-8").read()
    data = json.loads(re.search(r"id='data'>(.*?)</script>", text, re.S).group(1).replace("<\\/", "</"))
    rows = [None] * data["n"]
    for k, trace in enumerate(data["figure"]["data"][:data["match_trace"]]):
        for r, x, y in zip(trace["customdata"], trace["x"], trace["y"]):
            rows[r] = (x, y, data["labels"][k] if data["labels"] else trace["name"])
    data["rows"] = rows
    return data


def untitled_plotly_axes(folder):
    """(page, axis) of every axis of a Plotly figure in the folder's scatter pages without a
    title (and (page, "provenance") for a page without the provenance footer, (page, "figure
    title") for a figure without a title); the names of the scatter pages found."""
    bad, pages = [], []
    for page in sorted(folder.glob("*.html")):
        text = page.read_text(encoding="utf-8")
        if "id='data'>" not in text or "plotly.js" not in text:
            continue
        pages.append(page.name)
        if "<footer id='provenance'>" not in text:
            bad.append((page.name, "provenance"))
        layout = scatter_page(page)["figure"]["layout"]
        axes = [k for k in layout if k.startswith(("xaxis", "yaxis"))]
        assert {"xaxis", "yaxis"} <= set(axes), page
        bad += [(page.name, k) for k in axes if not ((layout[k].get("title") or {}).get("text") or "").strip()]
        if not (layout.get("title") or {}).get("text"):
            bad.append((page.name, "figure title"))
    return bad, pages


def save_pieces_bert(path, words, extra_tokens, *, seed: int, hidden: int, heads: int) -> str:
    """A tiny random 2-layer BERT saved at `path` whose vocabulary splits every alphabetic word
    longer than 4 letters into 2 pieces (vocabulary: the specials, extra_tokens, then the pieces);
    model_max_length 64."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_tokens]
    for w in words:
        if w.isalpha():
            vocab += [w[:3], "##" + w[3:]] if len(w) > 4 else [w]
    vocab = list(dict.fromkeys(vocab))
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.model_max_length = 64
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=64, attn_implementation="eager")
    BertModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def trained_tokenizer(kind: str, texts: list[str]):
    """A fast tokenizer trained on `texts`, [CLS] A [SEP] and [CLS] A [SEP] B [SEP] (token types 0
    and 1) around its pieces: byte-level BPE ("bpe": RoBERTa's, ModernBERT's; "Ġ" marks a word
    after a space) or a Metaspace unigram (sentencepiece's, XLM-R's, DeBERTa-v3's; "▁", sometimes
    a piece of its own before a word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    if kind == "bpe":
        tk = Tokenizer(models.BPE(unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tk = Tokenizer(models.Unigram())
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=special, unk_token="[UNK]")
    tk.train_from_iterator(texts, trainer)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
