"""`embgeom vocab` end to end: wall time (model load and plots included), its breakdown, and the
process's peak memory, on the default model and on a bert-base sized random model.

  python benchmarks/bench_vocab.py [--models default bert-base] [--repeats 1]

Each run is a fresh `embgeom vocab` subprocess (so the peak RSS is that run's alone). The
bert-base case is a random 1-layer BertModel with bert-base's embedding shapes (30,522 x 768
words, 512 positions, 2 token types) and the default model's tokenizer, saved to a temp dir.
Targets (issue 5): default model <= 60 s and <= 1.5 GB. Rows go to benchmarks/results/vocab.csv
(metric vocab_total plus one row per section; --no-csv: nothing written) and record the CPU
(model, instruction set), embgeom's CPU path and torch's threads (the subprocess's: the same
environment).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, provenance  # noqa: E402


def bert_base_sized(path: str) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embgeom.models import default_model_path

    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


def run_once(model: str | None, out: str) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "embgeom", "vocab", "--out", out] + (["--model", model] if model else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"embgeom vocab failed:\n{proc.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:  # max over children so far: only trust it when this child raised it
        peak_kb = json.load(open(os.path.join(out, "report.json")))["peak_rss_mb"] * 1024
    report = json.load(open(os.path.join(out, "report.json")))
    return wall, peak_kb / 1024.0, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default", "bert-base"], choices=["default", "bert-base"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-csv", action="store_true", help="append nothing to benchmarks/results/vocab.csv")
    args = p.parse_args()
    where = provenance()  # (the subprocess gets no --device: the CPU, embgeom vocab's default)
    tmp = tempfile.mkdtemp()
    for name in args.models:
        model = None if name == "default" else bert_base_sized(os.path.join(tmp, "bert-base-random"))
        for r in range(args.repeats):
            wall, peak, rep = run_once(model, os.path.join(tmp, f"out-{name}-{r}"))
            tm = rep["timing"]
            print(f"{name}: {rep['tokens_analysed']} x {rep['hidden']}  wall {wall:.1f} s  peak {peak:.0f} MiB  "
                  + "  ".join(f"{k} {v:.1f}" for k, v in tm.items()))
            common = dict(provider="embgeom-vocab", n=rep["tokens_analysed"], d=rep["hidden"], dtype="float32",
                          **where)
            rows = [dict(metric=f"vocab_total[{name}]", median_ms=round(wall * 1e3, 1), peak_mb=round(peak, 1),
                         **common)]
            rows += [dict(metric=f"vocab_{k}[{name}]", median_ms=round(v * 1e3, 1), **common)
                     for k, v in tm.items() if k not in ("total", "to_page")]  # (to_page: all steps so far)
            if not args.no_csv:
                print(f"  -> {append_rows('vocab.csv', rows)}")


if __name__ == "__main__":
    main()
