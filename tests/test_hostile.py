"""Hostile inputs (issue 27): concurrent writers of one output and the one-line refusals of
the writers."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import threading

import pytest

from embgeom.io import atomic_write
from embgeom.report import write_json


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# single-file writes ---------------------------------------------------------------------------

def _write_rounds(path, tag, rounds, barrier):
    data = {"writer": tag, "values": list(range(tag, 40000 + tag))}  # many write() calls per file
    try:
        for r in range(rounds):
            barrier.wait()
            write_json(path, dict(data, round=r))
            barrier.wait()
    except BaseException:
        barrier.abort()  # the parent stops waiting; the exit code tells
        raise


def test_concurrent_writers_leave_whole_json(tmp_path):
    path, rounds = str(tmp_path / "out.json"), 8
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3, timeout=60)
    procs = [ctx.Process(target=_write_rounds, args=(path, tag, rounds, barrier)) for tag in (0, 1)]
    for p in procs:
        p.start()
    broken = False
    try:
        for r in range(rounds):
            barrier.wait()  # both start writing
            barrier.wait()  # both done
            got = json.loads(open(path).read())
            assert got["round"] == r and got["values"][0] == got["writer"] in (0, 1)
            assert os.listdir(tmp_path) == ["out.json"]
    except threading.BrokenBarrierError:  # a writer failed and aborted
        broken = True
    except BaseException:
        barrier.abort()  # a check failed: release the writers (never after a clean last round:
        raise            # a writer not yet woken from it would see the barrier broken)
    finally:
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0, 0] and not broken


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
