"""cone_index and attention_entropy beyond the backend suite (tests/test_backends.py): stacked
hidden states, streaming, the C++ scalar path, the uniform baseline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import embgeom
from embgeom import reference

from helpers import CPU_CAPS, make_embeddings, make_sequences


def test_cone_index_tuple_of_hidden_states_and_stream():
    x, mask = make_sequences(3, 9, 8)
    states = (x, 2 * x + 1, -x)
    got = embgeom.cone_index(states, mask)
    assert got.index.shape == (3, 3)
    for layer, h in enumerate(states):
        torch.testing.assert_close(got.index[layer].double(), reference.cone_index(h, mask)["index"], atol=1e-9, rtol=1e-6, equal_nan=True)
    big = make_embeddings(5000, 12, zero_rows=3, seed=4)
    streamed = embgeom.cone_index_stream(big.split(777))
    whole = reference.cone_index(big)
    assert streamed.n.item() == whole["n"].item()
    assert streamed.index.item() == pytest.approx(whole["index"].item(), rel=1e-9)
    assert streamed.mean_cosine().item() == pytest.approx(
        embgeom.pairwise_stats(big, bins=0, topk=0, bottomk=0).mean, abs=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
def test_cone_index_of_empty_inputs(backend):
    """No sets, no tokens, no rows: index 0 over n = 0 (normalized undefined) on every backend,
    and an empty chunk adds nothing to a stream (the C++ core had refused it: 'the last
    dimension must be contiguous', from numpy's strides of an empty array). A stream in chunks
    is the whole set's index (the reference backend had added the chunks' indexes)."""
    for shape, sets in (((0, 5, 3), 0), ((2, 0, 3), 2), ((0, 3), 1)):
        got = embgeom.cone_index(torch.randn(*shape), backend=backend)
        assert got.index.shape == (sets,) and bool((got.index == 0).all()) and bool((got.n == 0).all())
    rows = make_embeddings(40, 8, seed=2)
    whole = embgeom.cone_index_stream([rows], backend=backend)
    split = embgeom.cone_index_stream([rows[:25], rows[:0], rows[25:]], backend=backend)
    assert split.n.item() == 40 and split.index.item() == pytest.approx(whole.index.item(), rel=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
def test_stream_of_hidden_states_leaves_padding_out(backend):
    """(B, T, D) chunks with a mask: the set of their real tokens, as cone_index over them."""
    h = make_embeddings(10, 8, seed=3).reshape(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    acc = embgeom.ConeAccumulator(backend)
    acc.update(h, mask)
    got, want = acc.result(), embgeom.cone_index(h[mask], backend=backend)
    assert got.n.item() == 8 and got.index.item() == pytest.approx(want.index.item(), rel=1e-12)
    with pytest.raises(ValueError, match="^chunks: no chunk"):
        embgeom.cone_index_stream([], backend=backend)
    with pytest.raises(ValueError, match=r"^ConeAccumulator.result: no chunk was added"):
        embgeom.ConeAccumulator(backend).result()


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
def test_cone_index_of_identical_rows_is_one(backend):
    """n identical rows: I/n within an ulp or two of 1 and never above it, on every route (one set,
    a stream, the text trace's per-text sums, the attention blocks' row cone). The rows' rounded
    unit vectors summed to 1 + 2^-51 and more in about half of these draws."""
    from embgeom.analysis.heads.matrices import block_measures
    from embgeom.analysis.text.trace import TraceAccumulator

    def one(v):
        return 1.0 - 1e-15 <= v <= 1.0

    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        x = (torch.randn(1, 384, generator=g) * 37.0).repeat(50, 1)
        got = embgeom.cone_index(x, backend=backend)
        assert one(got.index.item() / 50) and one(got.normalized.item())
        assert one(embgeom.cone_index_stream([x[:20], x[20:]], backend=backend).normalized.item())
        if backend == "cpp":
            total, raw, texts = TraceAccumulator._cone_sum([x[None]], torch.ones(1, 50, dtype=torch.bool), ())
            assert one(total.item()) and one(raw.item() / 50) and raw.item() <= 50 and texts.item() == 1.0
            rows = torch.softmax(torch.randn(1, 1, 1, 40, generator=g, dtype=torch.float64), -1).repeat(1, 1, 40, 1)
            assert one(block_measures(rows)["rows_cone"].item())


@pytest.mark.parametrize("cap", CPU_CAPS)
def test_cpp_cone_sums_read_groups_in_place(cap, monkeypatch):
    """The C++ cone sums of a (G, B, T, d) permuted view (a layer's head outputs (B, T, H, d) read
    in place, `embgeom text`) equal those of its contiguous copy bit for bit, and torch's float64
    sums over (G * B, T, d) with the mask repeated: padding, zero rows, a chunk boundary
    (T > 512), d not a multiple of 8, every group of a text in one pass (B >= 16); every vector level."""
    from embgeom.backends import cpp as cpp_backend
    from embgeom.backends.torch import torch_cone_unit_sums

    if cpp_backend.cpp() is None:
        pytest.skip("the C++ core is not built")
    monkeypatch.setenv("EMBGEOM_CPU", cap)
    for B, T, H, d in ((3, 9, 4, 5), (2, 600, 3, 32), (17, 9, 3, 5)):
        x = torch.randn(B, T, H, d, generator=torch.Generator().manual_seed(T + d))
        x[1, 2] = 0                                                  # zero rows in every group
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, T - 3:] = False
        view = x.permute(2, 0, 1, 3)                                 # (H, B, T, d), not contiguous
        got = cpp_backend.cone_unit_sums(view, mask)
        same = cpp_backend.cone_unit_sums(view.contiguous(), mask)
        want = torch_cone_unit_sums(view.reshape(-1, T, d), mask.repeat(H, 1))
        for g, c, w in zip(got, same, want):
            assert torch.equal(g, c)
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-12, atol=1e-12)
        assert got[2].tolist() == ([0, 1] + [0] * (B - 2)) * H       # zero rows: b = 1, every group


@pytest.mark.parametrize("cap", CPU_CAPS)
def test_cpp_cone_sums_take_inf_rows_as_torch_does(cap, monkeypatch):
    """A valid row holding inf is used (its unit vector NaN where inf / inf), as torch's x / |x|
    takes it, not counted as a zero row (1 / sqrt(inf) = 0 had put it among the zeros); D = 0:
    every valid row is a zero vector."""
    from embgeom.backends import cpp as cpp_backend
    from embgeom.backends.torch import torch_cone_unit_sums

    if cpp_backend.cpp() is None:
        pytest.skip("the C++ core is not built")
    monkeypatch.setenv("EMBGEOM_CPU", cap)
    x = torch.tensor([[[1.0, 0.0], [float("inf"), 0.0], [0.0, 0.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    for got, want in zip(cpp_backend.cone_unit_sums(x, mask), torch_cone_unit_sums(x, mask)):
        torch.testing.assert_close(got.double(), want.double(), equal_nan=True)
    assert cpp_backend.cone_unit_sums(x, mask)[1:] == (torch.tensor([2]), torch.tensor([1]))
    empty = torch.zeros(2, 3, 0)
    mask[0, 2] = False
    mask = mask.expand(2, 3).clone()
    for got, want in zip(cpp_backend.cone_unit_sums(empty, mask), torch_cone_unit_sums(empty, mask)):
        assert torch.equal(got.double(), want.double())


@pytest.mark.parametrize("cap", CPU_CAPS)
def test_cpp_entropy_leaves_padded_keys_out_whatever_they_hold(cap, monkeypatch):
    """A padded key holding NaN or inf adds nothing on every vector level (the portable loop
    multiplied the value by a weight 0: NaN)."""
    from embgeom import _C

    monkeypatch.setenv("EMBGEOM_CPU", cap)
    p = torch.softmax(torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3)), -1)
    mask = torch.ones(1, 32, dtype=torch.uint8)
    mask[0, 20:] = 0
    p[..., 20:] = 0
    want = _C.attention_row_entropy(p.numpy(), mask.numpy(), 0.0)
    for bad in (float("nan"), float("inf")):
        q = p.clone()
        q[0, 0, :, 25] = bad
        assert np.array_equal(_C.attention_row_entropy(q.numpy(), mask.numpy(), 0.0), want, equal_nan=True)


@pytest.mark.parametrize("cap", CPU_CAPS)
def test_cpp_entropy_scalar_path_matches_vector_path(cap, monkeypatch):
    """The scalar std::log loop (EMBGEOM_SCALAR_ENTROPY) and the vector path of each level
    (both variables are read on every call)."""
    _C = pytest.importorskip("embgeom._C")
    torch.manual_seed(1)
    m = torch.ones(2, 37, dtype=torch.bool)
    m[1, 20:] = False
    p = torch.softmax((4 * torch.randn(2, 3, 37, 37)).masked_fill(~m[:, None, None, :], -math.inf), -1)
    p[0, 1, 5, :9] = 0.0    # zeros and subnormals: terms that count as 0 ln 0, inside vectors
    p[0, 1, 6, 3:30] = 1e-40  # and in the tail
    p[0, 1, 5:7] /= p[0, 1, 5:7].sum(-1, keepdim=True)
    monkeypatch.setenv("EMBGEOM_CPU", cap)
    assert _C.cpu_info()["entropy"] != "scalar"
    vec = embgeom.attention_entropy(p, m, backend="cpp").row_entropy
    monkeypatch.setenv("EMBGEOM_SCALAR_ENTROPY", "1")
    assert _C.cpu_info()["entropy"] == "scalar"
    scalar = embgeom.attention_entropy(p, m, backend="cpp").row_entropy
    torch.testing.assert_close(vec, scalar, atol=1e-6, rtol=1e-6, equal_nan=True)  # padded rows NaN


def test_attention_entropy_uniform_baseline():
    mask = torch.tensor([[True, True, True, False]])
    p = torch.zeros(1, 2, 4, 4)
    p[..., :3] = 1 / 3
    got = embgeom.attention_entropy(p, mask)
    assert got.mean.tolist() == pytest.approx([math.log(3)] * 2, abs=1e-6)
    assert got.uniform_baseline.tolist() == pytest.approx([math.log(3)])


def test_entropy_mean_of_no_rows_is_nan_and_padded_keys_hold_no_mass():
    import numpy as np

    r = embgeom.attention_entropy(np.full((1, 2, 3, 3), 1 / 3, np.float32), np.zeros((1, 3), bool))
    assert all(math.isnan(v) for v in r.mean.tolist())  # as the float64 reference: a mean of nothing
    with pytest.raises(ValueError, match=r"row \[0, 0, 0\] sums to 0.5 over its unpadded keys"):
        embgeom.attention_entropy(np.full((1, 1, 2, 2), 0.5, np.float32), np.array([[True, False]]))
    x = np.random.default_rng(0).standard_normal((1, 4, 3)).astype(np.float32)
    m = np.array([[True, False, True, True]])
    assert torch.equal(embgeom.cone_index(x, m[:, ::-1]).index, embgeom.cone_index(x, m[:, ::-1].copy()).index)


def test_float64_rows_float32_cannot_hold_are_refused():
    import numpy as np

    with pytest.raises(ValueError, match=r"x: values up to 1e\+300 do not fit in float32"):
        embgeom.cone_index(np.array([[1e300, 0.0], [0.0, 1e300]]))
    with pytest.raises(ValueError, match="x: 1 nonzero row\\(s\\) with every value below float32's smallest normal"):
        embgeom.pairwise_stats(np.array([[1e-300, 0.0], [1.0, 1.0], [0.0, 1.0]]))


def test_float64_rows_give_the_engines_one_cone_index():
    """The engines read float64 rows as fp32 (docs/metrics.md, conventions): the torch backend had
    taken the float64 values themselves (7.258853054 against the C++ core's 7.258852999 for 50
    rows of width 16). The float64 reference keeps the values as given."""
    x = torch.randn(50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cpp, tch = (float(embgeom.cone_index(x, backend=b).index) for b in ("cpp", "torch"))
    rounded = float(embgeom.cone_index(x.float().double(), backend="reference").index)
    assert cpp == pytest.approx(rounded, rel=1e-14) and tch == pytest.approx(rounded, rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_map_made_float32_is_taken_as_itself(dtype):
    """`.float()` of a half-precision model's maps: the same values give the same entropies (the
    float32 tolerance of the row sums had refused rows that sum to 1.00013 in float16)."""
    attn = torch.softmax(torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype), -1)
    want = embgeom.attention_entropy(attn, backend="reference").mean
    for backend in ("cpp", "torch", "reference"):
        got = embgeom.attention_entropy(attn.float(), backend=backend).mean
        assert torch.allclose(got, want, rtol=1e-6)
    # float32 maps that do not sum to 1 are still refused
    bad = torch.softmax(torch.randn(1, 2, 8, 8), -1) * 1.001
    with pytest.raises(ValueError, match="expected each row to be a probability distribution"):
        embgeom.attention_entropy(bad)


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
def test_one_key_rows_have_entropy_plus_zero(backend):
    """A row over one key has entropy 0, not -0.0 (-sum p ln p of p = 1), in reports too."""
    got = embgeom.attention_entropy(torch.ones(2, 3, 1, 1), backend=backend)
    assert bool((got.row_entropy == 0).all()) and not bool(torch.signbit(got.row_entropy).any())
    assert not bool(torch.signbit(got.mean).any())


def test_mean_cosine_of_one_vector_is_nan():
    """A set of one vector has no pair: NaN, as documented (the index's float64 rounding,
    0.9999999999999999 for many single rows, had given (I^2 - 1) / 0 = -inf)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 7, generator=g)
    cone = embgeom.cone_index(x, backend="cpp")
    assert bool(torch.isnan(cone.mean_cosine()).all())
    two = embgeom.cone_index(torch.randn(5, 2, 7, generator=g), backend="cpp")
    assert bool(torch.isfinite(two.mean_cosine()).all())
    empty = embgeom.cone_index(torch.randn(2, 0, 7), backend="cpp")
    assert bool(torch.isnan(empty.mean_cosine()).all())
