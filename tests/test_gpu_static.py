"""What of the GPU path can be checked without a GPU: the launch plan, the CUDA build flags
(CMake configure), the sm_90a static profile's targets, the gpu-check script's steps, and the
float64 recheck used at 1M rows."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embgeom.backends import gpu_plan
from embgeom.engine.config import PairwiseConfig

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------

def test_plan_at_1m_bf16_suits_hopper():
    p = gpu_plan.make_plan(1 << 20, 1 << 20, 768, elem_bytes=2, on_gpu=True, sms=132, row_k=10, need=1000)
    # one warpgroup on a 64 x 128 tile: HGMMA 64x128x16, 64 accumulator registers per thread
    assert (p.bm, p.block_n, p.bk, p.num_warps, p.num_stages, p.split) == (64, 128, 64, 4, 3, 4)
    assert p.nbr == 16384 and p.nbc == 8192 and p.group == 128 and p.nbands == 128
    assert p.programs == 132 and p.occupancy_pending
    # 3 stages of a 64 x 64 and a 128 x 64 bf16 operand: two programs fit Hopper's shared memory
    assert 2 * p.num_stages * (p.bm + p.block_n) * p.bk * 2 <= 160 * 1024
    assert p.capacity == 1 << 25
    r0, rows, tiles = p.tiles(127, True)
    assert (r0, rows, tiles) == (127 * 128, 128, 128 * (8192 - 127 * 128 * 64 // 128))
    # the upper triangle plus at most one all-invalid column block per block-row
    pairs = p.total_tiles(True) * p.bm * p.block_n
    assert (1 << 20) ** 2 / 2 < pairs < (1 << 20) ** 2 / 2 * 1.01
    ex = gpu_plan.make_plan(1000, 1000, 768, elem_bytes=4, on_gpu=True, sms=132, mma=False)
    assert (ex.bm, ex.block_n, ex.bk, ex.num_warps) == (64, 64, 32, 8)


@pytest.mark.parametrize("n, elem_bytes, mma", [(8 << 20, 4, False), (10 << 20, 2, True), (16 << 20, 4, False),
                                                (16 << 20, 2, True)])
def test_a_programs_pairs_of_a_band_fit_its_int32_counts(n, elem_bytes, mma):
    """The kernel keeps a program's histogram slots and row counts in int32 for a band (int64 at
    its end): 128 bands at 8M rows had given a program 1.76 x 2^31 pairs (one bin holding 57 % of
    them wrapped negative). Bands are now cut so a program's share stays below 2^30."""
    p = gpu_plan.make_plan(n, n, 384, elem_bytes=elem_bytes, on_gpu=True, sms=132, mma=mma)
    assert p.group * p.bm * p.block_n * p.nbc <= (1 << 30) * p.programs
    assert p.nbands * p.group >= p.nbr


@pytest.mark.parametrize("n,m,bm,bn,group", [(100, None, 16, 32, 2), (77, None, 16, 64, 3), (130, None, 32, 32, 1),
                                             (50, 90, 16, 32, 2)])
def test_tile_walk_covers_each_pair_once(n, m, bm, bn, group):
    """The kernel's tile walk (band_row0 + t % band_rows, col_start + t // band_rows) over
    GpuPlan.tiles: every valid pair (i < j in self mode) lies in exactly one launched tile, and a
    launched tile with no valid pair is one of the few left of a later row's col_start."""
    self_mode = m is None
    p = gpu_plan.make_plan(n, m or n, 8, elem_bytes=4, on_gpu=False, block=bm, block_n=bn, group=group)
    assert (p.bm, p.block_n) == (bm, bn)
    seen = {}
    empty = 0
    for b in range(p.nbands):
        r0, rows, tiles = p.tiles(b, self_mode)
        for t in range(tiles):
            r = r0 + t % rows
            c = (r0 * bm // bn if self_mode else 0) + t // rows  # as the kernel computes it
            assert r < p.nbr and c < p.nbc
            got = 0
            for i in range(r * bm, min(n, (r + 1) * bm)):
                for j in range(c * bn, min(m or n, (c + 1) * bn)):
                    if not self_mode or i < j:
                        seen[i, j] = seen.get((i, j), 0) + 1
                        got += 1
            if not got:
                empty += 1
                assert self_mode and c < p.col_start(r, True) + 1
    want = n * (n - 1) // 2 if self_mode else n * m
    assert len(seen) == want and set(seen.values()) == {1}
    assert empty <= p.nbr * (bn // bm)


def test_programs_from_registers():
    assert gpu_plan.programs_for(255, 132, 8) == 132
    assert gpu_plan.programs_for(128, 132, 8) == 264
    assert gpu_plan.programs_for(64, 132, 8) == 4 * 132  # at most 4 programs per SM
    # one warpgroup: two 255-register programs fill the register file (256 per thread allocated)
    assert gpu_plan.programs_for(255, 132, 4) == 264
    assert gpu_plan.programs_per_sm(168, 4) == 3
    assert gpu_plan.programs_per_sm(170, 4) == 2  # allocated in units of 8 per thread: 176
    # shared memory: 1 KB reserved per block
    assert gpu_plan.programs_per_sm(128, 4, shared=100 * 1024) == 2
    assert gpu_plan.programs_per_sm(128, 4, shared=114 * 1024) == 1


def test_variant_switches():
    cfg = PairwiseConfig(bins=2000, topk=10, bottomk=10, row_topk=10, outside=(-0.2, 0.2))
    plan = gpu_plan.make_plan(4096, 4096, 768, elem_bytes=2, on_gpu=True, sms=132)
    kw = gpu_plan.variant(cfg, mode="bf16", plan=plan, self_mode=True, has_valid=True, do_stats=True,
                          streams=[True, True, False, True, False, True], collect_close=False)
    assert kw["nb"] == 2048 and not kw["ghist"] and kw["in_prec"] == "" and kw["split"] == 4
    assert (kw["bm"], kw["bn"], kw["num_warps"]) == (64, 128, 4)
    assert kw["groups"] == [0] * 5  # no live bucket maxima on the GPU (registers)
    live = gpu_plan.make_plan(4096, 4096, 768, elem_bytes=2, on_gpu=True, sms=132, live_bounds=True)
    kw = gpu_plan.variant(cfg, mode="bf16", plan=live, self_mode=True, has_valid=True, do_stats=True,
                          streams=[True] * 6, collect_close=False)
    assert kw["groups"] == [16, 16, 0, 16, 0]  # next_pow2(10); at most one per slab column (32)
    assert gpu_plan.slab_side(live) == 32
    exact = gpu_plan.make_plan(4096, 4096, 768, elem_bytes=4, on_gpu=True, sms=132, mma=False)
    assert (exact.bm, exact.block_n, exact.bk, exact.split, exact.num_warps) == (64, 64, 32, 1, 8)
    retry = gpu_plan.variant(cfg, mode="exact", plan=plan, self_mode=True, has_valid=True, do_stats=False,
                             streams=[True] + [False] * 5, collect_close=False)
    assert retry["nb"] == 0 and not retry["has_out"] and retry["in_prec"] == "ieee"


# --------------------------------------------------------------------------------------------
# CMake: the CUDA architectures reach nvcc
# --------------------------------------------------------------------------------------------

def _cmake():
    for c in (Path(sys.executable).parent / "cmake", shutil.which("cmake")):
        if c and Path(c).exists():
            out = subprocess.run([str(c), "--version"], capture_output=True, text=True).stdout
            ver = tuple(int(v) for v in re.search(r"(\d+)\.(\d+)", out).groups())
            if ver >= (3, 26):
                return str(c)
    return None


@pytest.mark.parametrize("archs", [None, "90"])
def test_cmake_cuda_architectures_reach_nvcc(tmp_path, archs):
    cmake = _cmake()
    if cmake is None:
        pytest.skip("no cmake >= 3.26 (pip install cmake)")
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the CUDA module is not configured")
    pybind11 = pytest.importorskip("pybind11")
    args = [cmake, "-S", str(ROOT), "-B", str(tmp_path), "-DEMBGEOM_CUDA=on", f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"]
    if archs:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
    res = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    cmds = json.loads((tmp_path / "compile_commands.json").read_text())
    cu = [c["command"] for c in cmds if c["file"].endswith(".cu")]
    assert cu, "no .cu compile command: _cuda not configured"
    want = ["80", "90"] if archs is None else ["90"]
    for c in cu:
        got = sorted(set(re.findall(r"arch=compute_(\d+)", c)))
        assert got == want, c
        assert "-flto" not in c and "fno-fat-lto" not in c, c  # pybind11's LTO flags stay off nvcc


# --------------------------------------------------------------------------------------------
# static profile (sm_90a, Triton's toolchain): the targets of docs/architecture.md
# --------------------------------------------------------------------------------------------

def test_speed_model_cold_path_is_the_guarded_append_region():
    """The model's hot path leaves out what a conditional forward branch skips when that region
    appends candidates (STG, value-returning ATOMG): the slab's "any candidate?" test. A branch
    past the k-loop, out of the loop, over reductions without a result (RED), or an
    unconditional one (past an else) leaves its region hot."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_static_profile as gsp

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
    .L_x_0:
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
        /*0030*/                   FMNMX R2, R3, R4, !PT ;
        /*0040*/               @!P1 BRA `(.L_x_1) ;
        /*0050*/                   ATOMG.E.ADD.STRONG.GPU PT, R5, desc[UR6][R6.64], R7 ;
        /*0060*/                   FADD R8, R8, R9 ;
    .L_x_1:
        /*0070*/               @!P2 BRA `(.L_x_2) ;
        /*0080*/                   RED.E.ADD.64.STRONG.GPU desc[UR6][R10.64], R12 ;
    .L_x_2:
        /*0090*/                   BRA `(.L_x_3) ;
        /*00a0*/                   STG.E desc[UR6][R10.64], R12 ;
    .L_x_3:
        /*00b0*/                   FADD R8, R8, R9 ;
        /*00c0*/               @P3 BRA `(.L_x_0) ;
        /*00d0*/                   EXIT ;
"""
    insns, labels = gsp.parse_sass(sass)
    # the unconditional branch skips an else that the other path always runs: hot
    assert gsp.cold_ranges(insns, labels, 0x0, 0xc0, (0x10, 0x20)) == [(0x41, 0x70)]


def test_euclidean_distances_take_the_correctly_rounded_square_root():
    """The euclidean variant's distances are exact mode's reported values (no rescoring): its PTX
    has sqrt.rn, never the fast sqrt.approx.ftz that tl.sqrt lowers to on the GPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_static_profile as gsp

    why = gsp.toolchain_missing()
    if why:
        pytest.skip(why)
    kernel = gsp.compile_variant("fulll2-exact")[0]
    ptx = kernel.asm["ptx"]
    assert "sqrt.rn.f32" in ptx and "sqrt.approx" not in ptx


def test_static_profile_targets(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_static_profile as gsp

    why = gsp.toolchain_missing()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    variants = [v for v in gsp.VARIANTS if v.endswith(("bf16", "exact"))]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_static_profile.py"), "--out", str(tmp_path),
                          "--variants", *variants], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((tmp_path / "profile.json").read_text())["variants"]
    assert sorted(table) == sorted(variants)
    for name, row in table.items():
        assert (tmp_path / f"{name}.cubin").stat().st_size > 0
        assert row["membar_gpu"] == 0, (name, row)  # relaxed atomics: no GPU-scope fences
        if not name.endswith("exact"):  # exact fp32 multiplies on CUDA cores (FFMA), no wgmma
            assert row["hgmma_n_min"] >= 128, (name, row)
        # no local-memory traffic (a Triton may reserve an unused stack frame: stack is reported,
        # the committed Triton 3.6.0 profile also has none)
        assert row["spill"] == 0, (name, row)
    # the static speed targets (predictions at 1,048,576 x 768 bf16, not measurements)
    assert table["full-bf16"]["model"]["predicted_seconds"] <= 2.5, table["full-bf16"]["model"]
    assert table["rowtopk-bf16"]["model"]["predicted_seconds"] <= 1.6, table["rowtopk-bf16"]["model"]
    assert table["full-bf16"]["atoms"] and table["full-bf16"]["shared"] >= 4 * 2048  # the shared histogram


# --------------------------------------------------------------------------------------------
# gpu-check script
# --------------------------------------------------------------------------------------------

def test_gpu_check_dry_run_goes_through_every_step(tmp_path):
    """`gpu_check.sh DIR --dry-run`: every step runs its arguments through (bench_gpu.py
    --check-args, pytest --collect-only, the model-package check) with the GPU work stubbed,
    and writes what a real run writes, in DIR (at most 8 files) and WORK (everything else)."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, WORK=str(work))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(script), str(out), "--dry-run"], capture_output=True, text=True, timeout=240,
                         env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = [p for p in out.rglob("*")]
    assert len(files) <= 8 and all(p.is_file() for p in files), files
    assert not (out / "gpu.csv").exists()  # nothing measured, nothing written
    summary = json.loads((out / "summary.json").read_text())
    names = [s["step"] for s in summary["steps"]]
    assert names == ["versions", "wheels", "build", "tests", "bench_262k", "bench_1m", "text", "vocab"]
    assert summary["dry_run"] is True and summary["failed"] == 0 and summary["budget"] == 540
    for s in summary["steps"]:
        assert s["status"] in ("ok", "skipped") and s["limit"] >= 1, s
    log = (out / "steps.log").read_text()
    worst = dict(kv.split("=") for kv in re.search(r"limits when every step uses its own: (.*)", log).group(1).split())
    assert sum(int(v) for v in worst.values()) <= 540 and int(worst["bench_1m"]) >= 200
    # both benchmark steps checked their arguments; the CSV goes to DIR, each row as measured
    checks = re.findall(r"bench_gpu \(check only\): n=\[(\d+)\].*csv=(\S+)", log)
    assert [n for n, _ in checks] == ["262144", "1048576"] and {c for _, c in checks} == {str(out / "gpu.csv")}
    assert "tests collected" in log or "test collected" in log
    text = script.read_text()
    assert "--no-index" in text and "--find-links" in text  # nothing from the network
    assert "-DCMAKE_CUDA_ARCHITECTURES=\\$ARCH" in text    # the device's own arch (90 on Hopper)
    assert text.count("--device cuda") >= 2 and "--recheck" in text


def test_gpu_wheels_are_ignored_and_small():
    assert ".whl/" in (ROOT / ".gitignore").read_text().split()
    whl = ROOT / ".whl"
    if not whl.is_dir():
        pytest.skip("no .whl/ here (make gpu-wheels)")
    assert sum(f.stat().st_size for f in whl.iterdir()) <= 5 * 2 ** 20
    names = " ".join(f.name for f in whl.iterdir())
    assert "pybind11" in names and "pytest" in names


# --------------------------------------------------------------------------------------------
# recheck at scale (run here on small inputs)
# --------------------------------------------------------------------------------------------

def test_gpu_check_stops_where_there_is_no_gpu(tmp_path):
    """A real run on a machine without a usable CUDA device: versions fails and the check stops
    there (its later steps had failed each in its own words: a CUDA assertion in the build, a
    traceback in the text step), exit status 1."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, WORK=str(work), STEPS="versions build tests")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], capture_output=True,
                         text=True, timeout=120, env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert res.returncode == 1 and [s["step"] for s in summary["steps"]] == ["versions"], res.stdout[-2000:]
    assert summary["steps"][0]["status"] == "failed" and "NO CUDA DEVICE" in res.stdout
    assert "stopping: no usable CUDA device" in res.stdout


def test_recheck_accepts_a_correct_result_and_finds_errors():
    import embgeom

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from verify import recheck

    from helpers import make_embeddings

    x = make_embeddings(300, 32, zero_rows=2, seed=4)
    got = embgeom.pairwise_stats(x, backend="cpp", bins=100, topk=10, bottomk=10, row_topk=5, row_bottomk=3)
    rep = recheck(got, x, tol=1e-5, sample_rows=16)
    assert rep["ok"], rep["failures"]
    assert rep["checked"]["pairs"] == 298 * 297 // 2 and rep["checked"]["row_topk"] == 16

    got.count += 1
    got.top_pairs.values[3] += 1e-3
    got.row_topk.indices[:, 0] = got.row_topk.indices[:, 1]
    rep = recheck(got, x, tol=1e-5, sample_rows=300)
    text = " ".join(rep["failures"])
    assert not rep["ok"] and "count" in text and "top_pairs" in text and "row_topk" in text


# --------------------------------------------------------------------------------------------
# the compiled kernel, read at the IR level (sm_90a, no GPU): what the interpreter cannot see
# --------------------------------------------------------------------------------------------

_IR_SCRIPT = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
import gpu_static_profile as gsp
src = open(sys.argv[2]).read().splitlines()
hist_line = 1 + next(i for i, ln in enumerate(src) if "tl.atomic_add(hist_ptr" in ln)

def source_line(ttir, ref):
    # '#locN = loc("file":line:col)' or 'loc(callsite(#locA at #locB))': the callee end of the chain
    locs = dict(re.findall(r"^(#loc\d*) = (loc\(.*\))$", ttir, re.M))
    while ref in locs:
        m = re.match(r'loc\((?:callsite\()?(#loc\d*)', locs[ref])
        if not m:
            m = re.search(r'"[^"]*pairwise.py":(\d+)', locs[ref])
            return int(m.group(1)) if m else None
        ref = m.group(1)
    return None

out = {}
for name in ("full-bf16", "widehist-bf16"):
    k, plan, kw, _ = gsp.compile_variant(name)
    ttir = k.asm["ttir"]
    atomics = [ln.strip() for ln in ttir.splitlines() if "tt.atomic_rmw" in ln
               and source_line(ttir, re.search(r"loc\((#loc\d*)\)\s*$", ln).group(1)) == hist_line]
    out[name] = dict(hist=[ln.strip() for ln in ttir.splitlines() if "tt.histogram" in ln],
                     smem=[ln.strip() for ln in ttir.splitlines() if "embgeom_hist_" in ln],
                     vote=[ln.strip() for ln in ttir.splitlines() if "embgeom_vote_" in ln],
                     atomics=atomics, nb=kw["nb"], ghist=kw["ghist"])
print("IR" + json.dumps(out))
"""


def _compiled_ir():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", _IR_SCRIPT, str(ROOT / "benchmarks"),
                          str(ROOT / "kernels" / "triton" / "pairwise.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.split("IR", 1)[1])


def test_histogram_is_one_shared_increment_per_element_and_wide_ones_count_in_int64():
    """The compiled kernel (sm_90a, the local Triton; `make gpu-static TRITON=3.6.0` for the
    lent machine's) keeps its per-program histogram in shared memory through the linked IR
    library: no tt.histogram (Triton 3.6 lowers it with warp ballots, and a mask reshaped for it
    from another layout pairs with the wrong elements), one unmasked elementwise increment
    call on the slot tile, slots zeroed and read once per program, >= bins + 3 slots (the
    spare one takes the invalid pairs). Wide histograms count in int64 global atomics."""
    ir = _compiled_ir()
    full = ir["full-bf16"]
    assert not full["hist"] and full["nb"] >= 2000 + 3
    calls = {re.search(r'symbol = "(embgeom_hist_\w+)"', ln).group(1): ln for ln in full["smem"]
             if "tt.extern_elementwise" in ln}
    assert sorted(calls) == ["embgeom_hist_add", "embgeom_hist_read", "embgeom_hist_zero"], full["smem"]
    for name, line in calls.items():
        operands = line.split("tt.extern_elementwise", 1)[1].split("{", 1)[0]
        assert operands.count("%") == 1, line  # the slot tile only: no mask
        shape = re.search(r"tensor<([0-9x]+)xi32", line).group(1)
        assert shape == (str(full["nb"]) if name != "embgeom_hist_add" else "64x32"), line
    wide = ir["widehist-bf16"]
    assert wide["ghist"] and not wide["hist"] and not wide["smem"] and wide["atomics"]
    for line in wide["atomics"]:
        assert "ptr<i64>" in line and "xi64>" in line, line


def test_candidate_vote_is_one_block_or_per_slab_without_a_cross_warp_reduction():
    """The compiled kernel asks "does any pair of this slab reach a stream's threshold?" through
    the block library: each thread marks its flag from its rows' maxima (a per-row tensor:
    reduced along the row inside the warp only) and one scalar call per slab takes the block's
    OR (bar.red.or). A reduction of a tile to a scalar crosses warps through shared memory, and
    ptxas kept its lane-predicated second stage alive from one tile to the next (spills on
    Triton 3.6). Each candidate append (behind the slab's vote) also votes, on a scalar: is
    its stream full? (one side of the branch for the whole block; see _append)."""
    ir = _compiled_ir()
    full = ir["full-bf16"]
    split = 4
    marks = [ln for ln in full["vote"] if "embgeom_vote_mark" in ln]
    takes = [ln for ln in full["vote"] if "embgeom_vote_take" in ln]
    clears = [ln for ln in full["vote"] if "embgeom_vote_clear" in ln]
    slab_marks = [ln for ln in marks if "tensor<" in ln]
    append_marks = [ln for ln in marks if "tensor<" not in ln]
    assert len(slab_marks) == split and len(clears) == 1, full["vote"]
    for line in slab_marks:
        assert re.search(r"\(tensor<64xf32", line), line  # one maximum per row of the slab
    # top, bottom, row top-k and outside pairs append in every slab
    assert len(append_marks) == 4 * split and len(takes) == len(marks), full["vote"]
    for line in takes + clears:
        assert "tensor<" not in line, line  # one call per thread: a scalar


def test_block_library_is_valid_ir_with_nb_slots_and_a_flag_per_thread(tmp_path):
    """The library text for each slot count and block size: a static shared array of nb int32
    histogram slots (none for nb = 0), one flag per thread, the functions the kernel calls,
    rewritten only when its text changes; its shared memory counts toward occupancy."""
    pytest.importorskip("triton")
    from embgeom.kernels.triton import pairwise

    path = Path(pairwise.block_library(512, 128))
    text = path.read_text()
    assert "addrspace(3) global [512 x i32]" in text and text.count("define i32 @embgeom_hist_") == 3
    assert "addrspace(3) global [128 x i32]" in text and text.count("define i32 @embgeom_vote_") == 3
    assert "atomicrmw add" in text and "atomicrmw or" in text and "bar.red.or.pred" in text
    assert " br " not in text  # no branch inside the hot path's calls
    mtime = path.stat().st_mtime_ns
    assert pairwise.block_library(512, 128) == str(path) and path.stat().st_mtime_ns == mtime
    assert pairwise.compile_options(512, 4, True) == {"extern_libs": ((pairwise.BLOCK_LIB, str(path)),)}
    assert pairwise.compile_options(512, 4, False) == {}
    no_hist = Path(pairwise.block_library(0, 128)).read_text()
    assert "embgeom_hist_" not in no_hist and "define i32 @embgeom_vote_take" in no_hist
    assert pairwise.block_library_bytes(512, 4, True) == 4 * (512 + 128)
    assert pairwise.block_library_bytes(512, 4, False) == 0


def test_profile_compiles_the_engine_signature():
    """Every runtime argument of the kernel has one type in kernels.triton.pairwise.ARG_TYPES
    (the engine's tensors are checked against it in tests/test_triton.py), and the integers
    that change within a run are excluded from specialisation."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("checks the compiled kernel object (run without TRITON_INTERPRET)")
    from embgeom.kernels.triton import pairwise

    fn = pairwise._pairwise_stats_kernel
    consts = set(pairwise.constexprs(metric=0, self_mode=True, has_valid=True, in_prec="", do_stats=True, nb=2048,
                                     ghist=False, has_out=True, collect_close=False, streams=[True] * 6,
                                     groups=[0] * 5, bm=64, bk=64, upcast=False, split=4, bn=128))
    runtime = [a for a in fn.arg_names if a not in consts]
    sig = pairwise.signature("tensordesc<bf16[64,64]>", "tensordesc<bf16[128,64]>")
    assert sorted(sig) == sorted(runtime) and sig["y_desc"] == "tensordesc<bf16[128,64]>"
    assert pairwise.ARG_TYPES["part_cnt_ptr"] == "*i64" and pairwise.ARG_TYPES["hist_ptr"] == "*i64"
    dns = {p.name for p in fn.params if p.do_not_specialize}
    assert dns == set(pairwise.DO_NOT_SPECIALIZE)
    spec = pairwise.specialization(dict(N=1 << 20, M=1 << 20, D=768, band_row0=64, band_rows=1, num_tiles=1, bins=1,
                                        cap=1 << 25, cut_i=0, cut_j=1))
    assert spec["constants"] == {"bins": 1}  # bins = max(bins, 1) is constant for a run; the 1s that vary are not
    names = fn.arg_names
    divisible = {names[k[0]] for k in spec["attrs"]}
    assert {"N", "M", "D"} <= divisible and not divisible & set(pairwise.DO_NOT_SPECIALIZE)


def test_bench_gpu_times_a_baseline_once():
    """At --repeats 1 a long baseline run (nothing to compile) is its own timing: the checked
    first run is not repeated (at 1M rows that is minutes of the lent machine's slot)."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    def must_not_run():
        raise AssertionError("the baseline ran twice")

    t = bench_gpu.timed(must_not_run, 1, 2.5, first_counts=True)
    assert t == {"median_ms": 2500.0, "p20_ms": 2500.0, "p80_ms": 2500.0}


@pytest.mark.parametrize("name", ["gpu_static_profile.json", "gpu_static_profile_triton3.6.0.json"])
def test_committed_profiles_carry_the_speed_model(name):
    """The committed static profiles (Triton 3.9 and the lent machine's 3.6.0): each records its
    Triton version and the model's assumptions, and every variant a predicted time at
    1,048,576 x 768 that is at least its product alone (predictions, not measurements)."""
    prof = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    assert prof["n"] == 1 << 20 and prof["d"] == 768 and prof["triton"]
    assert ("3.6.0" in name) == (prof["triton"] == "3.6.0")
    assert prof["model"]["bf16_tflops"] == 788.0 and prof["model"]["sms"] == 132
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_static_profile as gsp

    assert sorted(prof["variants"]) == sorted(gsp.VARIANTS)
    for variant, row in prof["variants"].items():
        m = row["model"]
        assert 0 < m["product_seconds"] <= m["predicted_seconds"] <= m["predicted_seconds_all"], variant
    # the static targets on either Triton: full output <= 2.5 s, row top-10 <= 1.6 s (bf16),
    # no spill instruction; the lent machine's Triton reserves no stack either
    for variant, row in prof["variants"].items():
        assert row["spill"] == 0 and (row["stack"] == 0 or prof["triton"] != "3.6.0"), (variant, row)
    assert prof["variants"]["full-bf16"]["model"]["predicted_seconds"] <= 2.5
    assert prof["variants"]["rowtopk-bf16"]["model"]["predicted_seconds"] <= 1.6


def test_shared_memory_opt_in_covers_the_block_library():
    """Static (block library) + dynamic (Triton) shared memory above 48 KB needs the opt-in that
    Triton sets only for a dynamic share above 48 KB: the exact variant with a histogram (9,216
    static + 42,000 dynamic bytes, its static profile's 51,216) failed every launch on an H200
    without it."""
    pytest.importorskip("triton")
    from embgeom.kernels.triton import pairwise

    static = pairwise.block_library_bytes(gpu_plan.hist_slots(2000), gpu_plan.EXACT_WARPS, True)
    assert static == 9216
    profile = json.loads((ROOT / "benchmarks/results/gpu_static_profile_triton3.6.0.json").read_text())
    assert profile["variants"]["full-exact"]["shared"] == static + 42000
    assert pairwise.shared_opt_in(static, 42000) == 42000
    assert pairwise.shared_opt_in(1024, 42000) is None  # within 48 KB: no opt-in
    assert pairwise.shared_opt_in(static, 74776) is None  # Triton opted in (dynamic > 48 KB)


def test_shared_memory_opt_in_calls_the_driver_once_per_function(monkeypatch):
    """allow_block_library_shared on a stand-in compiled kernel and driver: loads the kernel's
    module first, reads the function's static bytes, sets the opt-in to the dynamic share
    (51,216 bytes in all here), and asks the driver only once per function."""
    import ctypes

    pytest.importorskip("triton")
    from types import SimpleNamespace

    from embgeom.kernels.triton import pairwise

    calls = []

    class Driver:
        def cuFuncGetAttribute(self, out, attr, fn):
            calls.append(("get", attr, fn.value))
            ctypes.cast(out, ctypes.POINTER(ctypes.c_int)).contents.value = 9216
            return 0

        def cuFuncSetAttribute(self, fn, attr, value):
            calls.append(("set", attr, fn.value, value.value))
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver())
    monkeypatch.setattr(pairwise, "_opted_in", set())
    kernel = SimpleNamespace(function=None, metadata=SimpleNamespace(shared=42000))
    kernel._init_handles = lambda: setattr(kernel, "function", 0x7F00)
    pairwise.allow_block_library_shared(kernel)
    pairwise.allow_block_library_shared(kernel)
    assert calls == [("get", pairwise.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, 0x7F00),
                     ("set", pairwise.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 0x7F00, 42000)]
