"""`embgeom vocab --out DIR`: analysis of a model's input embeddings; writes report.json, PNG plots
and report.html (docs/metrics.md, vocabulary).
"""
from __future__ import annotations

import os
import sys

import torch

from .. import validation
from ..analysis.vocab.sections import PhaseTimer, analyse, peak_rss_mb
from ..engine.config import DEFAULTS, PRECISIONS
from ..analysis.vocab.layouts import LAYOUTS, LayoutCheckpoint
from ..io import check_output_folder, check_output_path, output_folder
from ..report import write_json
from ..report.vocab_page import write_page, write_plots
from .model_options import add_model_options, model_input, progress_for


def add_arguments(p) -> None:
    add_model_options(p)
    p.add_argument("--out", default="embgeom-vocab", metavar="DIR", help="output directory (created; default "
                   "embgeom-vocab)")
    p.add_argument("--all-tokens", action="store_true", help="keep special and [unusedN] tokens")
    p.add_argument("--precision", default=DEFAULTS.precision, choices=PRECISIONS,
                   help=f"the word pairs' products (docs/metrics.md, precision; default {DEFAULTS.precision}; "
                   "the position and token-type sections are always exact)")
    p.add_argument("--backend", default=None, help="all-pairs backend: cpp, torch, triton, cuda or reference "
                   "(default: auto, or EMBGEOM_BACKEND)")
    p.add_argument("--positions", metavar="A:B", default=None, help="analyse positions A..B-1 only "
                   "(e.g. 0:384; :B from 0, A: to the end; at least 4 positions)")
    p.add_argument("--projections", action="store_true", help="UMAP and t-SNE of word and position "
                   "embeddings on the exact cosine graph (needs umap-learn, openTSNE)")
    p.add_argument("--seed", type=int, default=None, help="with --projections: seed of the projections (default 0)")
    p.add_argument("--checkpoint", metavar="PATH", help="with --projections: save each finished UMAP / t-SNE "
                   "layout here; the same command resumes with them (the other sections take seconds and "
                   "are computed again)")


def run(model_name: str | None, out_dir: str, *, device=None, all_tokens=False, precision=DEFAULTS.precision,
        backend=None, positions=None, projections=False, seed=0, progress=None, provenance=None,
        checkpoint=None) -> dict:
    """Load the model, analyse, write report.json + PNGs + report.html; returns the report.
    progress: a progress.Progress (phases on stderr); provenance: a provenance.Provenance (made
    here when None); checkpoint: a path keeping the finished projection layouts
    (analysis/vocab/layouts.py); report["checkpoint"] then names the layouts taken from it."""
    from ..models import DEFAULT_MODEL, load_model
    from ..provenance import Provenance

    from ..analysis.vocab.positions import UNKNOWN_SIZE, parse_range

    seed = validation.seed(seed)  # (before the model: the layouts that take it run last)
    prov = provenance or Provenance(seed=seed)
    prov.seed = seed
    timer = PhaseTimer(progress)
    check_output_folder(out_dir, command="vocab", inputs=[("--checkpoint", checkpoint), model_input(model_name)])
    parse_range(positions, UNKNOWN_SIZE)  # its form before the model loads; its bounds right after
    if projections:  # (UMAP and t-SNE run last: a missing package had been said after the other sections)
        from ..analysis.clouds.projection import require_packages
        from ..report.interactive import require_page_packages

        require_packages("umap", "tsne")
        require_page_packages()  # (their pages are written after the layouts)
    if checkpoint is not None:
        if not projections:
            raise ValueError("--checkpoint: keeps the --projections layouts; without --projections there is "
                             "nothing to keep (the other sections take seconds)")
        check_output_path(checkpoint, "--checkpoint", beside=(".lock",))   # its folder, before the model loads
    layouts = None
    try:
        with output_folder(out_dir, command="vocab") as out:
            with timer("model_load"):
                model, tokenizer = load_model(model_name, device=device)
            prov.set_model(model_name, model)
            if checkpoint is not None:
                layouts = LayoutCheckpoint(checkpoint, model, tokenizer,
                                           {"all_tokens": all_tokens, "positions": positions, "seed": seed})
                layouts.load()
                if layouts.resumed and progress is not None and progress.enabled:
                    progress.stream.write(f"embgeom vocab: resuming from {checkpoint}: {len(layouts.resumed)} of "
                                          f"{len(LAYOUTS)} projection layouts done\n")
            with torch.no_grad():
                report, plots = analyse(model, tokenizer, all_tokens=all_tokens, backend=backend,
                                        precision=precision, timer=timer, positions=positions,
                                        projections=projections, seed=seed, layouts=layouts)
            report = _write(out, {"model": model_name or DEFAULT_MODEL, **report}, plots, timer, prov, layouts)
    finally:
        if layouts is not None:
            layouts.close()   # PATH free for the next run
    return report


def _write(out: str, report: dict, plots: dict, timer, prov, layouts) -> dict:
    """PNGs, report.html and report.json of an analysed vocabulary."""
    if layouts is not None:
        report["checkpoint"] = {"path": layouts.path, "layouts_resumed": list(layouts.resumed)}
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
    from ..formatting import counted, fmt, seconds
    from ..provenance import Provenance
    from ..validation import renamed
    from . import flags_of

    if args.seed is not None and not args.projections:
        raise ValueError("--seed: seeds the --projections layouts; without --projections nothing is random")
    if args.seed is None:
        args.seed = 0
    prov = Provenance(args, seed=args.seed)
    with renamed(**flags_of(args)):  # errors and the layouts checkpoint's differences by flag
        report = run(args.model, args.out, device=args.device, all_tokens=args.all_tokens,
                     precision=args.precision, backend=args.backend, positions=args.positions,
                     projections=args.projections, seed=args.seed,
                     progress=progress_for(args, "embgeom vocab"), provenance=prov, checkpoint=args.checkpoint)
    tm = report["timing"]
    parts = ", ".join(f"{k.replace('_', ' ')} {seconds(v)}" for k, v in tm.items() if k not in ("to_page", "total"))
    kept = report.get("checkpoint", {}).get("layouts_resumed")
    resumed = f" ({len(kept)} of {len(LAYOUTS)} projection layouts from {args.checkpoint})" if kept else ""
    print(f"embgeom vocab: {counted(report['tokens_analysed'], 'token')} in {seconds(prov.seconds())}{resumed} ({parts}); "
          f"peak {fmt(round(report['peak_rss_mb']))} MiB -> {os.path.join(args.out, 'report.html')}", file=sys.stderr)
    return 0
