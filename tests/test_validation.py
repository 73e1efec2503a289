"""Bad input at the public edge: a ValueError/TypeError that names the argument."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import embgeom


@pytest.mark.parametrize("x,exc,match", [
    (torch.zeros(3), ValueError, r"x: expected \(N, D\) float, got \(3,\) float32"),
    (torch.zeros(3, 4, dtype=torch.int64), TypeError, "x: expected .* float, got .* int64"),
    (torch.zeros(4, 0), ValueError, r"x: expected at least one column, got \(4, 0\)"),
    ([[1.0, 2.0]], TypeError, r"x: expected a torch.Tensor or numpy.ndarray, got list \(numpy.asarray\(x, "
                              r"dtype=numpy.float32\) converts an array of floats\)"),
    (np.arange(6).reshape(2, 3), TypeError, "x: expected a float array"),
])
def test_pairwise_bad_x(x, exc, match):
    with pytest.raises(exc, match=match):
        embgeom.pairwise_stats(x)


def test_nan_rows_are_named():
    x = torch.randn(10, 3)
    x[7, 1] = float("nan")
    x[2, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"x: NaN or Inf in 2 row\(s\): \[2, 7\]"):
        embgeom.pairwise_stats(x)


@pytest.mark.parametrize("rows", [6, 5000], ids=["numpy-sum", "torch-sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_finite_check_sees_what_its_sum_hides(dtype, rows):
    """check_finite first tests the sum (numpy's for a few CPU values): +Inf and -Inf that
    cancel to NaN, and finite values whose sum overflows (passed to the full check, which lets
    them through), without a numpy warning."""
    import warnings

    from embgeom.validation import check_finite

    x = torch.ones(rows, 4, dtype=dtype)
    x[1, 2], x[4, 0] = float("inf"), float("-inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"x: NaN or Inf in 2 row\(s\): \[1, 4\]"):
            check_finite(x, "x")
        big = torch.full((64, 4), torch.finfo(dtype).max / 2, dtype=dtype)
        assert not torch.isfinite(big.sum())
        check_finite(big, "x")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(metric="l1"), ValueError, "metric: expected one of"),
    (dict(precision="half"), ValueError, "precision"),
    (dict(bins=-1), ValueError, "bins: expected >= 0"),
    (dict(topk=1.5), TypeError, "topk: expected an int"),
    (dict(range=(1, 0)), ValueError, "range: expected lo < hi"),
    (dict(range=(0, float("inf"))), ValueError, "range"),
    (dict(metric="euclidean"), ValueError, "range: required"),
    (dict(outside=(0.5, 0.1)), ValueError, "outside: expected a <= b"),
    (dict(outside=0.5), TypeError, "outside: expected a pair"),
    (dict(block=0), ValueError, "block: expected >= 1"),
    (dict(block=2 ** 63 - 1), ValueError, r"block: expected 1 to 2,147,483,648 \(2\^31\)"),  # (it had given count 0)
    (dict(backend="gpu"), ValueError, "backend: expected one of"),
])
def test_pairwise_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        embgeom.pairwise_stats(torch.randn(5, 3), **kwargs)


def test_cross_mode_mismatch():
    with pytest.raises(ValueError, match="y: expected 3 columns, as many as the first matrix has"):
        embgeom.pairwise_stats(torch.randn(5, 3), torch.randn(4, 2))


def test_cone_and_entropy_bad_input():
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 3\)"):
        embgeom.cone_index(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected bool"):
        embgeom.cone_index(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"x: NaN or Inf in 1 row\(s\): \[\(1, 2\)\]"):
        bad = torch.randn(2, 3, 4)
        bad[1, 2, 0] = float("nan")
        embgeom.cone_index(bad)
    with pytest.raises(ValueError, match=r"attn: expected \(B, H, T, T\)"):
        embgeom.attention_entropy(torch.rand(2, 3, 4, 5))
    # a batch of one-head maps passed as 3-D: read as the heads of one sequence, and said so
    with pytest.raises(ValueError, match=r"mask: \(2, 3\) is a batch of 2 sequences, .*attn\[:, None\]"):
        embgeom.attention_entropy(torch.full((2, 3, 3), 1 / 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn: expected probabilities >= 0"):
        embgeom.attention_entropy(-torch.rand(1, 1, 2, 2))
    with pytest.raises(ValueError, match="smoothing"):
        embgeom.attention_entropy(torch.rand(1, 1, 2, 2), smoothing=2.0)
    with pytest.raises(ValueError, match="chunk: expected D = 4"):
        acc = embgeom.ConeAccumulator()
        acc.update(torch.randn(3, 4))
        acc.update(torch.randn(3, 5))


def test_load_model_missing_path(tmp_path):
    with pytest.raises(ValueError, match="model: no such directory"):
        embgeom.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors weights"):
        embgeom.load_model(str(tmp_path / "empty"))


def test_load_model_default_is_bundled_bert():
    model, tok = embgeom.load_model()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size) == (6, 12, 384, 30522)
    assert model.config._attn_implementation == "eager"
    assert tok.convert_tokens_to_ids("[CLS]") == 101


def test_inputs_as_files_and_callers_bring_them():
    """Big-endian arrays (a .npy from another machine) are read, not refused; sparse and meta
    tensors and non-path checkpoints get errors naming the argument."""
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(">f4")
    got = embgeom.pairwise_stats(x, topk=2)
    want = embgeom.pairwise_stats(x.astype("<f4"), topk=2)
    assert got.to_dict() == {**want.to_dict(), "seconds": got.to_dict()["seconds"]} and got.count == 10
    ones = np.ones((3, 2), np.float32)
    with pytest.raises(TypeError, match="checkpoint: expected a path"):
        embgeom.pairwise_stats(ones, checkpoint=5)
    with pytest.raises(ValueError, match="checkpoint: expected a non-empty path"):
        embgeom.pairwise_stats(ones, checkpoint="")
    with pytest.raises(TypeError, match="x: expected a dense tensor"):
        embgeom.pairwise_stats(torch.ones(3, 2).to_sparse())
    with pytest.raises(ValueError, match="x: a meta tensor holds no values"):
        embgeom.pairwise_stats(torch.empty(3, 4, device="meta"))


@pytest.mark.parametrize("rng", [(-1e308, 1e308), (-5e-324, 5e-324), (0.0, 5e-324)])
def test_histogram_range_whose_bin_scale_float64_cannot_hold(rng):
    x = np.array([[1, 0], [0, 1], [0, 2]], np.float32)
    with pytest.raises(ValueError, match="range: .* bin scale"):
        embgeom.pairwise_stats(x, metric="dot", range=rng, bins=4)


def test_load_model_by_hub_id_from_the_cache(tiny_bert_dir, tmp_path, monkeypatch):
    """An "org/name" id that is no directory here is a Hugging Face id (found in the cache,
    offline), not a missing path; a relative "dir/name" that is neither says both."""
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--org--tiny-bert" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_bert_dir, snapshot)
    refs = tmp_path / "hub" / "models--org--tiny-bert" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    code = ("import embgeom\n"
            "m, t = embgeom.load_model('org/tiny-bert')\n"
            "print(m.config.num_hidden_layers)\n"
            "try:\n    embgeom.load_model('org/absent-model')\n"
            "except ValueError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "2"
    assert lines[1].startswith("model: cannot load 'org/absent-model' (no such directory here, and not a "
                               "Hugging Face model id it could load)")
    with pytest.raises(ValueError, match="no such directory"):
        embgeom.load_model("./org/tiny-bert")
    from embgeom.models import is_hub_id

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/tiny-bert") and is_hub_id("bert-base-uncased")
    # a path under an existing folder, odd characters, a trailing newline: not Hub ids
    assert not any(is_hub_id(n) for n in ("models/x", "org/name\n", "org/name\u0660", "a/b/c", "~/x", "org/"))


@pytest.mark.parametrize("value", [True, np.True_, torch.tensor(True), np.array(False), "0.9", b"1"])
def test_thresholds_that_are_not_numbers_are_refused(value):
    from embgeom import validation

    with pytest.raises(TypeError, match="threshold: expected a number"):
        validation.finite_float(value, "threshold")
    assert [validation.finite_float(v, "t") for v in (np.float32(0.5), torch.tensor(0.5), np.int64(2), 3)] == \
        [0.5, 0.5, 2.0, 3.0]


def test_odd_layouts_and_byte_orders_are_read_or_named():
    # found by probing every entry point with unusual inputs: each had failed inside torch
    # or numpy with a message naming no argument
    from embgeom.compat.sentence_transformers import semantic_search

    attn = torch.full((2, 1, 4, 4), 0.25)
    x = torch.randn(2, 4, 8)
    big_endian = np.ones((2, 4), dtype=">i4")
    want = embgeom.cone_index(x, np.ones((2, 4), bool)).index
    assert torch.equal(embgeom.cone_index(x, big_endian).index, want)
    embgeom.attention_entropy(attn, big_endian)
    dense = torch.ones(2, 4, dtype=torch.bool)
    for bad, err, match in [(dense.to_sparse(), TypeError, "mask: expected a dense tensor"),
                            (torch.empty(2, 4, dtype=torch.bool, device="meta"), ValueError, "mask: a meta tensor")]:
        with pytest.raises(err, match=match):
            embgeom.cone_index(x, bad)
        with pytest.raises(err, match=match):
            embgeom.attention_entropy(attn, bad)
    # a field of a packed record array: strides no multiple of the item size
    rec = np.zeros(30, dtype=[("v", "f4", (8,)), ("tag", "i1")])
    rec["v"] = np.random.default_rng(0).standard_normal((30, 8))
    assert embgeom.pairwise_stats(rec["v"]).count == embgeom.pairwise_stats(np.ascontiguousarray(rec["v"])).count
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with pytest.raises(TypeError, match="x: expected a dense tensor, got a nested tensor"):
        embgeom.pairwise_stats(nested)
    corpus = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    for rows, err, match in [([corpus[0], corpus[1][:3]], ValueError, "rows of a list must have one shape"),
                             ([corpus[0], None], TypeError, "got NoneType"),
                             ([True, False, True, False], TypeError, "got bool")]:
        with pytest.raises(err, match="^query_embeddings: .*" + match):
            semantic_search(rows, corpus)
    assert semantic_search([corpus[0].astype(">f4")], corpus) == semantic_search(corpus[:1], corpus)
    with pytest.raises(TypeError, match="queries: expected a dense tensor"):
        embgeom.knn(corpus, 2, queries=torch.tensor([1, 3]).to_sparse())
    with pytest.raises(ValueError, match="got max 9223372036854775809"):  # (not wrapped to a negative id)
        embgeom.knn(corpus, 2, queries=np.array([2**63 + 1], np.uint64))
    # a view of a conjugate's imaginary part carries torch's negative bit
    imag = torch.complex(torch.zeros(30, 1), torch.randn(30, 1)).conj().imag
    assert torch.equal(embgeom.cone_index(imag).index, embgeom.cone_index(imag.clone()).index)
    # the shape named is the one passed, not the one it was reshaped to
    with pytest.raises(ValueError, match=r"got \(2, 3, 8\) float32"):
        embgeom.attention_entropy(np.ones((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"got \(5, 0\) float32"):
        embgeom.cone_index(np.zeros((5, 0), np.float32))


@pytest.mark.parametrize("backend", ["torch", "cpp", "reference"])
def test_results_hold_no_autograd_graph_on_any_backend(backend):
    x = torch.randn(50, 8, requires_grad=True)
    assert not embgeom.cone_index(x, backend=backend).index.requires_grad
    attn = torch.softmax(torch.randn(1, 2, 5, 5, requires_grad=True), -1)
    res = embgeom.attention_entropy(attn, backend=backend)
    assert not res.mean.requires_grad and not res.row_entropy.requires_grad
    assert embgeom.attention_entropy(torch.zeros(2, 0, 5, 5), backend=backend).mean.shape == (0,)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_a_parameter_passed_whole_warns_of_nothing(metric):
    """An nn.Embedding's weight (requires_grad) as x: the inputs are detached where they are
    read; the product range's float() of it had raised torch's autograd UserWarning."""
    import warnings

    w = torch.nn.Embedding(20, 8).weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = embgeom.pairwise_stats(w, metric=metric, range=None if metric == "cosine" else (-30, 30), row_topk=2)
        embgeom.Index(w).search(w[:3], 2)
    assert not s.row_topk.values.requires_grad


def test_a_backend_from_the_environment_is_named_as_such(monkeypatch):
    """EMBGEOM_BACKEND=bogus had been reported as `--backend` / `backend`, which the user never passed."""
    monkeypatch.setenv("EMBGEOM_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"EMBGEOM_BACKEND \(the environment\): expected one of .* got 'bogus'"):
        embgeom.pairwise_stats(torch.randn(5, 3))
    with pytest.raises(ValueError, match="^backend: expected one of"):
        embgeom.pairwise_stats(torch.randn(5, 3), backend="gpu")


def test_public_api_misuse_is_named(tiny_bert_dir, tiny_bert, tmp_path):
    """Arguments the API had let through to a bare error, and results compared with ==: a
    model name that is no string (re's TypeError), classifier not a bool or on a model without a
    head (named by the CLI's flag), an observer without update (AttributeError), chunks that
    are no iterable, Index.vectors bounds that are no ints; == on results is identity (it had
    compared tensors field by field: RuntimeError)."""
    import copy
    import subprocess
    import sys

    with pytest.raises(TypeError, match="name_or_path: expected a model folder or Hugging Face id"):
        embgeom.load_model(5)
    with pytest.raises(TypeError, match="classifier: expected True or False, got str"):
        embgeom.load_model(tiny_bert_dir, classifier="yes")
    with pytest.raises(ValueError, match="^classifier: model .* has no sequence-classification head"):
        embgeom.load_model(tiny_bert_dir, classifier=True)
    model, tokenizer = tiny_bert
    with pytest.raises(TypeError, match=r"observers: item 0 \(object\) has no update\(batch\) method"):
        embgeom.trace(model, tokenizer, ["a b"], observers=[object()])
    with pytest.raises(TypeError, match="chunks: expected an iterable"):
        embgeom.cone_index_stream(5)
    index = embgeom.Index(np.ones((4, 3), np.float32))
    for bad in (True, "a", 1.5):
        with pytest.raises(TypeError, match="start: expected an int"):
            index.vectors(bad)
    assert index.vectors(-1).shape == (1, 3)                      # Python's slicing, as documented
    r = embgeom.pairwise_stats(np.random.default_rng(0).standard_normal((20, 4)))
    assert (copy.deepcopy(r) == r) is False and (r == r) is True
    # the module tools answer a bad setting in one line, as `embgeom info` does
    env = dict(os.environ, EMBGEOM_CPU="bogus")
    done = subprocess.run([sys.executable, "-m", "embgeom.info"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "embgeom: error: EMBGEOM_CPU: expected 'avx512', 'avx2' or 'generic', got 'bogus'"]
    # the drop-in module without importing it first (the lazy `compat` had not loaded it)
    done = subprocess.run([sys.executable, "-c", "import embgeom; print(embgeom.compat.sentence_transformers.__name__)"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "embgeom.compat.sentence_transformers", done.stderr


def test_a_fast_run_on_the_exact_product_says_so(monkeypatch):
    """precision="fast" where the C++ core has no bf16 product faster than float32 (here: the AVX2
    level forced, even with EMBGEOM_GEMM asking for AMX) runs the exact product, and its notes say
    so (it had said 'fast' with error bound 0 and no word why); with one, no note."""
    from embgeom.backends.registry import cpp

    if cpp() is None:
        pytest.skip("the C++ core is not built")
    x = np.random.default_rng(0).standard_normal((60, 8))
    monkeypatch.setenv("EMBGEOM_CPU", "avx2")
    monkeypatch.setenv("EMBGEOM_GEMM", "amx")
    r = embgeom.pairwise_stats(x, precision="fast", backend="cpp")
    # (why: the cap, on a CPU with a bf16 product; else the CPU's lack of one)
    why = "EMBGEOM_CPU caps the vector level below avx512" if cpp().cpu_info()["isa_supported"] == "avx512" and \
        any(f in cpp().cpu_info()["cpu_features"] for f in ("avx512bf16", "amx-bf16")) else "no native bf16 dot"
    assert r.notes == [f"precision='fast' ran the exact product avx2-6x16 at vector level avx2 ({why}); "
                       "its values are exact-mode's"] and r.error_bound == 0
    monkeypatch.setenv("EMBGEOM_GEMM", "scalar")   # a product without bf16 forced: said so, whatever the CPU
    assert embgeom.pairwise_stats(x, precision="fast", backend="cpp").notes == [
        "precision='fast' ran the exact product scalar-4x8 at vector level avx2 (EMBGEOM_GEMM forces a product "
        "without bf16); its values are exact-mode's"]
    assert r.to_dict()["notes"] == r.notes
    assert embgeom.pairwise_stats(x, precision="exact", backend="cpp").notes == []
    monkeypatch.delenv("EMBGEOM_CPU")
    monkeypatch.delenv("EMBGEOM_GEMM")
    native = embgeom.pairwise_stats(x, precision="fast", backend="cpp")
    assert (native.notes == []) == bool(cpp().fast_product()["bf16"])


def test_yes_no_arguments_refuse_strings_and_numbers(tiny_bert, tmp_path):
    """"no" and "false" are truthy: float64="no" had run the float64 search, copy="no" copied,
    progress="no" showed the bars, verify="no" checked the file. Each is refused by name."""
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    index = embgeom.Index(x)
    index.save(tmp_path / "i.emb")
    model, tokenizer = tiny_bert
    calls = {
        "copy": lambda: embgeom.Index(x, copy="no"),
        "float64": lambda: index.search(x[:2], 3, float64="no"),
        "float64 ": lambda: index.search_stored(3, float64=1),
        "float64  ": lambda: index.range_search(x[:2], 0.5, float64="false"),
        "verify": lambda: embgeom.Index.load(tmp_path / "i.emb", verify="no"),
        "progress": lambda: embgeom.pairwise_stats(x, progress="no"),
        "classifier": lambda: embgeom.load_model(None, classifier="no"),
        "heads": lambda: embgeom.trace(model, tokenizer, ["a b c"], heads="no"),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"^{name.strip()}: expected True"):
            call()
    assert index.search(x[:2], 3, float64=np.bool_(True))[0].dtype == torch.float64
    assert embgeom.Index(x, copy=np.bool_(False)).ntotal == 20


def test_a_range_without_bins_is_refused():
    """range given with bins=0 had been ignored without a word (near_k without near is refused)."""
    import embgeom

    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"range: the histogram's range, only with bins > 0"):
        embgeom.pairwise_stats(x, bins=0, range=(0.0, 1.0))


READ_ONLY_SCRIPT = r'''
import sys, warnings
warnings.simplefilter("error")          # torch's "not writable" note, or any other, fails the run
import numpy as np, torch
import embgeom
from embgeom import validation
from embgeom.compat.sentence_transformers import semantic_search
from embgeom.faiss import IndexFlatIP
from embgeom.sklearn import NearestNeighbors

x = np.load(sys.argv[1], mmap_mode="r")    # PROT_READ: a write into it would end this process
w = np.array(x)
assert not x.flags.writeable
assert validation.as_tensor(x, "x").data_ptr() == x.ctypes.data   # no copy
index = embgeom.Index(x, copy=False)
assert index.vectors().data_ptr() == x.ctypes.data
index.add(x[:3])
assert index.search(x[:2], 4)[1].tolist() == embgeom.Index(np.vstack([w, w[:3]])).search(w[:2], 4)[1].tolist()
a, b = embgeom.pairwise_stats(x, topk=5, row_topk=3), embgeom.pairwise_stats(w, topk=5, row_topk=3)
assert a.top_pairs.to_list() == b.top_pairs.to_list() and torch.equal(a.row_topk.indices, b.row_topk.indices)
assert embgeom.pairwise_stats(x, x[:7], backend="torch").count == 7 * len(w)
embgeom.pairs_above(x, 0.5, out=sys.argv[2])
assert len(embgeom.read_pairs(sys.argv[2])[0]) == embgeom.pairwise_stats(w, outside=(-2.0, 0.5 - 1e-7)).outside.count
assert embgeom.communities(x, 0.5, 2) == embgeom.communities(w, 0.5, 2)
assert embgeom.knn(x, 3).indices.tolist() == embgeom.knn(w, 3).indices.tolist()
assert semantic_search(x[:3], x, top_k=3) == semantic_search(w[:3], w, top_k=3)
nn = NearestNeighbors(n_neighbors=3).fit(w)
assert np.array_equal(nn.kneighbors(x[:4])[1], nn.kneighbors(w[:4])[1])
flat = IndexFlatIP(w.shape[1])
flat.add(x)
assert np.array_equal(flat.search(x[:4], 3)[1], flat.search(w[:4], 3)[1])
assert np.array_equal(flat.range_search(x[:4], 0.5)[2], flat.range_search(w[:4], 0.5)[2])
embgeom.cone_index(x)
print("read-only ok")
'''


def test_read_only_arrays_are_read_in_place_never_written(tmp_path):
    """A read-only array (np.load(mmap_mode="r"), a pyarrow or polars buffer) is read where it
    is: it had been copied whole by every entry point (1.5 GB for pairs_above on 1M x 384), and
    torch's not-writable note had failed runs under -W error. A child process: a write into the
    PROT_READ mapping would end it, not the test run."""
    import subprocess
    import sys

    rows = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[:40:2] = rows[1:41:2] + 0.1  # pairs above 0.5
    np.save(tmp_path / "x.npy", rows)
    run = subprocess.run([sys.executable, "-c", READ_ONLY_SCRIPT, str(tmp_path / "x.npy"), str(tmp_path / "pairs")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and "read-only ok" in run.stdout, run.stdout + run.stderr


def test_masked_arrays_with_masked_values_are_refused():
    x = np.ma.masked_array(np.ones((3, 2), np.float32), mask=[[0, 0], [1, 0], [0, 0]])
    with pytest.raises(ValueError, match=r"^x: a masked array with 1 masked value\(s\); embgeom reads every value"):
        embgeom.pairwise_stats(x)
    assert embgeom.pairwise_stats(np.ma.masked_array(np.eye(3, dtype=np.float32))).count == 3


def test_read_only_arrays_leave_torchs_own_warning_to_the_caller():
    """embgeom reads a read-only array without torch.from_numpy, whose not-writable warning is
    shown once a process: the caller's own from_numpy of such an array still warns (a child
    process: the once is per process)."""
    import subprocess
    import sys

    script = ("import warnings, numpy as np, torch, embgeom\n"
              "x = np.ones((20, 4), np.float32); x.flags.writeable = False\n"
              "with warnings.catch_warnings(record=True) as w:\n"
              "    warnings.simplefilter('always')\n"
              "    embgeom.pairwise_stats(x); embgeom.Index(x).search(x[:2], 2)\n"
              "    assert not w, [str(m.message) for m in w]\n"
              "    torch.from_numpy(x)\n"
              "    assert any('not writable' in str(m.message) for m in w)\n"
              "print('warned once, for the caller')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "warned once, for the caller" in run.stdout, run.stdout + run.stderr
