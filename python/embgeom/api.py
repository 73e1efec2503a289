"""Public functions: validate at the edge, dispatch to a backend, return a result object."""
from __future__ import annotations

import math
import time
from typing import Any, Iterable

import numpy as np
import torch

from . import validation
from .backends import registry
from .engine.checkpoint import fingerprint
from .engine.config import DEFAULTS as _D
from .engine import limits
from .engine.config import make_config, options_doc
from .engine.runner import run_engine
from .io import check_output_path
from .progress import as_progress
from .api_types import Count, Interval, PathArg, ProgressArg, Scalar
from .results import AttentionEntropy, ConeIndex, PairwiseStats


def pairwise_stats(x, y=None, *, metric: str = _D.metric, bins: Count = _D.bins,
                   range: Interval | None = None, topk: Count = _D.topk,
                   bottomk: Count = _D.bottomk, near: Scalar | None = _D.near, near_k: Count = _D.near_k,
                   row_topk: Count = _D.row_topk, row_bottomk: Count = _D.row_bottomk,
                   outside: Interval | None = _D.outside, outside_limit: Count = _D.outside_limit,
                   precision: str = _D.precision, backend: str | None = None,
                   checkpoint: PathArg | None = None, progress: ProgressArg = False,
                   block: Count = _D.block) -> PairwiseStats:
    """Statistics over all pairs, tile by tile (docs/metrics.md, all-pairs statistics); the N x N matrix is never built.

    x: (N, D) float; y: (M, D) float or None. Self mode (y None) covers the pairs i < j; cross
    mode every (i, j). N = 0 (or M = 0) is a run over no pairs: count 0, moments and extremes
    NaN / None, empty lists. Every output is optional (bins=0, topk=0, ... switch it off).
    Options (docs/metrics.md defines each value, list order and tie rule):

{options}

    A row list's k above what a row can have (N - 1 in self mode, M in cross mode) is lowered
    to it, with a note in the result's `notes` (where N > 0). backend: 'cpp', 'torch',
    'triton', 'cuda' or 'reference' (the float64 implementation); default None: EMBGEOM_BACKEND where it is set,
    else the first usable for x's device; 'auto': that first usable one, whatever the
    environment says (`python -m embgeom.info` lists them). checkpoint=PATH
    saves finished tiles so that an interrupted run resumes (same inputs and options).
    progress: True (or a progress.Progress) shows a bar of tiles on stderr (plain lines where
    stderr is no terminal and no notebook with ipywidgets: progress.as_progress).
    Returns PairwiseStats (tensors on x's device).
    """
    checkpoint = validation.optional_path(checkpoint, "checkpoint")
    if checkpoint:  # (as the CLI's --checkpoint: before the lock file or any work)
        check_output_path(checkpoint, "checkpoint", beside=(".lock",))
    progress = as_progress(progress, "embgeom.pairwise_stats")  # (checked before the engine and the fingerprint)
    x, y = validation.pair_of_embeddings(x, y)
    cfg = make_config(metric=metric, bins=bins, range=range, topk=topk, bottomk=bottomk, near=near,
                      near_k=near_k, row_topk=row_topk, row_bottomk=row_bottomk, outside=outside,
                      outside_limit=outside_limit, precision=precision, block=block)
    validation.product_range(x, y, cfg.metric)
    m = None if y is None else y.shape[0]
    # the checkpoint's identity holds what was asked: the lowering follows from it and the
    # shapes, and a lowered list length named in a refusal is one the user never gave
    asked = cfg
    cfg, notes = limits.fit_to_input(cfg, x.shape[0], m)
    limits.check_memory(cfg, x.shape[0], m, x.shape[1])
    precision = cfg.precision
    name, make_engine = registry.pick("pairwise_stats", x, backend, precision=precision)
    start = time.perf_counter()
    engine = make_engine(x, y, cfg)
    fp = fingerprint(x, y, asked, name, engine.num_tiles(),
                     registry.numerics(name, x.device, precision)) if checkpoint else None
    state = run_engine(engine, fp=fp, checkpoint=checkpoint, progress=progress)
    result = state.finalize(cfg, d=x.shape[1], backend=name, device=x.device,
                            seconds=time.perf_counter() - start)
    result.notes = notes + _fast_ran_exact(name, precision)
    return result


if pairwise_stats.__doc__:  # (the options' lines from their one source; python -OO drops docstrings)
    pairwise_stats.__doc__ = pairwise_stats.__doc__.replace("{options}", options_doc("    "))


def _fast_ran_exact(backend: str, precision: str) -> list[str]:
    """The note of a precision="fast" run that the C++ core ran on its exact float32 product (no
    bf16 product faster than it at this vector level: EMBGEOM_CPU's cap, an EMBGEOM_GEMM it cannot
    honour there, or the CPU): the result had said 'fast' with error bound 0 and no word why."""
    core = registry.cpp() if backend == "cpp" and precision == "fast" else None
    product = core.fast_product() if core is not None and hasattr(core, "fast_product") else None
    if product is None or product["bf16"]:
        return []
    return [f"precision='fast' ran the exact product {product['kernel']} at vector level "
            f"{core.cpu_info()['isa']} ({product['why_exact']}); its values are exact-mode's"]


def cone_index(x, mask=None, *, backend: str | None = None) -> ConeIndex:
    """Cone index I = || sum_i x_i/||x_i|| || per set (docs/metrics.md, cone index), zero rows excluded.

    x: (B, T, D) with mask (B, T) bool -> results of shape (B,); (N, D) -> shape (1,);
    a tuple/list of L+1 hidden states (B, T, D) -> shape (L+1, B).
    """
    if isinstance(x, (tuple, list)):
        if not x:
            raise ValueError("x: expected a non-empty tuple of (B, T, D) hidden states")
        if not all(isinstance(h, (torch.Tensor, np.ndarray)) for h in x):
            raise TypeError("x: a tuple or list is read as L+1 hidden states, each a (B, T, D) tensor or array; "
                            f"got one of {', '.join(sorted({type(h).__name__ for h in x}))} (nested lists of numbers: "
                            "pass numpy.asarray(x))")
        shapes = [tuple(h.shape[:-1]) for h in x]
        if len(set(shapes)) > 1:
            k = next(i for i, s in enumerate(shapes) if s != shapes[0])
            raise ValueError(f"x: every hidden state needs the same (B, T): state 0 has {shapes[0]}, state {k} {shapes[k]}")
        parts = [cone_index(h, mask, backend=backend) for h in x]
        return ConeIndex(*(torch.stack([getattr(p, f) for p in parts])
                           for f in ("index", "normalized", "n", "zero_rows")), backend=parts[0].backend)
    x, mask = validation.sequences(x, mask)
    x = x.detach()  # statistics, not a graph: every backend's results alike
    name, run = registry.pick("cone_index", x, backend)
    sums, used, zero = run(x, mask)
    return _cone_result(sums, used, zero, name, x.device)


def _cone_result(sums, used, zero, name, device) -> ConeIndex:
    # ||sum of n unit rows|| <= n; the rows' float64 rounding gave n identical rows 1 + 2^-51
    used = used.to(device)
    index = torch.minimum(torch.linalg.vector_norm(sums.double(), dim=-1).to(device), used.double())
    normalized = torch.where(used > 0, index / used.clamp(min=1), torch.full_like(index, math.nan))
    return ConeIndex(index, normalized, used, zero.to(device), name)


class ConeAccumulator:
    """Streaming cone index of one huge set: `update(chunk)` as often as needed, then
    `result()`. Memory stays O(D) whatever the number of vectors."""

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self.sums: torch.Tensor | None = None
        self.used = 0
        self.zero = 0
        self._name = None

    def update(self, chunk, mask=None) -> None:
        """Add the rows of chunk: (N_i, D), or (B, T, D) hidden states whose every (b, t) row
        joins the one set, with mask (B, T) (True = a real token) leaving padding out. Zero rows
        are counted apart (zero_rows), as cone_index counts them."""
        x, mask = validation.sequences(chunk, mask, name="chunk")
        x = x.detach()
        if self.sums is not None and x.shape[-1] != self.sums.shape[-1]:
            raise ValueError(f"chunk: expected D = {self.sums.shape[-1]}, got {x.shape[-1]}")
        self._name, run = registry.pick("cone_index", x, self.backend)
        sums, used, zero = run(x.reshape(1, -1, x.shape[-1]), None if mask is None else mask.reshape(1, -1))
        self.sums = sums[0].to(x.device) if self.sums is None else self.sums + sums[0].to(self.sums.device)
        self.used += int(used.sum())
        self.zero += int(zero.sum())

    def result(self) -> ConeIndex:
        """The cone index of every row added so far (one set: index, normalized, n, zero_rows of
        shape (1,)); a ValueError before any update (the rows' D is not known)."""
        if self.sums is None:
            raise ValueError("ConeAccumulator.result: no chunk was added (call update(chunk) first)")
        dev = self.sums.device
        return _cone_result(self.sums[None], torch.tensor([self.used], device=dev),
                            torch.tensor([self.zero], device=dev), self._name, dev)


def cone_index_stream(chunks: Iterable[Any], *, backend: str | None = None) -> ConeIndex:
    """Cone index of the union of all chunks ((N_i, D) each, or (B, T, D) with every row
    counted: ConeAccumulator.update takes a mask), streaming; a ValueError for no chunk."""
    if not hasattr(chunks, "__iter__"):
        raise TypeError(f"chunks: expected an iterable of (N_i, D) matrices, got {type(chunks).__name__}")
    acc = ConeAccumulator(backend)
    for c in chunks:
        acc.update(c)
    if acc.sums is None:
        raise ValueError("chunks: no chunk (an empty iterable): the rows' D is not known; pass at "
                         "least one (N_i, D) chunk, which may have no rows")
    return acc.result()


def attention_entropy(attn, mask=None, *, smoothing: Scalar = 0.0,
                      backend: str | None = None) -> AttentionEntropy:
    """Row entropy H = -sum_j p_ij ln p_ij (nats) of attention probabilities (docs/metrics.md, attention rows).

    attn: (B, H, T, T) rows = queries, padded keys zero; mask: (B, T) bool. Padded query rows are
    NaN in `row_entropy` and left out of `mean` (H,). `smoothing` e mixes in the uniform
    distribution: p' = (1 - e) p + e / n_valid (Clark et al., arXiv 1906.04341).
    """
    smoothing = validation.finite_float(smoothing, "smoothing")  # options before reading values
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing: expected a value in [0, 1], got {smoothing}")
    attn, mask = validation.attention(attn, mask)
    attn = attn.detach()
    name, run = registry.pick("attention_entropy", attn, backend)
    ent = run(attn, mask, smoothing).to(attn.device) + 0.0  # (+ 0: a one-key row's -0.0 as 0.0)
    B, H, T, _ = attn.shape
    valid = ~torch.isnan(ent)
    n_rows = valid[:, 0, :].sum() if H else torch.tensor(0)
    count = valid.sum(dim=(0, 2))
    mean = torch.where(valid, ent, torch.zeros_like(ent)).double().sum(dim=(0, 2)) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, torch.full_like(mean, math.nan))  # a head with no valid row: none
    lengths = mask.sum(1).double() if mask is not None else torch.full((B,), float(T), dtype=torch.float64, device=attn.device)
    return AttentionEntropy(ent, mean, torch.log(lengths), int(n_rows), smoothing, name)
