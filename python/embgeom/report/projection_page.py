"""The files of `embgeom project`: projection.npy, report.json, the PNG and the interactive scatter.
"""
from __future__ import annotations

import os
import numpy as np



def write_outputs(out_dir: str, proj, *, texts=None, title: str = "", provenance=None) -> dict:
    """Write every file of `out_dir` (an existing folder, output_folder's staging) for a
    clouds.Projection; returns the report dict. provenance: a provenance.Provenance, recorded in
    report.json and the page footer."""
    from ..formatting import fmt
    from . import explained_variance_png, write_json
    from .interactive import scatter_png, write_scatter_html

    np.save(os.path.join(out_dir, "projection.npy"), proj.embedding.astype(np.float32))
    report = proj.to_dict()
    axis = {"pca": "PC", "tsne": "t-SNE"}.get(proj.method, proj.method.upper())
    depth = getattr(provenance, "extra", {}).get("depth") if provenance is not None else None
    name = title or (f"{proj.method} of {proj.n} x {proj.d}" + (f" at depth {depth}" if depth is not None else "")
                     + (f", perplexity {fmt(proj.perplexity)}" if proj.perplexity is not None else "")
                     + (f", {proj.k} {proj.metric} neighbours" if proj.k else ""))
    scatter_png(out_dir, "projection", proj.embedding, proj.labels, title=name,
                xlabel=f"{axis} 1", ylabel=f"{axis} 2")
    if proj.pca_curves is not None:
        explained_variance_png(out_dir, "explained_variance", proj.pca_curves, proj.labels)
    sil = report.get("silhouette")
    note = f"{proj.method}, n={proj.n}, d={proj.d}" + (f", k={proj.k}, {proj.metric}" if proj.k else "") + \
        (f"; silhouette original {fmt(sil['original'], 3)}, projection {fmt(sil['projection'], 3)}" if sil else "")
    if provenance is not None:
        report["provenance"] = provenance.record()
    knn = None if proj.indices is None else (proj.indices, proj.graph_values)
    # knn.npz (graph methods): written with the page, which names it
    write_scatter_html(os.path.join(out_dir, "projection.html"), proj.embedding, proj.labels, texts,
                       title=name, note=note, xlabel=f"{axis} 1", ylabel=f"{axis} 2",
                       provenance=report.get("provenance"), knn=knn, knn_file="knn.npz", knn_metric=proj.metric)
    if provenance is not None:
        report["provenance"] = provenance.record()
    write_json(os.path.join(out_dir, "report.json"), report)
    return report
