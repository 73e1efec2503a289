"""cone_index and attention_entropy beyond the backend suite (tests/test_backends.py): stacked
hidden states, streaming, the C++ scalar path, the uniform baseline."""
from __future__ import annotations

import math

import pytest
import torch

import embgeom
from embgeom import reference

from helpers import make_embeddings, make_sequences


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


def test_cpp_entropy_scalar_path_matches_vector_path():
    """The portable loop (EMBGEOM_SCALAR_ENTROPY, read once per process) and the AVX-512 one."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch, embgeom; torch.manual_seed(1); "
            "p = torch.softmax(4 * torch.randn(2, 3, 37, 37), -1); m = torch.ones(2, 37, dtype=torch.bool); "
            "m[1, 20:] = False; print(json.dumps(embgeom.attention_entropy(p, m, backend='cpp').row_entropy.tolist()))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, **extra}).stdout
            for extra in ({}, {"EMBGEOM_SCALAR_ENTROPY": "1"})]
    vec, scalar = (torch.tensor(json.loads(r)) for r in runs)  # padded query rows are NaN
    torch.testing.assert_close(vec, scalar, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_attention_entropy_uniform_baseline():
    mask = torch.tensor([[True, True, True, False]])
    p = torch.zeros(1, 2, 4, 4)
    p[..., :3] = 1 / 3
    got = embgeom.attention_entropy(p, mask)
    assert got.mean.tolist() == pytest.approx([math.log(3)] * 2, abs=1e-6)
    assert got.uniform_baseline.tolist() == pytest.approx([math.log(3)])
