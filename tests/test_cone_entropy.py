"""cone_index and attention_entropy, every CPU backend against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import embgeom
from embgeom import reference
from embgeom.backends import registry

from conftest import CPU_CAPS
from helpers import make_embeddings


def _param(name, op, cap=None):
    registry.ensure_registered()
    why = registry.BACKENDS[name].reasons(op, torch.zeros(1, 1))
    marks = [pytest.mark.skipif(bool(why), reason="; ".join(why))]
    if cap is None:
        return pytest.param(name, marks=marks)
    return pytest.param(name, marks=[*marks, pytest.mark.cpu_cap(cap)], id=f"{name}-cpu={cap}")


# the C++ kernels once per vector level the host supports (EMBGEOM_CPU)
CONE = [_param("cpp", "cone_index", c) for c in CPU_CAPS] + [_param("torch", "cone_index")]
ENTROPY = [_param("cpp", "attention_entropy", c) for c in CPU_CAPS] + [_param("torch", "attention_entropy")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _batch(B, T, D, seed=0):
    x = make_embeddings(B * T, D, seed=seed).reshape(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, T // 2:] = False       # padding
    if B > 2:
        mask[2] = False                # an all-pad sequence
    x[0, min(1, T - 1)] = 0             # a zero row inside the mask
    return x, mask


@pytest.mark.parametrize("backend", CONE)
@pytest.mark.parametrize("B,T,D", [(1, 1, 3), (3, 7, 16), (4, 600, 768)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cone_index_vs_reference(backend, B, T, D, dtype):
    x, mask = _batch(B, T, D)
    x = x.to(dtype)
    want = reference.cone_index(x.double(), mask)
    got = embgeom.cone_index(x, mask, backend=backend)
    assert got.backend == backend
    assert got.n.tolist() == want["n"].tolist()
    assert got.zero_rows.tolist() == want["zero_rows"].tolist()
    tol = 1e-9 * T if dtype in (torch.float32, torch.float64) else 1e-9 * T
    torch.testing.assert_close(got.index.double(), want["index"], atol=max(tol, 1e-9), rtol=1e-6, equal_nan=True)
    n = got.n
    assert torch.isnan(got.normalized[n == 0]).all()
    assert ((got.normalized[n > 0] >= 0) & (got.normalized[n > 0] <= 1 + 1e-9)).all()


def test_cone_index_tuple_of_hidden_states_and_stream():
    x, mask = _batch(3, 9, 8)
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


def _attention(B, H, T, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, T, T, generator=g, dtype=torch.float64) * 2
    logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
    p = torch.softmax(logits, -1)
    return torch.nan_to_num(p, nan=0.0)  # all-pad sequences: rows of zeros


@pytest.mark.parametrize("backend", ENTROPY)
@pytest.mark.parametrize("B,H,T", [(1, 1, 1), (3, 4, 9), (2, 3, 37), (2, 12, 128)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_attention_entropy_vs_reference(backend, B, H, T, smoothing):
    _, mask = _batch(B, T, 2)
    p = _attention(B, H, T, mask)
    p[0, 0, 0] = 0
    p[0, 0, 0, 0] = 1.0  # a one-hot row: entropy exactly 0 (0 ln 0 = 0)
    want = reference.attention_entropy(p, mask, smoothing)
    got = embgeom.attention_entropy(p.float(), mask, smoothing=smoothing, backend=backend)
    torch.testing.assert_close(got.row_entropy.double(), want["row_entropy"], atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.mean, want["mean"], atol=1e-5, rtol=1e-5, equal_nan=True)
    assert got.row_entropy[0, 0, 0].item() == pytest.approx(0.0 if smoothing == 0 else got.row_entropy[0, 0, 0].item())
    assert got.n_rows == int(mask.sum())


@pytest.mark.parametrize("cap", CPU_CAPS)
def test_cpp_entropy_scalar_path_matches_vector_path(cap, monkeypatch):
    """The scalar std::log loop (EMBGEOM_SCALAR_ENTROPY) and the vector path of each level
    (both variables are read on every call)."""
    _C = pytest.importorskip("embgeom._C")
    torch.manual_seed(1)
    p = torch.softmax(4 * torch.randn(2, 3, 37, 37), -1)
    m = torch.ones(2, 37, dtype=torch.bool)
    m[1, 20:] = False
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
