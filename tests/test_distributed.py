"""torchrun with 2 gloo ranks on CPU gives the single-process answer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from embgeom import distributed
from embgeom.cli import main

from helpers import make_embeddings, small_int_embeddings


def test_plan_covers_every_pair_once_and_balances():
    n = 1003
    jobs = distributed.plan_jobs(n, 6)
    assert sum(p for _, _, p in jobs) == n * (n - 1) // 2
    owned = distributed.assign_jobs(jobs, 3)
    assert sorted(j for o in owned for j in o) == list(range(len(jobs)))
    loads = [sum(jobs[j][2] for j in o) for o in owned]
    assert max(loads) / min(loads) < 1.3
    assert distributed.assign_jobs(jobs, 3) == owned  # deterministic


def _torchrun(args, tmp_path, nproc=2):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "embgeom", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", EMBGEOM_DIST_BACKEND="gloo")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("exact_input", [True, False], ids=["int-dot", "float-cosine"])
def test_torchrun_two_ranks_equals_single_process(tmp_path, exact_input):
    if exact_input:
        x = small_int_embeddings(157, 6, seed=11).numpy()
        opts = ["--metric", "dot", "--range", "-15", "15", "--outside", "-4", "4"]
    else:
        x = make_embeddings(157, 24, zero_rows=2, seed=12).numpy()
        opts = ["--outside", "-0.2", "0.2"]
    np.save(tmp_path / "x.npy", x)
    common = ["pairs", tmp_path / "x.npy", "--bins", "40", "--topk", "7", "--bottomk", "5", "--near", "0.5",
              "--near-k", "3", "--row-topk", "4", "--row-bottomk", "2", "--block", "16", *opts]
    assert main([str(a) for a in common] + ["--json", str(tmp_path / "single.json")]) == 0
    r = _torchrun([*common, "--distributed", "--checkpoint", tmp_path / "ck", "--json", tmp_path / "dist.json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("single.json", "dist.json"))
    assert b["backend"].endswith("x 2 ranks")
    for key in ("count", "hist", "top_pairs", "bottom_pairs", "near_pairs", "min", "max", "row_topk",
                "row_bottomk", "outside", "excluded_rows", "mode", "n"):
        if exact_input or a["backend"] == "cpp":
            assert a[key] == b[key], key
        else:  # torch matmul may round the last ulp differently for another tile shape
            assert _close(a[key], b[key]), key
    assert abs(a["mean"] - b["mean"]) < 1e-9 and abs(a["std"] - b["std"]) < 1e-9
    assert (tmp_path / "ck.rank0").exists() and (tmp_path / "ck.rank1").exists()
    # a restart finds every job finished in the checkpoints and gives the same answer
    r = _torchrun([*common, "--distributed", "--checkpoint", tmp_path / "ck", "--json", tmp_path / "again.json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads((tmp_path / "again.json").read_text())
    assert _close(c["top_pairs"], a["top_pairs"]) and _close(c["row_topk"], a["row_topk"])


def test_no_rows_is_a_run_over_no_pairs(tmp_path):
    """x with no rows: what pairwise_stats answers (count 0, moments null, empty lists), as one
    row gives; it had been refused ("expected at least one row") on the distributed path only.
    One rank, gloo, in its own process."""
    r = _one_rank(("import json, numpy as np, embgeom\n"
                   "from embgeom import distributed\n"
                   "x = np.zeros((0, 5), np.float32)\n"
                   "kw = dict(bins=10, topk=3, row_topk=2, outside=(-0.5, 0.5))\n"
                   "a, b = embgeom.pairwise_stats(x, **kw).to_dict(), distributed.pairwise_stats(x, **kw).to_dict()\n"
                   "print(json.dumps([a, b]))\n"), tmp_path, port=29500)
    a, b = json.loads(r.stdout.strip().splitlines()[-1])
    assert b["count"] == 0 and b["mean"] is None and b["top_pairs"] == a["top_pairs"]
    assert {k: v for k, v in a.items() if k not in ("backend", "seconds")} == \
        {k: v for k, v in b.items() if k not in ("backend", "seconds")}


def test_a_rank_checkpoint_in_use_is_refused(tmp_path):
    """Two jobs on one --checkpoint: a rank whose file another run holds is refused, naming it
    (both had run in full, each saving over the other's file). One rank, gloo, in its own process."""
    r = _one_rank(("import numpy as np\n"
                   "from embgeom import distributed\n"
                   "from embgeom.io import lock_checkpoint\n"
                   "held = lock_checkpoint('ck.rank0')\n"
                   "try:\n"
                   "    distributed.pairwise_stats(np.eye(4, dtype=np.float32), bins=4, checkpoint='ck')\n"
                   "except ValueError as e:\n"
                   "    print(e)\n"), tmp_path, port=29100)
    assert r.stdout.strip() == ("checkpoint: ck.rank0 is in use by another run; wait for it to finish, or pass "
                                "another path")
    assert not (tmp_path / "ck.rank0").exists()


def _one_rank(code: str, cwd, port: int):
    """`python -c code` as rank 0 of 1 (gloo) in cwd; its CompletedProcess, checked for status 0."""
    import subprocess
    import sys

    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port + os.getpid() % 400),
               EMBGEOM_DIST_BACKEND="gloo")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _close(a, b, tol=1e-6):
    """Equal structure and integers, floats within tol."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def test_distributed_without_torchrun_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    np.save(tmp_path / "x.npy", make_embeddings(10, 3).numpy())
    assert main(["pairs", str(tmp_path / "x.npy"), "--distributed", "--json", str(tmp_path / "o.json")]) == 2
    assert "not launched by torchrun" in capsys.readouterr().err


def _rank_pid(parent_pid: int, rank: str) -> int | None:
    """The worker process of torchrun whose environment has RANK=rank."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry)
    return None


def test_dead_rank_fails_the_job_and_restart_resumes(tmp_path):
    import signal
    import time

    np.save(tmp_path / "x.npy", make_embeddings(6000, 64, seed=13).numpy())
    args = ["pairs", tmp_path / "x.npy", "--row-topk", "5", "--block", "32", "--backend", "torch", "--progress",
            "--distributed", "--checkpoint", tmp_path / "ck", "--json", tmp_path / "out.json"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", EMBGEOM_DIST_BACKEND="gloo")
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", "-m", "embgeom", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "ck.rank1").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    pid = _rank_pid(proc.pid, "1")
    assert pid is not None and proc.poll() is None, "rank 1 finished before it could be killed"
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)  # fails instead of hanging
    assert proc.returncode != 0
    assert not (tmp_path / "out.json").exists()
    r = _torchrun(args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[rank 1]: resuming from" in r.stderr
    assert json.loads((tmp_path / "out.json").read_text())["count"] == 6000 * 5999 // 2


def test_products_beyond_float32_are_refused_by_the_ranks(tmp_path):
    """The ranks check the products' range on the whole matrix's largest norm (each rank's row
    groups' norms gathered before any work): every rank refuses, in one process's words."""
    np.save(tmp_path / "x.npy", make_embeddings(40, 8, seed=14).numpy() * 1e20)
    r = _torchrun(["pairs", tmp_path / "x.npy", "--metric", "dot", "--range", "-1", "1", "--distributed",
                   "--json", tmp_path / "out.json"], tmp_path)
    assert r.returncode != 0 and r.stderr.count("embgeom: error: X: rows with norms up to") == 2, r.stderr[-2000:]
    assert "a rank probably died" not in r.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("case", ["tiny-group", "near-collinear"])
def test_ranks_check_and_sum_as_one_process(tmp_path, case):
    """tiny-group: a row group of norms 1e-17 beside rows of norm ~2 (dot): one process takes it,
    the ranks had refused it (the products' underflow checked per job), one rank dying first.
    near-collinear: cosines within 1e-7 of 1: the ranks' std had been 3e-12 off one process's
    (the jobs' moments merged by Chan's formula around means rounded near 1; 8e-9 with the
    float64 reference backend); now the jobs sum around one shift and their sums add."""
    rng = np.random.default_rng(8)
    if case == "tiny-group":
        x = rng.standard_normal((8, 4)).astype(np.float32)
        x[:2] *= 1e-17
        opts = ["--metric", "dot", "--range", "-5", "5", "--bins", "10"]
    else:
        x = (np.ones(16) + 1e-4 * rng.standard_normal((1500, 16))).astype(np.float32)
        opts = ["--bins", "0", "--topk", "0", "--bottomk", "0"]
    np.save(tmp_path / "x.npy", x)
    common = ["pairs", tmp_path / "x.npy", *opts]
    assert main([str(a) for a in common] + ["--json", str(tmp_path / "single.json")]) == 0
    r = _torchrun([*common, "--distributed", "--json", tmp_path / "dist.json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("single.json", "dist.json"))
    for key in ("count", "hist", "top_pairs", "bottom_pairs", "min", "max"):
        assert a[key] == b[key], key
    assert b["std"] == pytest.approx(a["std"], rel=1e-13, abs=0) and b["mean"] == pytest.approx(a["mean"], rel=1e-15, abs=0)


def test_a_rank_checkpoint_that_is_not_this_ranks_is_refused():
    """A rank's saved (state, finished jobs) is taken only when the jobs are its own, each once,
    and the state is the merge of as many jobs of this run's shape: a crafted file (checksum
    made anew) had been resumed as it was."""
    from embgeom.distributed import _checked_rank_state
    from embgeom.engine.config import make_config
    from embgeom.engine.state import EngineState

    cfg = make_config(bins=20, topk=3)
    good = EngineState.empty(cfg, 30, None)
    good.tiles_done = 2
    state, done = _checked_rank_state({"state": good, "done": [1, 4]}, "c.rank0", cfg, 30, [1, 4, 6])
    assert done == [1, 4] and state is good
    short = EngineState.empty(cfg, 30, None)
    short.tiles_done, short.hist = 1, np.zeros(3, np.int64)
    for saved, message in (({"state": good, "done": [1, 9]}, "not this rank's"),
                           ({"state": good, "done": [1, 1]}, "not this rank's"),
                           ({"state": short, "done": [6]}, r"hist must be \(22,\)"),
                           ({"state": "x", "done": []}, "not a rank's state"),
                           ([1, 2], "not a rank's state")):
        with pytest.raises(ValueError, match=f"checkpoint: c.rank0: .*{message}"):
            _checked_rank_state(saved, "c.rank0", cfg, 30, [1, 4, 6])


def test_another_ranks_checkpoint_is_named_by_its_place_in_the_run():
    """A rank's checkpoint from another rank, world size or row-group count is refused naming
    those (it had read "--backend 'cpp/dist2/g4/r0' then, 'cpp/dist2/g4/r1' now")."""
    from embgeom.engine.checkpoint import differences, fingerprint
    from embgeom.engine.config import make_config

    x, cfg = make_embeddings(20, 4, seed=1), make_config(bins=10)

    def place(world, groups, rank):
        return fingerprint(x, None, cfg, "cpp", 3, {}, distributed={"world_size": world, "row_groups": groups,
                                                                     "rank": rank}).identity

    assert differences(place(2, 4, 0), place(2, 4, 1)) == ["rank 0 then, 1 now"]
    assert differences(place(2, 4, 0), place(3, 6, 0)) == ["row_groups 4 then, 6 now", "world_size 2 then, 3 now"]
    assert differences(fingerprint(x, None, cfg, "cpp", 3, {}).identity, place(2, 4, 0)) == \
        ["distributed null then, {\"rank\": 0, \"row_groups\": 4, \"world_size\": 2} now"]


def test_a_rank_state_must_count_the_pairs_of_its_finished_jobs():
    """A crafted list of finished jobs (its checksum made anew) beside a state had counted a job
    twice (done emptied, the state kept) or skipped jobs whose pairs the state lacks."""
    from embgeom.distributed import _check_done_pairs
    from embgeom.engine.config import make_config
    from embgeom.engine.state import EngineState
    from embgeom.distributed import group_bounds, plan_jobs

    x = make_embeddings(30, 6, seed=2)
    x[4] = 0  # a zero row: its pairs are left out under cosine
    cfg = make_config(bins=20)
    bounds, jobs = group_bounds(30, 3), plan_jobs(30, 3)
    rows = lambda a, b: x[a:b]  # noqa: E731
    sizes = [b - a for a, b in bounds]
    valid = [s - (a <= 4 < b) for s, (a, b) in zip(sizes, bounds)]
    pairs = [valid[g] * (valid[g] - 1) // 2 if g == h else valid[g] * valid[h] for g, h, _ in jobs]
    state = EngineState.empty(cfg, 30, None)
    state.count = pairs[0]
    _check_done_pairs(state, [0], jobs, bounds, rows, cfg, "c.rank0")
    for done in ([], [0, 1]):
        with pytest.raises(ValueError, match="checkpoint: c.rank0: its state counts"):
            _check_done_pairs(state, done, jobs, bounds, rows, cfg, "c.rank0")


def test_a_rank_state_must_list_pairs_of_its_finished_jobs_only():
    """A finished-jobs list relabelled to another job of the same pair count (its checksum made
    anew) passes the count check; the pairs the state lists name the job they came from, and a
    state listing pairs of a job it does not count is refused (it had been resumed and merged
    with that job's own run: a neighbour listed twice)."""
    from embgeom.backends import registry
    from embgeom.distributed import _check_done_pairs, _run_job, group_bounds, plan_jobs
    from embgeom.engine.config import make_config

    x = make_embeddings(40, 6, seed=3)
    cfg = make_config(bins=20, topk=4, bottomk=2, row_topk=3, outside=(-0.2, 0.2))
    bounds, jobs = group_bounds(40, 4), plan_jobs(40, 4)
    rows = lambda a, b: x[a:b]  # noqa: E731
    _, pick = registry.pick("pairwise_stats", x, "cpp", precision="exact")
    selfs = [k for k, (g, h, _) in enumerate(jobs) if g == h]
    g, h, _ = jobs[selfs[0]]
    state = _run_job(rows, g, h, bounds, cfg, lambda a, b, c: pick(a, b, c, shift=0.0), 40)
    _check_done_pairs(state, [selfs[0]], jobs, bounds, rows, cfg, "c.rank0")
    with pytest.raises(ValueError, match="^checkpoint: c.rank0: its state lists pairs of jobs it does not count "
                                         "as finished; delete it"):
        _check_done_pairs(state, [selfs[1]], jobs, bounds, rows, cfg, "c.rank0")   # the same pair count


def test_ranks_that_disagree_are_refused_naming_what_differs():
    """Every rank compares its shape, dtype, options and a sample of rows with the others' before
    any work: ranks given other files or options had merged their parts silently (exit 0)."""
    import pytest

    from embgeom.distributed import _check_ranks_agree
    from embgeom.engine.config import make_config

    x = make_embeddings(157, 6, seed=1)

    class Peers:  # rank 1 of 2, the other rank's answer given
        def __init__(self, theirs):
            self.theirs = theirs

        def all_gather_object(self, out, mine):
            out[0], out[1] = self.theirs, mine

    def answer(x, cfg, groups=4, backend=None):
        got = {}

        class Me:
            def all_gather_object(self, out, mine):
                got.update(mine)
                out[:] = [mine] * len(out)

        _check_ranks_agree(Me(), 0, 2, x, cfg, groups, backend)
        return got

    cfg = make_config(bins=40)
    _check_ranks_agree(Peers(answer(x, cfg)), 1, 2, x, cfg, 4, None)          # the same: no word
    other = make_embeddings(157, 6, seed=9)                                 # another file of the same shape
    for theirs, what in ((answer(other, cfg), "x rows"), (answer(x, make_config(bins=20)), "bins"),
                         (answer(x, make_config(bins=40, metric="dot", range=(-9, 9))), "metric"),
                         (answer(x[:150], cfg), "shape"), (answer(x, cfg, groups=6), "groups")):
        with pytest.raises(ValueError, match=f"^distributed: rank 1 runs another input or options than rank 0 "
                                             f"\\({what}.*; run the same command on the same file on every rank"):
            _check_ranks_agree(Peers(theirs), 1, 2, x, cfg, 4, None)
    # a file that differs from rank 0's in one row outside the sample: named by the row group
    one_row = x.clone()
    one_row[120, 2] += 1.0
    assert answer(one_row, cfg)["x rows"] == answer(x, cfg)["x rows"]
    with pytest.raises(ValueError, match=r"^distributed: rank 1 runs another input than rank 0 \(rows 120-156 "
                                         r"of x differ: sha256 \w+ on rank 0, \w+ on rank 1\); run the same"):
        _check_ranks_agree(Peers(answer(one_row, cfg)), 1, 2, x, cfg, 4, None)


def test_rank_errors_name_the_input_row_and_the_port(tmp_path, capsys, monkeypatch):
    """A NaN is named by its row in X (a rank had counted from its row group's start); a port
    another process holds is one line, not torch's traceback; --json onto a rank's checkpoint
    file is refused before any work."""
    import socket

    x = make_embeddings(157, 6, seed=2).numpy()
    x[100, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    r = _torchrun(["pairs", tmp_path / "x.npy", "--distributed", "--json", tmp_path / "o.json"], tmp_path)
    assert r.returncode != 0 and "NaN or Inf in 1 row(s): [100]" in r.stderr, r.stderr[-2000:]
    np.save(tmp_path / "ok.npy", make_embeddings(10, 3).numpy())
    args = ["pairs", str(tmp_path / "ok.npy"), "--distributed", "--json", str(tmp_path / "o.json")]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(held.getsockname()[1])), ("EMBGEOM_DIST_BACKEND", "gloo")):
            monkeypatch.setenv(k, v)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("embgeom: error: distributed: the ranks could not join (") and err.count("\n") == 1, err
    assert main([*args[:-1], str(tmp_path / "ck.rank1"), "--checkpoint", str(tmp_path / "ck")]) == 2
    assert "--json: " in capsys.readouterr().err
