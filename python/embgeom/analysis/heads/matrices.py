"""The geometry-of-BERT authors' matrix analyses (docs/metrics.md, attention matrices; arXiv
2502.12033, as in the authors' released code): per (layer, head) the cone index of the attention
matrix's rows, its singular values below 1e-3, its von Neumann entropy and the distribution of
k90; from the weights alone, the rank, singular values and eigenvalue signs of W_Q,h W_K,h^T, its
skew fraction, and the largest singular value of each per-head projection beside histograms of
||q||, ||k||, ||v|| per token; the numerical ranks of the softmax attention matrix, V, the head
output and the layer output per text, and of W_V per head (the authors' numpy.linalg.matrix_rank
calls, numpy's default tolerance). Every matrix is a text's real-token block (padding excluded),
float64; per-batch sums, so memory does not grow with the corpus.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ...engine.checkpoint import Resumable
from .measures import k90, skew_fraction

SMALL_SINGULAR = 1e-3
K90_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# ||q||, ||k||, ||v||: 20 log-spaced bins per decade over [1e-3, 1e4], plus under/overflow
NORM_EDGES = torch.logspace(-3, 4, 141, dtype=torch.float64)
KINDS = ("q", "k", "v")


def numerical_rank(s: torch.Tensor, m: int, n: int, eps: float) -> torch.Tensor:
    """s (..., r): the singular values of m x n matrices, descending -> (...,) float64: how many
    exceed s_max * max(m, n) * eps, numpy.linalg.matrix_rank's default tolerance (eps: that of
    the dtype the matrix was computed in, float32 for a float32 model, as the authors' float32
    numpy arrays had; 0 for an all-zero matrix)."""
    if s.shape[-1] == 0:
        return s.new_zeros(s.shape[:-1])
    tol = s[..., :1] * (max(m, n) * eps)
    return (s > tol).sum(-1).double()


def projections(model) -> dict[str, list]:
    """The query, key and value nn.Linear modules of every layer (BERT-family names)."""
    out = {}
    for kind, name in zip(KINDS, ("query", "key", "value")):
        out[kind] = [m for n, m in model.named_modules()
                     if n.endswith(f"attention.self.{name}") and "crossattention" not in n]
    L = model.config.num_hidden_layers
    if any(len(v) != L for v in out.values()):
        raise ValueError("--matrices: no '*.attention.self.query/key/value' projections for every "
                         "layer; the weight analyses support BERT-family encoders")
    return out


_POOL: list[ThreadPoolExecutor] = []


def lapack_workers() -> int:
    """Python threads the per-block LAPACK calls are split across: torch's thread count, at most
    the CPUs."""
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads()))


@contextlib.contextmanager
def one_blas_thread():
    """numpy's BLAS held to one thread while the per-block LAPACK calls run in lapack_workers()
    Python threads: on blocks this small a threaded LAPACK call is slower than one thread per
    call (96 eigvals of 145 x 145 on 2 cores: 0.23 s split across two single-threaded calls,
    0.39 s for torch's batched call, 0.71 s split without the limit; `embgeom text --matrices`
    on 145-token texts: 14 s of matrix measures against 30 s). Without threadpoolctl the calls
    run one after the other."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield 1
        return
    with threadpool_limits(1, user_api="blas"):
        yield lapack_workers()


EPS64 = float(np.finfo(np.float64).eps)
# the width of the band around a threshold inside which a Gram eigenvalue does not decide a count
# (sv_counts): GRAM_SLACK * (m + n) * eps64 * trace of the Gram matrix
GRAM_SLACK = 4.0


def sv_counts(a: np.ndarray, eps: float | None, small: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """a (k, m, n) float64 -> (numerical rank (k,), with numpy's default tolerance
    s_max * max(m, n) * eps, zeros without eps; the number of singular values < small (k,),
    zeros without small), both int64, as counted on numpy.linalg.svd's singular values.

    The squared singular values are the eigenvalues of the smaller Gram matrix G = X X^T or X^T X
    (min(m, n) square), numpy.linalg.eigvalsh: for tall n x d_h blocks a 32 x 32 problem instead
    of an SVD of the block, for square ones a symmetric eigenproblem instead of an SVD (about
    two thirds of its cost on 128 x 128). Why a count is still numpy's: the computed Gram is
    G + E with |E_ij| <= gamma_k |x_i| |x_j| (k the inner dimension, gamma_k ~ k eps64), so
    ||E||_2 <= ||E||_F <= k eps64 ||X||_F^2; eigvalsh is backward stable (its eigenvalues are
    those of G + E + F, ||F||_2 <= p(r) eps64 ||G||_2, p modest); by Weyl every computed
    eigenvalue is within delta = (k + p(r)) eps64 ||X||_F^2 of sigma_i^2, and delta here is
    GRAM_SLACK * (m + n) * eps64 * trace(G) (trace(G) = ||X||_F^2), several times that bound
    (the SVD's own error on sigma^2, ~eps64 s_max^2, is far inside it). A count of sigma^2 against
    t^2 can therefore differ from the exact one only if some eigenvalue lies within delta of t^2
    (for the rank, t^2 = lambda_max (max(m, n) eps)^2 itself carries delta (max(m, n) eps)^2);
    every matrix with such an eigenvalue is counted again on numpy.linalg.svd's singular values.
    Relative to the threshold the band is small for the 1e-3 count (delta / 1e-6 <= 3e-5 on a
    128-token attention block) but not for the rank of a float32 matrix (t^2 / s_max^2 =
    (max(m, n) eps32)^2 ~ 2e-10, within a factor 1e6 of eps64): of the 2304 attention blocks of
    one 32 x 128-token batch of the default model 5 fell back to the SVD, of its 2304 head outputs
    and 192 layer outputs none; an all-zero matrix always does (rank 0)."""
    k, m, n = a.shape
    zeros = np.zeros(k, dtype=np.int64)
    if k == 0 or min(m, n) == 0:
        return zeros, zeros.copy()
    g = a @ a.transpose(0, 2, 1) if m <= n else a.transpose(0, 2, 1) @ a
    counted = _gram_counts(g, m + n, eps, max(m, n), small)
    if counted is not None:
        rank, count, unsure = counted
    else:
        lam = np.linalg.eigvalsh(g)                                        # ascending, ~sigma^2
        delta = (GRAM_SLACK * (m + n) * EPS64) * np.abs(lam).sum(-1, keepdims=True)
        unsure = np.zeros(k, dtype=bool)
        rank, count = zeros, zeros.copy()
        if eps is not None:
            c2 = (max(m, n) * eps) ** 2
            t2 = lam[:, -1:] * c2
            rank = (lam > t2).sum(-1)
            unsure |= (np.abs(lam - t2) <= delta * (1 + c2)).any(-1)
        if small is not None:
            count = (lam < small * small).sum(-1)
            unsure |= (np.abs(lam - small * small) <= delta).any(-1)
    if unsure.any():
        sv = np.linalg.svd(a[unsure], compute_uv=False)
        if eps is not None:
            rank[unsure] = (sv > sv[:, :1] * (max(m, n) * eps)).sum(-1)
        if small is not None:
            count[unsure] = (sv < small).sum(-1)
    return rank, count


def _gram_counts(g: np.ndarray, mn: int, eps: float | None, big: int, small: float | None):
    """sv_counts' counts on the C++ core's tridiagonal forms of the Gram matrices g (k, r, r)
    (sym_tridiagonal: Householder reduction in lockstep, 3-4x LAPACK's dsyevd on 128 x 128 ones),
    Sturm counts and the largest eigenvalue by bisection instead of every eigenvalue: (rank,
    count, unsure), the same rule as from eigvalsh's eigenvalues (sv_counts), with
    delta = GRAM_SLACK * mn * eps64 * trace(G) (mn = m + n: the tridiagonal form is the Gram
    matrix's up to the same backward error as eigvalsh's first step, and a Sturm count is exact for
    a matrix within a few ulps of each entry); lambda_max from above, within delta / 4, widens the
    rank's band by c2 delta / 4. An all-zero or non-finite matrix is unsure. None without the core."""
    from ...backends.registry import cpp_kernel

    tridiagonal, largest, count_below = (cpp_kernel(f) for f in ("sym_tridiagonal", "tridiag_largest",
                                                                  "tridiag_count_below"))
    if tridiagonal is None or largest is None or count_below is None:
        return None
    k, r = g.shape[0], g.shape[-1]
    d, e, ok = tridiagonal(np.ascontiguousarray(g), 1)
    trace = np.trace(g, axis1=1, axis2=2)
    delta = (GRAM_SLACK * mn * EPS64) * trace
    unsure = ~ok | ~np.isfinite(trace)
    rank, count = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    cuts = []
    if eps is not None:
        c2 = (big * eps) ** 2
        hi = largest(d, e, np.where(ok, delta / 4, 0.0))
        t2 = hi * c2
        band = delta * (1 + c2) + c2 * delta / 4
        cuts += [t2, t2 - band, t2 + band]
        unsure |= trace == 0  # (rank 0: every eigenvalue at the threshold)
    if small is not None:
        s2 = small * small
        cuts += [np.full(k, s2), s2 - delta, s2 + delta]
    below = count_below(d, e, np.stack(cuts, 1) if cuts else np.zeros((k, 0)))
    if eps is not None:
        rank = r - below[:, 0]
        unsure |= below[:, 1] != below[:, 2]
        below = below[:, 3:]
    if small is not None:
        count = below[:, 0]
        unsure |= below[:, 1] != below[:, 2]
    return rank, count, unsure


def eigenvalue_magnitudes(a: np.ndarray) -> np.ndarray:
    """|eigenvalues| (k, n) of square float64 blocks a (k, n, n), each row in no particular
    order: the C++ core's double-shift QR run in lockstep over the vector lanes' blocks
    (`eigvals_abs`: 8 with AVX-512, 4 with AVX2, 2 with SSE2 or NEON; one thread: the caller's
    lapack_map spreads the blocks over the cores; 4.1-4.5x faster than numpy.linalg.eigvals one
    block at a time for 16-128 tokens, docs/architecture.md), with
    numpy.linalg.eigvals (LAPACK dgeev) for any block it gives up on, or without the core; NaN for
    a block holding NaN or inf."""
    from ...backends.registry import cpp_kernel

    kernel = cpp_kernel("eigvals_abs")
    if a.shape[0] == 0:
        return np.zeros(a.shape[:2])
    if kernel is None:
        mags, ok = np.zeros(a.shape[:2]), np.zeros(a.shape[0], dtype=bool)
    else:
        mags, ok = kernel(np.ascontiguousarray(a, dtype=np.float64), 1)
    if not ok.all():
        # blocks holding NaN or inf get NaN (numpy refuses them); the rest LAPACK's
        finite = np.isfinite(a).all(axis=(1, 2))
        mags[~ok & ~finite] = np.nan
        redo = ~ok & finite
        if redo.any():
            mags[redo] = np.abs(np.linalg.eigvals(a[redo]))
    return mags


def block_spectra(a: np.ndarray, eps: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square float64 blocks a (k, n, n) -> (numerical rank (k,), #(singular values
    < SMALL_SINGULAR) (k,), eigenvalue magnitudes (k, n)): sv_counts and eigenvalue_magnitudes."""
    rank, small = sv_counts(a, eps, SMALL_SINGULAR)
    return rank, small, eigenvalue_magnitudes(a)


def lapack_map(fn, stacks: list[torch.Tensor], workers: int, pieces_per_worker: int = 4) -> list:
    """[fn(s) for s in stacks] as torch tensors (each s (..., m, n) float64 on the CPU, fn a numpy
    LAPACK call on a (k, m, n) array returning one array or a tuple of arrays of shape (k, ...)):
    every stack cut into up to workers * pieces_per_worker pieces, run in `workers` threads
    (numpy's LAPACK releases the GIL; several pieces a thread, so that a thread slowed by other
    load leaves its share to the other), the results put back together to s.shape[:-2] + (...)."""
    flat = [s.reshape(-1, *s.shape[-2:]).numpy() for s in stacks]
    cut = max(1, workers * pieces_per_worker) if workers > 1 else 1
    pieces = [(k, p) for k, f in enumerate(flat) for p in np.array_split(f, max(1, min(cut, f.shape[0])))]
    if workers > 1 and len(pieces) > 1:
        if not _POOL or _POOL[0]._max_workers < workers:
            _POOL[:] = [ThreadPoolExecutor(workers, thread_name_prefix="embgeom-lapack")]
        done = list(_POOL[0].map(lambda kp: fn(kp[1]), pieces))
    else:
        done = [fn(p) for _, p in pieces]
    out = []
    for k, s in enumerate(stacks):
        mine = [r for (kk, _), r in zip(pieces, done) if kk == k]
        lead = s.shape[:-2]
        if isinstance(mine[0], tuple):
            out.append(tuple(torch.from_numpy(np.concatenate(parts)).reshape(*lead, *parts[0].shape[1:])
                             for parts in zip(*mine)))
        else:
            out.append(torch.from_numpy(np.concatenate(mine)).reshape(*lead, *mine[0].shape[1:]))
    return out


def block_measures(a: torch.Tensor, eps: float | None = None, spec=None) -> dict[str, torch.Tensor]:
    """a: (k, H, n, n) float64 attention blocks (rows = queries, summing to 1) -> dict of (k, H):
    rows_cone = ||sum_i a_i / ||a_i|| || / n, small_singular = #(singular values < 1e-3),
    von_neumann = -sum v ln v with v = |lambda| / sqrt(sum |lambda|^2) over the eigenvalues;
    with eps, rank = numerical_rank of each block. spec: block_spectra(a, eps) (through
    lapack_map) when computed already."""
    n = a.shape[-1]
    nrm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    inv = torch.where(nrm > 0, 1 / nrm, torch.zeros_like(nrm))   # (a zero row adds nothing)
    # sum of the unit rows as (1 / |a_i|)^T a: no (k, H, n, n) copy of the rows divided
    # (clamped: I <= n, which the rounded unit rows of identical rows pass by an ulp)
    cone = (torch.linalg.vector_norm(inv.transpose(-1, -2) @ a, dim=-1)[..., 0] / n).clamp(max=1.0)
    if spec is None:
        spec = lapack_map(lambda x: block_spectra(x, eps), [a.detach().cpu().double()], 1)[0]
    rank, small, lam = (x.to(a.device) for x in spec)
    total = torch.sqrt((lam * lam).sum(-1, keepdim=True))
    v = lam / torch.where(total > 0, total, torch.ones_like(total))
    out = {"rows_cone": cone, "small_singular": small.double(), "von_neumann": -torch.special.xlogy(v, v).sum(-1)}
    if eps is not None:
        out["rank"] = rank.double()
    return out


def w_v_ranks(model) -> list[list[int]]:
    """[L][H]: the numerical rank of each head's W_V,h (rows h*d_h..(h+1)*d_h of the value
    nn.Linear weight, d_h x D), numpy's default tolerance with the eps of the weight's dtype."""
    H = model.config.num_attention_heads
    out = []
    for lin in projections(model)["v"]:
        w = lin.weight.detach()
        eps = torch.finfo(w.dtype).eps
        d = w.shape[0] // H
        blocks = w.double().cpu().view(H, d, -1)
        out.append([int(r) for r in numerical_rank(torch.linalg.svdvals(blocks), d, w.shape[1], eps)])
    return out


def weight_measures(model) -> dict:
    """From the weights alone, per layer and head (true per-head slices of the nn.Linear weights,
    rows h*d_h..(h+1)*d_h; biases not part of M): M = W_Q,h^T W_K,h (D x D, the bilinear form
    x M y^T of the scores; W_Q,h W_K,h^T in row-vector notation): numerical rank, its d_h largest
    singular values, the signs of its non-zero eigenvalues (those of the d_h x d_h W_K,h W_Q,h^T),
    skew fraction; the largest singular value of each of W_Q,h, W_K,h, W_V,h."""
    proj = projections(model)
    H = model.config.num_attention_heads
    eps = torch.finfo(torch.float64).eps
    rank, sv, pos, neg, cplx = [], [], [], [], []
    sigma = {k: [] for k in KINDS}
    for l in range(model.config.num_hidden_layers):
        w = {k: proj[k][l].weight.detach().double().cpu() for k in KINDS}
        d = w["q"].shape[0] // H
        row = {key: [] for key in ("rank", "sv", "pos", "neg", "cplx")}
        for k in KINDS:
            sigma[k].append([float(torch.linalg.svdvals(w[k][h * d:(h + 1) * d])[0]) for h in range(H)])
        for h in range(H):
            wq, wk = w["q"][h * d:(h + 1) * d], w["k"][h * d:(h + 1) * d]
            # M = Q1 R1 (Q2 R2)^T from the QR of W_Q,h^T and W_K,h^T (D x d_h): its non-zero
            # singular values are those of R1 R2^T (d_h x d_h), without a D x D decomposition
            r1 = torch.linalg.qr(wq.T, mode="r").R
            r2 = torch.linalg.qr(wk.T, mode="r").R
            s = torch.linalg.svdvals(r1 @ r2.T)
            tol = float(s[0]) * wq.shape[1] * eps
            row["rank"].append(int((s > tol).sum()))
            row["sv"].append(s[:d].tolist())
            lam = torch.linalg.eigvals(wk @ wq.T)
            real = lam.imag.abs() <= tol
            row["pos"].append(int((real & (lam.real > tol)).sum()))
            row["neg"].append(int((real & (lam.real < -tol)).sum()))
            row["cplx"].append(int((~real).sum()))
        rank.append(row["rank"])
        sv.append(row["sv"])
        pos.append(row["pos"])
        neg.append(row["neg"])
        cplx.append(row["cplx"])
    return {"rank": rank, "singular_values": sv,
            "eigenvalue_signs": {"positive": pos, "negative": neg, "complex": cplx},
            "skew_fraction": skew_fraction(model).tolist(), "sigma_max": sigma}


def per_head_counts(values: torch.Tensor, size: int) -> torch.Tensor:
    """values (H, N) int64 in [0, size) -> (H, size) counts (one bincount)."""
    H = values.shape[0]
    offset = torch.arange(H, device=values.device)[:, None] * size
    return torch.bincount((values + offset).flatten(), minlength=H * size).view(H, size)


class MatricesAccumulator(Resumable):
    """Observer of trace(): per-text measures of every head's real-token attention block, k90
    counts per (layer, head) and ||q||, ||k||, ||v|| histograms (with `capture()` active).
    spectra_texts: the per-text spectral measures (the block measures and the numerical ranks,
    the LAPACK work, a few ms a block) of the first that many texts only (None: every text);
    k90 and the norms cover every text."""

    not_saved = ("store",)   # the q/k/v of the batch in hand
    fixed = ("L", "H", "spectra_limit")
    count = "texts"

    def __init__(self, L: int, H: int, max_len: int, device, spectra_texts: int | None = None):
        z = lambda *s, dt=torch.float64: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.L, self.H = L, H
        if spectra_texts is not None and (isinstance(spectra_texts, bool) or spectra_texts < 1):
            raise ValueError(f"--matrices-texts: expected N >= 1, got {spectra_texts}")
        self.spectra_limit = spectra_texts
        self.spectra_texts = 0
        self.sums = {k: z(L, H) for k in ("rows_cone", "small_singular", "von_neumann")}
        # numerical ranks per text (summed): softmax block, V, head output (L, H); layer output (L,)
        self.ranks = {"softmax": z(L, H), "v": z(L, H), "head_output": z(L, H), "layer_output": z(L)}
        self.rank_eps: float | None = None
        self.v_seen = False
        self.real_tokens = 0
        self.texts = 0
        self.k90 = z(L, H, max_len + 1, dt=torch.int64)
        bins = NORM_EDGES.numel() + 1
        self.norm_hist = {k: z(L, H, bins, dt=torch.int64) for k in KINDS}
        self.norm_sum = {k: z(L, H) for k in KINDS}
        self.norm_min = {k: torch.full((L, H), float("inf"), dtype=torch.float64, device=device) for k in KINDS}
        self.norm_max = {k: z(L, H) for k in KINDS}
        self.tokens = 0
        self.store: dict = {}
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def capture(self, model):
        """Forward hooks on the query/key/value projections (biases included: the true q, k, v)."""
        proj = projections(model)
        handles = []
        for kind in KINDS:
            for l, m in enumerate(proj[kind]):
                def fn(_m, _inp, out, l=l, kind=kind):
                    self.store.setdefault(l, {})[kind] = out
                handles.append(m.register_forward_hook(fn))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def update(self, b) -> None:
        t0 = time.perf_counter()
        mask = b.mask
        B = mask.shape[0]
        positions = [mask[i].nonzero().flatten() for i in range(B)]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(positions):
            by_len.setdefault(int(p.numel()), []).append(i)
        # each group: a layer's blocks of the texts with n real tokens (k, H, n, n), model dtype
        groups = [(l, n, texts, attn[texts] if n == attn.shape[-1] else
                   torch.stack([attn[i][:, positions[i]][:, :, positions[i]] for i in texts]))
                  for l, attn in enumerate(b.attentions) for n, texts in by_len.items() if n]
        # refused before anything is counted: a caller that goes on holds the earlier batches' sums
        for l, _n, _texts, raw in groups:
            if not bool(torch.isfinite(raw).all()):  # (LAPACK's SVD would not converge)
                raise ValueError(f"--matrices: layer {l + 1}'s attention maps hold NaN or inf (the model's "
                                 "output); their spectra are not defined")
        self.texts += B
        if b.attentions:
            self.rank_eps = torch.finfo(b.attentions[0].dtype).eps
        eps = self.rank_eps
        # the texts of this batch whose spectra are taken (the first ones, up to the limit)
        room = B if self.spectra_limit is None else max(0, min(B, self.spectra_limit - self.spectra_texts))
        self.spectra_texts += room
        self.real_tokens += int(mask[:room].sum())  # (the texts the ranks are of)
        with one_blas_thread() as workers:
            # (the first `room` texts of a group: by_len lists each length's texts in batch order)
            picked = [[j for j, i in enumerate(g[2]) if i < room] for g in groups]
            blocks64 = [g[3][sel].double() for g, sel in zip(groups, picked)]
            specs = lapack_map(lambda x: block_spectra(x, eps), [x.cpu() for x in blocks64], workers) \
                if room else [None] * len(groups)
            for (l, _n, _texts, raw), blocks, spec in zip(groups, blocks64, specs):
                if blocks.shape[0]:
                    m = block_measures(blocks, eps, spec)
                    self.ranks["softmax"][l] += m.pop("rank").sum(0)
                    for key, v in m.items():
                        self.sums[key][l] += v.sum(0)
                k = k90(raw)                                                      # (k, H, n)
                self.k90[l] += per_head_counts(k.permute(1, 0, 2).reshape(self.H, -1), self.k90.shape[-1])
            self.seconds["matrices: attention blocks"] = self.seconds.get("matrices: attention blocks", 0.0) \
                + time.perf_counter() - t0
            t0 = time.perf_counter()
            if room:
                spectra_len = {n: [i for i in texts if i < room] for n, texts in by_len.items()}
                self._ranks(b, positions, {n: t for n, t in spectra_len.items() if t}, eps, workers)
        self.seconds["matrices: ranks"] = self.seconds.get("matrices: ranks", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.store:
            self.tokens += int(mask.sum())
            edges = NORM_EDGES.to(mask.device)
            for l in range(self.L):
                for kind in KINDS:
                    x = self.store[l][kind]                                       # (B, T, D)
                    nrm = torch.linalg.vector_norm(x.double().reshape(*x.shape[:2], self.H, -1), dim=-1)[mask]
                    slot = torch.bucketize(nrm, edges, right=True)                # (tokens, H)
                    self.norm_hist[kind][l] += per_head_counts(slot.T, edges.numel() + 1)
                    self.norm_sum[kind][l] += nrm.sum(0)
                    self.norm_min[kind][l] = torch.minimum(self.norm_min[kind][l], nrm.min(0).values)
                    self.norm_max[kind][l] = torch.maximum(self.norm_max[kind][l], nrm.max(0).values)
            self.store.clear()
        self.seconds["matrices: q/k/v norms"] = self.seconds.get("matrices: q/k/v norms", 0.0) \
            + time.perf_counter() - t0

    def _ranks(self, b, positions, by_len, eps, workers: int = 1) -> None:
        """Per text, the numerical ranks of its real-token blocks of V (n x d_h per head, the value
        projection's output with its bias), the head output (softmax V, n x d_h, before W_O) and
        the layer output (hidden_states[l + 1], n x D), summed over the batch's texts (sv_counts:
        numpy's SVD counts, from the Gram matrices)."""
        jobs = []  # (rank key, layer, rows, columns, stack of matrices (..., rows, columns))

        def rows(x, n, texts):
            """x (B, T, ...) -> the texts' real-token rows (k, n, ...): a slice when they fill T."""
            if n == x.shape[1]:
                return x[texts]
            return torch.stack([x[i][positions[i]] for i in texts])

        def f64(x):
            """float64 and contiguous in one copy (lapack_map would copy a permuted view again)."""
            return x.to(torch.float64, memory_format=torch.contiguous_format)

        for l in range(self.L):
            v_all = self.store.get(l, {}).get("v")
            for n, texts in by_len.items():
                if n == 0:
                    continue
                heads = rows(b.head_outputs[l], n, texts)                                  # (k, n, H, d_h)
                jobs.append(("head_output", l, n, heads.shape[-1], f64(heads.permute(0, 2, 1, 3))))
                out = f64(rows(b.hidden_states[l + 1], n, texts))
                jobs.append(("layer_output", l, n, out.shape[-1], out))
                if v_all is not None:
                    self.v_seen = True
                    v = rows(v_all, n, texts)
                    v = f64(v.view(len(texts), n, self.H, -1).permute(0, 2, 1, 3))           # (k, H, n, d_h)
                    jobs.append(("v", l, n, v.shape[-1], v))
        counts = lapack_map(lambda x: sv_counts(x, eps)[0], [j[4].cpu() for j in jobs], workers)
        for (key, l, *_), ranks in zip(jobs, counts):
            ranks = ranks.double()
            self.ranks[key][l] += (ranks.sum(0) if ranks.dim() else ranks).to(self.ranks[key].device)

    def k90_quantiles(self) -> torch.Tensor:
        """(L, H, 5): for q in K90_QUANTILES the smallest k with at least q of the corpus's real
        rows at k90 <= k (a lower quantile, exact from the counts)."""
        cum = self.k90.cumsum(-1).double()
        total = cum[..., -1:].clamp(min=1)
        qs = torch.tensor(K90_QUANTILES, dtype=torch.float64, device=cum.device)
        return (cum[..., None, :] < qs[:, None] * total[..., None]).sum(-1).double()

    def result(self, model) -> dict:
        t = max(self.spectra_texts, 1)
        tok = max(self.tokens, 1)
        out = {key: (v / t).tolist() for key, v in self.sums.items()}
        out.update({"texts": self.texts, "spectra_texts": self.spectra_texts,
                    "small_singular_threshold": SMALL_SINGULAR,
                    "k90_quantiles": {"q": list(K90_QUANTILES), "values": self.k90_quantiles().tolist()},
                    "weights": weight_measures(model)})
        out["ranks"] = {
            **{key: (v / t).tolist() if key != "v" or self.v_seen else None for key, v in self.ranks.items()},
            "w_v": w_v_ranks(model), "mean_tokens": self.real_tokens / t, "eps": self.rank_eps,
            "rule": "singular values > s_max * max(m, n) * eps (numpy.linalg.matrix_rank's default; "
                    "eps of the model's float dtype)"}
        if self.tokens:
            out["qkv_norms"] = {
                "edges": NORM_EDGES.tolist(), "tokens": self.tokens,
                **{kind: {"hist": self.norm_hist[kind].tolist(), "mean": (self.norm_sum[kind] / tok).tolist(),
                          "min": self.norm_min[kind].tolist(), "max": self.norm_max[kind].tolist(),
                          "sigma_max": out["weights"]["sigma_max"][kind]} for kind in KINDS}}
        return out
