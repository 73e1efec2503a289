"""A prepared corpus for repeated queries, and every pair above a threshold: embgeom against
FAISS flat, torch, sentence-transformers and scikit-learn in one run (issue 22).

    python benchmarks/bench_index.py                    # corpus 100,000 and 1,000,000 x 384; pairs on 1M
    python benchmarks/bench_index.py --quick            # 20,000 x 384, pairs on 20,000 (a smoke run)
    python benchmarks/bench_index.py --sizes 100000 --batches 1 32 1024 --no-pairs
    python benchmarks/bench_index.py --path avx2        # torch / oneDNN / MKL / OpenBLAS capped at AVX2

Search: unit rows (N, 384), top-10 of Q = 1, 32, 1,024 random unit queries per call, the median
of --repeats calls after one warm-up; providers: embgeom Index float32 and bfloat16, FAISS
IndexFlatIP, torch topk(Q @ C.T) (query blocks so the scores stay <= 512 MB),
sentence-transformers semantic_search, scikit-learn NearestNeighbors(brute, cosine). Every
provider's ids are first checked against float64 brute force on the first queries (agreement
printed; differences only at float32 near-ties are expected from the float32 providers); the
one-off preparation (Index(), FAISS add, fit) is timed separately. Each provider then makes
--warm-scans one-query calls before any timing: on the 2-core VMs memory written for the first
time reads slower for its first dozen scans (a 100,000 x 384 float32 scan went from 7.9 to 4.4
ms over 15 calls on an Emerald Rapids VM, with or without huge pages), and the providers that
keep their own copy of the corpus (embgeom, FAISS) would be timed on fresh memory while torch
reads the caller's long-used tensor.
Pairs: --pairs-n random unit rows with --dups planted near-duplicates (cosine about 0.98), every
pair >= 0.9 with embgeom.pairs_above in a child process (its own peak RSS); checked: every
planted pair found, nothing below the threshold. --pairs-providers adds FAISS range_search and
chunked torch (expensive at 1M: the same N^2 d products).
Prints ratios (ours / the faster of FAISS and torch at each batch size) and appends rows to
benchmarks/results/index.csv. OPENBLAS_CORETYPE is left as the environment sets it (FAISS and
numpy keep their pins); --path avx2 sets the AVX2 caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS, and OPENBLAS_CORETYPE=Haswell unless already set) and re-runs itself.
Never run the full sizes while anything else loads the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (append_rows, cpu_name, missing_module, peak_rss_mb, provenance, say_missing, timeit,  # noqa: E402
                    versions)

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "EMBGEOM_CPU": "avx2"}
SEARCH_PROVIDERS = ("embgeom-f32", "embgeom-bf16", "faiss-flat", "torch-topk", "st-semantic-search",
                    "compat-semantic-search", "sklearn-brute")
PAIRS_PROVIDERS = ("embgeom-pairs", "faiss-range", "torch-chunked")


def unit_rows(n, d, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True))  # in place: one copy of a 1M corpus


def reference_ids(corpus, q, k):
    """float64 brute force, ties by smaller id."""
    import torch

    c64 = corpus.double()
    out = []
    for q0 in range(0, q.shape[0], 32):
        s = q[q0:q0 + 32].double() @ c64.T
        out.append(torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out)


def make_search(provider, corpus, k):
    """-> (prepare seconds, search(q) -> ids (Q, k) numpy) or None when not installed. The
    provider's imports come before the clock: prepare is the preparation alone."""
    import numpy as np
    import torch

    import embgeom

    if provider == "compat-semantic-search":
        from embgeom.compat.sentence_transformers import semantic_search
    try:
        if provider == "faiss-flat":
            import faiss
        elif provider == "st-semantic-search":
            from sentence_transformers.util import semantic_search
        elif provider == "sklearn-brute":
            from sklearn.neighbors import NearestNeighbors
    except ImportError:
        return None
    t0 = time.perf_counter()
    if provider.startswith("embgeom"):
        index = embgeom.Index(corpus, dtype=torch.float32 if provider == "embgeom-f32" else torch.bfloat16)
        fn = lambda q: index.search(q, k)[1].numpy()  # noqa: E731
    elif provider == "faiss-flat":
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(corpus.numpy())
        fn = lambda q: index.search(q.numpy(), k)[1]  # noqa: E731
    elif provider == "torch-topk":
        def fn(q):
            step = max(1, (512 << 20) // (4 * corpus.shape[0]))
            return torch.cat([torch.topk(q[a:a + step] @ corpus.T, k, dim=1).indices
                              for a in range(0, q.shape[0], step)]).numpy()
    elif provider in ("st-semantic-search", "compat-semantic-search"):
        # the drop-in and the function it replaces, called as a pipeline calls them: the raw
        # corpus every call (no prepared index kept between calls)
        def fn(q):
            hits = semantic_search(q, corpus, top_k=k)
            return np.array([[h["corpus_id"] for h in row] for row in hits])
    elif provider == "sklearn-brute":
        nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(corpus.numpy())
        fn = lambda q: nn.kneighbors(q.numpy(), return_distance=False)  # noqa: E731
    else:
        raise SystemExit(f"unknown provider {provider}")
    return time.perf_counter() - t0, fn


def search_bench(args, threads, rows, failures):
    import numpy as np

    if not args.providers:  # (no corpora, no references: the drop-in rows' peak memory is their own)
        return
    where = provenance(threads=threads)
    for n in args.sizes:
        corpus = unit_rows(n, args.d, seed=0)
        queries = unit_rows(max(args.batches), args.d, seed=1)
        want = reference_ids(corpus, queries[:args.check], args.k).numpy()
        table = {}
        for prov in args.providers:
            made = make_search(prov, corpus, args.k)
            if made is None:
                print(f"  {prov}: not installed, skipped")
                continue
            prep, fn = made
            got = fn(queries[:args.check])
            for _ in range(args.warm_scans):
                fn(queries[:1])
            agree = float(np.mean(got == want))
            print(f"n={n:,} {prov}: prepare {prep:.2f} s, ids equal to float64 brute force: {agree:.4f}")
            if prov.startswith("embgeom") and agree < 1.0:  # (random rows: no ties; the index is exact)
                failures.append(f"{prov} on {n:,} rows: ids equal to float64 brute force {agree:.4f}")
            for Q in args.batches:
                slow = prov in ("st-semantic-search", "compat-semantic-search", "sklearn-brute")
                if slow and Q * n > args.slow_limit:
                    continue
                q = queries[:Q]
                t = timeit(lambda: fn(q), repeats=args.repeats)
                table[(prov, Q)] = t["median_ms"]
                rows.append({"metric": f"search_top{args.k}", "provider": prov, "n": n, "m": Q, "d": args.d,
                             "dtype": "bfloat16" if prov.endswith("bf16") else "float32", **where, **t,
                             "peak_mb": round(peak_rss_mb()),
                             "versions": where["versions"] + f" path={args.path} agree={agree:.4f} prepare_s={prep:.2f}"})
        if not table:  # (every provider skipped: no table to print)
            continue
        print(f"\ncorpus {n:,} x {args.d}, top-{args.k}, median ms per call ({args.repeats} calls, {threads} threads)")
        print(f"{'provider':<22}" + "".join(f"{'Q=' + str(Q):>12}" for Q in args.batches))
        for prov in args.providers:
            print(f"{prov:<22}" + "".join(f"{table[(prov, Q)]:>12.2f}" if (prov, Q) in table else f"{'-':>12}"
                                           for Q in args.batches))
        for ours in ("embgeom-f32", "embgeom-bf16"):
            ratios = []
            for Q in args.batches:
                base = [table[(b, Q)] for b in ("faiss-flat", "torch-topk") if (b, Q) in table]
                ratios.append(f"{table[(ours, Q)] / min(base):>12.2f}" if base and (ours, Q) in table else f"{'-':>12}")
            print(f"{ours + ' / best':<22}" + "".join(ratios))
        if any((p, Q) in table for p in ("compat-semantic-search",) for Q in args.batches):
            print(f"{'compat / st':<22}" + "".join(
                f"{table[('compat-semantic-search', Q)] / table[('st-semantic-search', Q)]:>12.2f}"
                if ("compat-semantic-search", Q) in table and ("st-semantic-search", Q) in table else f"{'-':>12}"
                for Q in args.batches))
        print()


def planted(n, d, dups, seed=0):
    """Unit rows with `dups` planted near-duplicate pairs (src, dst), cosine about 0.98."""
    import torch

    x = unit_rows(n, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=g)
    src, dst = perm[:dups], perm[dups:2 * dups]
    noise = torch.randn(dups, d, generator=g)
    noise *= 0.2 / torch.linalg.vector_norm(noise, dim=1, keepdim=True)
    y = x[src] + noise
    x[dst] = y / torch.linalg.vector_norm(y, dim=1, keepdim=True)
    return x, src, dst


def peak_mb_since_exec() -> float:
    """This process's own peak RSS (VmHWM starts afresh at exec; ru_maxrss may carry the
    parent's peak into a forked child)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def pairs_child(args) -> None:
    """One provider of the pairs benchmark (own process: own peak RSS); prints a JSON line."""
    import numpy as np

    if args.child == "embgeom-pairs":  # (imports before the clock)
        import embgeom
    elif args.child == "faiss-range":
        try:
            import faiss
        except ImportError:
            say_missing("faiss")
            return
    x, src, dst = planted(args.pairs_n, args.d, args.dups)
    t0 = time.perf_counter()
    if args.child == "embgeom-pairs":
        with tempfile.TemporaryDirectory() as out:
            embgeom.pairs_above(x, args.threshold, out=os.path.join(out, "p"))
            seconds = time.perf_counter() - t0
            i, j, s = embgeom.read_pairs(os.path.join(out, "p"))
    elif args.child == "faiss-range":
        index = faiss.IndexFlatIP(args.d)
        index.add(x.numpy())
        lims, s, j = index.range_search(x.numpy(), args.threshold)
        seconds = time.perf_counter() - t0
        i = np.repeat(np.arange(args.pairs_n), np.diff(lims).astype(np.int64))
        keep = i < j
        i, j, s = i[keep], j[keep], s[keep]
    else:  # torch-chunked
        parts = []
        for a in range(0, args.pairs_n, 1024):
            sc = x[a:a + 1024] @ x.T
            qi, ci = (sc >= args.threshold).nonzero(as_tuple=True)
            keep = ci > qi + a
            parts.append(((qi[keep] + a).numpy(), ci[keep].numpy(), sc[qi[keep], ci[keep]].numpy()))
        seconds = time.perf_counter() - t0
        i, j, s = (np.concatenate([p[k] for p in parts]) for k in range(3))
    found = set(zip(i.tolist(), j.tolist())) if len(i) < 5_000_000 else None
    want = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())}
    print(json.dumps({"seconds": seconds, "count": int(len(i)), "peak_mb": peak_mb_since_exec(),
                      "planted_found": None if found is None else len(want & found), "planted": len(want),
                      "min_similarity": float(s.min()) if len(s) else None}))


def pairs_bench(args, threads, rows, failures):
    where = provenance(threads=threads)
    for prov in args.pairs_providers:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", prov, "--pairs-n", str(args.pairs_n),
               "--dups", str(args.dups), "--threshold", str(args.threshold), "--d", str(args.d)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        missing = missing_module(proc.stdout)
        if missing:
            print(f"pairs {prov}: not installed ({missing}), skipped")
            continue
        if proc.returncode != 0:
            print(f"pairs {prov}: failed\n{proc.stderr[-2000:]}")
            if prov == "embgeom-pairs":  # (a baseline's crash is its own; embgeom's fails the run)
                failures.append(f"{prov}: the run failed (exit status {proc.returncode})")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ok = r["planted_found"] == r["planted"] and (r["min_similarity"] is None or r["min_similarity"] >= args.threshold)
        print(f"pairs >= {args.threshold} on {args.pairs_n:,} x {args.d} ({args.dups:,} planted): {prov} "
              f"{r['seconds']:.2f} s, {r['count']:,} pairs, planted found {r['planted_found']}/{r['planted']}, "
              f"min similarity {r['min_similarity']}, peak {r['peak_mb']:.0f} MiB {'OK' if ok else 'CHECK FAILED'}")
        if prov == "embgeom-pairs" and not ok:
            failures.append(f"{prov}: planted pairs found {r['planted_found']}/{r['planted']}, "
                            f"min similarity {r['min_similarity']}")
        rows.append({"metric": f"pairs_above_{args.threshold}", "provider": prov, "n": args.pairs_n, "m": args.dups,
                     "d": args.d, "dtype": "float32", **where, "median_ms": r["seconds"] * 1e3,
                     "peak_mb": round(r["peak_mb"]),
                     "versions": where["versions"] + f" path={args.path} pairs={r['count']} check={'ok' if ok else 'failed'}"})


def vocabulary():
    """The default model's word embeddings (30,522 x 384)."""
    from embgeom import load_model

    model, _ = load_model(None)
    return model.get_input_embeddings().weight.detach().float().contiguous()


def dropins_bench(args, threads, rows):
    """sentence-transformers' bulk util functions against embgeom.compat's on the default model's
    vocabulary, one timed call each, outputs compared (target: >= 5x faster, same results but
    for float32 near-ties)."""
    try:
        from sentence_transformers import util
    except ImportError:
        print("drop-ins: sentence-transformers not installed, skipped")
        return
    from embgeom.compat import sentence_transformers as ours

    e = vocabulary()
    # pairs both return (the order of near-equal scores, float32 against exact, may differ)
    same_pairs = lambda a, b: (len({(x[1], x[2]) for x in a} & {(y[1], y[2]) for y in b}),  # noqa: E731
                               max(len(a), len(b)))
    cases = [
        ("paraphrase_mining_top100", lambda m: m.paraphrase_mining_embeddings(e, top_k=100, max_pairs=100),
         same_pairs),
        ("paraphrase_mining_default", lambda m: m.paraphrase_mining_embeddings(e),  # top_k=100, 500,000 pairs
         same_pairs),
        ("semantic_search_top11", lambda m: m.semantic_search(e, e, top_k=11),
         lambda a, b: (sum([h["corpus_id"] for h in x] == [h["corpus_id"] for h in y] for x, y in zip(a, b)), len(a))),
        ("community_detection_0.75", lambda m: m.community_detection(e, threshold=0.75, min_community_size=10),
         lambda a, b: (sum(sorted(x) == sorted(y) for x, y in zip(sorted(map(sorted, a)), sorted(map(sorted, b)))),
                       max(len(a), len(b)))),
    ]
    print(f"\ndrop-ins on the default model's vocabulary {tuple(e.shape)}, one call each")
    where = provenance(threads=threads)
    for name, call, same in cases:
        got = {}
        for prov, mod in (("sentence-transformers", util), ("embgeom-compat", ours)):
            t0 = time.perf_counter()
            got[prov] = call(mod)
            got[prov + "_s"] = time.perf_counter() - t0
        equal, total = same(got["sentence-transformers"], got["embgeom-compat"])
        st_s, ours_s = got["sentence-transformers_s"], got["embgeom-compat_s"]
        print(f"  {name:26s} sentence-transformers {st_s:7.2f} s   embgeom {ours_s:6.2f} s   "
              f"{st_s / ours_s:5.1f}x faster   equal {equal}/{total}")
        for prov, sec in (("sentence-transformers", st_s), ("embgeom-compat", ours_s)):
            rows.append({"metric": f"dropin_{name}", "provider": prov, "n": int(e.shape[0]), "m": 0,
                         "d": int(e.shape[1]), "dtype": "float32", **where, "median_ms": sec * 1e3,
                         "peak_mb": round(peak_rss_mb()),
                         "versions": where["versions"] + f" path={args.path} equal={equal}/{total}"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    p.add_argument("--sizes", type=int, nargs="*", default=None,
                   help="corpus rows (100,000 and 1,000,000; none: no search cases)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 1024], help="queries per call")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (5; --quick 2)")
    p.add_argument("--check", type=int, default=32, help="queries checked against float64 brute force")
    p.add_argument("--warm-scans", type=int, default=20,
                   help="one-query calls per provider before timing (fresh memory settles; see above)")
    p.add_argument("--providers", default=",".join(SEARCH_PROVIDERS))
    p.add_argument("--slow-limit", type=float, default=2e8,
                   help="skip sentence-transformers / scikit-learn where queries x corpus exceeds this")
    p.add_argument("--no-pairs", action="store_true")
    p.add_argument("--dropins", action="store_true",
                   help="also sentence-transformers' bulk util functions against embgeom.compat on the vocabulary")
    p.add_argument("--pairs-n", type=int, default=None, help="rows of the pairs case (1,000,000)")
    p.add_argument("--dups", type=int, default=None, help="planted near-duplicate pairs (10,000)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--pairs-providers", default="embgeom-pairs",
                   help="comma list of embgeom-pairs, faiss-range, torch-chunked")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--path", choices=["host", "avx2"], default="host")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # --quick sets small defaults; sizes given explicitly win
    for name, full, quick in (("sizes", [100_000, 1_000_000], [20_000]), ("pairs_n", 1_000_000, 20_000),
                              ("dups", 10_000, 200), ("repeats", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.path == "host" and os.environ.get("EMBGEOM_CPU"):
        # (EMBGEOM_CPU set by hand caps embgeom alone: the rows say so, not "host")
        args.path = f"EMBGEOM_CPU={os.environ['EMBGEOM_CPU']}"
    args.providers = [s for s in args.providers.split(",") if s]
    args.pairs_providers = [s for s in args.pairs_providers.split(",") if s]
    for given, known, flag in ((args.providers, SEARCH_PROVIDERS, "--providers"),
                               (args.pairs_providers, PAIRS_PROVIDERS, "--pairs-providers")):
        if set(given) - set(known):  # (before any corpus is built)
            p.error(f"{flag}: unknown {sorted(set(given) - set(known))}; expected names from {', '.join(known)}")
    if args.path == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        env = {**os.environ, **AVX2_ENV}
        env.setdefault("OPENBLAS_CORETYPE", "Haswell")
        return subprocess.call([sys.executable, os.path.abspath(__file__)] + list(argv if argv is not None else sys.argv[1:]),
                               env=env)
    import torch

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    if args.child:
        pairs_child(args)
        return 0
    print(f"{cpu_name()}, {args.threads} threads, path {args.path}, OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', 'autodetected')}\n{versions()}")
    rows: list[dict] = []
    failures: list[str] = []  # embgeom's own answers that are not the exact ones: nothing recorded
    search_bench(args, args.threads, rows, failures)
    if not args.no_pairs:
        pairs_bench(args, args.threads, rows, failures)
    if args.dropins:
        dropins_bench(args, args.threads, rows)
    if failures:
        print("embgeom's answers are not the exact ones; no rows written:\n  " + "\n  ".join(failures))
        return 1
    if rows and not args.quick:
        path = append_rows("index.csv", rows)
        print(f"rows appended to {path}")
    elif rows:
        print("(--quick: rows not written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
