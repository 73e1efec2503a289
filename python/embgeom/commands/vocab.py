"""`embgeom vocab --out DIR`: analysis of a model's input embeddings; writes report.json, PNG plots
and report.html (docs/metrics.md, vocabulary).
"""
from __future__ import annotations

import os
import sys

import torch

from ..analysis.vocab.sections import PhaseTimer, analyse, peak_rss_mb
from ..engine.config import DEFAULTS, PRECISIONS
from ..io import check_output_folder, output_folder
from ..report import write_json
from ..report.vocab_page import write_page, write_plots
from .model_options import add_model_options, progress_for


def add_arguments(p) -> None:
    add_model_options(p)
    p.add_argument("--out", default="embgeom-vocab", metavar="DIR", help="output directory (created)")
    p.add_argument("--all-tokens", action="store_true", help="keep special and [unusedN] tokens")
    p.add_argument("--precision", default=DEFAULTS.precision, choices=PRECISIONS)
    p.add_argument("--backend", default=None, help="all-pairs backend (default: auto)")
    p.add_argument("--positions", metavar="A:B", default=None, help="analyse positions A..B-1 only "
                   "(e.g. 0:384)")
    p.add_argument("--projections", action="store_true", help="UMAP and t-SNE of word and position "
                   "embeddings on the exact cosine graph (needs umap-learn, openTSNE)")
    p.add_argument("--seed", type=int, default=0, help="seed of the projections")


def run(model_name: str | None, out_dir: str, *, device=None, all_tokens=False, precision=DEFAULTS.precision,
        backend=None, positions=None, projections=False, seed=0, progress=None, provenance=None) -> dict:
    """Load the model, analyse, write report.json + PNGs + report.html; returns the report.
    progress: a progress.Progress (phases on stderr); provenance: a provenance.Provenance (made
    here when None)."""
    from ..models import DEFAULT_MODEL, load_model
    from ..provenance import Provenance

    from ..analysis.vocab.positions import UNKNOWN_SIZE, parse_range

    prov = provenance or Provenance(seed=seed)
    prov.seed = seed
    timer = PhaseTimer(progress)
    check_output_folder(out_dir)
    parse_range(positions, UNKNOWN_SIZE)  # its form before the model loads; its bounds right after
    with output_folder(out_dir, command="vocab") as out:
        with timer("model_load"):
            model, tokenizer = load_model(model_name, device=device)
        prov.set_model(model_name, model)
        with torch.no_grad():
            report, plots = analyse(model, tokenizer, all_tokens=all_tokens, backend=backend,
                                    precision=precision, timer=timer, positions=positions,
                                    projections=projections, seed=seed)
        report = {"model": model_name or DEFAULT_MODEL, **report}
        with timer("plots"):
            pngs = write_plots(out, plots, provenance=prov.record())
        report["timing"] = dict(timer.seconds)
        # the page shows the time up to itself; report.json adds the page and the whole run
        report["timing"]["to_page"] = prov.seconds()
        report["peak_rss_mb"] = peak_rss_mb()
        report["provenance"] = prov.record()
        with timer("page"):
            write_page(out, report, pngs)
        report["timing"]["page"] = timer.seconds["page"]
        report["timing"]["total"] = prov.seconds()
        report["provenance"] = prov.record()
        write_json(os.path.join(out, "report.json"), report)
    return report


def main(args) -> int:
    from ..formatting import fmt, seconds
    from ..provenance import Provenance

    prov = Provenance(args, seed=args.seed)
    report = run(args.model, args.out, device=args.device, all_tokens=args.all_tokens,
                 precision=args.precision, backend=args.backend, positions=args.positions,
                 projections=args.projections, seed=args.seed,
                 progress=progress_for(args, "embgeom vocab"), provenance=prov)
    tm = report["timing"]
    parts = ", ".join(f"{k.replace('_', ' ')} {seconds(v)}" for k, v in tm.items() if k not in ("to_page", "total"))
    print(f"embgeom vocab: {fmt(report['tokens_analysed'])} tokens in {seconds(prov.seconds())} ({parts}); "
          f"peak {fmt(round(report['peak_rss_mb']))} MB -> {os.path.join(args.out, 'report.html')}", file=sys.stderr)
    return 0
