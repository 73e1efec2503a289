"""pairwise_stats through the public API: options, inputs, dispatch and JSON (the per-backend
comparison with the float64 reference is tests/test_backends.py)."""
from __future__ import annotations


from types import SimpleNamespace

import pytest
import torch

import embgeom

from helpers import check_stats, make_embeddings

ALL_OUTPUTS = dict(bins=50, topk=5, bottomk=5, near=0.0, near_k=4, row_topk=3, row_bottomk=2,
                   outside=(-0.2, 0.2), outside_limit=7)




def test_all_zero_rows_cosine():
    x = torch.zeros(4, 3)
    got = embgeom.pairwise_stats(x, row_topk=2)
    assert got.count == 0 and got.excluded_rows == [0, 1, 2, 3]
    assert got.min is None and got.top_pairs.to_list() == []
    assert (got.row_topk.indices == -1).all()
    d = got.to_dict()
    assert d["mean"] is None and d["row_topk"]["values"][0] == [None, None]


def test_outputs_switch_off():
    x = make_embeddings(20, 8)
    got = embgeom.pairwise_stats(x, bins=0, topk=0, bottomk=0)
    d = got.to_dict()
    assert d["hist"] is None and d["top_pairs"] == [] and "row_topk" not in d and "outside" not in d


def test_input_dtypes_and_numpy_and_strides():
    x = make_embeddings(30, 16)
    base = embgeom.pairwise_stats(x, backend="torch")
    for variant in (x.double(), x.numpy(), x.T.contiguous().T, x.half()):
        got = embgeom.pairwise_stats(variant, backend="torch")
        assert got.count == base.count
        tol = 2e-3 if getattr(variant, "dtype", None) == torch.float16 else 1e-6
        assert abs(got.mean - base.mean) < tol
    bf = embgeom.pairwise_stats(x.bfloat16(), backend="torch")
    assert abs(bf.mean - base.mean) < 2e-2


def test_mean_cosine_matches_cone_identity():
    x = make_embeddings(50, 10, seed=9)
    stats = embgeom.pairwise_stats(x, bins=0, topk=0, bottomk=0)
    cone = embgeom.cone_index(x)
    assert abs(float(cone.mean_cosine()[0]) - stats.mean) < 1e-5


def test_json_layout():
    x = make_embeddings(12, 4)
    d = embgeom.pairwise_stats(x, row_topk=2, outside=(-0.1, 0.1)).to_dict()
    for key in ("n", "m", "d", "mode", "metric", "precision", "backend", "count", "mean", "std", "min",
                "max", "hist", "top_pairs", "bottom_pairs", "near_pairs", "row_topk", "outside",
                "excluded_rows", "seconds"):
        assert key in d, key
    assert set(d["hist"]) >= {"lo", "hi", "bins", "counts", "underflow", "overflow"}
    assert set(d["outside"]) >= {"a", "b", "count", "pairs"}
    assert all(i < j for i, j, _ in d["top_pairs"])
    assert sum(d["hist"]["counts"]) + d["hist"]["underflow"] + d["hist"]["overflow"] == d["count"] == 66


def test_reference_backend_through_api():
    x = make_embeddings(15, 6, zero_rows=1)
    got = embgeom.pairwise_stats(x, backend="reference", **ALL_OUTPUTS)
    check_stats(got, x, **{**ALL_OUTPUTS, "range": (-1.0, 1.0)})


def test_env_backend_selection(monkeypatch):
    monkeypatch.setenv("EMBGEOM_BACKEND", "torch")
    assert embgeom.pairwise_stats(make_embeddings(5, 3)).backend == "torch"
    monkeypatch.setenv("EMBGEOM_BACKEND", "nope")
    with pytest.raises(ValueError, match="EMBGEOM_BACKEND"):
        embgeom.pairwise_stats(make_embeddings(5, 3))


def test_explicit_unusable_backend_lists_reasons():
    with pytest.raises(ValueError, match="cuda"):
        embgeom.pairwise_stats(make_embeddings(5, 3), backend="cuda")


def test_auto_dispatch_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert embgeom.pairwise_stats(make_embeddings(5, 3)).backend in ("cpp", "torch")


def test_auto_dispatch_passes_over_kernels_that_failed_on_a_gpu(monkeypatch):
    """registry.FAILED_ON_DEVICE: on CUDA tensors auto picks the next backend (torch), with the
    reason in the skipped list; asked for by name the kernel still runs. No GPU here: the
    device backends are made to look usable and the tensor to look like a CUDA one."""
    from embgeom.backends import registry

    registry.ensure_registered()
    for name in ("triton", "cuda"):
        monkeypatch.setattr(registry.BACKENDS[name], "base_reasons", lambda x: [])
    fake_cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert ("triton", "pairwise_stats") in registry.FAILED_ON_DEVICE
    assert registry.pick("pairwise_stats", fake_cuda)[0] == "torch"
    assert registry.pick("pairwise_stats", fake_cuda, backend="triton")[0] == "triton"
    # only the failed op: the entropy kernel is still picked
    assert registry.pick("attention_entropy", fake_cuda)[0] == "triton"
    monkeypatch.setattr(registry.BACKENDS["torch"], "base_reasons", lambda x: ["off for this test"])
    monkeypatch.setattr(registry.BACKENDS["reference"], "base_reasons", lambda x: ["off"])
    with pytest.raises(ValueError, match="failed on an NVIDIA H200"):
        registry.pick("pairwise_stats", fake_cuda)
