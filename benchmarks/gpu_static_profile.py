"""Static profile of the all-pairs kernel for Hopper, without a GPU.

    python benchmarks/gpu_static_profile.py --out DIR [--variants full-bf16 rowtopk-bf16 ...]

Compiles every variant the engine launches at 1,048,576 x 768 (full output, moments only, row
top-10 only; bf16, fp16, tf32 and exact fp32 inputs) for sm_90a with Triton's own toolchain and
the engine's launch plan (embgeom.backends.gpu_plan), then reads the cubin with cuobjdump and
nvdisasm. Writes DIR/<variant>.cubin and DIR/profile.json, and prints the table:
  regs, stack (bytes; > 0 means spills), spill (LDL/STL instructions), membar (MEMBAR.*.GPU/SYS:
  what acq_rel atomics cost), hgmma (distinct HGMMA shapes), loop (SASS instructions of the
  persistent loop per program), kloop (of which the k-loop), epi/elem (the rest of the persistent
  loop per tile element and thread: a static upper bound of the epilogue's issue cost, rarely
  taken branches included).
Each variant also gets the static speed model (MODEL, speed_model): instructions per tile and
thread by class and predicted_seconds at N x D, a prediction from stated assumptions, never a
measurement. profile.json records the Triton version (`make gpu-static TRITON=3.6.0` runs this
with another Triton; --expect-triton refuses a mismatch).
Targets (tests/test_gpu_static.py): stack 0, no GPU-scope MEMBAR, HGMMA N >= 128.
--variants also takes check variants (CHECK_OUTPUTS): fullnohist-* (the full output without
its histogram) and full500-* (500 bins) show what the histogram costs, widehist-* the
global-atomics histogram.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "python") not in sys.path:  # this tree's embgeom (and embgeom.kernels)
    sys.path.insert(0, str(HERE.parent / "python"))
N, D = 1 << 20, 768
PRECISIONS = ("bf16", "fp16", "tf32", "exact")
OUTPUTS = {
    # the GPU benchmark's full M1 output and its row top-10 workload (benchmarks/bench_gpu.py)
    "full": dict(bins=2000, topk=10, bottomk=10, row_topk=10, outside=(-0.2, 0.2), outside_limit=1000),
    "moments": dict(bins=0, topk=0, bottomk=0),
    "rowtopk": dict(bins=0, topk=0, bottomk=0, row_topk=10),
}
VARIANTS = [f"{o}-{p}" for o in OUTPUTS for p in PRECISIONS]
# compiled by the tests only: more bins than a per-program histogram holds (global atomics)
CHECK_OUTPUTS = {"widehist": dict(bins=10000, topk=1, bottomk=1),
                 # the full output without its histogram: what the histogram costs (--variants)
                 "fullnohist": dict(OUTPUTS["full"], bins=0),
                 # and with 500 bins (512 histogram slots instead of 2,048)
                 "full500": dict(OUTPUTS["full"], bins=500),
                 # euclidean (its distances' square roots correctly rounded: sqrt.rn in the PTX)
                 "fulll2": dict(OUTPUTS["full"], metric="euclidean")}
CHECK_VARIANTS = [f"{o}-{p}" for o in CHECK_OUTPUTS for p in PRECISIONS]


def find_tool(name: str) -> str | None:
    """cuobjdump/nvdisasm: Triton's bundled copies first (they match its ptxas), then PATH."""
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which(name)


def toolchain_missing() -> str | None:
    """Why the profile cannot run here (None: it can)."""
    try:
        import triton  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        return f"triton with its NVIDIA backend is not importable ({e})"
    for tool in ("cuobjdump", "nvdisasm"):
        if find_tool(tool) is None:
            return f"{tool} not found (Triton's bundle or PATH)"
    return None


def launch_args(name: str):
    """(cfg, plan, variant kwargs) of the engine's first launch for one variant name."""
    from embgeom.backends import gpu_plan
    from embgeom.engine.config import PairwiseConfig

    out, prec = name.split("-")
    cfg = PairwiseConfig(**{**OUTPUTS, **CHECK_OUTPUTS}[out], precision="exact" if prec == "exact" else "fast")
    lengths = gpu_plan.list_lengths(cfg)
    plan = gpu_plan.make_plan(N, N, D, elem_bytes=2 if prec in ("bf16", "fp16") else 4, on_gpu=True, sms=132,
                              row_k=max(cfg.row_topk, cfg.row_bottomk), need=max(lengths.values()),
                              mma=prec != "exact")
    streams = [lengths[s] > 0 for s in gpu_plan.STREAMS]
    kw = gpu_plan.variant(cfg, mode=prec, plan=plan, self_mode=True, has_valid=True, do_stats=True,
                          streams=streams, collect_close=cfg.metric == "euclidean")
    return cfg, plan, kw


def first_launch_ints(cfg, plan) -> dict:
    """The integer arguments of the engine's first launch at N x D (self mode): N, M, D and bins
    are constant for a run, the rest change between launches and are not specialised
    (kernels.triton.pairwise.DO_NOT_SPECIALIZE)."""
    r0, rows, tiles = plan.tiles(0, True)
    return dict(N=N, M=N, D=D, band_row0=r0, band_rows=rows, num_tiles=tiles, bins=max(cfg.bins, 1),
                cap=plan.capacity, cut_i=2 ** 31 - 1, cut_j=0)


def compile_variant(name: str):
    """Compile one variant for sm_90a with the engine's argument types and Triton's own
    specialisation of its first launch (kernels.triton.pairwise.signature / specialization)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from embgeom.kernels.triton import pairwise

    cfg, plan, kw = launch_args(name)
    prec = name.split("-")[1]
    el = {"bf16": "bf16", "fp16": "fp16", "tf32": "fp32", "exact": "fp32"}[prec]
    consts = pairwise.constexprs(upcast=False, linked=True,
                                 **{k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")})
    spec = pairwise.specialization(first_launch_ints(cfg, plan))
    consts.update(spec["constants"])
    fn = pairwise._pairwise_stats_kernel
    types = pairwise.signature(f"tensordesc<{el}[{plan.bm},{plan.bk}]>", f"tensordesc<{el}[{plan.block_n},{plan.bk}]>")
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, consts, spec["attrs"]), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": kw["num_warps"], "num_stages": kw["num_stages"],
                                **pairwise.compile_options(kw["nb"], kw["num_warps"], True)})
    return k, plan, kw, time.perf_counter() - t0


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRA = re.compile(r"\bBRA\b[^`]*`\(([.\w]+)\)")
_LABEL = re.compile(r"^\s*\.?([.\w]+):", re.M)


def parse_sass(text: str):
    """[(addr, opcode, operands)] and {label: addr} from nvdisasm output."""
    insns, labels = [], {}
    pending = []
    for line in text.splitlines():
        m = re.match(r"^\s*(\.[\w]+):\s*$", line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSN.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            # args keep the guard predicate in front ("@!P0 ..."): cold_ranges reads it
            insns.append((addr, m.group(3), (m.group(2) or "") + m.group(4)))
    return insns, labels


def loops(insns, labels):
    """Backward branches as (start, end) address ranges."""
    out = []
    for addr, op, args in insns:
        if op.startswith("BRA"):
            m = re.search(r"`\(([.\w]+)\)", args)
            if m and m.group(1) in labels and labels[m.group(1)] <= addr:
                out.append((labels[m.group(1)], addr))
    return out


# ----------------------------------------------------------------------------------------------
# static speed model: an instruction walk of the persistent loop's SASS
# ----------------------------------------------------------------------------------------------

# Assumptions (stated, not measured here): the bf16 tensor-core rate and SM count measured on the
# lent machine kind (H100/H200 SXM), its boost clock, and Hopper's issue rate: 4 schedulers per SM,
# each issuing one warp-instruction per clock (no dual issue).
MODEL = dict(bf16_tflops=788.0, sms=132, clock_ghz=1.98, warp_issue_per_clk_per_sm=4,
             # tf32 wgmma at half the bf16 rate (the datasheet ratio); exact fp32 on CUDA cores: 128
             # FFMA lanes per clock and SM, or the k-loop's issue if that is slower
             rate_vs_bf16=dict(bf16=1.0, fp16=1.0, tf32=0.5), ffma_per_clk_per_sm=128,
             note="time per tile = product (tensor cores at the measured rate) + epilogue issue (every "
                  "static instruction of the persistent loop outside the k-loop, once per tile and warp, "
                  "at the issue rate); with one program per SM (registers, shared memory) the two do not "
                  "overlap, with p >= 2 programs per SM a tile takes max(product, epilogue, (product + "
                  "epilogue) / p). Not modelled: memory and "
                  "barrier stalls, spill latency, atomics' latency, inner loops' trip counts (counted "
                  "once), f64 and conversion pipe throughput, shared-memory bandwidth of the wgmma operands. "
                  "'hot' leaves out the regions a conditional forward branch skips that hold candidate "
                  "appends (global stores, value-returning atomics): the slab's 'any candidate?' test, "
                  "taken only by slabs that hold a candidate; 'all' counts every block (every slab "
                  "appends).")
# opcode prefix -> class of the walk
CLASSES = (
    ("spill", ("LDL", "STL")),
    ("barrier", ("BAR", "MEMBAR", "WARPSYNC", "SYNCS.ARRIVE")),
    ("matrix", ("HGMMA", "WARPGROUP", "UTMALDG", "UTMACCTL", "UTMASTG", "SYNCS", "LDSM", "R2UR", "UBLKCP")),
    # ATOMS: the shared-memory histogram; VOTE/MATCH/POPC/FLO/REDUX: warp aggregation (histogram
    # increments, atomics, reductions)
    ("histogram_warp", ("ATOMS", "VOTE", "MATCH", "POPC", "FLO", "REDUX")),
    ("append", ("ATOMG", "ATOM.", "ATOM", "RED", "REDG", "STG", "LDG")),
    ("f64", ("DADD", "DFMA", "DMUL", "DSETP", "F2F.F64", "F2F.F32.F64", "I2F.F64", "DMNMX")),
    ("shared", ("LDS", "STS")),
    ("control", ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "NOP", "BMOV", "YIELD")),
)


def op_class(op: str) -> str:
    for name, prefixes in CLASSES:
        if op.startswith(prefixes):
            return name
    return "alu"


def basic_blocks(insns, labels, lo, hi):
    """The instructions of [lo, hi] cut at branch targets and after branches: [[(addr, op, args)]]."""
    starts = set(labels.values())
    blocks, cur = [], []
    for ins in insns:
        if not lo <= ins[0] <= hi:
            continue
        if ins[0] in starts and cur:
            blocks.append(cur)
            cur = []
        cur.append(ins)
        if ins[1].startswith(("BRA", "EXIT")):
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def is_append(op: str) -> bool:
    """Global stores and value-returning global atomics: what only the candidate path issues
    (the hot path's global atomics are reductions without a result, RED)."""
    return op.startswith(("STG", "ATOMG", "ATOM."))


def cold_ranges(insns, labels, lo, hi, kloop):
    """[start, end) address ranges skipped by a conditional forward branch inside [lo, hi] that
    hold a candidate append (is_append): the "any candidate in this slab?" test jumps over them,
    so they run only for slabs that hold a candidate. An unconditional branch (past an else)
    marks nothing: an append path that runs on every slab, predicated off per element, is hot."""
    out = []
    for addr, op, args in insns:
        if not (lo <= addr <= hi and op.startswith("BRA") and args.startswith("@")):
            continue
        m = re.search(r"`\(([.\w]+)\)", args)
        if not m or m.group(1) not in labels or labels[m.group(1)] <= addr:
            continue
        end = labels[m.group(1)]
        # the candidate path only: not a jump past the k-loop or out of the persistent loop
        if end > hi or addr < kloop[1] and kloop[0] < end:
            continue
        if any(addr < a < end and is_append(o) for a, o, _ in insns):
            out.append((addr + 1, end))
    return out


def speed_model(insns, labels, ploop, kloop, lp, plan, kw, regs, prec, n=N, d=D, shared=0) -> dict:
    """predicted_seconds of a self-mode run at n x d from the persistent loop's SASS (MODEL)."""
    if not ploop or not kloop:
        return dict(predicted_seconds=None, why="no persistent loop / k-loop found")
    epi = [b for b in basic_blocks(insns, labels, *ploop) if not (kloop[0] <= b[0][0] <= kloop[1])]
    skipped = cold_ranges(insns, labels, *ploop, kloop)
    by_class, hot_by_class = {}, {}
    for b in epi:
        cold = any(lo <= b[0][0] < hi for lo, hi in skipped)
        for _, op, _ in b:
            c = op_class(op)
            by_class[c] = by_class.get(c, 0) + 1
            if not cold:
                hot_by_class[c] = hot_by_class.get(c, 0) + 1
    warps = kw["num_warps"]
    inner = [r for r in lp if ploop[0] <= r[0] and r[1] <= ploop[1] and r != ploop and r != kloop
             and not (kloop[0] <= r[0] and r[1] <= kloop[1])]
    from embgeom.backends.gpu_plan import make_plan, programs_per_sm

    per_sm = programs_per_sm(regs, warps, shared)
    if prec in MODEL["rate_vs_bf16"]:
        mac_per_clk = MODEL["bf16_tflops"] * MODEL["rate_vs_bf16"][prec] * 1e12 / 2 / (MODEL["sms"] * MODEL["clock_ghz"] * 1e9)
    else:
        mac_per_clk = MODEL["ffma_per_clk_per_sm"]
    kloop_issue = sum(1 for a, _, _ in insns if kloop[0] <= a <= kloop[1]) * (-(-d // plan.bk)) * warps \
        / MODEL["warp_issue_per_clk_per_sm"]
    product_clk = max(plan.bm * plan.block_n * d / mac_per_clk, kloop_issue if prec not in MODEL["rate_vs_bf16"] else 0)
    # the tiles a self-mode run at n launches (the upper triangle, bands as planned)
    full = make_plan(n, n, d, elem_bytes=2, on_gpu=True, sms=MODEL["sms"], block=plan.bm, block_n=plan.block_n,
                     group=plan.group if n == N else None, mma=prec != "exact")
    tiles_per_sm = full.total_tiles(True) / MODEL["sms"]

    def seconds(instr):
        epi_clk = instr * warps / MODEL["warp_issue_per_clk_per_sm"]
        tile = product_clk + epi_clk if per_sm == 1 else max(product_clk, (product_clk + epi_clk) / per_sm, epi_clk)
        return round(tiles_per_sm * tile / (MODEL["clock_ghz"] * 1e9), 3), round(epi_clk)

    hot_s, hot_clk = seconds(sum(hot_by_class.values()))
    all_s, all_clk = seconds(sum(by_class.values()))
    return dict(predicted_seconds=hot_s, predicted_seconds_all=all_s,
                product_seconds=round(tiles_per_sm * product_clk / (MODEL["clock_ghz"] * 1e9), 3),
                product_clk_per_tile=round(product_clk), epilogue_clk_per_tile=hot_clk,
                epilogue_clk_per_tile_all=all_clk, programs_per_sm=per_sm, inner_loops=len(inner),
                instr_per_tile_thread=dict(sorted(hot_by_class.items())),
                instr_per_tile_thread_all=dict(sorted(by_class.items())))


def analyse(cubin: Path, plan, kw, prec: str = "bf16", dyn_shared: int = 0) -> dict:
    res = subprocess.run([find_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    # static shared memory (cuobjdump) plus the dynamic shared memory Triton launches with
    shared = int(re.search(r"SHARED:(\d+)", res).group(1)) + dyn_shared
    sass = subprocess.run([find_tool("nvdisasm"), "-c", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    insns, labels = parse_sass(sass)
    ops = [op for _, op, _ in insns]
    hg = sorted({op.split(".")[1] for op in ops if op.startswith("HGMMA.")})
    membar = [op for op in ops if op.startswith("MEMBAR")]
    lp = loops(insns, labels)
    # the k-loop: the innermost loop holding the products (HGMMA; FFMA for exact fp32)
    mark = "HGMMA" if hg else "FFMA"
    hg_addr = [a for a, op, _ in insns if op.startswith(mark)]
    kl = [r for r in lp if any(r[0] <= a <= r[1] for a in hg_addr)]
    kloop = min(kl, key=lambda r: r[1] - r[0]) if kl else None
    outer = [r for r in lp if kloop and r[0] <= kloop[0] and r[1] >= kloop[1] and r != kloop]
    ploop = min(outer, key=lambda r: r[1] - r[0]) if outer else None

    def count(r):
        return sum(1 for a, _, _ in insns if r and r[0] <= a <= r[1])

    n_loop, n_k = count(ploop), count(kloop)
    per_thread = plan.bm * plan.block_n / (32 * kw["num_warps"])
    return dict(regs=regs, stack=stack, shared=shared, spill=sum(op.startswith(("LDL", "STL")) for op in ops),
                membar=len(membar), membar_gpu=sum(("GPU" in op or "SYS" in op) for op in membar),
                hgmma=hg, hgmma_n_min=min((int(s.split("x")[1]) for s in hg), default=0),
                insns=len(insns), loop=n_loop, kloop=n_k,
                epi_per_elem=round((n_loop - n_k) / per_thread, 2) if ploop else None,
                atoms=sum(op.startswith(("ATOMS", "ATOM.", "RED.", "ATOMG", "REDG")) for op in ops),
                vote=sum(op.startswith("VOTE") for op in ops),
                tile=[plan.bm, plan.block_n, plan.bk], warps=kw["num_warps"], stages=kw["num_stages"],
                model=speed_model(insns, labels, ploop, kloop, lp, plan, kw, regs, prec, shared=shared))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS + CHECK_VARIANTS)
    ap.add_argument("--expect-triton", help="refuse to run unless this Triton version is the one imported")
    args = ap.parse_args(argv)
    why = toolchain_missing()
    if why:
        print(f"static profile skipped: {why}")
        return 2
    import triton

    if args.expect_triton and triton.__version__ != args.expect_triton:
        print(f"triton {triton.__version__} imported from {triton.__file__}, expected {args.expect_triton}")
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    args.out.mkdir(parents=True, exist_ok=True)
    table = {}
    for name in args.variants:
        k, plan, kw, secs = compile_variant(name)
        cubin = args.out / f"{name}.cubin"
        cubin.write_bytes(k.asm["cubin"])
        row = analyse(cubin, plan, kw, name.split("-")[1], int(k.metadata.shared))
        row["compile_s"] = round(secs, 1)
        table[name] = row
        print(f"{name:15s} regs {row['regs']:3d} stack {row['stack']:4d} spill {row['spill']:4d} "
              f"membar {row['membar']:3d} (gpu {row['membar_gpu']:3d}) hgmma {','.join(row['hgmma']) or '-':10s} "
              f"loop {row['loop']:5d} kloop {row['kloop']:4d} epi/elem {row['epi_per_elem']} "
              f"vote {row['vote']} atom {row['atoms']} p/SM {row['model'].get('programs_per_sm')} predicted {row['model']['predicted_seconds']} s "
              f"(all blocks {row['model'].get('predicted_seconds_all')} s) ({secs:.0f} s)", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # (benchmarks/common.py: the commit the kernels were read at)

    (args.out / "profile.json").write_text(json.dumps(dict(
        n=N, d=D, target="sm_90a", triton=triton.__version__, git_sha=common.git_sha(), date=common.today(),
        model=MODEL, variants=table), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
