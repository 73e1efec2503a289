"""2-D projections on the exact graph against the libraries' own neighbour search, and the cost
of `embgeom text --keep cls`.

  python benchmarks/bench_projection.py projection [--n 0 --k 15 --perplexity 30 --seed 0] [--record]
  python benchmarks/bench_projection.py keep [--lines 2000 --batch 32 --repeats 3] [--record]

projection: the default model's word embeddings (30,522 x 384; --n N takes the first N rows).
Providers, each in a fresh process (its peak RSS is its own), each after a warm-up on 300 rows
so that numba compilation is left out for all alike:
  umap-embgeom   embgeom.project(method="umap"): exact graph from pairwise_stats, k = n_neighbors - 1
  umap-learn     umap.UMAP(n_neighbors, metric="cosine", random_state=seed).fit_transform
  tsne-embgeom   embgeom.project(method="tsne"): exact graph, k = min(N - 1, 3 * perplexity)
  tsne-openTSNE  openTSNE.TSNE(perplexity, metric="cosine", random_state=seed).fit
  tsne-openTSNE-exact   the same with neighbors="exact" (scikit-learn's brute force): the graph
                 ours uses, so that a quality difference left beside it is the optimiser's; not
                 in the default set (--providers)
Quoted: ours / theirs (targets: UMAP <= 0.5, t-SNE <= 0.75), peak RSS (<= 2 GB), the recall of
their neighbour graph against the exact one (rebuilt with their method and seed: umap's
nearest_neighbors, openTSNE's Annoy index), and each layout's quality, computed after the timed
runs on 5,000 rows drawn once (seed 0) for all: trustworthiness at 15 neighbours (scikit-learn;
cosine in the original space; on the sample its 15 neighbours stand for about 90 of the full
set's, so it is also computed over every row with exact float64 ranks) and the silhouette of the token classes (special, "##" piece,
number, word, other) in the layout, beside the same classes' silhouette in the original space
(cosine, float64). Before timing, 500 rows of the exact graph are checked against a numpy brute
force.
keep: `embgeom text CORPUS` with and without `--keep cls` on a synthetic corpus, after one
untimed warm-up run, alternating (which goes first alternates too); quoted: the median per-round
ratio - 1 (target <= 10 %).
A provider whose library is not installed (umap-learn, openTSNE) is skipped with a line; another
provider's failure prints its error and the rest still run and are recorded, and the exit status
is then 1. Every provider runs on torch's thread count (openTSNE's n_jobs too), which the rows
record with the CPU (model, instruction set) and embgeom's CPU path.
--record appends rows to benchmarks/results/projection.csv (run it on a quiet machine).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import append_rows, missing_module, peak_rss_mb, provenance, say_missing  # noqa: E402

DEFAULT_PROVIDERS = ("umap-embgeom", "umap-learn", "tsne-embgeom", "tsne-openTSNE")
PROVIDERS = DEFAULT_PROVIDERS + ("tsne-openTSNE-exact",)
# the optional library each provider needs (embgeom's layouts are umap-learn's and openTSNE's):
# absent, the provider is skipped, not failed
NEEDS = {"umap-embgeom": "umap", "umap-learn": "umap", "tsne-embgeom": "openTSNE", "tsne-openTSNE": "openTSNE",
         "tsne-openTSNE-exact": "openTSNE"}


def word_embeddings(n: int) -> np.ndarray:
    from embgeom import load_model

    model, _ = load_model(None)
    x = model.get_input_embeddings().weight.detach().float().numpy()
    return np.ascontiguousarray(x[:n] if n else x)


def token_classes(n: int) -> np.ndarray:
    """A class per vocabulary row: special ([...]), "##" piece, number, word (letters), other."""
    from embgeom import load_model

    _, tokenizer = load_model(None)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))

    def kind(t: str) -> str:
        if t.startswith("[") and t.endswith("]"):
            return "special"
        if t.startswith("##"):
            return "piece"
        if t.isdigit():
            return "number"
        return "word" if t.isalpha() else "other"

    return np.array([kind(t) for t in tokens])


QUALITY_ROWS = 5000


def trustworthiness_all(x: np.ndarray, emb: np.ndarray, k: int = 15, block: int = 1024) -> float:
    """scikit-learn's trustworthiness(x, emb, n_neighbors=k, metric="cosine") over every row,
    without its N x N rank matrix: each row's k nearest in the layout (a KD-tree), and their
    ranks among the row's cosine similarities in float64, one block of rows at a time (rank =
    1 + the other rows more similar, equal ones before it when their index is smaller, as
    scikit-learn's argsort orders ties; among exact duplicates its 1 - cosine distances are
    rounding noise that decides instead: 120 rows with 40 duplicates, k = 5, 0.0005 apart,
    0.007 before the tie rule)."""
    from sklearn.neighbors import NearestNeighbors

    n = x.shape[0]
    _, lay = NearestNeighbors(n_neighbors=k + 1).fit(emb.astype(np.float64)).kneighbors(emb.astype(np.float64))
    lay = np.array([[j for j in row if j != i][:k] for i, row in enumerate(lay)])  # self out
    u = x.astype(np.float64)
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-300)
    penalty = 0.0
    for b0 in range(0, n, block):
        s = u[b0:b0 + block] @ u.T                                          # (b, n) float64
        rows = np.arange(b0, min(n, b0 + block))
        s[rows - b0, rows] = -np.inf                                        # the row itself is no neighbour
        at = np.take_along_axis(s, lay[rows], 1)                            # (b, k)
        cols = np.arange(n)[None, :]
        greater = np.stack([((s > at[:, q:q + 1]) | ((s == at[:, q:q + 1]) & (cols < lay[rows, q:q + 1]))).sum(1)
                            for q in range(k)], 1)  # (b, k), no (b, k, n)
        penalty += np.maximum(1 + greater - k, 0).sum()
    return float(1.0 - penalty * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)))


def fixed4(value: float | None) -> str:
    """A silhouette to 4 places; None (one token class only: the first rows of the vocabulary
    are all [unusedN]) as n/a."""
    return "n/a" if value is None else f"{value:.4f}"


def quality(x: np.ndarray, emb: np.ndarray, rows: np.ndarray, classes: np.ndarray) -> dict:
    """Trustworthiness (15 neighbours) and the token classes' silhouette of a layout, on `rows`;
    trustworthiness over every row too (trustworthiness_all)."""
    from sklearn.manifold import trustworthiness

    from embgeom.analysis.clouds.geometry import silhouette

    xs, es = x[rows].astype(np.float64), emb[rows].astype(np.float64)
    return {"trustworthiness": float(trustworthiness(xs, es, n_neighbors=15, metric="cosine")),
            "trustworthiness_all": trustworthiness_all(x, emb, 15),
            "silhouette": silhouette(es, classes[rows], "euclidean")}


def run_one(provider: str, x: np.ndarray, args) -> dict:
    """Time one provider on x; returns seconds, knn_seconds and the layout ("embedding")."""
    import torch

    import embgeom

    threads = torch.get_num_threads()  # every provider's threads: the engine's, the row's `threads`
    if provider == "umap-embgeom":
        p = embgeom.project(x, method="umap", k=args.k - 1, seed=args.seed)
        return {"seconds": p.seconds, "knn_seconds": p.knn_seconds, "embedding": p.embedding}
    if provider == "tsne-embgeom":
        p = embgeom.project(x, method="tsne", perplexity=args.perplexity, seed=args.seed, n_jobs=threads)
        return {"seconds": p.seconds, "knn_seconds": p.knn_seconds, "embedding": p.embedding}
    start = time.perf_counter()
    if provider == "umap-learn":
        import umap

        emb = umap.UMAP(n_neighbors=args.k, metric="cosine", random_state=args.seed).fit_transform(x)
    elif provider in ("tsne-openTSNE", "tsne-openTSNE-exact"):
        from openTSNE import TSNE

        neighbors = "exact" if provider.endswith("-exact") else "auto"
        emb = TSNE(perplexity=args.perplexity, metric="cosine", random_state=args.seed, n_jobs=threads,
                   neighbors=neighbors).fit(x)
    else:
        raise ValueError(provider)
    return {"seconds": time.perf_counter() - start, "knn_seconds": None, "embedding": np.asarray(emb)}


def their_graph(provider: str, x: np.ndarray, args) -> np.ndarray:
    """The neighbour lists the library computes for itself (self excluded)."""
    import torch

    n = x.shape[0]
    if provider == "umap-learn":
        from sklearn.utils import check_random_state
        from umap.umap_ import nearest_neighbors

        idx, _, _ = nearest_neighbors(x, args.k, "cosine", {}, False, check_random_state(args.seed))
        k = args.k - 1
    else:
        from openTSNE.nearest_neighbors import Annoy

        k = min(n - 1, int(3 * args.perplexity))
        idx, _ = Annoy(x, k=k, metric="cosine", random_state=args.seed, n_jobs=torch.get_num_threads()).build()
    # drop the point itself wherever it appears, keep the first k others
    return np.stack([[j for j in row if j != i][:k] for i, row in enumerate(idx.tolist())])


def child(args) -> None:
    import torch

    from embgeom.analysis.clouds.projection import exact_knn
    from embgeom.neighbours import recall_at_k

    try:  # (before the model loads; a module that library needs, absent, counts the same)
        importlib.import_module(NEEDS[args.provider])
    except ModuleNotFoundError as exc:
        say_missing(exc.name)  # the parent prints "not installed" and goes on
        return
    x = word_embeddings(args.n)
    run_one(args.provider, x[:300], args)              # warm-up: numba / pynndescent compilation
    out = run_one(args.provider, x, args)
    out["peak_mb"] = peak_rss_mb()
    np.save(args.save, np.asarray(out.pop("embedding"), dtype=np.float32))
    if args.provider in ("umap-learn", "tsne-openTSNE"):
        theirs = their_graph(args.provider, x, args)
        exact, _, _ = exact_knn(x, theirs.shape[1])
        out["recall"] = recall_at_k(theirs, exact)
    out["n"], out["d"] = x.shape
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out))


def check_exact(x: np.ndarray, k: int) -> None:
    from embgeom.analysis.clouds.projection import exact_knn

    idx, sim, _ = exact_knn(x, k)
    rows = np.random.default_rng(0).choice(x.shape[0], size=min(500, x.shape[0]), replace=False)
    u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    s = u[rows] @ u.T
    s[np.arange(len(rows)), rows] = -np.inf
    want = -np.sort(-s, axis=1)[:, :k]
    err = np.abs(sim[rows] - want).max()
    assert err < 1e-5, f"exact graph differs from brute force by {err}"
    print(f"exact graph: {len(rows)} rows match numpy brute force (max |diff| {err:.1e})")


def projection(args) -> int:
    x = word_embeddings(args.n)
    check_exact(x, min(x.shape[0] - 1, int(3 * args.perplexity)))
    results = {}
    failed = []
    layouts = tempfile.mkdtemp()
    for provider in args.providers:
        cmd = [sys.executable, os.path.abspath(__file__), "child", "--provider", provider, "--n", str(args.n),
               "--k", str(args.k), "--perplexity", str(args.perplexity), "--seed", str(args.seed),
               "--save", os.path.join(layouts, provider + ".npy")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        missing = missing_module(proc.stdout)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if missing:
            print(f"{provider}: not installed ({missing}), skipped", flush=True)
            continue
        if proc.returncode or not line:
            # the rows measured so far are kept; the exit status says something failed
            print(f"{provider} failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            failed.append(provider)
            continue
        results[provider] = json.loads(line[-1][7:])
        r = results[provider]
        extra = f" (graph {r['knn_seconds']:.1f} s)" if r.get("knn_seconds") else ""
        rec = f", recall of its graph {r['recall']:.4f}" if "recall" in r else ""
        print(f"{provider:14s} {r['seconds']:8.1f} s{extra}, peak {r['peak_mb']:.0f} MiB{rec}", flush=True)
    if not results:
        print(f"no provider ran ({len(failed)} failed)")
        return 1 if failed else 0
    n, d = x.shape
    # quality after every timed run: one sample of rows for all layouts
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(QUALITY_ROWS, n), replace=False))
    classes = token_classes(n)
    from embgeom.analysis.clouds.geometry import silhouette

    original = silhouette(x[rows], classes[rows], "cosine")
    print(f"quality on {len(rows)} rows (token classes' silhouette in the original space, cosine: {fixed4(original)})")
    for provider, r in results.items():
        r.update(quality(x, np.load(os.path.join(layouts, provider + ".npy")), rows, classes))
        print(f"  {provider:14s} trustworthiness(15) {r['trustworthiness']:.4f} (all {n} rows: "
              f"{r['trustworthiness_all']:.4f}), silhouette {fixed4(r['silhouette'])}")
    for method, ours, theirs, target in (("umap", "umap-embgeom", "umap-learn", 0.5),
                                         ("tsne", "tsne-embgeom", "tsne-openTSNE", 0.75),
                                         ("tsne, both on the exact graph", "tsne-embgeom", "tsne-openTSNE-exact", None)):
        if ours in results and theirs in results:
            ratio = results[ours]["seconds"] / results[theirs]["seconds"]
            goal = f" (target <= {target})" if target else ""
            print(f"{method}: ours / theirs = {ratio:.2f}{goal}; n={n} d={d}")
    if args.record:
        where = provenance()
        append_rows("projection.csv", [dict(where, metric=f"project_{p.split('-')[0]}", provider=p, n=n, d=d,
                                            dtype="float32", threads=r["threads"],  # (the child's)
                                            median_ms=round(r["seconds"] * 1e3, 1), peak_mb=round(r["peak_mb"], 1),
                                            m=round(r.get("recall", 1.0), 5),
                                            versions=where["versions"] + f" trustworthiness15={r['trustworthiness']:.4f}"
                                            f" trustworthiness15_all={r['trustworthiness_all']:.4f}"
                                            f" silhouette={fixed4(r['silhouette'])} silhouette_original={fixed4(original)}"
                                            f" quality_rows={len(rows)}")
                                       for p, r in results.items()])
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def keep(args) -> None:
    from embgeom import load_model
    from embgeom.cli import main

    _, tokenizer = load_model(None)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 1)  # (a fixed order: see bench_text)
    rng = random.Random(0)
    tmp = tempfile.mkdtemp()
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
        for _ in range(args.lines):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "\n")
    base = ["text", corpus, "--batch-size", str(args.batch), "--no-progress"]
    runs = (("plain", []), ("keep", ["--keep", "cls"]))
    # untimed, with --keep cls (a plain run's code and its own): first-call costs land here
    assert main(base + ["--out", os.path.join(tmp, "warm-up")] + runs[1][1]) == 0
    times = {"plain": [], "keep": []}
    for r in range(args.repeats):
        for name, extra in runs if r % 2 == 0 else runs[::-1]:  # alternating order: no side always goes first
            t0 = time.perf_counter()
            assert main(base + ["--out", os.path.join(tmp, f"{name}{r}")] + extra) == 0
            times[name].append(time.perf_counter() - t0)
    ratios = sorted(k / p - 1 for k, p in zip(times["keep"], times["plain"]))
    med = ratios[len(ratios) // 2]
    print(f"text {args.lines} lines: plain {min(times['plain']):.1f} s, --keep cls {min(times['keep']):.1f} s; "
          f"added {100 * med:+.1f} % (median per round; target <= 10 %)")
    if args.record:
        common = dict(n=args.lines, dtype="float32", peak_mb=round(peak_rss_mb(), 1), **provenance())
        append_rows("projection.csv", [dict(metric="text_keep_cls", provider=name,
                                            median_ms=round(sorted(v)[len(v) // 2] * 1e3, 1), **common)
                                       for name, v in times.items()])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["projection", "keep", "child"])
    p.add_argument("--n", type=int, default=0, help="first N vocabulary rows (0 = all)")
    p.add_argument("--k", type=int, default=15, help="UMAP n_neighbors (the point itself included)")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=PROVIDERS)
    p.add_argument("--provider", choices=PROVIDERS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--record", action="store_true", help="append rows to benchmarks/results/projection.csv")
    args = p.parse_args()
    return {"projection": projection, "keep": keep, "child": child}[args.what](args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
