"""pytest-benchmark groups for all-pairs statistics at a size that runs in seconds.

    .venv/bin/python -m pytest benchmarks/bench_pairwise.py --benchmark-group-by=param:data -p no:cacheprovider

The full-size comparison with the CSV row per provider is benchmarks/compare.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import embgeom

FULL = dict(bins=2000, topk=10, bottomk=10, row_topk=10, outside=(-0.2, 0.2))


@pytest.fixture(scope="module", params=[4096, 8192], ids=lambda n: f"n={n}")
def data(request):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((request.param, 384), dtype=np.float32)
    return request.param, x


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("provider", ["embgeom-cpp-exact", "embgeom-cpp-fast", "embgeom-torch", "numpy-matmul",
                                      "faiss-flat-10nn"])
def test_pairwise(benchmark, data, provider):
    n, x = data
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.group = f"pairwise n={n}"
    xt = torch.from_numpy(x)
    if provider.startswith("embgeom"):
        backend = "torch" if provider == "embgeom-torch" else "cpp"
        precision = "fast" if provider.endswith("fast") else "exact"
        try:
            embgeom.pairwise_stats(xt[:2], backend=backend, precision=precision)
        except ValueError as exc:
            pytest.skip(str(exc))
        benchmark.pedantic(embgeom.pairwise_stats, args=(xt,), kwargs=dict(FULL, backend=backend, precision=precision),
                           rounds=3, warmup_rounds=1)
    elif provider == "numpy-matmul":
        u = _unit(x)
        benchmark.pedantic(lambda: u @ u.T, rounds=3, warmup_rounds=1)
    else:
        faiss = pytest.importorskip("faiss")
        u = np.ascontiguousarray(_unit(x))
        index = faiss.IndexFlatIP(u.shape[1])
        index.add(u)
        benchmark.pedantic(index.search, args=(u, 11), rounds=3, warmup_rounds=1)
