"""The sections of `embgeom vocab`: all-pairs statistics, mean-embedding measures, PCA and
neighbours of a model's input embeddings (word, position, token type; docs/metrics.md, vocabulary).
"""
from __future__ import annotations

import re
import resource
import time
from contextlib import contextmanager
import numpy as np
import torch
from ...api import pairwise_stats
from ...engine.config import DEFAULTS
from ...numerics import cosine_matrix
from ..clouds import projection as clouds
from ..clouds.projection import pca_fit
from ..text import adapters
from .positions import components_for, offset_profile


PROBE_WORDS = ("king", "queen", "man", "woman", "paris", "france", "dog", "cat", "good", "bad",
               "big", "small", "run", "walk", "music", "science", "red", "blue", "one", "two")


# each measure against the mean embedding, in report order, with the name the report prints
MEAN_MEASURES = {"euclidean": "Euclidean distance to the mean embedding",
                 "cosine": "cosine with the mean embedding",
                 "abs_cosine": "|cosine| with the mean embedding",
                 "dot": "dot product with the mean embedding",
                 "abs_dot": "|dot product| with the mean embedding",
                 "norm": "the token's own norm"}


UNUSED_TOKEN = re.compile(r"^\[unused\d+\]$")


TABLE_K = 10


OUTSIDE = (-0.2, 0.2)


AGREEMENT_ROWS = 2000  # rows whose FAISS neighbours are compared with the engine's row top-k


def input_embeddings(model) -> dict:
    """The word, position and token-type embedding matrices (float32, float64 for a float64
    model; detached, model's device),
    None where the family has none; the position matrix starts at the first real position id
    (row p = the p-th token). Also "first_position" and "absent" ({section: why}), from the
    family's adapter (analysis/text/adapters.py)."""
    m = adapters.embedding_matrices(model)
    return {"word": m.word, "position": m.position, "token_type": m.token_type,
            "first_position": m.first_position, "absent": m.absent}


def kept_token_ids(tokenizer, vocab_size: int, all_tokens: bool) -> tuple[torch.Tensor, list[str], dict]:
    """Ids analysed (all, or all but special and [unusedN] tokens), every id's token string, and
    what was left out."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    tokens = [t if t is not None else f"<id {i}>" for i, t in enumerate(tokens)]
    special = sorted({int(i) for i in tokenizer.all_special_ids if 0 <= int(i) < vocab_size})
    unused = [i for i, t in enumerate(tokens) if UNUSED_TOKEN.match(t)]
    if all_tokens:
        dropped: list[int] = []
    else:
        dropped = sorted(set(special) | set(unused))
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[dropped] = False
    excluded = {"all_tokens": all_tokens, "special": len(special), "unused": len(unused),
                "excluded": len(dropped), "special_tokens": [tokens[i] for i in special]}
    return torch.nonzero(keep).flatten(), tokens, excluded


def _remap_pairs(pairs: list, rows: torch.Tensor, cols: torch.Tensor) -> list:
    return [[int(rows[i]), int(cols[j]), v] for i, j, v in pairs]


def _remap_stats(d: dict, rows: torch.Tensor, cols: torch.Tensor) -> dict:
    """Indices of a pairwise_stats dict on submatrices -> ids of the full matrices."""
    for key in ("top_pairs", "bottom_pairs", "near_pairs"):
        d[key] = _remap_pairs(d[key], rows, cols)
    for key in ("min", "max"):
        if d[key] is not None:
            d[key] = _remap_pairs([d[key]], rows, cols)[0]
    if "outside" in d:
        d["outside"]["pairs"] = _remap_pairs(d["outside"]["pairs"], rows, cols)
    d["excluded_rows"] = [int(rows[i]) for i in d["excluded_rows"]]
    if "excluded_cols" in d:
        d["excluded_cols"] = [int(cols[j]) for j in d["excluded_cols"]]
    return d


def section_pairs(words: torch.Tensor, ids: torch.Tensor, tokens: list[str], *, backend, precision,
                  progress=False):
    """All-pairs statistics over the analysed word embeddings (rows of `words` are vocabulary ids `ids`). The
    engine's per-row top-10 comes from the same pass, for the neighbour agreement check. progress:
    the engine's bar over the pairs (a progress.Progress, or False)."""
    res = pairwise_stats(words, metric="cosine", topk=TABLE_K,
                         bottomk=TABLE_K, near=0.0, near_k=TABLE_K, row_topk=TABLE_K,
                         outside=OUTSIDE, outside_limit=100, precision=precision, backend=backend,
                         progress=progress)
    d = res.to_dict()
    d.pop("row_topk")
    d["outside"].pop("row_counts")
    # the pairs nearest 0, picked by the engine's float32 values, shown with their float64
    # cosines: near 0 a float32 cosine's rounding (up to (2d + 8) 2^-24) is most of its digits
    near64 = _cosines64(words, [(i, j) for i, j, _ in d["near_pairs"]])
    _remap_stats(d, ids, ids)

    def named(pairs):
        return [[tokens[i], tokens[j], v] for i, j, v in pairs]

    d["top_tokens"], d["bottom_tokens"] = named(d["top_pairs"]), named(d["bottom_pairs"])
    d["near_zero_tokens"] = [[tokens[i], tokens[j], v] for (i, j, _), v in zip(d["near_pairs"], near64)]
    return d, res


def _cosines64(words: torch.Tensor, pairs: list) -> list[float]:
    """Float64 cosines of the rows (i, j) of words: the clouds' rule (projection.cosines64, one
    fixed order of three sums) on the rows the pairs name."""
    if not pairs:
        return []
    ij = np.asarray(pairs, dtype=np.int64)
    used, at = np.unique(ij, return_inverse=True)
    at = at.reshape(ij.shape)
    scaled = clouds.scaled_rows(words[torch.from_numpy(used).to(words.device)].double().cpu().numpy())
    return clouds.cosines64(scaled, at[:, 1:], rows=at[:, 0])[:, 0].tolist()


def _extremes(values: torch.Tensor, ids: torch.Tensor, tokens: list[str], k: int) -> dict:
    """top/bottom k as [id, token, value]; ties ordered by id (ids are ascending)."""
    v = values.double().cpu()
    k = min(k, v.numel())
    # stable sorts keep ascending ids among equal values
    order_top = torch.sort(v, descending=True, stable=True).indices[:k].tolist()
    order_bottom = torch.sort(v, stable=True).indices[:k].tolist()

    def rows(order):
        return [[int(ids[i]), tokens[int(ids[i])], float(v[i])] for i in order]

    return {"top": rows(order_top), "bottom": rows(order_bottom)}


def mean_embedding_measures(word: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row against the mean row: Euclidean distance, cosine, |cosine|, dot, |dot|, and the
    row's own norm (float64; a zero row has cosine NaN and is ranked last)."""
    x = word.double()
    mu = x.mean(0)
    dot = x @ mu
    norms = x.norm(dim=1)
    denom = norms * mu.norm()
    cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.full_like(dot, float("nan")))
    return {"euclidean": (x - mu).norm(dim=1), "cosine": cos, "abs_cosine": cos.abs(), "dot": dot,
            "abs_dot": dot.abs(), "norm": norms}


def section_mean_embedding(words, ids, tokens):
    measures = mean_embedding_measures(words)
    out = {}
    for name in MEAN_MEASURES:
        v = measures[name]
        # NaN (zero rows) must not win either table
        finite = torch.isfinite(v)
        out[name] = _extremes(v[finite], ids[finite.cpu()], tokens, TABLE_K)
        out[name]["mean"] = float(v[finite].mean()) if finite.any() else None
    out["mean_norm"] = float(words.double().mean(0).norm())
    return out, measures


def principal_components(x: torch.Tensor, axes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Explained-variance ratio of each principal component (descending) and the rows projected
    on the first `axes` components (float64; clouds.pca_fit)."""
    x64 = x.detach().double().cpu().numpy()
    ratio, mean, comps = pca_fit(x64, axes)
    return torch.from_numpy(ratio), torch.from_numpy((x64 - mean) @ comps)


def pca_summary(ratio: torch.Tensor) -> dict:
    return {"explained_variance": ratio.tolist(),
            "components_for": {f"{int(s * 100)}pct": components_for(ratio.numpy(), s) for s in (0.5, 0.9, 0.99)}}


def section_positional(pos: torch.Tensor, *, first: int = 0, backend):
    """The position rows `pos` are positions first, first + 1, ... (--positions A:B: first = A);
    the pairs are reported by those positions."""
    stats = pairwise_stats(pos, metric="cosine", bins=200, topk=TABLE_K, bottomk=TABLE_K,
                           backend=backend).to_dict()
    positions = torch.arange(first, first + pos.shape[0])
    _remap_stats(stats, positions, positions)
    cos = cosine_matrix(pos).cpu()
    ratio, path = principal_components(pos, axes=3)  # path: the 3-D PCA path of the positions
    out = {"positions": int(pos.shape[0]), "mean": stats["mean"], "std": stats["std"],
           "min": stats["min"], "max": stats["max"], "top_pairs": stats["top_pairs"],
           "bottom_pairs": stats["bottom_pairs"], "offset_profile": offset_profile(cos.numpy()),
           "explained_variance": ratio.tolist(),
           "components_for_90pct": components_for(ratio.numpy(), 0.9),
           "norms": pos.double().norm(dim=1).cpu().tolist(),
           "excluded_positions": stats["excluded_rows"]}   # (zero rows: no direction)
    return out, cos, ratio, path


def section_token_position(words, pos, ids, tokens, *, first: int = 0, backend):
    """Words against the position rows `pos`, positions first, first + 1, ... (--positions A:B:
    first = A; they had been numbered from 0, so position 511 of 384:512 read 127)."""
    res = pairwise_stats(words, pos, metric="cosine", bins=200, topk=TABLE_K,
                         bottomk=TABLE_K, outside=OUTSIDE, outside_limit=200, backend=backend)
    d = res.to_dict()
    d["first_position"] = first   # (outside.per_position[0] is this position's)
    positions = torch.arange(first, first + pos.shape[0])
    per_position = d["outside"].pop("col_counts")
    d["outside"].pop("row_counts")
    _remap_stats(d, ids, positions)

    def named(pairs):
        return [[i, tokens[i], j, v] for i, j, v in pairs]

    d["outside"]["pairs"] = named(d["outside"]["pairs"])
    d["outside"]["per_position"] = per_position
    d["outside"]["note"] = ("pairs: the first `limit` by (token_id, position); count and "
                            "per_position cover all")
    d["outside"]["limit"] = 200
    d["top_pairs"], d["bottom_pairs"] = named(d["top_pairs"]), named(d["bottom_pairs"])
    d.pop("near_pairs")
    return d


def section_token_type(tt, words, pos, *, backend):
    t = tt.double()
    # from the differences (no ||a||^2 + ||b||^2 - 2ab cancellation for near-equal rows)
    dist = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist")
    out = {"types": int(tt.shape[0]), "norms": t.norm(dim=1).tolist(),
           "cosine": cosine_matrix(tt).tolist(), "dot": (t @ t.T).tolist(), "distance": dist.tolist(),
           "vs_word": [], "vs_position": []}
    for k in range(tt.shape[0]):
        for key, other in (("vs_word", words), ("vs_position", pos)):
            if other is None:
                continue
            s = pairwise_stats(tt[k:k + 1], other, metric="cosine", bins=0, topk=0, bottomk=0,
                               backend=backend)
            out[key].append({"mean": s.mean, "std": s.std,
                             "min": None if s.min is None else s.min[2],
                             "max": None if s.max is None else s.max[2]})
    return out


def _agreement(engine_top, faiss_top, faiss_vals, engine_vals, tol: float) -> dict:
    """Per-row neighbour sets equal, or equal up to ties: ids that differ have values within
    `tol` of the row's k-th value (either side may have broken the tie otherwise)."""
    exact = ties = 0
    max_diff = 0.0
    for a, b, va, vb in zip(engine_top, faiss_top, engine_vals, faiss_vals):
        sa, sb = set(a), set(b)
        if va:
            max_diff = max(max_diff, max(abs(x - y) for x, y in zip(va, vb)))
        if sa == sb:
            exact += 1
            continue
        kth = min(va[-1], vb[-1])
        engine_val = dict(zip(a, va))
        faiss_val = dict(zip(b, vb))
        if all(abs(engine_val[i] - kth) <= tol for i in sa - sb) and \
                all(abs(faiss_val[i] - kth) <= tol for i in sb - sa):
            ties += 1
    rows = len(engine_top)
    return {"rows_checked": rows, "identical": exact, "equal_up_to_ties": exact + ties,
            "disagree": rows - exact - ties, "max_abs_value_diff": max_diff, "tie_tolerance": tol,
            "agree": exact + ties == rows}


def section_neighbors(words, ids, tokens, engine_rowtopk, *, k=TABLE_K):
    """FAISS exact neighbours of the probe words, and FAISS vs the engine's per-row top-k on a
    deterministic sample of rows."""
    from ...neighbours import knn

    n = words.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return {"probes": {}, "agreement": None, "note": "fewer than 2 tokens"}
    position = {int(v): p for p, v in enumerate(ids.tolist())}
    vocab = {t: i for i, t in enumerate(tokens)}
    probe_ids = {}
    for w in PROBE_WORDS:
        # the word as a word of a text: after a space sentencepiece and byte-level BPE mark it
        # ('▁dog', 'Ġdog'; unmarked, 'man' is the piece of 'wo' + 'man'); WordPiece leaves it bare
        found = [vocab[t] for t in ("▁" + w, "Ġ" + w, w) if t in vocab and vocab[t] in position]
        if found:
            probe_ids[w] = found[0]
    probes = list(probe_ids)
    faiss_device = "cpu" if words.device.type == "cpu" else None
    out: dict = {"k": k, "probes": {}, "missing_probes": [w for w in PROBE_WORDS if w not in probes],
                 "probe_tokens": {w: tokens[probe_ids[w]] for w in probes}}
    if probes:
        q = torch.tensor([position[probe_ids[w]] for w in probes])
        res = knn(words, k, queries=q, device=faiss_device)
        for w, row_i, row_v in zip(probes, res.indices.tolist(), res.values.tolist()):
            # (-1: no neighbour there, as for a zero row, which has none; ids[-1] had named the
            # last token k times)
            out["probes"][w] = [[int(ids[i]), tokens[int(ids[i])], float(v)] for i, v in zip(row_i, row_v) if i >= 0]
    # agreement with the engine on a fixed sample (all rows when few)
    g = torch.Generator().manual_seed(0)
    sample = torch.randperm(n, generator=g)[:AGREEMENT_ROWS].sort().values
    res = knn(words, k, queries=sample, device=faiss_device)
    eng_i = engine_rowtopk.indices[sample.to(engine_rowtopk.indices.device)][:, :k].cpu().tolist()
    eng_v = engine_rowtopk.values[sample.to(engine_rowtopk.values.device)][:, :k].double().cpu().tolist()
    out["agreement"] = _agreement(eng_i, res.indices.cpu().tolist(), res.values.double().cpu().tolist(),
                                  eng_v, tol=1e-5)
    out["agreement"]["faiss_device"] = res.device
    return out


# what each timed phase is called on stderr
PHASES = {"model_load": "loading the model", "pairs": "all pairs of the vocabulary",
          "mean_embedding": "mean embedding", "positional": "position embeddings",
          "token_position": "tokens x positions", "token_type": "token-type embeddings",
          "pca": "principal components", "neighbors": "nearest neighbours (FAISS check)",
          "position_geometry": "position geometry", "projections": "UMAP and t-SNE projections",
          "plots": "plots", "page": "page"}


class PhaseTimer:
    """Seconds per named phase: `with timer("plots"): ...` adds to seconds["plots"]; with a
    progress.Progress, each phase also ticks on stderr while it runs."""

    def __init__(self, progress=None):
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def __call__(self, name, own_bars: bool = False):
        """own_bars: the phase's work draws its own bars (from self.progress), so no clock."""
        start = time.perf_counter()
        try:
            if self.progress is None or own_bars:
                yield
            else:
                with self.progress.phase(PHASES.get(name, name.replace("_", " "))):
                    yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB; report.json peak_rss_mb)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def analyse(model, tokenizer, *, all_tokens: bool = False, backend: str | None = None,
            precision: str = DEFAULTS.precision, timer: PhaseTimer | None = None, positions: str | None = None,
            projections: bool = False, seed: int = 0, layouts=None) -> tuple[dict, dict]:
    """Every section of the vocabulary report -> (report dict, arrays for the plots).
    positions: "A:B" restricts the position sections to positions A..B-1; projections: UMAP and
    t-SNE of word and position embeddings (umap-learn, openTSNE); layouts: their checkpoint
    (layouts.LayoutCheckpoint)."""
    from . import positions as position_geometry

    timer = timer or PhaseTimer()
    mats = input_embeddings(model)
    word, pos, tt = mats["word"], mats["position"], mats["token_type"]
    pos_full = pos
    pos_range = None
    if pos is not None:
        pos_range = position_geometry.parse_range(positions, pos.shape[0]) or (0, pos.shape[0])
        pos = pos[pos_range[0]:pos_range[1]]
    elif positions is not None:
        raise ValueError("--positions: the model has no position embeddings")
    ids, tokens, excluded = kept_token_ids(tokenizer, word.shape[0], all_tokens)
    if ids.numel() < 2:
        raise ValueError(f"model: only {ids.numel()} token(s) left to analyse; try --all-tokens")
    words = word[ids.to(word.device)]  # the analysed rows, row r = vocabulary id ids[r]
    report: dict = {"vocab_size": int(word.shape[0]), "hidden": int(word.shape[1]),
                    "tokens_analysed": int(ids.numel()), "tokens": excluded}
    plots: dict = {}
    # precision applies to the word pairs alone: the position, token x position and token-type
    # sections take exact products (milliseconds), so their means and stds are fp32's
    with timer("pairs", own_bars=True):
        report["pairs"], res = section_pairs(words, ids, tokens, backend=backend, precision=precision,
                                             progress=timer.progress or False)
        plots["hist"] = res.hist
    with timer("mean_embedding"):
        report["mean_embedding"], plots["mean_measures"] = section_mean_embedding(words, ids, tokens)
    if pos is not None:
        with timer("positional"):
            report["positional"], plots["pos_cos"], plots["pos_ratio"], plots["pos_path"] = \
                section_positional(pos, first=pos_range[0], backend=backend)
            # positions count from the first token's; its position id is the model's own
            report["positional"]["first_position"] = pos_range[0]
            report["positional"]["first_position_id"] = mats["first_position"]
            plots["pos_offset"] = report["positional"]["offset_profile"]
            plots["pos_first"] = pos_range[0]
        with timer("token_position"):
            report["token_position"] = section_token_position(words, pos, ids, tokens, first=pos_range[0],
                                                              backend=backend)
    else:
        report["positional"] = {"absent": mats["absent"]["position"]}
        report["token_position"] = {"absent": mats["absent"]["position"]}
    if tt is not None:
        with timer("token_type"):
            report["token_type"] = section_token_type(tt, words, pos, backend=backend)
    else:
        report["token_type"] = {"absent": mats["absent"]["token_type"]}
    with timer("pca"):
        plots["word_ratio"], _ = principal_components(words)
        report["pca"] = {"word": pca_summary(plots["word_ratio"])}
        if pos is not None:
            report["pca"]["position"] = pca_summary(plots["pos_ratio"])
    with timer("neighbors"):
        report["neighbors"] = section_neighbors(words, ids, tokens, res.row_topk)
    if pos is not None:
        with timer("position_geometry"):
            report["position_geometry"], plots["position_geometry"] = position_geometry.section(
                word, words, pos_full, pos_range, tokenizer)
        if projections:
            with timer("projections", own_bars=True):
                report["projections"], plots["projections"] = position_geometry.projections(
                    words, ids, tokens, pos, pos_range, seed=seed, progress=timer.progress or False,
                    layouts=layouts)
    return report, plots
