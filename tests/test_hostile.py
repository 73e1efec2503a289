"""Hostile inputs (issue 27): crafted checkpoints and model directories that would create a file
if anything in them ran, concurrent writers of one output, torn files, and the one-line
refusals of the readers. Every crafted payload is first shown to be live (loading it the unsafe
way does create its marker file), so a marker that stays absent means nothing ran."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import stat
import pickle
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import embgeom
from embgeom.engine import runner
from embgeom.engine.checkpoint import MAGIC, load_checkpoint, save_checkpoint
from embgeom.engine.config import PairwiseConfig
from embgeom.engine.state import EngineState
from embgeom.io import atomic_write, check_complete, check_output_folder, load_matrix, output_folder
from embgeom.models import load_model
from embgeom.report import write_json

from helpers import assert_engine_states_equal, make_embeddings


class CreatesFile:
    """Unpickling this calls open(path, "w"): a harmless stand-in for os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def crafted_pickle(marker, fp="f" * 64) -> bytes:
    return pickle.dumps({"fingerprint": fp, "payload": CreatesFile(marker)}, protocol=4)


def test_crafted_payloads_are_live(tmp_path):
    """Control: the payloads below do run when loaded the unsafe way."""
    got = pickle.loads(crafted_pickle(tmp_path / "a"))
    got["payload"].close()
    assert (tmp_path / "a").exists()
    buf = io.BytesIO()
    np.savez(buf, hist=np.array([CreatesFile(tmp_path / "b")], dtype=object))
    np.load(io.BytesIO(buf.getvalue()), allow_pickle=True)["hist"][0].close()
    assert (tmp_path / "b").exists()


# checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("magic", [b"EMBGEOM-CKPT2", b"EMBGEOM-CKPT1"])
def test_old_pickled_checkpoint_is_refused_without_unpickling(tmp_path, magic):
    marker = tmp_path / "ran"
    body = crafted_pickle(marker)
    path = tmp_path / "old.ckpt"
    path.write_bytes(magic + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(ValueError, match="old embgeom format .*unsafe.*delete it") as e:
        load_checkpoint(str(path), "f" * 64)
    assert str(path) in one_line(e)
    # the same file through the public API (and its own fingerprint)
    with pytest.raises(ValueError, match="old embgeom format"):
        embgeom.pairwise_stats(make_embeddings(10, 4), checkpoint=str(path), bins=0)
    assert not marker.exists()


def _format3(path, fp, meta: bytes, arrays: bytes, header_extra=None):
    header = {"fingerprint": fp, "meta_bytes": len(meta), "arrays_bytes": len(arrays),
              "sha256": hashlib.sha256(meta + arrays).hexdigest(), **(header_extra or {})}
    path.write_bytes(MAGIC + b"\n" + json.dumps(header).encode() + b"\n" + meta + arrays)


def _state(n=12, m=None, **cfg_kw):
    """A state of a real run: every list kind, per-row lists, histogram, outside counts."""
    cfg = PairwiseConfig(**{**dict(metric="cosine", bins=16, lo=-1.0, hi=1.0, topk=4, bottomk=3, near=0.5,
                                   near_k=3, row_topk=3, row_bottomk=2, outside=(-0.2, 0.2), block=4),
                            **cfg_kw})
    from embgeom.backends.cpp import CppEngine

    x = make_embeddings(n, 6, zero_rows=1, duplicate_rows=1, seed=1)
    y = None if m is None else make_embeddings(m, 6, seed=2)
    engine = CppEngine(x, y, cfg)
    engine.run(0, engine.num_tiles() - 1)  # not all tiles: a mid-run state
    return engine.state()


def test_crafted_format3_checkpoint_with_pickled_array_is_refused(tmp_path):
    marker = tmp_path / "ran"
    meta, arrays = _state().to_record()
    arrays["hist"] = np.array([CreatesFile(marker)], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # object arrays are pickled into the .npz
    path = tmp_path / "c.ckpt"
    payload = json.dumps({"payload": "state", "state": meta, "extra": {}}).encode()
    _format3(path, "f" * 64, payload, buf.getvalue())  # right fingerprint, right sizes, right sha256
    with pytest.raises(ValueError, match="not a valid embgeom checkpoint .*payload") as e:
        load_checkpoint(str(path), "f" * 64)
    assert str(path) in one_line(e)
    assert not marker.exists()


def test_an_array_header_claiming_more_than_its_member_holds_is_refused_before_allocating(tmp_path, monkeypatch):
    """A checkpoint's .npz member whose .npy header claims a shape past the member's bytes
    (checksum made anew) is refused from the sizes; numpy had allocated the claimed array
    (GBs for a header of a few bytes) before failing."""
    import zipfile

    meta, arrays = _state().to_record()
    member = next(k for k in arrays if arrays[k].size > 1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:   # (an .npz as np.savez writes it)
        for name, a in arrays.items():
            one = io.BytesIO()
            np.save(one, a, allow_pickle=False)
            data = one.getvalue()
            if name == member:   # the header's shape made 2**31 rows, its padding shortened to match
                shape = str(tuple(a.shape)).encode()
                big = str((2**31,) + tuple(a.shape[1:])).encode()
                data = data.replace(b"'shape': " + shape, b"'shape': " + big, 1)
                data = data.replace(b" " * (len(big) - len(shape)) + b"\n", b"\n", 1)
            zf.writestr(name + ".npy", data)
    crafted = buf.getvalue()
    allocated = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    path = tmp_path / "c.ckpt"
    _format3(path, "f" * 64, json.dumps({"payload": "state", "state": meta, "extra": {}}).encode(), crafted)
    with pytest.raises(ValueError, match=rf"not a valid embgeom checkpoint .*array '{re.escape(member)}' claims "
                                         r"\(2147483648") as e:
        load_checkpoint(str(path), "f" * 64)
    one_line(e)
    assert not any(a and isinstance(a[0], tuple) and a[0] and a[0][0] == 2**31 for a in allocated)


def test_fingerprint_is_checked_before_the_payload_is_parsed(tmp_path):
    path = tmp_path / "c.ckpt"
    _format3(path, "a" * 64, b"not json", b"not a zip", {"identity": {"settings": {"bins": 10}}})
    with pytest.raises(ValueError, match="another input or other settings"):
        load_checkpoint(str(path), "b" * 64)
    # a header of an embgeom from before the identity: said so, not blamed on the input
    _format3(path, "a" * 64, b"not json", b"not a zip")
    with pytest.raises(ValueError, match="written by an older embgeom, .*cannot be resumed; delete it"):
        load_checkpoint(str(path), "b" * 64)


@pytest.mark.parametrize("identity", [
    {"settings": {"evil\nsecond line": 1, "bins\u2028": "x\ny"}, "numerics": {"a\rb": [1] * 100}},
    "not a dict", [1, 2], None])
def test_crafted_identity_gives_one_line(tmp_path, identity):
    from embgeom.engine.checkpoint import fingerprint

    path = tmp_path / "c.ckpt"
    _format3(path, "a" * 64, b"not json", b"not a zip", {"identity": identity})
    fp = fingerprint(make_embeddings(5, 3), None, PairwiseConfig(), "cpp", 1, {"product": "k"})
    with pytest.raises(ValueError, match="checkpoint: ") as e:
        load_checkpoint(str(path), fp)
    one_line(e)
    assert "\u2028" not in str(e.value) and "\r" not in str(e.value)


def test_deeply_nested_header_is_refused_in_one_line(tmp_path):
    path = tmp_path / "c.ckpt"
    path.write_bytes(MAGIC + b"\n" + b"[" * 3000 + b"\n")
    with pytest.raises(ValueError, match="not a valid embgeom checkpoint") as e:
        load_checkpoint(str(path), "b" * 64)
    one_line(e)


@pytest.mark.parametrize("bad", ["extra_header_key", "unknown_array", "wrong_dtype", "bad_shape", "extra_meta"])
def test_format3_checkpoint_that_we_did_not_write_is_refused(tmp_path, bad):
    meta, arrays = _state().to_record()
    header_extra = {}
    if bad == "extra_header_key":
        header_extra = {"pickle": True}
    elif bad == "unknown_array":
        arrays["evil"] = np.zeros(3)
        meta["arrays"] = sorted(arrays)
    elif bad == "wrong_dtype":
        arrays["hist"] = arrays["hist"].astype(np.float64)
    elif bad == "bad_shape":
        arrays["row_top.values"] = arrays["row_top.values"][:-1]
    else:
        meta["code"] = "import os"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = tmp_path / "c.ckpt"
    _format3(path, "f" * 64, json.dumps({"payload": "state", "state": meta, "extra": {}}).encode(),
             buf.getvalue(), header_extra)
    with pytest.raises(ValueError, match="not a valid embgeom checkpoint") as e:
        load_checkpoint(str(path), "f" * 64)
    one_line(e)


@pytest.mark.parametrize("m", [None, 7])
def test_checkpoint_round_trip(tmp_path, m):
    state = _state(m=m)
    assert state.row_top is not None and state.hist is not None and len(state.top[0]) > 0
    assert (state.outside_cols is not None) == (m is not None)
    path = str(tmp_path / "s.ckpt")
    save_checkpoint(path, "fp", state)
    assert_engine_states_equal(load_checkpoint(path, "fp"), state, float_rel=0.0)
    # the distributed runner's payload: a state and the finished job ids
    save_checkpoint(path, "fp", {"state": state, "done": [3, 0, 5]})
    got = load_checkpoint(path, "fp")
    assert set(got) == {"state", "done"} and got["done"] == [3, 0, 5]
    assert_engine_states_equal(got["state"], state, float_rel=0.0)
    # a fresh state: no extremes, empty lists
    empty = EngineState.empty(PairwiseConfig(bins=0, topk=2), 5, m)
    save_checkpoint(path, "fp", empty)
    assert_engine_states_equal(load_checkpoint(path, "fp"), empty, float_rel=0.0)
    assert os.listdir(tmp_path) == ["s.ckpt"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_resume_through_api_equals_uninterrupted_run(tmp_path, monkeypatch, backend):
    x = make_embeddings(60, 8, zero_rows=1, duplicate_rows=2, seed=4)
    kw = dict(backend=backend, block=8, bins=20, topk=5, bottomk=5, row_topk=3, outside=(-0.3, 0.3))
    want = embgeom.pairwise_stats(x, **kw).to_dict()
    path = str(tmp_path / "run.ckpt")
    with _ended_after_three_saves(monkeypatch, Killed), pytest.raises(Killed):
        embgeom.pairwise_stats(x, checkpoint=path, **kw)
    assert _resumed_tiles(monkeypatch, x, path, kw, want) == 3


@contextlib.contextmanager
def _ended_after_three_saves(monkeypatch, exc):
    """Inside: the run's checkpoint saves (one tile each) raise `exc` after the third."""
    real_save, saves = runner.save_checkpoint, []

    def save_then_end(*args):
        real_save(*args)
        saves.append(1)
        if len(saves) == 3:
            raise exc

    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", "0")  # one tile per chunk
    monkeypatch.setattr(runner, "save_checkpoint", save_then_end)
    try:
        yield
    finally:
        monkeypatch.setattr(runner, "save_checkpoint", real_save)


def test_an_interrupted_checkpointed_run_says_what_it_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C in pairwise_stats(checkpoint=...): the KeyboardInterrupt a caller sees (a notebook's
    traceback) says how many tiles are saved and that the same call resumes; a finished
    checkpoint's rerun says it holds the finished run (it said 'resuming ... 36 of 36 tiles')."""
    x = make_embeddings(60, 8, seed=4)
    kw = dict(block=8, bins=20, topk=5)
    path = str(tmp_path / "run.ckpt")
    with _ended_after_three_saves(monkeypatch, KeyboardInterrupt), \
            pytest.raises(KeyboardInterrupt, match=rf"^interrupted: 3 of 36 tiles are saved in {re.escape(path)}; "
                                                   "the same call resumes from them$"):
        embgeom.pairwise_stats(x, checkpoint=path, **kw)
    embgeom.pairwise_stats(x, checkpoint=path, progress=True, **kw)
    assert f"resuming from {path}: 3 of 36 tiles done" in capsys.readouterr().err
    embgeom.pairwise_stats(x, checkpoint=path, progress=True, **kw)
    assert f"{path} holds the finished run (36 tiles)" in capsys.readouterr().err


def _resumed_tiles(monkeypatch, x, path, kw, want) -> int:
    """Rerun pairwise_stats(x, checkpoint=path, **kw): assert its result is `want` (an
    uninterrupted run's to_dict()) and return the tiles done in the checkpoint it resumed."""
    resumed_from = []
    real_load = runner.load_checkpoint
    monkeypatch.setattr(runner, "load_checkpoint", lambda *a: resumed_from.append(real_load(*a)) or resumed_from[-1])
    got = embgeom.pairwise_stats(x, checkpoint=path, **kw).to_dict()
    want, got = dict(want), dict(got)
    want.pop("seconds"), got.pop("seconds")
    assert got == want
    return resumed_from[0].tiles_done


@pytest.mark.parametrize("seconds", ["0", "inf"])
def test_a_signal_during_a_chunk_is_raised_after_that_chunk_is_saved(tmp_path, monkeypatch, seconds, ctrl_c_raises):
    """SIGINT while the engine runs a chunk (the C++ call holds no GIL: Python takes the signal
    as it returns): the chunk is saved, then KeyboardInterrupt. It had been raised before the
    save, losing the chunk, and under EMBGEOM_CHECKPOINT_SECONDS=inf (one chunk) the whole run."""
    import os
    import signal

    from embgeom import api

    x = make_embeddings(60, 8, seed=5)
    kw = dict(block=8, bins=20, topk=5, row_topk=3)
    want = embgeom.pairwise_stats(x, **kw).to_dict()
    path = str(tmp_path / "run.ckpt")
    real_run_engine = api.run_engine

    class SignalledInChunk2:
        def __init__(self, engine):
            self.engine, self.chunks = engine, 0

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def run(self, begin, end):
            self.engine.run(begin, end)
            self.chunks += 1
            if self.chunks == 2:
                os.kill(os.getpid(), signal.SIGINT)   # as if it came while the call ran

    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", seconds)
    monkeypatch.setattr(api, "run_engine", lambda engine, **k: real_run_engine(SignalledInChunk2(engine), **k))
    with pytest.raises(KeyboardInterrupt):
        embgeom.pairwise_stats(x, checkpoint=path, **kw)
    monkeypatch.setattr(api, "run_engine", real_run_engine)
    # chunks of one tile each, or (inf) a first tile, then the rest in one
    assert _resumed_tiles(monkeypatch, x, path, kw, want) == (2 if seconds == "0" else 36)


def _crafted(name):
    """A change a crafted checkpoint (its checksum made anew) could make to a saved state."""
    def top(i, j):
        return lambda st: setattr(st, "top", (np.array([0.99]), np.array([i]), np.array([j])))

    def row_top_column(st):
        vals, cols = (a.copy() for a in st.row_top)
        cols[0, 0] = 10 ** 9
        st.row_top = (vals, cols)

    def row_own(st):
        vals, cols = (a.copy() for a in st.row_top)
        cols[0, 0] = 0
        st.row_top = (vals, cols)

    def moments(mean=None, m2=None, m2_times=None):
        """mean and m2 set, the shifted sums the engines resume from made to agree with them"""
        def edit(st):
            new_mean = st.mean if mean is None else mean(st)
            new_m2 = st.m2 if m2 is None else m2(st)
            shift = st.moment_shift if math.isfinite(st.moment_shift) else 0.0
            st.moment_shift, st.mean, st.m2 = shift, new_mean, new_m2
            st.shifted_sum = st.count * (new_mean - shift)
            st.shifted_sumsq = new_m2 + st.count * (new_mean - shift) ** 2
        return edit

    def outside_inside(st):
        vals, i, j = (a.copy() for a in st.outside_pairs)
        vals[0] = 0.0
        st.outside_pairs = (vals, i, j)

    return {
        "mean past max": (moments(mean=lambda st: float(st.max[0]) + 0.05), "the mean must lie between min and max"),
        "m2 too large": (moments(m2=lambda st: st.count * 10.0), "m2 is more than values between min and max allow"),
        "m2 zero": (moments(m2=lambda st: 0.0), "m2 is less than min and max give together"),
        "max above lists": (lambda st: setattr(st, "max", (0.9999, *st.max[1:])), "top: its first value is not the max"),
        "outside inside": (outside_inside, r"outside_pairs: a value inside \(-0.2, 0.2\)"),
        "outside undercounted": (lambda st: (setattr(st, "outside_count", 0), setattr(st, "outside_rows", st.outside_rows * 0)),
                                 "outside_pairs: [0-9]+ listed, outside_count 0"),
        "diagonal pair": (top(0, 0), "top: a pair outside"),
        "reversed pair": (top(3, 1), "top: a pair outside"),
        "far pair": (top(10 ** 9, 5), "top: a pair outside"),
        "short histogram": (lambda st: setattr(st, "hist", st.hist[:3]), r"hist must be \(2002,\)"),
        "histogram wraps": (lambda st: setattr(st, "hist", st.hist + np.array([2 ** 62] * 4 + [0] * (st.hist.size - 4),
                                                                       st.hist.dtype)),
                            r"the histogram.s counts sum to 184467440737095\d{5}, not count \d+"),
        "outside rows": (lambda st: setattr(st, "outside_rows", st.outside_rows + np.eye(1, st.outside_rows.size, 3,
                                                                                      dtype=np.int64)[0] * 10 ** 12),
                         r"outside_rows sums to 10000000\d+, not twice outside_count \d+"),
        "tiles_done -1": (lambda st: setattr(st, "tiles_done", -1), "tiles_done must be an integer >= 0"),
        "tiles_done 2^70": (lambda st: setattr(st, "tiles_done", 2 ** 70), "tiles_done 1180591620717411303424 of a run"),
        "count too large": (lambda st: setattr(st, "count", st.count + 10 ** 6), "more than its"),
        "row neighbour 10^9": (row_top_column, "row_top: a column outside"),
        "long list": (lambda st: setattr(st, "top", tuple(np.concatenate([a] * 3) for a in st.top)), "top: 15 pairs, this run lists at most 5"),
        "outside 2^70": (lambda st: setattr(st, "outside_count", 2 ** 70), "outside_count .* more than its"),
        "error bound NaN": (lambda st: setattr(st, "hist_error_bound", math.nan), "hist_error_bound must be finite"),
        "cosine 5": (lambda st: setattr(st, "top", (st.top[0] * 0 + 5.0, *st.top[1:])), "top: .*out of range"),
        "pair twice": (lambda st: setattr(st, "top", tuple(np.concatenate([a[:1]] * 2 + [a[2:]]) for a in st.top)),
                       "top: a pair listed twice"),
        "own neighbour": (row_own, "row_top: a row listed as its own neighbour"),
        "excluded twice": (lambda st: setattr(st, "excluded_rows", np.array([3, 3], np.int64)), "excluded_rows: an index listed twice"),
        "count too small": (lambda st: (setattr(st, "count", 0), setattr(st, "hist", st.hist * 0)), "count 0 is less than"),
        "shifted sums": (lambda st: setattr(st, "shifted_sumsq", -1e6) if math.isfinite(st.shifted_sumsq)
                         else (setattr(st, "moment_shift", 0.0), setattr(st, "shifted_sum", 1e308),
                               setattr(st, "shifted_sumsq", 1.0)), "shifted sums"),
    }[name]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("change", ["diagonal pair", "reversed pair", "far pair", "short histogram", "histogram wraps",
                                    "outside rows",
                                    "tiles_done -1",
                                    "tiles_done 2^70", "count too large", "row neighbour 10^9", "long list",
                                    "outside 2^70", "error bound NaN", "cosine 5", "pair twice", "own neighbour",
                                    "excluded twice", "count too small", "shifted sums", "mean past max",
                                    "m2 too large", "m2 zero", "max above lists", "outside inside",
                                    "outside undercounted"])
def test_a_crafted_state_that_does_not_fit_is_refused(tmp_path, monkeypatch, backend, change):
    """A state that no run of these settings writes (its checksum made anew, as a crafted file's
    would be) is refused with one line on every backend, before any engine takes it: the torch
    engine had copied it as it was (a 3-bin histogram of a 2,000-bin run, a neighbour 10^9, a pair
    count above the pairs there are), and the C++ one had answered 2^70 tiles with a RuntimeError."""
    x = make_embeddings(40, 8, seed=6)
    path = str(tmp_path / "run.ckpt")
    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", "0")
    real_save = runner.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        raise Killed

    opts = dict(checkpoint=path, backend=backend, block=8, topk=5, row_topk=3, outside=(-0.2, 0.2))
    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        embgeom.pairwise_stats(x, **opts)
    monkeypatch.setattr(runner, "save_checkpoint", real_save)
    real_load = runner.load_checkpoint
    edit, message = _crafted(change)

    def crafted(*a):
        st = real_load(*a)
        edit(st)
        return st

    monkeypatch.setattr(runner, "load_checkpoint", crafted)
    with pytest.raises(ValueError, match=f"checkpoint: {re.escape(path)}: state does not fit this run: .*{message}") as info:
        embgeom.pairwise_stats(x, **opts)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(runner, "load_checkpoint", real_load)
    assert embgeom.pairwise_stats(x, **opts).count == 40 * 39 // 2    # the file itself resumes


def test_torn_checkpoint_is_refused_with_one_line(tmp_path):
    path = tmp_path / "s.ckpt"
    save_checkpoint(str(path), "fp", _state())
    whole = path.read_bytes()
    header_end = whole.index(b"\n", len(MAGIC) + 1) + 1
    for cut in (0, 5, len(MAGIC) + 1, header_end - 3, header_end, header_end + 10, len(whole) - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="not a valid embgeom checkpoint") as e:
            load_checkpoint(str(path), "fp")
        assert str(path) in one_line(e), cut
    flipped = bytearray(whole)
    flipped[-100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(str(path), "fp")


def test_a_huge_declared_body_is_checked_before_it_is_read(tmp_path):
    """A checkpoint whose header declares a 256 MB body and whose file is that size (sparse: a
    forger's 64 GiB costs no disk) is refused on its checksum, taken in pieces: the body had been
    read whole first (MemoryError for 64 GiB)."""
    import json
    import tracemalloc

    path = tmp_path / "s.ckpt"
    save_checkpoint(str(path), "fp", _state())
    whole = path.read_bytes()
    header_end = whole.index(b"\n", len(MAGIC) + 1) + 1
    header = json.loads(whole[len(MAGIC) + 1:header_end])
    header["arrays_bytes"] = (256 << 20) - header["meta_bytes"]
    with open(path, "wb") as f:
        f.write(MAGIC + b"\n" + json.dumps(header).encode() + b"\n")
        f.truncate(f.tell() + (256 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="size or checksum does not match"):
            load_checkpoint(str(path), "fp")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak


def test_checkpoint_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory") as e:
        load_checkpoint(str(tmp_path), "fp")
    one_line(e)
    with pytest.raises(ValueError, match="is a directory") as e:
        save_checkpoint(str(tmp_path), "fp", _state())
    one_line(e)
    with pytest.raises(ValueError, match="is a directory"):
        embgeom.pairwise_stats(make_embeddings(10, 4), checkpoint=str(tmp_path), bins=0)


# model directories ----------------------------------------------------------------------------

def _custom_code_model(tiny_bert_dir, tmp_path, marker):
    path = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, path)
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                  "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="embgeom-evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def test_model_that_needs_its_own_code_is_refused(tiny_bert_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    path = _custom_code_model(tiny_bert_dir, tmp_path, marker)
    with pytest.raises(ValueError, match="needs its own Python code .*auto_map") as e:
        load_model(path)
    one_line(e)
    assert not marker.exists()
    # without the up-front check, transformers itself is told trust_remote_code=False: it
    # refuses instead of asking [y/N] (stdin is closed here, so a prompt would fail too)
    import embgeom.models

    monkeypatch.setattr(embgeom.models, "refuse_custom_code", lambda path: None)
    with pytest.raises(ValueError, match="cannot load") as e:
        load_model(path)
    one_line(e)
    assert not marker.exists()


def test_a_cached_hub_model_that_needs_its_own_code_is_refused(tiny_bert_dir, tmp_path):
    """A Hub id whose cached snapshot has an auto_map (config.json, then tokenizer_config.json):
    refused as a local folder is, its code never run; transformers, told not to run it, had
    loaded the stock BERT classes in its place without a word. (A process of its own: the cache
    folder is read from HF_HOME at import.)"""
    import subprocess
    import sys

    marker = tmp_path / "ran"
    snap = tmp_path / "hf" / "hub" / "models--evil--automap" / "snapshots" / ("0" * 40)
    shutil.copytree(_custom_code_model(tiny_bert_dir, tmp_path, marker), snap)
    cfg = json.loads((snap / "config.json").read_text())
    (snap / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))  # (one transformers knows)
    (tmp_path / "hf" / "hub" / "models--evil--automap" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--evil--automap" / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    script = ("import embgeom\ntry:\n    embgeom.load_model('evil/automap')\nexcept ValueError as e:\n    print(e)\n"
              "else:\n    print('LOADED')\n")

    def run():
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=300).stdout.strip()

    assert run() == ("model: 'evil/automap' needs its own Python code (config.json has an auto_map); "
                     "embgeom never runs code from a model, so it is refused")
    (snap / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "auto_map"} | {"model_type": "bert"}))
    tok = json.loads((snap / "tokenizer_config.json").read_text())
    (snap / "tokenizer_config.json").write_text(json.dumps(dict(tok, auto_map={"AutoTokenizer": ["evil.Tok", None]})))
    assert "(tokenizer_config.json has an auto_map)" in run()
    assert not marker.exists()


def test_a_tokenizer_that_is_not_the_models_is_refused(tiny_bert_dir, tmp_path):
    """Weights without tokenizer files (transformers built a tokenizer of its five special
    tokens: every word [UNK], a plausible report of nothing) and a tokenizer with ids past the
    embeddings (an IndexError deep in the forward pass): one line each, naming the model."""
    from transformers import BertConfig, BertModel

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_bert_dir, name), bare / name)
    with pytest.raises(ValueError, match="has no tokenizer files") as e:
        load_model(str(bare))
    one_line(e)
    # names alone are no tokenizer: a link to nothing (a Hub snapshot copied without -L), a pipe,
    # a folder, an unrelated *.model file had each loaded the five-token tokenizer silently
    (bare / "tokenizer.json").symlink_to(tmp_path / "blobs" / "missing")
    with pytest.raises(ValueError, match=r"has no tokenizer files .*\(tokenizer.json: a link to nothing\)"):
        load_model(str(bare))
    (bare / "tokenizer.json").unlink()
    os.mkfifo(bare / "tokenizer.json")
    with pytest.raises(ValueError, match="model: .*tokenizer.json is not a regular file"):
        load_model(str(bare))
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer.json").mkdir()
    with pytest.raises(ValueError, match="model: .*tokenizer.json is not a regular file"):
        load_model(str(bare))
    (bare / "tokenizer.json").rmdir()
    (bare / "notes.model").write_bytes(b"not sentencepiece")
    with pytest.raises(ValueError, match=r"its tokenizer has only its 5 special tokens \(every word would be \[UNK\]\)") as e:
        load_model(str(bare))
    one_line(e)
    small = tmp_path / "small"
    shutil.copytree(tiny_bert_dir, small)
    cfg = BertConfig.from_pretrained(small)
    cfg.vocab_size -= 3
    BertModel(cfg).save_pretrained(str(small), safe_serialization=True)
    with pytest.raises(ValueError, match=f"its tokenizer has {cfg.vocab_size + 3} tokens, its embeddings "
                       f"{cfg.vocab_size} rows") as e:
        load_model(str(small))
    one_line(e)


def test_a_sentence_pair_on_a_model_of_one_token_type_is_one_line(tiny_bert_dir, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from embgeom.cli import main

    one_type = tmp_path / "one_type"
    shutil.copytree(tiny_bert_dir, one_type)
    cfg = BertConfig.from_pretrained(one_type)
    cfg.type_vocab_size = 1
    BertModel(cfg).save_pretrained(str(one_type), safe_serialization=True)
    (tmp_path / "c.txt").write_text("the cat sat\tthe dog ran\n")
    capsys.readouterr()   # (save_pretrained's own progress bar)
    assert main(["text", str(tmp_path / "c.txt"), "--model", str(one_type), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "a sentence pair (a TAB in a line) gives its second side token type 1, and this model has 1 token" in err
    assert len(err.strip().splitlines()) == 1


def test_truncated_safetensors_is_one_line(tiny_bert_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, path)
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    for cut in (4, len(whole) // 2):
        weights.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt") as e:
            load_model(str(path))
        one_line(e)


@pytest.mark.parametrize("key, value, match", [
    ("num_hidden_layers", 0, "asks for 0 layers"),
    ("num_hidden_layers", 10**6, "asks for 1000000 layers"),
    ("num_hidden_layers", 300, "describes a model of .* parameters but its weights hold"),
    ("num_hidden_layers", 1, "no place for .*encoder.layer.1"),  # the second layer was left out
    ("max_position_embeddings", 10**7, r"position_embeddings.weight the shape \[10000000, 64\]"),
    ("num_hidden_layers", "2", "expected int, got str"),
    ("hidden_act", "nope", "KeyError"),
    ("num_attention_heads", 0, "ZeroDivisionError"),
])
def test_config_that_does_not_describe_its_weights_is_refused_before_building(tiny_bert_dir, tmp_path, key, value,
                                                                             match):
    # a config.json value is read by transformers before anything checks it: counts it builds
    # (10^7 positions allocated 2.6 GB, 10^6 layers never finished), types and names it indexes
    path = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="^model: .*" + match) as e:
        load_model(str(path))
    one_line(e)


# single-file writes ---------------------------------------------------------------------------

def _writer(write, tag, rounds, barrier):
    try:
        for r in range(rounds):
            barrier.wait()
            write(tag, r)
            barrier.wait()
    except BaseException:
        barrier.abort()  # the parent stops waiting; the exit code tells
        raise


def race_two_writers(write, rounds, check):
    """Two forked processes call write(tag, round) at the same moment, round after round;
    check(round) runs in this process once both have finished that round."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3, timeout=60)
    procs = [ctx.Process(target=_writer, args=(write, tag, rounds, barrier)) for tag in (0, 1)]
    for p in procs:
        p.start()
    broken = False
    try:
        for r in range(rounds):
            barrier.wait()  # both start writing
            barrier.wait()  # both done
            check(r)
    except threading.BrokenBarrierError:  # a writer failed and aborted
        broken = True
    except BaseException:
        barrier.abort()  # a check failed: release the writers (never after a clean last round:
        raise            # a writer not yet woken from it would see the barrier broken)
    finally:
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0, 0] and not broken


def test_concurrent_writers_leave_whole_json(tmp_path):
    path = str(tmp_path / "out.json")

    def write(tag, r):
        write_json(path, {"writer": tag, "values": list(range(tag, 40000 + tag)), "round": r})  # many write() calls

    def check(r):
        got = json.loads(open(path).read())
        assert got["round"] == r and got["values"][0] == got["writer"] in (0, 1)
        assert os.listdir(tmp_path) == ["out.json"]

    race_two_writers(write, 8, check)


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.json"
    write_json(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as f:
            f.write("{partial")
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]
    with pytest.raises(TypeError):
        write_json(str(path), {"a": object()})  # serialised before the file opens
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_takes_names_up_to_name_max_and_undecoded_paths(tmp_path):
    """A legal 255-byte name had been refused ("File name too long": the temporary name beside it
    added 20 bytes); a file name the file system gave back undecoded (a C locale: surrogates) had
    failed the whole report's write after the work was done."""
    from embgeom.io import output_folder

    for name in ("b" * 255, "é" * 127 + "x"):
        write_json(str(tmp_path / name), {"a": 1})
        assert json.loads((tmp_path / name).read_text()) == {"a": 1}
        with output_folder(str(tmp_path / (name[:-4] + ".out")), command="test") as out:
            with atomic_write(os.path.join(out, "page.html"), name="page") as f:
                f.write("x")
        assert (tmp_path / (name[:-4] + ".out") / "page.html").read_text() == "x"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    undecoded = b"caf\xc3\xa9".decode("ascii", "surrogateescape")  # as a C locale decodes the name
    with atomic_write(str(tmp_path / "page.html"), name="page") as f:
        f.write(f"<p>{undecoded}</p>")
    assert (tmp_path / "page.html").read_bytes() == "<p>café</p>".encode()


def test_an_out_folder_holding_the_working_folder_is_refused(tmp_path, monkeypatch):
    """`cd d && embgeom project ../x.npy --out .` had swapped the folder out from under the shell:
    its next command (torch's import) failed in a deleted working folder."""
    (tmp_path / "d" / "e").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "d" / "e")
    for out in (".", "..", str(tmp_path / "d")):
        with pytest.raises(ValueError, match="holds the current folder"):
            check_output_folder(out, command="project")
    assert check_output_folder("../f", command="project") == str(tmp_path / "d" / "f")


def test_one_run_at_a_time_on_a_pairs_checkpoint(tmp_path):
    """Two `pairs --checkpoint PATH` runs at once had both run in full, each saving over the
    other's progress; the second is refused in one line, as `text` and `pairs-above` do."""
    from embgeom.io import exclusive_lock

    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    path = str(tmp_path / "ck")
    held = exclusive_lock(path + ".lock", "held", "checkpoint")  # another run holds PATH
    try:
        with pytest.raises(ValueError, match=f"checkpoint: {path} is in use by another run"):
            embgeom.pairwise_stats(x, checkpoint=path)
    finally:
        os.close(held)
    assert embgeom.pairwise_stats(x, checkpoint=path).count == 50 * 49 // 2
    assert embgeom.pairwise_stats(x, checkpoint=path).count == 50 * 49 // 2  # its own lock let go


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(str(tmp_path / "a.json"), [1])
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_write_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such folder") as e:
        write_json(str(tmp_path / "missing" / "a.json"), {})
    assert str(tmp_path / "missing" / "a.json") in one_line(e)
    with pytest.raises(ValueError, match="it is a directory") as e:
        write_json(str(tmp_path), {})
    one_line(e)
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ValueError, match="not writable"):
                write_json(str(ro / "a.json"), {})
        finally:
            ro.chmod(0o755)
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match=r"cannot write .*a\.json: the folder .* is not writable") as e:
        write_json(str(tmp_path / "a.json"), {})
    one_line(e)


# matrix files ---------------------------------------------------------------------------------

def test_big_endian_npy_is_read_in_native_order(tmp_path):
    x = make_embeddings(5, 3).numpy()
    np.save(tmp_path / "x.npy", x.astype(">f4"))
    got = load_matrix(str(tmp_path / "x.npy"))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), x)


def test_expanded_pt_is_refused_not_read_as_a_huge_matrix(tmp_path):
    # a 2 KB file of an expanded view had been read as a 3,000,000-row matrix of one row
    torch.save(torch.randn(1, 64).expand(3_000_000, 64), tmp_path / "x.pt")
    assert os.path.getsize(tmp_path / "x.pt") < 10_000
    with pytest.raises(ValueError, match=r"holds a \(3000000, 64\) tensor stored as 64 values") as e:
        load_matrix(str(tmp_path / "x.pt"))
    one_line(e)
    torch.save({"x": torch.randn(100, 8)[10:20]}, tmp_path / "view.pt")  # a slice of more: read
    assert load_matrix(str(tmp_path / "view.pt")).shape == (10, 8)


def test_pickled_pt_is_refused_with_one_line(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"x": torch.zeros(2, 2), "obj": CreatesFile(marker)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="pickled objects beyond plain tensors; refused for safety") as e:
        load_matrix(str(tmp_path / "x.pt"))
    assert "weights_only" not in one_line(e)
    assert not marker.exists()


def test_a_raw_pickle_as_pt_is_refused_without_torch_warnings(tmp_path):
    """A bare pickle (protocol 4, a call of os.system) named .pt: refused in one line, never run,
    and torch's pickle-protocol UserWarning no longer printed before the refusal."""
    import pickle
    import warnings

    marker = tmp_path / "ran"
    (tmp_path / "x.pt").write_bytes(pickle.dumps(CreatesFile(marker), protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="x.pt: not a tensor file torch can read safely") as e:
            load_matrix(str(tmp_path / "x.pt"))
    one_line(e)
    assert not marker.exists()


def test_unreadable_pt_is_one_line_without_torch_advice(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="cannot read .*not a tensor file torch can read") as e:
        load_matrix(str(tmp_path / "x.pt"))
    assert "weights_only" not in one_line(e)


# ------------------------------------------------------------------ report folders (output_folder)
def test_output_folder_swaps_in_whole_runs_and_seals_them(tmp_path):
    out = tmp_path / "rep"
    with output_folder(str(out), command="test") as staging:
        assert not out.exists() and os.path.basename(staging).endswith(".partial")
        (Path(staging) / "a.txt").write_text("first")
        (Path(staging) / "old.txt").write_text("only in the first run")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["command"] == "test"
    assert manifest["files"]["a.txt"]["sha256"] == hashlib.sha256(b"first").hexdigest()
    check_complete(str(out / "a.txt"), "X")
    with output_folder(str(out), command="test") as staging:  # a second run replaces the first whole
        (Path(staging) / "a.txt").write_text("second")
    assert sorted(os.listdir(out)) == ["a.txt", "manifest.json"]
    assert os.listdir(tmp_path) == ["rep"]  # no staging or old folder left behind
    with pytest.raises(RuntimeError):
        with output_folder(str(out), command="test") as staging:
            (Path(staging) / "a.txt").write_text("third, never finished")
            raise RuntimeError("failed late")
    assert (out / "a.txt").read_text() == "second" and os.listdir(tmp_path) == ["rep"]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_output_folder_survives_a_kill_inside_the_swap(tmp_path, monkeypatch, exchange):
    """A writer killed between the two renames of a swap (the old output moved aside, the new one
    not yet in place) loses nothing: the next writer puts the old output back before its sweep of
    dead writers' leftovers, and its own failure then leaves that output in place."""
    import subprocess
    import sys

    import embgeom.io as eio

    if not exchange:
        monkeypatch.setattr(eio, "_exchange", lambda a, b: False)
    out = tmp_path / "rep"
    with output_folder(str(out), command="test") as staging:
        (Path(staging) / "a.txt").write_text("first")
    with output_folder(str(out), command="test") as staging:  # replaced whole, by either swap
        (Path(staging) / "a.txt").write_text("second")
    assert (out / "a.txt").read_text() == "second" and os.listdir(tmp_path) == ["rep"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    aside = tmp_path / f".rep.{dead}.x1.old.partial"
    aside.mkdir()
    os.rename(out, aside / "previous")  # where the kill left it
    (tmp_path / f".rep.{dead}.x2.partial").mkdir()  # and the killed run's own staging folder
    with pytest.raises(RuntimeError):
        with output_folder(str(out), command="test"):
            raise RuntimeError("this run fails too")
    assert (out / "a.txt").read_text() == "second"
    check_complete(str(out / "a.txt"), "X")
    assert os.listdir(tmp_path) == ["rep"]
    # the aside copy of another output whose name starts alike (rep.9) is not rep's to restore
    with output_folder(str(tmp_path / "rep.9"), command="test") as staging:
        (Path(staging) / "a.txt").write_text("rep.9's")
    other = tmp_path / f".rep.9.{dead}.abcd1234.old.partial"
    other.mkdir()
    os.rename(tmp_path / "rep.9", other / "previous")
    import shutil

    shutil.rmtree(out)
    with pytest.raises(RuntimeError):
        with output_folder(str(out), command="test"):
            raise RuntimeError("fails")
    assert not out.exists() and (other / "previous" / "a.txt").read_text() == "rep.9's"
    with pytest.raises(RuntimeError):  # rep.9's own next writer puts it back, even when it fails
        with output_folder(str(tmp_path / "rep.9"), command="test"):
            raise RuntimeError("fails")
    assert (tmp_path / "rep.9" / "a.txt").read_text() == "rep.9's"


def test_output_folder_through_a_link_replaces_the_folder_it_names(tmp_path):
    """--out naming a link to a folder: the run replaces that folder and the link stays (the swap
    had renamed the link aside and put a new folder in its place, the target never written); a
    link to nothing, or to a file, is refused in one line. The folder keeps its permission bits."""
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to("target")
    for text in ("first", "second"):
        with output_folder(str(tmp_path / "link"), command="test") as staging:
            (Path(staging) / "a.txt").write_text(text)
        assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "a.txt").read_text() == text
    assert sorted(os.listdir(tmp_path)) == ["link", "target"]
    os.chmod(tmp_path / "target", 0o750)
    with output_folder(str(tmp_path / "link"), command="test") as staging:
        (Path(staging) / "a.txt").write_text("third")
    assert stat.S_IMODE(os.stat(tmp_path / "target").st_mode) == 0o750
    (tmp_path / "dangling").symlink_to("missing")
    (tmp_path / "file").write_text("x")
    (tmp_path / "to_file").symlink_to("file")
    for name, state in (("dangling", "missing"), ("to_file", "a file")):
        with pytest.raises(ValueError, match=f"^--out: .*{name} is a link to .*, which is {state}; expected a folder") as e:
            check_output_folder(str(tmp_path / name))
        one_line(e)


def test_output_folder_refuses_files_it_did_not_write_and_creates_nothing_on_failure(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="no embgeom run wrote") as e:
        check_output_folder(str(tmp_path / "mine"))
    one_line(e)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file") as e:
        check_output_folder(str(tmp_path / "file"))
    one_line(e)
    with pytest.raises(RuntimeError):
        with output_folder(str(tmp_path / "new" / "deeper" / "rep"), command="test"):
            raise RuntimeError("model failed to load")
    assert sorted(os.listdir(tmp_path)) == ["file", "mine"]  # no empty folders left behind


def test_output_folder_refuses_files_added_after_the_run(tmp_path):
    """A sealed report folder where the user has since put a file, or a folder of their own: a
    rerun there is refused before any work, naming them, and they are kept (the swap had deleted
    them without a word); a malformed manifest entry is one line (it had been an AttributeError
    in check_complete)."""
    out = tmp_path / "rep"
    with output_folder(str(out), command="test") as staging:
        (Path(staging) / "figures").mkdir()
        (Path(staging) / "figures" / "a.png").write_bytes(b"png")
        (Path(staging) / "report.json").write_text("{}")
    check_output_folder(str(out), command="test")  # as sealed: a rerun may replace it
    (out / "notes.txt").write_text("mine")
    (out / "mywork").mkdir()
    (out / "mywork" / "results.csv").write_text("1,2")
    (out / "figures" / "mine.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"holds 3 entries that the embgeom run which wrote it did not "
                                         r"\(figures/mine.png, mywork/, notes.txt\); a run there would delete") as e:
        check_output_folder(str(out), command="test")
    one_line(e)
    with pytest.raises(ValueError, match="holds 3 entries"):
        with output_folder(str(out), command="test"):
            pass
    assert (out / "notes.txt").read_text() == "mine" and (out / "mywork" / "results.csv").exists()
    for f in ("notes.txt", "figures/mine.png"):
        (out / f).unlink()
    shutil.rmtree(out / "mywork")
    (out / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds 1 entry .*\(empty/\)"):
        check_output_folder(str(out), command="test")
    (out / "empty").rmdir()
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["report.json"] = 5
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="not a readable embgeom manifest") as e:
        check_complete(str(out / "report.json"), "X")
    one_line(e)


def test_readers_refuse_partial_stale_and_foreign_files(tmp_path):
    out = tmp_path / "rep"
    with output_folder(str(out), command="test") as staging:
        np.save(os.path.join(staging, "cls.npy"), np.ones((3, 2, 4), np.float32))
        with pytest.raises(ValueError, match="did not finish") as e:  # read while being written
            check_complete(os.path.join(staging, "cls.npy"), "X")
        one_line(e)
    np.save(out / "stray.npy", np.ones(2))
    with pytest.raises(ValueError, match="not part of") as e:
        check_complete(str(out / "stray.npy"), "X")
    one_line(e)
    arr = np.load(out / "cls.npy", mmap_mode="r+")
    arr[2] = 0  # a later change (or a run that died writing it in place): same size, other bytes
    arr.flush()
    del arr
    with pytest.raises(ValueError, match="changed after") as e:
        check_complete(str(out / "cls.npy"), "X")
    one_line(e)
    np.save(tmp_path / "users_own.npy", np.ones((3, 4), np.float32))
    check_complete(str(tmp_path / "users_own.npy"), "X")  # not an embgeom output: fine


def test_orphans_of_killed_writers_are_removed(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".out.json.{dead}.abc.tmp").write_text("{torn")
    (tmp_path / f".rep.{dead}.xyz.partial").mkdir()
    (tmp_path / f".out.json.{os.getppid()}.abc.tmp").write_text("a live writer's")
    write_json(str(tmp_path / "out.json"), {"a": 1})
    with output_folder(str(tmp_path / "rep"), command="test"):
        pass
    assert sorted(os.listdir(tmp_path)) == [f".out.json.{os.getppid()}.abc.tmp", "out.json", "rep"]


def _dead_pid() -> int:
    proc = multiprocessing.get_context("fork").Process(target=int)
    proc.start()
    proc.join()
    return proc.pid


def _wait_for(predicate, proc, seconds=120.0):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _staged(folder, pattern):
    """Files matching `pattern` inside the staging folders of `folder`."""
    import glob

    return [p for d in os.listdir(folder) if d.endswith(".partial")
            for p in glob.glob(os.path.join(folder, d, pattern))]


# while the kept vectors are written, and while the report's pictures are (report.json comes last)
@pytest.mark.parametrize("kill_when", ["cls.npy", "*.png"])
def test_text_killed_mid_run_leaves_nothing_that_passes_as_whole(tiny_bert_dir, tmp_path, kill_when):
    """SIGKILL `text --keep cls` while the kept vectors are written, or while the pictures are; the
    earlier run's folder stays whole, `project` refuses the staged cls.npy, a rerun replaces all."""
    import signal
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat .\n" * 400)
    small = tmp_path / "small.txt"
    small.write_text("a dog ran .\nthe cat sat .\n")
    out = tmp_path / "rep"
    def text(path):
        return [sys.executable, "-m", "embgeom", "text", str(path), "--model", tiny_bert_dir,
                "--keep", "cls", "--batch-size", "8", "--no-progress", "--out", str(out)]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(text(small), check=True, env=env, capture_output=True, timeout=300)
    first = json.loads((out / "manifest.json").read_text())
    proc = subprocess.Popen(text(corpus), env=env, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: _staged(tmp_path, kill_when), proc), "the run never reached the kill point"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(60)
    assert json.loads((out / "manifest.json").read_text()) == first  # the earlier run, untouched
    assert np.load(out / "cls.npy").shape[0] == 2
    for staged in _staged(tmp_path, "cls.npy"):
        r = subprocess.run([sys.executable, "-m", "embgeom", "project", staged, "--method", "pca",
                            "--out", str(tmp_path / "proj")], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "did not finish" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    subprocess.run(text(small), check=True, env=env, capture_output=True, timeout=300)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith(".")) == []  # orphans removed
    assert not (tmp_path / "proj").exists()


# ------------------------------------------------------------------ limits checked before work
def test_row_lists_are_lowered_to_the_candidates_with_a_note():
    x = make_embeddings(40, 8, seed=3)
    got = embgeom.pairwise_stats(x, row_topk=100_000, row_bottomk=39, backend="cpp")
    assert got.row_topk.indices.shape == (40, 39) and got.row_bottomk.indices.shape == (40, 39)
    assert got.notes == ["row_topk 100,000 lowered to N - 1 (self mode) = 39: a row has no more neighbours"]
    assert got.to_dict()["notes"] == got.notes
    ref = embgeom.pairwise_stats(x, row_topk=39, backend="cpp")
    assert torch.equal(got.row_topk.indices, ref.row_topk.indices) and not ref.notes
    cross = embgeom.pairwise_stats(x, make_embeddings(5, 8, seed=4), row_topk=7, backend="cpp")
    assert cross.row_topk.indices.shape == (40, 5) and "M (cross mode: the second matrix's rows) = 5" in cross.notes[0]


def test_absurd_bins_and_memory_are_refused_before_work(monkeypatch):
    from embgeom.engine import limits

    x = make_embeddings(30, 8, seed=5)
    with pytest.raises(ValueError, match="bins: at most 33,554,432") as e:
        embgeom.pairwise_stats(x, bins=2_000_000_000)
    one_line(e)
    with pytest.raises(ValueError, match="^checkpoint: cannot write /nonexistent-embgeom/dir/ckpt: no such folder /nonexistent-embgeom/dir$"):
        embgeom.pairwise_stats(x, checkpoint="/nonexistent-embgeom/dir/ckpt")   # (had named PATH.lock)
    monkeypatch.setattr(limits, "memory_available", lambda: (64 << 20, "the machine has"))  # a 64 MiB machine
    with pytest.raises(ValueError, match=r"bins: this run needs about .* GiB .* 0\.1 GiB available") as e:
        embgeom.pairwise_stats(x, bins=30_000_000)
    one_line(e)
    with pytest.raises(ValueError, match="row_topk: this run needs"):
        embgeom.pairwise_stats(make_embeddings(3000, 8, seed=6), row_topk=2999, bins=0)
    embgeom.pairwise_stats(x, bins=100_000)  # what fits still runs


def test_a_process_memory_limit_counts_as_the_machine_does(tmp_path):
    """ulimit -v (RLIMIT_AS) bounds what the checks allow, not only the machine's MemAvailable:
    a run past it is refused naming the option and that limit (it had started and aborted)."""
    import subprocess
    import sys

    code = ("import resource, embgeom, torch\n"
            "from embgeom.engine import limits\n"
            "from helpers import make_embeddings\n"
            "size = limits._read_keyed('/proc/self/status')['VmSize']\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))\n"
            "have, where = limits.memory_available()\n"
            "assert where == 'its address-space limit (ulimit -v) leaves' and have <= 1 << 30, (have, where)\n"
            "try:\n"
            "    embgeom.pairwise_stats(make_embeddings(6000, 8, seed=1), row_topk=5999, bins=0)\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.match(r"row_topk: this run needs about [\d.]+ GiB \(\d+ threads\), its address-space limit "
                    r"\(ulimit -v\) leaves [\d.]+ GiB available; lower it$", r.stdout.strip()), r.stdout


def test_the_engine_out_of_memory_in_its_threads_is_a_memory_error():
    """A std::bad_alloc inside the C++ engine's OpenMP threads (a thread's row lists) is raised
    as MemoryError after the parallel region; it had called std::terminate (SIGABRT, no message).
    The memory check is told the machine is large, so that the run starts under ulimit -v."""
    import subprocess
    import sys

    code = ("import resource, embgeom, torch\n"
            "from embgeom.engine import limits\n"
            "from helpers import make_embeddings\n"
            "limits.memory_available = lambda: (1 << 50, 'the machine has')\n"
            "x, y = make_embeddings(500, 8, seed=1), make_embeddings(100_000, 8, seed=2)\n"
            "size = limits._read_keyed('/proc/self/status')['VmSize']\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + (1200 << 20), resource.RLIM_INFINITY))\n"
            "try:\n"
            "    embgeom.pairwise_stats(x, y, row_topk=100_000, bins=0, topk=0, bottomk=0, backend='cpp')\n"
            "except MemoryError as e:\n"
            "    print('MemoryError', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("MemoryError"), r.stdout


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """An allocation that fails anyway (the C++ core's std::bad_alloc, numpy's, torch's
    allocator) ends a command with one line and status 2, not a traceback."""
    from embgeom import api
    from embgeom.cli import main

    np.save(tmp_path / "x.npy", make_embeddings(10, 4).numpy())
    for exc in (MemoryError("std::bad_alloc"),
                RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2807136000 bytes")):
        def fail(*args, exc=exc, **kwargs):
            raise exc
        monkeypatch.setattr(api, "pairwise_stats", fail)
        assert main(["pairs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "o.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("embgeom: error: out of memory (") and err.count("\n") == 1, err
        assert err.rstrip().endswith("nothing was kept; --checkpoint PATH keeps finished work for a rerun"), err


def test_pairs_prints_the_note(tmp_path):
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", make_embeddings(20, 4, seed=7).numpy())
    r = subprocess.run([sys.executable, "-m", "embgeom", "pairs", str(tmp_path / "x.npy"), "--row-topk",
                        "100000", "--json", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=300)
    # the note names the flag (it said row_topk, the API's name)
    assert r.returncode == 0 and "note: --row-topk 100,000 lowered to N - 1 (self mode) = 19" in r.stderr
    assert len(json.loads((tmp_path / "o.json").read_text())["row_topk"]["indices"][0]) == 19


# ------------------------------------------------------------------ large finite values, probabilities
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_products_beyond_float32_are_refused(metric, scale):
    x = make_embeddings(50, 16, seed=8) * scale
    with pytest.raises(ValueError, match="float32") as e:
        embgeom.pairwise_stats(x, metric=metric, range=(-1.0, 1.0), backend="cpp")
    one_line(e)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_cosine_of_huge_and_tiny_rows_is_right(backend, scale):
    x = make_embeddings(60, 16, seed=9)
    got = embgeom.pairwise_stats(x * scale, backend=backend, topk=5, bottomk=5)
    ref = embgeom.pairwise_stats(x, backend="reference", topk=5, bottomk=5)
    assert got.count == ref.count == 60 * 59 // 2 and not got.excluded_rows
    assert abs(got.mean - ref.mean) < 1e-6 and abs(got.std - ref.std) < 1e-6
    assert torch.equal(got.top_pairs.i.cpu(), ref.top_pairs.i) and torch.equal(got.top_pairs.j.cpu(), ref.top_pairs.j)


def test_euclidean_near_the_float32_limit_is_still_right():
    x = make_embeddings(80, 16, seed=10) * 1e16
    got = embgeom.pairwise_stats(x, metric="euclidean", range=(0, 1e18), backend="cpp")
    ref = embgeom.pairwise_stats(x, metric="euclidean", range=(0, 1e18), backend="reference")
    assert got.min[:2] == ref.min[:2] and abs(got.min[2] / ref.min[2] - 1) < 1e-5
    assert abs(got.mean / ref.mean - 1) < 1e-6


def test_attention_rows_must_be_distributions():
    with pytest.raises(ValueError, match=r"summing to 1, row \[0, 0, 0\]") as e:
        embgeom.attention_entropy(torch.rand(1, 1, 3, 3) * 10)
    one_line(e)
    mask = torch.tensor([[True, True, True, False]])
    probs = torch.softmax(torch.randn(1, 2, 4, 4).masked_fill(~mask[:, None, None, :], -math.inf), -1)
    probs[0, :, 3] = 0.0  # a padded query row: not checked
    embgeom.attention_entropy(probs, mask)
    with pytest.raises(ValueError, match="summing to 1"):
        embgeom.attention_entropy(probs)
    leaky = torch.softmax(torch.randn(1, 2, 4, 4), -1)  # mass on the padded key 3
    with pytest.raises(ValueError, match="over its unpadded keys"):
        embgeom.attention_entropy(leaky, mask)


# ------------------------------------------------------------------ treebanks, late checks, odd arguments
def _conllu(tmp_path, rows, sent_id="s1"):
    lines = [f"# sent_id = {sent_id}"] + ["\t".join(map(str, r)) for r in rows]
    path = tmp_path / "t.conllu"
    path.write_text("\n".join(lines) + "\n\n")
    return str(path)


def _word(i, head, form="w"):
    return [i, form, form, "X", "X", "_", head, "dep" if head else "root", "_", "_"]


@pytest.mark.parametrize("rows, match", [
    ([_word(1, 2), _word(2, 3), _word(3, 1), _word(4, 0)], r"cycle 1 -> 2 -> 3 -> 1"),
    ([_word(1, 1), _word(2, 0)], "word 1 is its own head"),
    ([_word(1, 0), _word(2, 0)], r"exactly one root .* found 2"),
    ([_word(1, 2), _word(2, 1)], "exactly one root .* found 0"),
    ([_word(1, 0), _word(1, 1)], "ids must run 1..n"),
    ([_word(1, 0), [2, "b", "b", "X", "X"]], "line 3, sentence 1 \\(s1\\): a word line has 5 TAB-separated columns"),
    ([_word(1, 0), _word(2, 1) + ["extra"]], "line 3, sentence 1 \\(s1\\): a word line has 11 TAB-separated columns"),
    ([_word(1, 0), _word(2, "x")], r"line 3, sentence 1 \(s1\): word 2 \(.w.\) has HEAD .x., expected a word number"),
])
def test_bad_trees_are_refused_naming_the_sentence(tmp_path, rows, match):
    from embgeom.analysis.syntax.treebank import read_conllu

    with pytest.raises(ValueError, match=match) as e:
        read_conllu(_conllu(tmp_path, rows))
    assert "sentence 1 (s1)" in one_line(e)


def test_invalid_utf8_on_the_last_line_is_found_before_the_model_loads(tmp_path, capsys):
    from embgeom.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"fine\n" * 50 + b"bad \xff\n")
    # a model path that does not exist: the corpus error must come first
    args = ["text", str(corpus), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    assert main(args) == 2 and not (tmp_path / "o").exists()
    assert "line 51 is not UTF-8" in capsys.readouterr().err


def test_progress_counts_the_lines_that_run(tmp_path):
    from embgeom.analysis.text.trace import count_texts

    path = tmp_path / "c.txt"
    path.write_text("one\n \u00a0\u3000\n\t\ntwo\n", encoding="utf-8")
    assert count_texts(str(path)) == 2


def test_odd_python_arguments_name_themselves(tiny_bert):
    from embgeom.analysis.clouds.projection import project
    from embgeom.analysis.text.trace import trace

    model, tok = tiny_bert
    with pytest.raises(TypeError, match="model: expected a transformers model"):
        trace(None, tok, ["a"])
    with pytest.raises(TypeError, match="texts: expected"):
        trace(model, tok, None)
    with pytest.raises(ValueError, match=r"texts\[1\]: a lone surrogate '\\ud800' at character 2"):
        trace(model, tok, ["fine", "a \ud800 b"])  # (the tokenizer's TypeError named no text)
    x = make_embeddings(20, 8, seed=11)
    with pytest.raises(TypeError, match="perplexity: expected a number, got str"):
        project(x, method="tsne", perplexity="30")
    with pytest.raises(ValueError, match=r"perplexity: expected a finite number >= 1/3 .*, got inf"):
        project(x, method="tsne", perplexity=float("inf"))
    with pytest.raises(TypeError, match="k: expected an int, got float"):
        project(x, method="umap", k=2.5)


def test_perplexity_above_what_the_rows_allow_is_lowered_with_a_note():
    from embgeom.analysis.clouds.projection import project

    got = project(make_embeddings(31, 8, seed=12), method="tsne", perplexity=1000, n_jobs=1)
    assert got.perplexity == 10.0 and got.k == 30
    assert got.to_dict()["notes"] == ["perplexity 1000 lowered to (N - 1) / 3 = 10 for 31 rows"]


@pytest.mark.parametrize("command", ["text", "syntax", "coref", "project", "vocab"])
def test_out_naming_a_file_or_a_foreign_folder_is_one_line(tmp_path, command):
    import subprocess
    import sys

    (tmp_path / "f").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    inputs = {"text": [str(tmp_path / "f")], "syntax": [str(tmp_path / "f")], "coref": [str(tmp_path / "f")],
              "project": [str(tmp_path / "f")], "vocab": []}[command]
    for out, match in ((tmp_path / "f", "is a file"), (tmp_path / "mine", "no embgeom run wrote")):
        r = subprocess.run([sys.executable, "-m", "embgeom", command, *inputs, "--out", str(out)],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_inputs_inside_out_and_other_commands_reports_are_refused(tiny_bert_dir, tmp_path, capsys):
    """A run replaces its --out folder whole: an input inside it (`project DIR/cls.npy --out
    DIR`, a corpus, a --checkpoint) would be deleted by the swap, and a report of another command
    replaced silently. Each is refused in one line, the folder left as it was."""
    from embgeom.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat .\na dog ran .\n", encoding="utf-8")
    rep = tmp_path / "rep"
    assert main(["text", str(corpus), "--out", str(rep), "--model", tiny_bert_dir, "--keep", "cls",
                 "--no-progress"]) == 0
    sealed = sorted(p.name for p in rep.iterdir())
    capsys.readouterr()
    shutil.copy(corpus, rep / "inside.txt")
    cases = [
        (["project", str(rep / "cls.npy"), "--method", "pca", "--out", str(rep)], "X: "),
        (["project", str(rep / "cls.npy"), "--method", "pca", "--out", str(rep) + "/"], "X: "),
        (["text", str(corpus), "--out", str(rep), "--model", tiny_bert_dir, "--checkpoint", str(rep / "ck")],
         "--checkpoint: "),
        (["text", str(rep / "inside.txt"), "--out", str(rep), "--model", tiny_bert_dir], "CORPUS: "),
    ]
    for argv, word in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0] and "lies inside --out" in err[0], (argv, err)
    (rep / "inside.txt").unlink()
    np.save(tmp_path / "x.npy", make_embeddings(40, 6, seed=1).numpy())
    assert main(["project", str(tmp_path / "x.npy"), "--method", "pca", "--out", str(rep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an `embgeom text` report" in err[0], err
    assert sorted(p.name for p in rep.iterdir()) == sealed
    # the same command into its own folder replaces it, as before
    assert main(["text", str(corpus), "--out", str(rep), "--model", tiny_bert_dir, "--no-progress"]) == 0


@pytest.mark.parametrize("n", [1, 2, 45])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_lists_of_length_zero_count_without_listing(cpu_cap, n, precision):
    """outside_limit=0 (count only) read the last entry of an empty list in the C++ core and
    crashed; limits.fit_to_input lowers every list to 0 on one row, which reached it too."""
    x = make_embeddings(n, 12, seed=13)
    opts = dict(bins=20, topk=0, bottomk=0, near=0.0, near_k=0, outside=(-0.2, 0.2), outside_limit=0)
    got = embgeom.pairwise_stats(x, backend="cpp", precision=precision, **opts)
    ref = embgeom.pairwise_stats(x, backend="reference", **opts)
    assert got.outside.count == ref.outside.count and len(got.outside.pairs.i) == 0
    assert torch.equal(got.outside.row_counts, ref.outside.row_counts)
    assert int(got.hist.counts.sum()) == int(ref.hist.counts.sum())


def _whole_or_absent(out: Path) -> bool:
    """out is absent, or one sealed run: every file listed in its manifest and matching it."""
    if not out.exists():
        return False
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert manifest["complete"] and on_disk == set(manifest["files"])
    for name in on_disk:
        check_complete(str(out / name), "X")
    return True


@pytest.mark.parametrize("command", ["vocab", "syntax", "project"])
def test_sigkill_at_several_points_then_rerun(tiny_bert_dir, tmp_path, command):
    import signal
    import subprocess
    import sys
    import time

    from embgeom.analysis.syntax.treebank import sample_path

    np.save(tmp_path / "x.npy", make_embeddings(1500, 24, seed=14).numpy())
    out = tmp_path / "out"
    args = {"vocab": ["--model", tiny_bert_dir, "--out", str(out)],
            "syntax": [sample_path(), "--model", tiny_bert_dir, "--no-progress", "--out", str(out)],
            "project": [str(tmp_path / "x.npy"), "--method", "umap", "--out", str(out)]}[command]
    cmd = [sys.executable, "-m", "embgeom", command, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for delay in (1.5, 5.0):  # while loading or computing, and (usually) while writing
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        _whole_or_absent(out)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _whole_or_absent(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # the killed runs' staging is gone


def test_concurrent_folder_writers_leave_one_whole_run(tmp_path):
    out = tmp_path / "rep"

    def write(tag, r):
        with output_folder(str(out), command="test") as staging:
            for k in range(20):
                Path(staging, f"part{k}.json").write_text(json.dumps({"writer": tag, "round": r}))

    def check(r):
        assert _whole_or_absent(out)
        parts = {json.loads((out / f"part{k}.json").read_text())["writer"] for k in range(20)}
        assert len(parts) == 1  # every file from the same writer's run
        assert os.listdir(tmp_path) == ["rep"]

    race_two_writers(write, 6, check)


def test_json_nested_past_the_parser_is_one_line(tmp_path, capsys):
    """JSON nested deeper than Python's parser goes (RecursionError, not a ValueError) in a report
    folder's manifest, a --pairs file or a mentions file: one line naming the file, exit 2."""
    from embgeom.cli import main

    deep = "[" * 100000 + "]" * 100000
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((20, 4)).astype(np.float32))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text(deep)
    (tmp_path / "deep.jsonl").write_text(deep + "\n")
    (tmp_path / "huge.jsonl").write_text('{"tokens": ["a"], "clusters": [[[0, 1' + "1" * 5000 + ']]]}\n')
    (tmp_path / "c.txt").write_text("a b\n")
    for argv, message in (
        (["project", str(tmp_path / "x.npy"), "--method", "pca", "--out", str(tmp_path / "out")],
         "its manifest.json is not one embgeom writes"),
        (["text", str(tmp_path / "c.txt"), "--pairs", str(tmp_path / "deep.jsonl"), "--out", str(tmp_path / "t")],
         "line 1: nested too deeply to read"),
        (["coref", str(tmp_path / "deep.jsonl"), "--out", str(tmp_path / "co")], "line 1: nested too deeply to read"),
        # an integer past Python's 4,300 digits: json's ValueError had been printed as it was
        (["coref", str(tmp_path / "huge.jsonl"), "--out", str(tmp_path / "co")],
         "MENTIONS: " + str(tmp_path / "huge.jsonl") + ": line 1: not readable JSON (Exceeds the limit (4300 digits)"),
        (["text", str(tmp_path / "c.txt"), "--pairs", str(tmp_path / "huge.jsonl"), "--out", str(tmp_path / "t")],
         "line 1: not readable JSON (Exceeds the limit"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_row_lists_of_a_single_row_say_what_they_hold():
    """One row in self mode has no neighbour: k is lowered to 1, one padded slot, and the note
    gives N - 1 = 0 (it had said "lowered to N - 1 (self mode) = 1")."""
    got = embgeom.pairwise_stats(make_embeddings(1, 8, seed=3), row_topk=5, backend="cpp")
    assert got.row_topk.indices.tolist() == [[-1]] and torch.isnan(got.row_topk.values).all()
    assert got.notes == ["row_topk 5 lowered to 1: N - 1 (self mode) = 0, so the list holds one padded slot (-1)"]
    # no rows: no list to hold anything, nothing to say (it had said N - 1 = -1, one padded slot)
    none = embgeom.pairwise_stats(torch.zeros(0, 8), row_topk=5, backend="cpp")
    assert none.notes == [] and tuple(none.row_topk.indices.shape) == (0, 1)
    cross = embgeom.pairwise_stats(make_embeddings(2, 8, seed=3), torch.zeros(0, 8), row_topk=5, backend="cpp")
    assert cross.notes == ["row_topk 5 lowered to 1: M (cross mode: the second matrix's rows) = 0, so the list "
                           "holds one padded slot (-1)"] and cross.row_topk.indices.tolist() == [[-1], [-1]]


def test_api_arguments_named_where_python_or_torch_would_not(tmp_path):
    """Inputs an API probe found answered by torch, pybind11 or os.fspath in their own words (or
    refused where they work): each now a one-line error naming the argument, or a result."""
    from embgeom.index import Index

    h = torch.randn(3, 7, 5)
    with pytest.raises(ValueError, match=r"^x: every hidden state needs the same \(B, T\): state 0 has \(3, 7\), state 1 \(2, 7\)"):
        embgeom.cone_index((h, torch.randn(2, 7, 5)))
    with pytest.raises(TypeError, match="^x: a tuple or list is read as L\\+1 hidden states.*got one of list"):
        embgeom.cone_index([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match=r"^chunk: expected \(B, T, D\) or \(N, D\) float, got \(3, 4\) int64"):
        embgeom.cone_index_stream([torch.ones(3, 4, dtype=torch.int64)])
    with pytest.raises(TypeError, match="^mask: expected a \\(B, T\\) bool tensor or array, got \\(3, 7\\) object"):
        embgeom.cone_index(h, np.full((3, 7), True, dtype=object))
    with pytest.raises(ValueError, match="^metric: expected one of"):
        embgeom.pairwise_stats(make_embeddings(5, 4, seed=1), metric=np.array(["cosine"]))
    x = make_embeddings(20, 4, seed=2)
    index = Index(x)
    with pytest.raises(TypeError, match="^path: expected a path"):
        index.save(None)
    with pytest.raises(TypeError, match="^path: expected a path"):
        Index.load(None)
    with pytest.raises(TypeError, match="^out: expected a path"):
        embgeom.pairs_above(x, 0.5, None)
    with pytest.raises(TypeError, match="^folder: expected a path"):
        embgeom.read_pairs(None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="^folder: not a folder: "):
        embgeom.read_pairs(tmp_path / "file")
    base = np.random.default_rng(3).standard_normal((40, 6))
    assert embgeom.project(base, method="umap", seed=np.int64(1), k=5).seed == 1
    assert embgeom.knn(x, 3, device=torch.device("cpu")).indices.shape == (20, 3)


def test_pipes_links_and_long_chains_are_refused_or_fast(tmp_path, tiny_bert_dir):
    """A pipe handed as an input, checkpoint, manifest or model config is refused (reading it had
    hung the command); a lock file or the [CLS] rows file planted as a link never writes its
    target; a CoNLL-U chain of 30,000 words is checked in linear time (a list's `in` had made it
    quadratic: 79 s for 150,000)."""
    from embgeom.analysis.syntax.treebank import check_tree
    from embgeom.io import exclusive_lock, load_matrix

    fifo = tmp_path / "x.npy"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="X: .* is not a regular file"):
        load_matrix(str(fifo))
    with pytest.raises(ValueError, match="checkpoint: .* is not a regular file"):
        load_checkpoint(str(fifo), "fp")
    folder = tmp_path / "pairs"
    folder.mkdir()
    os.mkfifo(folder / "manifest.json")
    with pytest.raises(ValueError, match="is damaged"):
        embgeom.read_pairs(folder)
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    with pytest.raises(ValueError, match="model: .*config.json is not a regular file"):
        embgeom.load_model(str(model))
    (model / "config.json").unlink()
    shutil.copy(os.path.join(tiny_bert_dir, "config.json"), model / "config.json")
    os.mkfifo(model / "extra.safetensors")  # (its header had been read: the load hung)
    with pytest.raises(ValueError, match="model: .*extra.safetensors is not a regular file"):
        embgeom.load_model(str(model))
    outside = tmp_path / "outside"
    (tmp_path / "lockdir").mkdir()
    os.symlink(outside, tmp_path / "lockdir" / ".lock")
    with pytest.raises(ValueError, match="^out: .*a link is never followed"):
        exclusive_lock(str(tmp_path / "lockdir" / ".lock"), "busy", "out")
    assert not outside.exists()
    from embgeom.cli import main

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "ck").mkdir()
    os.symlink(victim, tmp_path / "ck" / "run.cls.npy")
    (tmp_path / "c.txt").write_text("the cat sat .\na dog ran .\n")
    assert main(["text", str(tmp_path / "c.txt"), "--model", str(tiny_bert_dir), "--keep", "cls", "--quiet",
                 "--checkpoint", str(tmp_path / "ck" / "run"), "--out", str(tmp_path / "rep")]) == 2
    assert victim.read_text() == "keep me"
    heads = list(range(2, 30001)) + [0]                     # word w's head is w + 1, the last is the root
    check_tree(heads, "chain")


def test_json_files_larger_than_embgeom_writes_are_not_read(tmp_path, monkeypatch):
    # a sparse manifest of gigabytes had been read whole before anything checked it
    import embgeom.io as io_module

    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"shards": list(range(100))}))
    assert io_module.read_json_file(str(path))["shards"][-1] == 99
    monkeypatch.setattr(io_module, "MAX_JSON_BYTES", 64)
    with pytest.raises(ValueError, match=r"manifest.json: 4.. bytes, more than any JSON file embgeom writes \(64\)"):
        io_module.read_json_file(str(path))


def test_a_report_is_not_swapped_over_what_came_into_its_folder_meanwhile(tmp_path):
    """output_folder checks the folder again just before its swap: a pairs_above folder being
    written there (or another command's report) since the run began is not replaced (a project
    run had swapped its report over a pairs folder in progress, both runs ending with 0), and
    the refusal names the pairs folder as such."""
    out = tmp_path / "shared"
    x = make_embeddings(40, 8, seed=3)
    with pytest.raises(ValueError, match=r"^--out: .*shared is a pairs_above folder, which `embgeom project` "
                                         r"would replace; choose another folder or remove it$"):
        with output_folder(str(out), command="project") as staging:
            write_json(os.path.join(staging, "report.json"), {"a": 1})
            embgeom.pairs_above(x, 0.5, out)   # (another process's run, finished meanwhile)
    embgeom.read_pairs(out)                    # intact
    assert [e for e in os.listdir(tmp_path) if e.endswith(".partial")] == []
    with pytest.raises(ValueError, match=r"^--out: .*shared is a pairs_above folder, which `embgeom text` would"):
        check_output_folder(str(out), command="text")


def test_a_write_error_inside_the_staging_folder_names_the_folder_given(tmp_path):
    """A page writer's OSError about a file of the hidden staging folder is said of the folder
    the user named, under its argument (it had named .NAME.PID.RANDOM.partial/FILE, gone by then)."""
    from embgeom.io import write_error

    out = tmp_path / "report"
    with pytest.raises(ValueError) as info:
        with output_folder(str(out), command="project") as staging:
            raise write_error("output", os.path.join(staging, "projection.html"),
                              OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert str(info.value) == f"--out: cannot write {out}/projection.html: No space left on device"


def test_checkpoint_paths_are_checked_for_their_side_files_and_a_writable_folder(tmp_path, monkeypatch):
    """A checkpoint name whose side files (PATH.lock, PATH.cls.npy, PATH.pairs.lock) would pass
    NAME_MAX, and a folder that is not writable, are refused by check_output_path before any work
    (they had failed after the model loaded, or after the whole corpus); a lock file that cannot
    be made does not blame a link where there is none."""
    from embgeom.io import NAME_MAX, check_output_path, exclusive_lock

    long_name = str(tmp_path / ("c" * (NAME_MAX - 8)))
    check_output_path(long_name, "--checkpoint", beside=(".lock",))
    with pytest.raises(ValueError, match=r"^--checkpoint: .*: the name is too long for the file '\.pairs\.lock' "
                                         rf"kept beside it \(at most {NAME_MAX - 11} bytes, got {NAME_MAX - 8}\)$"):
        check_output_path(long_name, "--checkpoint", beside=(".lock", ".cls.npy", ".pairs.lock"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(tmp_path)
                        else real_access(p, mode, **kw))
    with pytest.raises(ValueError, match=rf"^checkpoint: cannot write .*: the folder {re.escape(str(tmp_path))} is "
                                         "not writable$"):
        embgeom.pairwise_stats(make_embeddings(10, 4), checkpoint=tmp_path / "run.ckpt")
    monkeypatch.setattr(os, "access", real_access)
    with pytest.raises(ValueError) as info:
        exclusive_lock(str(tmp_path / ("l" * (NAME_MAX + 1))), "busy", "checkpoint")
    assert "File name too long" in str(info.value) and "link" not in str(info.value)


def test_pairs_above_into_a_dangling_link_says_so(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(ValueError, match=r"^out: .*link is a link to .*gone, which is missing; expected a folder$"):
        embgeom.pairs_above(make_embeddings(10, 4), 0.9, tmp_path / "link")


def test_leftovers_of_writers_in_other_pid_namespaces_are_left_alone(tmp_path):
    """Temporary names carry the writer's pid namespace (host and /proc/self/ns/pid): a staging
    folder or temporary file whose pid is not visible here because its writer runs in another
    container (or on another host of a network file system) is not swept as a dead writer's (a
    live text run's staging folder had been deleted under it); a dead writer's of this namespace
    still is, and so are the names earlier versions wrote."""
    import subprocess
    import sys

    from embgeom.io import _pid_namespace, _temp_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert _temp_prefix("rep") == f".rep.{os.getpid()}-{_pid_namespace()}."
    other_ns = "0" * 6 if _pid_namespace() != "0" * 6 else "1" * 6
    elsewhere = tmp_path / f".rep.{dead}-{other_ns}.ab12cd34.partial"
    ours_dead = tmp_path / f".rep.{dead}-{_pid_namespace()}.ef56gh78.partial"
    earlier = tmp_path / f".rep.{dead}.ij90kl12.partial"
    temp_file = tmp_path / f".rep.json.{dead}-{other_ns}.zz99yy88.tmp"
    for folder in (elsewhere, ours_dead, earlier):
        folder.mkdir()
    temp_file.write_text("{}")
    with output_folder(str(tmp_path / "rep"), command="test") as staging:
        (Path(staging) / "a.txt").write_text("x")
    with atomic_write(str(tmp_path / "rep.json")) as f:
        f.write("{}")
    assert elsewhere.is_dir() and temp_file.exists()
    assert not ours_dead.exists() and not earlier.exists()


def test_engine_calls_grow_past_a_fixed_cost_per_call():
    """The runner's chunks: about chunk_seconds of work a call, and at least three times a call's
    fixed cost once two calls of different sizes tell it apart (counted as per-tile cost, 1.4 s
    of list merging a call had held row top-2000 runs at a few tiles a call)."""
    from embgeom.engine.runner import next_chunk

    assert next_chunk([(1, 0.01)], 2.0, 10_000) == 200              # cheap tiles: ~2 s of them
    assert next_chunk([(1, 1.5)], 2.0, 10_000) == 2                 # a second size first
    assert next_chunk([(1, 1.5), (2, 1.6)], 2.0, 10_000) in (41, 42)   # 1.4 s fixed: 4.2 s of tiles
    assert next_chunk([(1, 0.01), (200, 2.0)], 2.0, 10_000) in (200, 201)
    assert next_chunk([(1, 1.5), (2, 1.6)], math.inf, 10_000) == 10_000
    assert next_chunk([(5, 1.0)], 2.0, 7) == 7
    assert next_chunk([(1, 1.5), (2, 1.6)], 0.0, 10_000) == 1       # EMBGEOM_CHECKPOINT_SECONDS=0
