"""pairs_above / read_pairs against float64 brute force (every pair found, none below the
threshold), resuming, refusing partial, stale and foreign folders; communities against
sentence-transformers' community_detection where it is installed."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import embgeom
from embgeom import Index, communities, pairs_above, read_pairs
from embgeom import pair_shards

from test_index import make_rows


def brute_pairs(x, threshold, metric="cosine"):
    x64 = x.double()
    if metric == "cosine":
        nrm = x64.norm(dim=1)
        v = (x64 @ x64.T) / (nrm[:, None] * nrm[None, :])
        v = v.clamp(-1, 1)
    elif metric == "dot":
        v = x64 @ x64.T
    else:
        v = torch.cdist(x64, x64)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1)
    vals = v[i, j]
    hit = (vals <= threshold) if metric == "l2" else (vals >= threshold)
    hit &= ~torch.isnan(vals)
    return i[hit].numpy(), j[hit].numpy(), vals[hit].numpy()


@pytest.mark.parametrize("metric,threshold", [("cosine", 0.45), ("dot", 6.0), ("l2", 4.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_pairs_above_vs_float64(tmp_path, metric, threshold, dtype):
    x = make_rows(1100, 12, zero=(4,), dup=((2, 900),))
    m = pairs_above(x, threshold, tmp_path / "p", metric=metric, dtype=dtype)
    i, j, s = read_pairs(tmp_path / "p")
    wi, wj, ws = brute_pairs(x, threshold, metric)
    assert m["complete"] and m["count"] == len(wi)
    assert np.array_equal(i, wi) and np.array_equal(j, wj)
    assert s.dtype == np.float32 and np.allclose(s, ws, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric,threshold", [("cosine", 0.45), ("cosine", -1.0), ("dot", 6.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cpu", ["native", "avx2", "generic"])
def test_engine_path_bands_chunks_and_overflow(tmp_path, monkeypatch, metric, threshold, dtype, cpu):
    """The C++ engine's candidates (cosine, dot on the CPU), over bands and column chunks that
    are not multiples of each other nor of the engine's tiles, and a list that overflows in
    some chunks (those chunks are scanned instead): the same pairs as float64 brute force."""
    if not Index(make_rows(2, 3))._pairs_engine_applies():
        pytest.skip("embgeom._C was built without the pairwise engine")
    if cpu != "native":
        monkeypatch.setenv("EMBGEOM_CPU", cpu)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND", 300)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND_BF16", 300)  # (the band with a bf16 product)
    monkeypatch.setattr(embgeom.index, "PAIR_CHUNK", 257)
    monkeypatch.setattr(embgeom.index, "PAIR_LIST", 8000)
    x = make_rows(1100, 12, zero=(4,), dup=((2, 900), (5, 6)))
    took, fell = [], []
    real = Index._engine_pair_candidates

    def spy(self, *args):
        got = real(self, *args)
        (fell if got is None else took).append(1)
        return got

    monkeypatch.setattr(Index, "_engine_pair_candidates", spy)
    m = pairs_above(x, threshold, tmp_path / "p", metric=metric, dtype=dtype)
    i, j, s = read_pairs(tmp_path / "p")
    wi, wj, ws = brute_pairs(x, threshold, metric)
    assert m["complete"] and m["count"] == len(wi)
    assert np.array_equal(i, wi) and np.array_equal(j, wj)
    assert np.allclose(s, ws, rtol=1e-6, atol=1e-6)
    if threshold == -1.0:
        assert fell  # every pair passes: lists of 8,000 overflow, those chunks are scanned
    else:
        assert took and not fell  # the engine answered every chunk


def test_planted_near_duplicates_all_found_nothing_below(tmp_path):
    x = make_rows(3000, 64, seed=3)
    g = torch.Generator().manual_seed(4)
    src = torch.randperm(3000, generator=g)[:200]
    dst = torch.arange(2800, 3000)
    src = src[src < 2800][:150]
    dst = dst[:src.numel()]
    x[dst] = x[src] + 0.05 * torch.randn(src.numel(), 64, generator=g)
    pairs_above(x, 0.9, tmp_path / "p")
    i, j, s = read_pairs(tmp_path / "p")
    found = set(zip(i.tolist(), j.tolist()))
    assert {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())} <= found
    assert (s >= 0.9).all()
    wi, wj, _ = brute_pairs(x, 0.9)
    assert set(zip(wi.tolist(), wj.tolist())) == found


def test_shards_are_bounded_and_resume_skips_finished_rows(tmp_path, monkeypatch):
    x = make_rows(600, 6, seed=5)
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 500)  # many shards
    monkeypatch.setattr(embgeom.index, "PAIR_BAND", 128)  # several bands on the engine path too
    monkeypatch.setattr(embgeom.index, "PAIR_BAND_BF16", 128)
    index = Index(x)
    calls = []
    real = Index._pairs_of_rows

    def spy(self, st, r0, *args):
        calls.append(r0)
        if len(calls) == 2 and not getattr(spy, "failed", False):
            spy.failed = True
            raise KeyboardInterrupt  # the run is killed after its first row block
        yield from real(self, st, r0, *args)

    monkeypatch.setattr(Index, "_pairs_of_rows", spy)
    # what a caller's traceback ends with: what was kept and how to go on
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted: the pairs of the first 128 of 600 rows are saved in .*p; "
                                                r"the same call continues from them$"):
        index.pairs_above(0.3, tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["rows_done"] > 0
    with pytest.raises(ValueError, match="unfinished"):
        read_pairs(tmp_path / "p")
    done = manifest["rows_done"]
    calls.clear()
    m = index.pairs_above(0.3, tmp_path / "p")
    assert min(calls) == done  # finished rows were not computed again
    assert m["complete"] and len(m["shards"]) >= 3
    i, j, s = read_pairs(tmp_path / "p")
    wi, wj, _ = brute_pairs(x, 0.3)
    assert np.array_equal(i, wi) and np.array_equal(j, wj)
    calls.clear()
    index.pairs_above(0.3, tmp_path / "p")  # complete: nothing to do
    assert calls == []
    assert not [f for f in os.listdir(tmp_path / "p") if f.endswith(".tmp")]


def test_dense_pairs_keep_shards_and_blocks_bounded(tmp_path, monkeypatch):
    # a threshold most pairs pass: one band's hits had been held together (9,000 rows: 3 GB) and
    # written as one shard of 20 M pairs, far past SHARD_PAIRS
    x = make_rows(700, 6, seed=6)
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 1000)
    monkeypatch.setattr(embgeom.index, "SCORE_BLOCK_BYTES", 1 << 18)
    sizes = []
    real = Index._exact_pairs

    def spy(self, st, qexact, qi, ci, **kw):
        sizes.append(qi.numel())
        return real(self, st, qexact, qi, ci, **kw)

    monkeypatch.setattr(Index, "_exact_pairs", spy)
    m = Index(x).pairs_above(-1.0, tmp_path / "p")
    assert m["count"] == 700 * 699 // 2 and max(s["count"] for s in m["shards"]) <= 1000
    assert max(sizes) <= embgeom.index.SCORE_BLOCK_BYTES // 16  # one score block's hits at a time
    i, j, _ = read_pairs(tmp_path / "p")
    wi, wj, _ = brute_pairs(x, -1.0)
    assert np.array_equal(i, wi) and np.array_equal(j, wj)


@pytest.mark.parametrize("shard_pairs", [1 << 22, 40], ids=["one-shard", "shards-mid-band"])
def test_an_interrupt_keeps_every_finished_band(tmp_path, monkeypatch, shard_pairs):
    """Ctrl-C (or SIGTERM, taken as it) in the middle of a band: the manifest counts every band
    finished before it, whatever the shard size and the save clock (pairs_above had saved only
    every 4M pairs or 30 s: an interrupt lost every row since, yet the command said they were
    kept); the band in hand is left out, also where its first pairs already went to a shard
    (shard_pairs 40: shards written while the band comes in); the rerun gives the pairs of an
    uninterrupted run."""
    x = make_rows(700, 6, seed=11)
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", shard_pairs)
    monkeypatch.setattr(pair_shards, "SAVE_SECONDS", 1e9)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND", 128)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND_BF16", 128)
    monkeypatch.setattr(embgeom.index, "PAIR_CHUNK", 64)        # several pieces a band
    real = Index._pairs_of_rows
    bands = []

    def stopped_in_band_4(self, st, r0, *args):
        bands.append(r0)
        for k, piece in enumerate(real(self, st, r0, *args)):
            if len(bands) == 4 and k == 1:
                raise KeyboardInterrupt
            yield piece

    index = Index(x)
    monkeypatch.setattr(Index, "_pairs_of_rows", stopped_in_band_4)
    with pytest.raises(KeyboardInterrupt):
        index.pairs_above(0.3, tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["rows_done"] == bands[3] and not manifest["complete"]
    monkeypatch.setattr(Index, "_pairs_of_rows", real)
    index.pairs_above(0.3, tmp_path / "p")
    i, j, s = read_pairs(tmp_path / "p")
    wi, wj, _ = brute_pairs(x, 0.3)
    assert np.array_equal(i, wi) and np.array_equal(j, wj)
    assert sorted(os.listdir(tmp_path / "p")) == sorted(
        ["manifest.json", ".lock"] + [s["file"] for s in json.loads((tmp_path / "p" / "manifest.json").read_text())["shards"]])


def test_an_index_grown_by_add_resumes_the_same_run(tmp_path):
    """The fingerprint names the stored rows only: add()'s spare room past them (unwritten
    memory) made an index grown by add() refuse its own folder on the next run."""
    x = make_rows(100, 8)
    grown = Index(x[:90])
    grown.add(x[90:])
    assert grown.fingerprint() == Index(x).fingerprint()
    pairs_above(Index(x), 0.3, tmp_path / "p")
    m = grown.pairs_above(0.3, tmp_path / "p")  # the same corpus: the finished folder as it is
    assert m["complete"]


def test_refuses_foreign_stale_and_non_pairs_folders(tmp_path):
    x = make_rows(200, 8)
    pairs_above(x, 0.5, tmp_path / "p")
    with pytest.raises(ValueError, match=r"another input or settings \(fingerprint differ"):
        pairs_above(x * 2 + 1, 0.5, tmp_path / "p")
    with pytest.raises(ValueError, match=r"threshold differ"):
        pairs_above(x, 0.6, tmp_path / "p")
    shard = sorted(f for f in os.listdir(tmp_path / "p") if f.startswith("pairs-"))[0]
    with open(tmp_path / "p" / shard, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(ValueError, match="stale"):
        read_pairs(tmp_path / "p")
    # a rerun builds on nothing it cannot trust: refused before any work, the shard named
    with pytest.raises(ValueError, match=f"shard {shard} is missing or changed .*delete the folder"):
        pairs_above(x, 0.5, tmp_path / "p")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no embgeom pairs manifest"):
        pairs_above(x, 0.5, tmp_path / "other")
    with pytest.raises(ValueError, match="no manifest.json"):
        read_pairs(tmp_path / "other")
    with pytest.raises(ValueError, match="no such folder"):
        read_pairs(tmp_path / "missing")
    with pytest.raises(ValueError, match="no such folder"):
        pairs_above(x, 0.5, tmp_path / "a" / "b")


def test_damaged_folders_are_refused_not_read(tmp_path):
    """A shard's bytes changed in place (same size), a hand-edited manifest (a shard listed twice,
    a wrong count, a missing field, wrong types) and pairs outside 0 <= i < j < n under a
    recomputed sha256: each a one-line ValueError, never pairs."""
    import hashlib
    import json

    x = make_rows(300, 8)
    folder = tmp_path / "p"
    pairs_above(x, 0.3, folder)
    good = (folder / "manifest.json").read_text()
    shard = folder / "pairs-000000.npy"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[200] ^= 0x40  # inside the data, size unchanged
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="stale: shard pairs-000000.npy is missing or changed"):
        read_pairs(folder)
    shard.write_bytes(original)
    assert read_pairs(folder)[0].size > 0

    def edited(change):
        m = json.loads(good)
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match="^folder: .* is damaged: ") as info:
            read_pairs(folder)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "expected 'pairs-000001.npy'" in edited(lambda m: m["shards"].append(dict(m["shards"][0])))
    assert "not the sum" in edited(lambda m: m.update(count=5))
    assert "exactly file, count, bytes and sha256" in edited(lambda m: m["shards"][0].pop("bytes"))
    assert "names 7" in edited(lambda m: m["shards"][0].update(file=7))
    assert "shards must be a list" in edited(lambda m: m.update(shards="pairs-000000.npy"))
    assert "rows_done must be an integer" in edited(lambda m: m.update(rows_done="12", complete=False))
    assert "metric must be one of cosine, dot, l2" in edited(lambda m: m.update(metric="jaccard"))
    assert "threshold must be a finite number" in edited(lambda m: m.update(threshold=float("nan")))
    # the writer names its own argument for the same damage
    with pytest.raises(ValueError, match="^out: .* is damaged: "):
        pairs_above(x, 0.3, folder)
    # a crafted shard with its sha256 recomputed: the pairs' range is still checked
    m = json.loads(good)
    arr = np.load(shard)
    arr["i"][0] = 10 ** 12
    np.save(shard, arr, allow_pickle=False)
    m["shards"][0].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"outside 0 <= i < j < n = 300"):
        read_pairs(folder)
    # bytes that are no .npy at all, under a recomputed sha256: one line naming the shard, from
    # the reader and from a resuming writer
    shard.write_bytes(b"not a numpy file")
    m["shards"][0].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"^folder: cannot read shard .*pairs-000000.npy: "):
        read_pairs(folder)
    m.update(complete=False, rows_done=100)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"^out: cannot read shard .*pairs-000000.npy: "):
        pairs_above(x, 0.3, folder)


def _resign(folder, m, k=0):
    """The manifest m with shard k's size and sha256 made anew for its bytes (a forger's edit)."""
    import hashlib

    shard = folder / m["shards"][k]["file"]
    m["shards"][k].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(m))


def test_planted_links_are_never_written_through(tmp_path):
    """An unfinished folder whose next shard name, or whose manifest, is a link to a file
    elsewhere (a planted folder: its fingerprint is the input's sha256, which anyone with the
    input can compute): the resumed run refuses to write through the link and the file it names
    is unchanged (atomic_write had replaced it with the shard's bytes)."""
    x = make_rows(200, 8)
    folder, victim = tmp_path / "p", tmp_path / "victim.txt"
    pairs_above(x, 0.3, folder)
    m = json.loads((folder / "manifest.json").read_text())
    unfinished = dict(m, rows_done=0, complete=False, count=0, shards=[])
    for f in folder.glob("pairs-*.npy"):
        f.unlink()
    (folder / "manifest.json").write_text(json.dumps(unfinished))
    victim.write_text("mine\n")
    (folder / "pairs-000000.npy").symlink_to(victim)
    with pytest.raises(ValueError, match=r"pairs-000000.npy is a symbolic link, which embgeom never writes through"):
        pairs_above(x, 0.3, folder)
    assert victim.read_text() == "mine\n"
    (folder / "pairs-000000.npy").unlink()
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps(unfinished))
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"manifest.json is a symbolic link"):
        pairs_above(x, 0.3, folder)
    assert json.loads(outside.read_text()) == unfinished


def test_forged_manifests_and_shards_are_one_line(tmp_path):
    """Forged manifests and shards (sha256 recomputed) are refused in one line: a threshold of
    400 digits (OverflowError before), a version that is a string (named as given), a shard
    listed past the largest one a writer makes (it had been read whole before its checksum: a
    64 GiB sparse file), a shard of the wrong shape on resume, NaN or below-threshold
    similarities, more rows than pair keys can number."""
    x = make_rows(300, 8)
    folder = tmp_path / "p"
    pairs_above(x, 0.3, folder)
    good = json.loads((folder / "manifest.json").read_text())
    shard = folder / "pairs-000000.npy"
    original = shard.read_bytes()

    def refused(m, match, call=read_pairs):
        (folder / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match=match) as info:
            call(folder)
        assert "\n" not in str(info.value)

    refused(dict(good, threshold=10 ** 400), "threshold must be a finite number, got 1000000")
    refused(dict(good, version="2"), "written by pairs folder version '2'; this version reads 2")
    # rows past those whose pair keys (i n + j) fit an int64: keys that wrap would misorder pairs
    refused(dict(good, n=2 ** 62, rows_done=2 ** 62), r"n must be at most 3,037,000,499, got 4611686018427387904")
    big = json.loads(json.dumps(good))
    big["shards"][0]["bytes"] = 64 << 30
    refused(big, r"at most 4,194,304 pairs and 83,890,176 bytes")
    for value, said in ((np.nan, "a similarity of nan"), (0.25, "a similarity of 0.25 below the threshold 0.3")):
        arr = np.load(shard)
        arr["similarity"][3] = value
        np.save(shard, arr, allow_pickle=False)
        m = json.loads(json.dumps(good))
        _resign(folder, m)
        refused(m, said)
        shard.write_bytes(original)
    arr = np.load(shard)
    np.save(shard, arr[:4].reshape(2, 2), allow_pickle=False)
    m = json.loads(json.dumps(good))
    m.update(complete=False)
    _resign(folder, m)
    refused(m, r"^out: .* holds \(2, 2\)", call=lambda f: pairs_above(x, 0.3, f))


def test_repeated_pairs_and_rewound_manifests_are_refused(tmp_path, monkeypatch):
    """A shard listed twice under a second name (sha256 and counts recomputed): read_pairs names
    the repeated pair instead of returning it twice; a manifest rewound to fewer rows than its
    shards hold is refused by the writer (it would write those rows' pairs again); deeply nested
    JSON in place of the manifest is a one-line ValueError; a rerun removes only its own stale
    shards (pairs-NNNNNN.npy), never another file named pairs-*.npy."""
    import hashlib
    import shutil

    x = make_rows(300, 8)
    folder = tmp_path / "p"
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 300)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND", 64)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND_BF16", 64)
    pairs_above(x, 0.3, folder)
    good = json.loads((folder / "manifest.json").read_text())
    assert len(good["shards"]) >= 3
    m = json.loads(json.dumps(good))
    last = folder / m["shards"][-1]["file"]
    extra = f"pairs-{len(m['shards']):06d}.npy"
    shutil.copy(folder / m["shards"][0]["file"], folder / extra)
    m["shards"].append(dict(m["shards"][0], file=extra))
    m["count"] += m["shards"][0]["count"]
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"damaged: the pair \(\d+, \d+\) is in it more than once"):
        read_pairs(folder)
    # rewound: rows_done below the rows the listed shards hold
    rewound = dict(json.loads(json.dumps(good)), rows_done=10, complete=False)
    (folder / "manifest.json").write_text(json.dumps(rewound))
    with pytest.raises(ValueError, match="holds pairs of rows the manifest counts as not done"):
        pairs_above(x, 0.3, folder)
    (folder / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    for call in (lambda: read_pairs(folder), lambda: pairs_above(x, 0.3, folder)):
        with pytest.raises(ValueError, match="is damaged"):
            call()
    # a finished rerun cleans its own leftovers only
    (folder / "manifest.json").write_text(json.dumps(dict(good, rows_done=good["rows_done"])))
    os.unlink(folder / extra)
    (folder / "pairs-mine.npy").write_bytes(b"mine")
    (folder / f"pairs-{len(good['shards']) + 3:06d}.npy").write_bytes(b"stale")
    pairs_above(x, 0.3, folder)
    assert (folder / "pairs-mine.npy").read_bytes() == b"mine"
    assert not (folder / f"pairs-{len(good['shards']) + 3:06d}.npy").exists()
    assert last.exists() and hashlib.sha256(last.read_bytes()).hexdigest() == good["shards"][-1]["sha256"]


def test_no_pairs_and_single_row(tmp_path):
    m = pairs_above(make_rows(1, 4), 0.0, tmp_path / "one")
    assert m["count"] == 0
    i, j, s = read_pairs(tmp_path / "one")
    assert i.shape == j.shape == s.shape == (0,) and i.dtype == np.int64


def test_one_writer_at_a_time(tmp_path):
    """A second run on a folder another run is writing is refused (two would commit shards
    under the same names at different points); the lock goes with the first run."""
    x = make_rows(300, 8)
    first = pair_shards.ShardWriter(tmp_path / "p", fingerprint="f", n=300, d=8, metric="cosine",
                                    threshold=0.5)
    with pytest.raises(ValueError, match="being written by another pairs_above run"):
        pairs_above(x, 0.5, tmp_path / "p")
    first.close()
    with pytest.raises(ValueError, match="fingerprint differ"):  # the lock is free: on to the manifest
        pairs_above(x, 0.5, tmp_path / "p")
    got = pairs_above(x, 0.5, tmp_path / "q")
    assert got["complete"] and pairs_above(x, 0.5, tmp_path / "q")["complete"]  # released after each run
    assert sorted(os.listdir(tmp_path / "q"))[0] == pair_shards.LOCK


def test_bad_arguments():
    with pytest.raises(TypeError, match="threshold"):
        pairs_above(make_rows(3, 2), None, "x")
    with pytest.raises(TypeError, match="threshold: expected a number, got str '0.9'"):
        pairs_above(make_rows(3, 2), "0.9", "x")
    with pytest.raises(ValueError, match="metric"):
        pairs_above(make_rows(3, 2), 0.5, "x", metric="jaccard")


def _clusters(seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 24, generator=g)
    sizes = [30, 18, 12, 9, 5, 3]
    rows = [centres[c] + 0.25 * torch.randn(s, 24, generator=g) for c, s in enumerate(sizes)]
    x = torch.cat(rows + [torch.randn(40, 24, generator=g)])
    return x[torch.randperm(x.shape[0], generator=g)]


def test_communities_groups():
    x = _clusters()
    groups = communities(x, threshold=0.8, min_community_size=5)
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    flat = [r for g in groups for r in g]
    assert len(flat) == len(set(flat))
    x64 = torch.nn.functional.normalize(x.double(), dim=1)
    for g in groups:
        assert len(g) >= 5
        sims = x64[g[1:]] @ x64[g[0]]
        assert bool((sims >= 0.8).all())
        assert sims.tolist() == sorted(sims.tolist(), reverse=True)
    assert communities(x[:3], min_community_size=5) == []


def test_communities_match_sentence_transformers():
    util = pytest.importorskip("sentence_transformers.util", reason="sentence-transformers not installed")
    x = _clusters(seed=1)
    for threshold, size in ((0.8, 5), (0.7, 3), (0.95, 2)):
        want = util.community_detection(x, threshold=threshold, min_community_size=size)
        got = communities(x, threshold=threshold, min_community_size=size)
        # members in a tie-free order; centres and sizes identical
        assert [(g[0], sorted(g)) for g in got] == [(g[0], sorted(g)) for g in want]


def test_truncated_outside_list_says_so():
    x = make_rows(300, 8)
    st = embgeom.pairwise_stats(x, outside=(-0.2, 0.2), outside_limit=5, bins=0, topk=0, bottomk=0)
    assert st.outside.truncated and st.outside.count > 5 and len(st.outside.pairs) == 5
    df = st.to_pandas("outside")
    assert len(df) == 5 and df.attrs["count"] == st.outside.count and df.attrs["truncated"] is True
    assert st.to_dict()["outside"]["truncated"] is True
    full = embgeom.pairwise_stats(x, outside=(-0.2, 0.2), outside_limit=10 ** 6, bins=0, topk=0, bottomk=0)
    assert not full.outside.truncated and full.to_pandas("outside").attrs["truncated"] is False


def test_pairs_above_names_its_own_arguments(tmp_path):
    import embgeom

    with pytest.raises(ValueError, match=r"x: expected \(N, D\) float"):
        embgeom.pairs_above(np.ones(4, np.float32), 0.5, tmp_path / "a")
    index = embgeom.Index(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="metric: x is an Index of metric 'cosine'"):
        embgeom.pairs_above(index, 0.5, tmp_path / "b", metric="l2")
    with pytest.raises(ValueError, match="dtype: x is an Index of dtype"):
        embgeom.pairs_above(index, 0.5, tmp_path / "c", dtype="bfloat16")
    assert embgeom.pairs_above(index, 0.5, tmp_path / "d", metric="cosine")["complete"]


UNWRITABLE = r"""
import os, sys
import numpy as np, embgeom
x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
for out in sys.argv[1:]:
    try:
        embgeom.pairs_above(x, 0.5, out)
        print("written")
    except ValueError as e:
        print(e)
"""


def test_unwritable_folders_are_named_as_out(tmp_path):
    # a new folder under a read-only one had raised a bare PermissionError, an existing read-only
    # folder "PATH/.lock: cannot be used as a lock file", neither naming the argument
    import shutil
    import subprocess
    import sys

    command = [sys.executable]
    if os.geteuid() == 0:  # root writes anywhere unless it gives up CAP_DAC_OVERRIDE
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: read-only folders are writable")
        command = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override", *command]
    ro = tmp_path / "ro"
    (ro / "existing").mkdir(parents=True)
    script = tmp_path / "unwritable.py"
    script.write_text(UNWRITABLE)
    for folder in (ro / "existing", ro):
        folder.chmod(0o555)
    try:
        done = subprocess.run([*command, str(script), str(ro / "new"), str(ro / "existing")],
                              capture_output=True, text=True, timeout=120)
    finally:
        for folder in (ro, ro / "existing"):
            folder.chmod(0o755)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f"out: cannot write {ro / 'new'}: the folder {ro} is not writable",
        f"out: cannot write {ro / 'existing' / '.lock'}: the folder {ro / 'existing'} is not writable"]


def test_command_line_writes_resumes_and_refuses(tmp_path, monkeypatch, capsys):
    """`embgeom pairs-above`: the API's pairs; Ctrl-C keeps the finished rows and the same
    command continues from them; bad input is one line naming the option."""
    from embgeom.cli import main

    x = make_rows(600, 6, seed=7)
    np.save(tmp_path / "x.npy", x.numpy())
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 500)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND", 128)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND_BF16", 128)
    real = Index._pairs_of_rows
    calls = []

    def stopped_once(self, st, r0, *args):
        calls.append(r0)
        if len(calls) == 3 and not getattr(stopped_once, "done", False):
            stopped_once.done = True
            raise KeyboardInterrupt
        yield from real(self, st, r0, *args)

    monkeypatch.setattr(Index, "_pairs_of_rows", stopped_once)
    out = tmp_path / "p"
    cmd = ["pairs-above", str(tmp_path / "x.npy"), "--threshold", "0.3", "--out", str(out)]
    assert main(cmd) == 130
    err = capsys.readouterr().err
    done = json.loads((out / "manifest.json").read_text())["rows_done"]
    assert done > 0
    assert f"the pairs of rows 0-{done - 1} of 600 are kept in {out}; the same command continues from them" in err
    calls.clear()
    assert main(cmd) == 0
    assert min(calls) == done
    err = capsys.readouterr().err
    assert f"embgeom pairs-above: {len(brute_pairs(x, 0.3)[0]):,} pairs with cosine >= 0.3 among 600 rows" in err
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(s["bytes"] for s in manifest["shards"]) / 2**20
    assert f" MiB in {len(manifest['shards'])} shards; embgeom.read_pairs)" in err and f"({size:.3g} MiB" in err, err
    # stopped before any row was saved, the line says nothing was kept (it said the rows were)
    capsys.readouterr()

    def stopped_first(self, st, r0, *args):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(Index, "_pairs_of_rows", stopped_first)
    assert main([*cmd[:-1], str(tmp_path / "q")]) == 130
    assert f"stopped before the first row was saved to {tmp_path / 'q'}: nothing was kept" in capsys.readouterr().err
    i, j, s = read_pairs(out)
    wi, wj, ws = brute_pairs(x, 0.3)
    assert np.array_equal(i, wi) and np.array_equal(j, wj) and np.array_equal(s, ws.astype(np.float32))
    assert json.loads((out / "provenance.json").read_text())["inputs"][0]["name"] == "X"

    np.save(tmp_path / "cube.npy", np.ones((2, 3, 4), np.float32))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for argv, message in (
        (["--threshold", "nan", "--out", str(tmp_path / "a")], "--threshold: expected a finite number"),
        (["--threshold", "-1", "--metric", "l2", "--out", str(tmp_path / "a")], "--threshold: expected a distance >= 0"),
        (["--threshold", "0.9", "--out", str(tmp_path / "full")], "--out: "),
        (["--threshold", "0.2", "--out", str(out)], "--out: "),  # the folder of another threshold
    ):
        assert main(["pairs-above", str(tmp_path / "x.npy"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["pairs-above", str(tmp_path / "cube.npy"), "--threshold", "0.9", "--out", str(tmp_path / "b")]) == 2
    assert "X: expected a matrix (N, D), got shape (2, 3, 4)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert os.listdir(tmp_path / "full") == ["notes.txt"]


def test_progress_is_a_bar_of_pairs(tmp_path, capsys, monkeypatch):
    """The bar counts the pairs compared (row i meets the n - 1 - i rows after it; counted in
    rows, the first rows' share had put the ETA at several times the run), a resumed run from
    the pairs of the rows already done."""
    from contextlib import contextmanager

    from embgeom.progress import Progress

    x = make_rows(300, 5, seed=2)
    pairs_above(x, 0.5, tmp_path / "p", progress=True)
    err = capsys.readouterr().err
    # stderr is no terminal here: the bar as plain lines (300 x 299 / 2 = 44,850 pairs)
    assert "embgeom.pairs_above: pairs: 44,850/44,850 pairs (100 %) in " in err
    pairs_above(x, 0.5, tmp_path / "p", progress=True)  # finished: nothing to do, no bar
    assert capsys.readouterr().err == ""

    bars = []

    class Recorder(Progress):
        @contextmanager
        def bar(self, total, desc, unit="it", unit_scale=False, initial=0):
            seen = {"total": total, "initial": initial, "done": initial}
            bars.append(seen)

            class Counter:
                def update(self, n=1):
                    seen["done"] += n
            yield Counter()

    monkeypatch.setattr(embgeom.index, "PAIR_BAND", 64)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND_BF16", 64)
    real, calls = pair_shards.ShardWriter.add_rows, []

    def stop_at_the_third_band(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(pair_shards.ShardWriter, "add_rows", stop_at_the_third_band)
    with pytest.raises(KeyboardInterrupt):
        pairs_above(x, 0.5, tmp_path / "q", progress=Recorder(enabled=True))
    monkeypatch.setattr(pair_shards.ShardWriter, "add_rows", real)
    pairs_above(x, 0.5, tmp_path / "q", progress=Recorder(enabled=True))
    done_rows = 128  # two bands of 64
    assert bars[1] == {"total": 44850, "initial": done_rows * 299 - done_rows * 127 // 2, "done": 44850}


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_an_interrupt_inside_a_shard_write_loses_no_pairs(tmp_path, monkeypatch, stop_at):
    """SIGTERM (or Ctrl-C) while a shard is being written at the end of a band: the buffer had
    been emptied before the write, so save_progress found nothing to keep and still counted the
    band's rows as done; the finished folder then lacked their pairs (267,455 of 6.1M in a
    probe) and read_pairs accepted it."""
    x = make_rows(700, 6, seed=13)
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 1 << 22)
    monkeypatch.setattr(pair_shards, "SAVE_SECONDS", 0.0)       # a shard at the end of every band
    monkeypatch.setattr(embgeom.index, "PAIR_BAND", 128)
    monkeypatch.setattr(embgeom.index, "PAIR_BAND_BF16", 128)
    real_save, saves = np.save, []

    def stopped_save(f, arr, **kw):
        saves.append(len(arr))
        if len(saves) == stop_at:
            raise KeyboardInterrupt                      # the signal lands inside the write
        return real_save(f, arr, **kw)

    index = Index(x)
    monkeypatch.setattr(pair_shards.np, "save", stopped_save)
    with pytest.raises(KeyboardInterrupt):
        index.pairs_above(0.3, tmp_path / "p")
    monkeypatch.setattr(pair_shards.np, "save", real_save)
    index.pairs_above(0.3, tmp_path / "p")
    i, j, s = read_pairs(tmp_path / "p")
    wi, wj, _ = brute_pairs(x, 0.3)
    assert np.array_equal(i, wi) and np.array_equal(j, wj)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_write_keeps_every_row(tmp_path, monkeypatch, sig):
    """Ctrl-C or SIGTERM while the last shard and the manifest are written, after every row was
    scanned: the run had ended with the manifest at its last save (0 of 3,000 rows here). The
    write now finishes first; the signal then ends the call, and the folder is complete."""
    import os
    import signal

    x = make_rows(3000, 16, seed=5)
    real_flush = pair_shards.ShardWriter._flush

    def flush(self, *args, **kw):
        if self._taken == self.manifest["n"]:
            os.kill(os.getpid(), getattr(signal, sig))
        return real_flush(self, *args, **kw)

    monkeypatch.setattr(pair_shards.ShardWriter, "_flush", flush)
    # Python's own handlers, whatever the test run inherited (a shell's background job ignores
    # SIGINT; terminate_as_interrupt takes over SIGTERM only from its default)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt):
            embgeom.pairs_above(x, 0.2, tmp_path / "p")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    monkeypatch.setattr(pair_shards.ShardWriter, "_flush", real_flush)
    i, j, _ = read_pairs(tmp_path / "p")                      # complete as it stands
    wi, wj, _ = brute_pairs(x, 0.2)
    assert np.array_equal(i, wi) and np.array_equal(j, wj)


def test_thresholds_below_float32s_range_take_every_pair(tmp_path):
    """A finite threshold below -3.4e38 is below every value: every pair (and one community of
    all rows), as range_search and sentence-transformers answer; it had become -inf on the way
    to the engine and was refused naming an argument the caller never gave (outside[0])."""
    import warnings

    x = make_rows(50, 8, seed=3)
    for metric, t in (("cosine", -1e39), ("dot", -1e300), ("dot", -3.5e38)):
        embgeom.pairs_above(x, t, tmp_path / f"{metric}{t}", metric=metric)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (the shard check's float32 threshold had warned of overflow)
            i, j, _ = read_pairs(tmp_path / f"{metric}{t}")
        assert len(i) == 50 * 49 // 2, (metric, t)
    assert [len(c) for c in embgeom.communities(x, threshold=-1e39, min_community_size=5)] == [50]


def test_l2_values_and_boundaries_agree_across_calls(tmp_path):
    """A float64 l2 distance is correctly rounded whichever call computes it: torch's CPU sqrt
    (2.13) gives sqrt(2) as 1.414213562373095, one ulp low, so a 5-query search, pairs_above and
    a 1-query search (the C++ core's std::sqrt) disagreed, and a pair at distance sqrt(2) was
    listed below the threshold nextafter(sqrt(2), 0)."""
    import math

    x = np.zeros((12, 4), np.float32)
    x[1, :2] = 1.0                                  # |x0 - x1| = sqrt(2)
    x[2, :] = [2.0, 2.0, 0.0, 0.0]                  # |x0 - x2| = sqrt(8)
    x[3:] = make_rows(9, 4, seed=1)
    index = Index(x, metric="l2")
    one = index.search(x[:1], 12, float64=True)
    five = index.search(x[:5], 12, float64=True)
    np.testing.assert_array_equal(np.asarray(one[0])[0], np.asarray(five[0])[0])
    got = dict(zip(np.asarray(one[1])[0].tolist(), np.asarray(one[0])[0].tolist()))
    assert got[1] == math.sqrt(2) and got[2] == math.sqrt(8)
    below = math.nextafter(math.sqrt(2), 0)
    embgeom.pairs_above(x, below, tmp_path / "p", metric="l2")
    i, j, d = read_pairs(tmp_path / "p")
    assert (0, 1) not in set(zip(i.tolist(), j.tolist())) and bool((d <= below).all())


def test_a_finished_folder_lists_every_shard_in_it(tmp_path, monkeypatch):
    """Shards a killed run wrote past its last manifest are removed before the folder is marked
    complete, so read_pairs refuses a complete folder holding a shard its manifest does not list
    (a manifest edited to leave out its last shard, count fixed, had read short)."""
    x = make_rows(400, 6, seed=8)
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 500)
    folder = tmp_path / "p"
    m = pairs_above(x, 0.3, folder)
    assert len(m["shards"]) >= 2
    # a leftover of a killed run beside an unfinished manifest: gone once the run finishes
    manifest = json.loads((folder / "manifest.json").read_text())
    stray = folder / "pairs-000099.npy"
    stray.write_bytes((folder / m["shards"][0]["file"]).read_bytes())
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pairs_above(x, 0.3, folder)
    assert not stray.exists()
    want = read_pairs(folder)
    assert np.array_equal(want[0], brute_pairs(x, 0.3)[0])
    last = manifest["shards"].pop()
    manifest.update(complete=True, count=manifest["count"] - last["count"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"is damaged: it holds {last['file']}, which its manifest.json does not list"):
        read_pairs(folder)


def test_reading_more_pairs_than_memory_holds_is_refused_naming_the_folder(tmp_path, monkeypatch):
    """read_pairs checks the manifest's count against the memory free before reading a shard,
    and fills the three arrays shard by shard (the pairs once, not 3.6 times)."""
    from embgeom.engine import limits

    x = make_rows(400, 6, seed=8)
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 500)
    folder = tmp_path / "p"
    m = pairs_above(x, 0.0, folder)
    assert len(m["shards"]) >= 3
    i, j, s = read_pairs(folder)
    wi, wj, ws = brute_pairs(x, 0.0)
    assert np.array_equal(i, wi) and np.array_equal(j, wj) and i.dtype == j.dtype == np.int64
    assert s.dtype == np.float32 and i.flags.c_contiguous and s.flags.c_contiguous
    monkeypatch.setattr(pair_shards, "SHARD_PAIRS", 1 << 28)   # as if a shard were large
    monkeypatch.setattr(limits, "memory_available", lambda: (1 << 30, "the machine has"))
    with pytest.raises(ValueError, match=rf"^folder: .* holds {m['count']:,} pairs; reading them needs about "
                                         r"[\d.,]+ GiB, the machine has 1\.0 GiB available: read its shards one"):
        read_pairs(folder)
