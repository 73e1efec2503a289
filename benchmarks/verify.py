"""Checks of an all-pairs result that need no N x N matrix (a 1M-row run has 5.5e11 pairs):
a float64 recheck of the reported top/bottom pairs, of a random sample of rows' lists against
those rows' exact values over every column, and the counts (histogram total = count =
unique valid pairs). Used by benchmarks/bench_gpu.py (and so benchmarks/gpu_check.sh) and
benchmarks/compare.py; definitions in docs/metrics.md. The sampled rows' lists are checked
complete (each rank's value against the row's exact ones); the global top/bottom lists only for
their values and order: that no unlisted pair beats them needs every pair (the tests check it on
small inputs against float64 brute force).
"""
from __future__ import annotations

import torch

from embgeom.numerics import unit_rows


def _values(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """float64 values of rows a against rows b (already unit for cosine): (len(a), len(b))."""
    if metric == "euclidean":
        return torch.cdist(a, b)
    v = a @ b.T
    return v.clamp(-1.0, 1.0) if metric == "cosine" else v


def recheck(result, x: torch.Tensor, *, tol: float, sample_rows: int = 32, seed: int = 0,
            chunk: int = 1 << 16) -> dict:
    """result: PairwiseStats of x (N, D) in self mode; tol: allowed |value error| (the
    precision's bound). Returns {"ok": bool, "failures": [str], "checked": {...}}.

    - count == N_valid (N_valid - 1) / 2 and the histogram (under/overflow included) sums to it;
    - each reported top/bottom pair: float64 value within tol, the list ordered;
    - `sample_rows` random rows: their row top-k lists against the rows' float64 values over all
      columns (chunked: O(sample_rows x N) memory): each listed value within tol of the exact
      value at the same rank, and of the listed pair's own exact value.
    """
    metric = result.metric
    fails: list[str] = []
    x64 = x.double()
    valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if metric == "cosine":
        x64, valid = unit_rows(x64)
    nv = int(valid.sum())
    want = nv * (nv - 1) // 2
    checked = {"pairs": want}
    if result.count != want:
        fails.append(f"count {result.count} != N_valid (N_valid - 1) / 2 = {want}")
    if result.hist is not None:
        total = int(result.hist.counts.sum()) + int(result.hist.underflow) + int(result.hist.overflow)
        checked["hist_total"] = total
        if total != want:
            fails.append(f"histogram total {total} != {want}")

    for name, largest in (("top_pairs", True), ("bottom_pairs", False)):
        lst = getattr(result, name)
        if lst is None or lst.values.numel() == 0:
            continue
        i, j = lst.i.to(x.device).long(), lst.j.to(x.device).long()
        exact = _values(x64[i], x64[j], metric).diagonal() if i.numel() else torch.zeros(0)
        err = (exact.cpu() - lst.values.double().cpu()).abs()
        checked[name] = int(i.numel())
        if bool((err > tol).any()):
            fails.append(f"{name}: max |value - float64| = {float(err.max()):.3g} > {tol:.3g}")
        v = lst.values.double().cpu()
        steps = v[:-1] - v[1:] if largest else v[1:] - v[:-1]
        if bool((steps < 0).any()):
            fails.append(f"{name}: not ordered")

    for name, largest in (("row_topk", True), ("row_bottomk", False)):
        rows = getattr(result, name)
        if rows is None:
            continue
        k = rows.indices.shape[1]
        g = torch.Generator().manual_seed(seed)
        cand = torch.nonzero(valid.cpu()).flatten()
        pick = cand[torch.randperm(cand.numel(), generator=g)[:sample_rows]].to(x.device)
        exact = torch.cat([_values(x64[pick], x64[c0:c0 + chunk], metric) for c0 in range(0, x.shape[0], chunk)], 1)
        exact[:, ~valid] = -float("inf") if largest else float("inf")
        exact[torch.arange(pick.numel(), device=x.device), pick] = -float("inf") if largest else float("inf")
        best = exact.topk(min(k, max(nv - 1, 0)), dim=1, largest=largest).values
        got_v = rows.values[pick.cpu()].double().to(x.device)[:, :best.shape[1]]
        got_i = rows.indices[pick.cpu()].to(x.device)[:, :best.shape[1]]
        own = exact.gather(1, got_i.clamp(min=0))
        e_rank = float((got_v - best).abs().max()) if best.numel() else 0.0
        e_own = float((got_v - own).abs().max()) if best.numel() else 0.0
        checked[name] = int(pick.numel())
        if e_rank > tol or e_own > tol or bool((got_i < 0).any()):
            fails.append(f"{name}: rank error {e_rank:.3g}, own-value error {e_own:.3g} (tol {tol:.3g})")
    return {"ok": not fails, "failures": fails, "checked": checked}
