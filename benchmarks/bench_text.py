"""`embgeom text` costs: metric overhead over the bare forward pass, and a corpus run's peak RSS.

  python benchmarks/bench_text.py overhead [--batch 32 --tokens 128 --repeats 7]
  python benchmarks/bench_text.py corpus [--lines 10000 --batch 32]

overhead: the default model on the default device, eager attention; the bare pass is
model(..., output_attentions=True, output_hidden_states=True) under inference_mode; ours is the
same pass with the head hooks plus TraceAccumulator.update (every metric). Target (issue 23): < 20 %.
corpus: a synthetic corpus (random vocabulary words, 5-60 words a line) through trace(); peak
RSS after a first pass over 10% of the lines and at the end of the timed pass over all of them
(flat memory: the two agree); the time is the full pass's alone. Rows go to
benchmarks/results/text.csv (--no-csv: nothing written) and record the device (CPU model and
instruction set, or the GPU's name), embgeom's CPU path and torch's threads. A device that is
not here (--device cuda without one) is a one-line error, exit status 1.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, peak_rss_mb, provenance, timeit  # noqa: E402

from embgeom import load_model  # noqa: E402
from embgeom.analysis.text.trace import (TraceAccumulator, iter_batches, model_max_length,  # noqa: E402
                                    sentence_tables, trace)


def _words(tokenizer) -> list[str]:
    # sorted: get_vocab()'s order changes from one process to the next (a fast tokenizer's hash
    # map), and the seeded choices below then picked other words every run
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha() and not w.startswith("[") and len(w) > 1)


def _texts(tokenizer, n, lo, hi, seed=0) -> list[str]:
    rng = random.Random(seed)
    words = _words(tokenizer)
    punct = [".", ",", ";", "!", "?"]
    out = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        out.append(" ".join(rng.choice(words) if rng.random() > 0.1 else rng.choice(punct) for _ in range(k)))
    return out


def load(args):
    """The model and tokenizer on --device; a device or model that is not here ends the run in
    one line (gpu_check.sh's text step asks for cuda)."""
    try:
        return load_model(args.model, device=args.device)
    except ValueError as exc:
        raise SystemExit(f"bench_text: {exc}") from None


def overhead(args) -> None:
    model, tokenizer = load(args)
    dev = next(model.parameters()).device
    texts = _texts(tokenizer, args.batch, 400, 400)             # every text fills --tokens
    enc = tokenizer(texts, padding=True, truncation=True, max_length=args.tokens, return_tensors="pt").to(dev)
    assert enc["input_ids"].shape == (args.batch, args.tokens), enc["input_ids"].shape

    def bare():
        with torch.inference_mode():
            model(**enc, output_attentions=True, output_hidden_states=True)

    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    max_len = model_max_length(model, tokenizer)
    acc = TraceAccumulator(L, H, max_len, model.config.vocab_size, dev,
                           sentence_tables=sentence_tables(tokenizer))
    batches = []

    def forward_hooks():
        batches.clear()
        batches.extend(iter_batches(model, tokenizer, texts, batch_size=args.batch, max_length=args.tokens))

    def metrics_only():
        acc.update(batches[0])

    threads = torch.get_num_threads()
    # bare pass, traced forward (tokenize + forward + hooks) and metric update alternate so that
    # load from other processes hits all alike; quoted: medians of the per-round ratios
    bare(), forward_hooks(), metrics_only()
    times = {"bare": [], "forward": [], "metrics": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("forward", forward_hooks), ("metrics", metrics_only)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    metric_ratio = med([m / b for m, b in zip(times["metrics"], times["bare"])])
    total_ratio = med([(f + m) / b - 1 for f, m, b in zip(times["forward"], times["metrics"], times["bare"])])

    def stats(v):
        v = sorted(v)
        return {"median_ms": med(v), "p20_ms": v[len(v) // 5], "p80_ms": v[(4 * len(v)) // 5]}

    t_bare, t_fwd, t_metrics = stats(times["bare"]), stats(times["forward"]), stats(times["metrics"])
    forward_hooks()
    parts = {}
    if args.profile:
        for name in ("cone", "entropy", "attention", "context", "evolution"):
            a = TraceAccumulator(L, H, max_len, model.config.vocab_size, dev, metrics=(name,))
            parts[name] = timeit(lambda: a.update(batches[0]), args.repeats)["median_ms"]
        # the opt-in extras of `embgeom text` (--heads, --clark-js, --gaussianity, --matrices), one batch each
        from embgeom.analysis.heads.gaussianity import GaussianityAccumulator
        from embgeom.analysis.heads.measures import HeadsAccumulator, clark_js_sums

        h = HeadsAccumulator(L, H, max_len, dev)
        parts["--heads"] = timeit(lambda: h.update(batches[0]), args.repeats)["median_ms"]
        g = GaussianityAccumulator(L + 1, model.config.hidden_size)
        parts["--gaussianity"] = timeit(lambda: g.update(batches[0]), args.repeats)["median_ms"]
        b0 = batches[0]
        parts["--clark-js"] = timeit(lambda: clark_js_sums(b0.attentions, b0.mask), 1, warmup=0)["median_ms"]
        # --matrices: the q/k/v hooks fill its store during the forward; each timed update gets it back
        from embgeom.analysis.heads.matrices import MatricesAccumulator

        mx = MatricesAccumulator(L, H, max_len, dev)
        with mx.capture(model):
            forward_hooks()
        saved, b1 = {l: dict(v) for l, v in mx.store.items()}, batches[0]

        def matrices():
            mx.store = {l: dict(v) for l, v in saved.items()}
            mx.update(b1)

        parts["--matrices"] = timeit(matrices, args.repeats)["median_ms"]
    res = acc.result(tokenizer)
    assert torch.isfinite(res.entropy).all() and torch.isfinite(res.js_distance).all()
    print(f"device={dev} threads={threads} batch={args.batch}x{args.tokens} L={L} H={H} rounds={args.repeats}")
    print(f"bare forward (output_attentions)          {t_bare['median_ms']:8.1f} ms")
    print(f"metric update of one batch                {t_metrics['median_ms']:8.1f} ms  "
          f"overhead {100 * metric_ratio:.1f}% of the bare forward (median per round)")
    print(f"iter_batches (tokenize + forward + hooks) {t_fwd['median_ms']:8.1f} ms")
    print(f"trace end to end vs bare forward          overhead {100 * total_ratio:+.1f}% (tokenization included)")
    for name, ms in parts.items():
        print(f"  {name:14s} {ms:8.1f} ms  ({100 * ms / t_bare['median_ms']:.0f}% of the bare forward)")
    if args.no_csv:
        return
    common = dict(n=args.batch, m=args.tokens, d=model.config.hidden_size, dtype="float32",
                  peak_mb=round(peak_rss_mb(), 1), **provenance(dev, threads))
    append_rows("text.csv", [
        dict(metric="text_forward", provider="bare", **common, **t_bare),
        dict(metric="text_forward", provider="iter_batches", **common, **t_fwd),
        dict(metric="text_metrics", provider="trace", **common, **t_metrics),
    ])


def corpus(args) -> None:
    model, tokenizer = load(args)
    path = os.path.join(tempfile.mkdtemp(), "corpus.txt")
    with open(path, "w", encoding="utf-8") as f:
        for t in _texts(tokenizer, args.lines, 5, 60, seed=1):
            f.write(t + "\n")
    rss = {}
    tenth = max(args.lines // 10, 1)
    with open(path) as f:
        head = [next(f).rstrip("\n") for _ in range(tenth)]
    trace(model, tokenizer, head, batch_size=args.batch)
    rss["after_10pct"] = peak_rss_mb()
    start = time.perf_counter()  # (after the first pass: the time is for the r.n_texts lines reported)
    r = trace(model, tokenizer, path, batch_size=args.batch, progress=True)
    seconds = time.perf_counter() - start
    rss["end"] = peak_rss_mb()
    print(f"{r.n_texts} texts, {r.n_tokens} tokens, {r.truncated} truncated in {seconds:.1f}s; "
          f"peak RSS after 10% of the lines {rss['after_10pct']:.0f} MiB, at the end {rss['end']:.0f} MiB")
    if not args.no_csv:
        append_rows("text.csv", [dict(metric="text_corpus", provider="trace", n=args.lines, m=r.n_tokens,
                                      d=model.config.hidden_size, dtype="float32", median_ms=round(seconds * 1e3, 1),
                                      peak_mb=round(rss["end"], 1), **provenance(next(model.parameters()).device))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["overhead", "corpus"])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--lines", type=int, default=10000)
    p.add_argument("--profile", action="store_true", help="time each metric group alone")
    p.add_argument("--no-csv", action="store_true", help="append nothing to benchmarks/results/text.csv")
    args = p.parse_args()
    overhead(args) if args.what == "overhead" else corpus(args)


if __name__ == "__main__":
    main()
