"""Every numeric rule of the all-pairs engine, once (docs/metrics.md says why each is so).

The C++ core has the same rules in `csrc/numerics.h`; the Triton kernels receive them as
constants from the backends. `tests/test_numerics.py` checks the copies agree.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Euclidean distance: |a|^2 + |b|^2 - 2 a.b cancels for near-identical rows. Where the squared
# distance from that formula is below NEAR_DUPLICATE_TAU * (|a|^2 + |b|^2) the distance is
# recomputed directly as sqrt(sum (a_k - b_k)^2), the differences of the fp32 rows summed in
# float64 and the result rounded to fp32 (csrc/numerics.h: kNearDuplicateTau).
NEAR_DUPLICATE_TAU = 1.0 / 64



def spread_rows(n: int, count: int, device=None) -> torch.Tensor:
    """`min(count, n)` distinct row indices spread evenly over [0, n), first and last included:
    round(q (n - 1) / (count - 1)) in integer arithmetic, int64. torch.linspace in its default
    float32 had rounded n - 1 up to n from n = 16,777,220 on (a sample one past the last row)."""
    count = min(int(count), int(n))
    if count <= 1:
        return torch.zeros(count, dtype=torch.int64, device=device)
    q = torch.arange(count, dtype=torch.int64, device=device)
    return (2 * q * (n - 1) + (count - 1)) // (2 * (count - 1))


def correct_sqrt(t: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a float32 or float64 tensor, as C++'s std::sqrt and
    numpy's give it: torch's CPU kernels (2.13) are one ulp off for about 1 % of values (sqrt(2.0)
    in float64 gives 1.414213562373095, sqrt(267.0) in float32 16.340134), so two paths to one
    value disagreed. GPU tensors (IEEE square roots) and other types: torch's own."""
    if t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu":
        return torch.from_numpy(np.sqrt(t.detach().contiguous().numpy()))
    return t.sqrt()


def direct_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of row pairs (a[q], b[q]) from their difference, summed in float64,
    rounded to a's float type: the near-duplicate rule above."""
    diff = a.double() - b.double()
    return correct_sqrt((diff * diff).sum(-1)).to(a.dtype)


FP32_UNIT_ROUNDOFF = 2.0 ** -24
# unit roundoff of the products' inputs per `fast` input type (tf32 may truncate: 2^-10)
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "tf32": 2.0 ** -10}

# Ranked lists (docs/metrics.md, ranked lists): the primary key, ascending; ties by (i, j).
LIST_KINDS = ("top", "bottom", "near", "outside_pairs")


def unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows divided by their L2 norm, in x's float type; zero rows stay zero.

    Returns (unit, valid) with valid = norm > 0. Every engine normalises with this rule (fp32
    rows in, fp32 rows out for exact mode; the reference passes float64).
    """
    # float64 like the C++ core: an fp32 norm overflows from |x| ~ 1.8e19 (every row would
    # become 0) and underflows below ~1e-19 (a nonzero row would count as a zero row)
    wide = x.to(torch.float64)
    norms = torch.linalg.vector_norm(wide, dim=-1)
    valid = norms > 0
    unit = (wide / torch.where(valid, norms, torch.ones_like(norms)).unsqueeze(-1)).to(x.dtype)
    return unit, valid


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """All-pairs cosines of a small set of rows (n, D) -> (n, n) float64, clamped to [-1, 1] (an
    identical pair's rounded unit rows give 1 + 2^-52 unclamped); a zero row has no direction:
    its row and column are NaN (null in report.json; means over them leave it out)."""
    u, valid = unit_rows(x.to(torch.float64))
    cos = u @ u.T
    # one value per pair, mirrored: a BLAS kernel need not sum (i, j) and (j, i) alike (OpenBLAS's
    # dgemm on a Zen 3 did not)
    cos = (torch.triu(cos) + torch.triu(cos, 1).T).clamp_(-1.0, 1.0)
    cos[~valid] = math.nan
    cos[:, ~valid] = math.nan
    return cos


def order_key(kind: str, v: torch.Tensor, near: float | None = None) -> torch.Tensor:
    """Primary sort key (ascending) of a ranked-list kind; ties then go by (i, j) ascending."""
    if kind == "top":
        return -v
    if kind == "bottom":
        return v
    if kind == "near":
        return (v - near).abs()
    if kind == "outside_pairs":
        return torch.zeros_like(v)  # (i, j) order only
    raise ValueError(f"kind: expected one of {', '.join(LIST_KINDS)}, got {kind!r}")


def bin_scale(lo: float, hi: float, bins: int) -> float:
    """Bins per unit value: the one factor every engine multiplies by (float64)."""
    return bins / (hi - lo)


def bin_index(v, lo: float, hi: float, bins: int):
    """Histogram slot of each value: 0 = underflow (v < lo), 1..bins = bin b - 1,
    bins + 1 = overflow (v > hi). Bin b = floor((v - lo) * bins / (hi - lo)) in float64, and
    v = hi (or a value whose product rounds up to bins) falls in the last bin.
    Works on float64 numpy arrays and torch tensors."""
    scale = bin_scale(lo, hi, bins)
    if isinstance(v, torch.Tensor):
        v = v.double()
        pos = torch.floor((v - lo) * scale).clamp(max=bins - 1)
        slot = torch.where(v < lo, torch.full_like(pos, -1), pos)
        return torch.where(v > hi, torch.full_like(pos, bins), slot).long() + 1
    v = np.asarray(v, np.float64)
    pos = np.minimum(np.floor((v - lo) * scale), bins - 1)
    slot = np.where(v < lo, -1, pos)
    return np.where(v > hi, bins, slot).astype(np.int64) + 1


def fast_error_bound(*, d: int, metric: str, x_full: float, x_rounded: float, x_delta: float,
                     y_full: float, y_rounded: float, y_delta: float) -> float:
    """Sound bound on |fast value - exact fp32 value| for any pair, from the actual rounding.

    x_full / x_rounded / x_delta: the largest L2 norm over the rows of x of the fp32 row, of its
    rounded (bf16/fp16/tf32) copy, and of their difference; the same for y. For a~ = a + da:
    a~.b~ - a.b = a~.(b~ - b) + (a~ - a).b, so by Cauchy-Schwarz
    |err| <= |a~||db| + |da||b| + 2 gamma_d |a~||b~| (fp32 accumulation on both sides).
    Euclidean: |sqrt(s) - sqrt(t)| <= sqrt(|s - t|), plus the fp32 rounding of the squared
    distance formula on both sides. The same formula is in csrc/numerics.h.
    """
    e32 = FP32_UNIT_ROUNDOFF
    gam = (d + 2) * e32 / (1.0 - (d + 2) * e32)
    edot = (x_rounded * y_delta + x_delta * y_full
            + 2 * gam * max(x_rounded, x_full) * max(y_rounded, y_full)) * 1.01 + 1e-30
    if metric == "euclidean":
        ed2 = 2 * edot + 8 * e32 * (x_full * x_full + y_full * y_full)
        return math.sqrt(ed2) * 1.01
    return edot


def saturated(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t with values past `dtype`'s largest finite one set to it, before a cast to that dtype (a
    product's bf16 / fp16 inputs; csrc to_bf16 saturates alike): the rounding error stays finite,
    inside fast_error_bound and the index's margin, where an inf input had made inf * 0 = NaN
    products that no filter passes (pairs lost)."""
    big = float(torch.finfo(dtype).max)
    if t.dtype.is_floating_point and big >= float(torch.finfo(t.dtype).max):
        return t  # (nothing of t can pass it: no copy, e.g. the Triton engine's exact-mode rows)
    return t.clamp(-big, big)


def rounding_norms(rows: torch.Tensor, rounded: torch.Tensor) -> tuple[float, float, float]:
    """(max |row|, max |rounded row|, max |rounded - row|) over the rows, in float64."""
    if rows.shape[0] == 0:
        return 0.0, 0.0, 0.0
    r64, q64 = rows.double(), rounded.double()
    return (float(torch.linalg.vector_norm(r64, dim=1).max()),
            float(torch.linalg.vector_norm(q64, dim=1).max()),
            float(torch.linalg.vector_norm(q64 - r64, dim=1).max()))


MOMENT_SAMPLE_ROWS = 64  # the rows (and columns) whose pairs give the moment shift


def moment_shift(x: torch.Tensor, y: torch.Tensor | None, metric: str, sample: int = MOMENT_SAMPLE_ROWS) -> float:
    """A value near the mean of all pair values, from the pairs of the first `sample` rows
    (and columns): engines sum (v - shift) and (v - shift)^2 so the variance does not cancel
    when std << |mean| (the dot metric on anisotropic embeddings; cosines of near-collinear
    rows, all near 1). Any value is correct; a near one keeps the sums small. It is rounded
    to 8 significant bits so that v - shift stays exact for fp32 values of similar size (the
    sums of exactly representable inputs then do not depend on the order of the tiles).
    x, y: the rows as given, or the unit rows for cosine (normalised here either way)."""
    if x.shape[0] == 0:
        return 0.0
    a = x[:sample].double()
    b = a if y is None else y[:sample].double()
    if b.shape[0] == 0:
        return 0.0
    if metric == "cosine":  # (a zero row stays zero: its cosines count as 0 here)
        a, b = (r / torch.linalg.vector_norm(r, dim=1, keepdim=True).clamp(min=1e-300) for r in (a, b))
    v = a @ b.T
    if metric == "euclidean":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]
        v = (sq - 2 * v).clamp(min=0).sqrt()
    mantissa, exponent = math.frexp(float(v.mean()))
    return math.ldexp(round(mantissa * 256) / 256, exponent)


def f32_up(v: float) -> float:
    """Smallest fp32 >= v (for fp32 x: x < v <=> x < f32_up(v))."""
    t = np.float32(v)
    if float(t) < v:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


def f32_down(v: float) -> float:
    """Largest fp32 <= v (for fp32 x: x > v <=> x > f32_down(v))."""
    t = np.float32(v)
    if float(t) > v:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


# The JS term's series F(x) / x^2 = sum_k x^(2k-2) / (k (2k - 1)), highest power first, to k = 6 for
# float32 (the C++ core's kJsSeries: the next term is below 1e-9 of the sum where x^2 < 1/16) and to
# k = 14 for float64 (below 1e-18)
def _js_series(terms: int) -> list[float]:
    return [1.0 / (k * (2 * k - 1)) for k in range(terms, 0, -1)]


def js_terms(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1/2 [p ln(2p/s) + q ln(2q/s)] elementwise (p, q >= 0, broadcast; in their dtype), s = p + q,
    the Jensen-Shannon divergence's terms (nats), as (s / 4) F(x), x = (p - q) / s,
    F(x) = (1 + x) ln(1 + x) + (1 - x) ln(1 - x) >= 0: its series where x^2 < 1/16, the logarithms
    beyond (F >= 0.063 there, so their rounding is a few ulps of it); 0 where s is below the
    smallest normal number. Every term is >= 0: sums of them do not cancel, however similar p
    and q are."""
    s = p + q
    x = (p - q) / s
    y = x * x
    series = _js_series(14 if y.dtype == torch.float64 else 6)
    f = torch.full_like(y, series[0])
    for c in series[1:]:
        f = f * y + c
    logs = 0.5 * (torch.special.xlogy(p, 2 * p / s) + torch.special.xlogy(q, 2 * q / s))
    term = torch.where(y < 0.0625, 0.25 * s * (y * f), logs)
    # no term below the dtype's smallest normal number, where 1 / s would overflow (0 within it)
    return torch.where(s >= torch.finfo(s.dtype).tiny, term, torch.zeros_like(term))
