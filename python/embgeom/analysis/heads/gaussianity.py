"""Gaussianity of hidden states by depth (docs/metrics.md, attention heads; our measurable reading of the
geometry-of-BERT paper's data-distribution analysis, arXiv 2502.12033).

Per depth 0..L (0 = embedding output) and per real token ([CLS]/[SEP] included): the
D'Agostino-Pearson K^2 test of its D hidden-state components, with skew and excess kurtosis
(the values of `scipy.stats.normaltest`, `skew` and `kurtosis` with their defaults, computed
here from one pass of moments, `_stats`; scipy is not needed). A token
rejects normality at p < 0.05 / N, N = the number of real tokens in the corpus (Bonferroni), so
the threshold is known only at the end: the accumulator keeps one p-value per token and depth
(8 bytes each) and running sums of skew and kurtosis; no token matrix is kept. The same three
numbers for each text's mean vector over its real tokens, at p < 0.05 / (number of texts).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ...engine.checkpoint import Resumable

ALPHA = 0.05


def _stats(x):
    """x (N, D) float64 numpy -> (p-values, skew, excess kurtosis), each (N,): scipy's
    normaltest, skew and kurtosis (defaults) from one pass of central moments. normaltest
    recomputes skew and kurtosis from the data for each of its two tests, four moment passes
    in all; here K^2 = Z_skew^2 + Z_kurtosis^2 comes from the same m2, m3, m4 by D'Agostino's
    skew test and Anscombe and Glynn's kurtosis test, as scipy writes them, and p = exp(-K^2 / 2)
    (chi-squared, 2 degrees of freedom). Rows with m2 = 0 get NaN, as in scipy."""
    mean = x.mean(axis=1)
    d = x - mean[:, None]
    d2 = d * d
    return _stats_from_moments(x.shape[1], mean, d2.mean(axis=1), (d2 * d).mean(axis=1), (d2 * d2).mean(axis=1))


def _stats_from_moments(n, mean, m2, m3, m4):
    """_stats from each row's length n, mean and central moments m2, m3, m4 ((N,) float64)."""
    n = float(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        flat = m2 <= (np.finfo(np.float64).eps * np.abs(mean)) ** 2
        g1 = np.where(flat, np.nan, m3 / m2 ** 1.5)
        b2 = np.where(flat, np.nan, m4 / (m2 * m2))
        # skew test (D'Agostino 1970)
        y = g1 * np.sqrt(((n + 1) * (n + 3)) / (6.0 * (n - 2)))
        beta2 = 3.0 * (n * n + 27 * n - 70) * (n + 1) * (n + 3) / ((n - 2.0) * (n + 5) * (n + 7) * (n + 9))
        w2 = -1 + np.sqrt(2 * (beta2 - 1))
        delta = 1 / np.sqrt(0.5 * np.log(w2))
        alpha = np.sqrt(2.0 / (w2 - 1))
        y = np.where(y == 0, 1, y)
        z_skew = delta * np.log(y / alpha + np.sqrt((y / alpha) ** 2 + 1))
        # kurtosis test (Anscombe and Glynn 1983)
        e = 3.0 * (n - 1) / (n + 1)
        varb2 = 24.0 * n * (n - 2) * (n - 3) / ((n + 1) * (n + 1.0) * (n + 3) * (n + 5))
        xk = (b2 - e) / np.sqrt(varb2)
        sqrtbeta1 = 6.0 * (n * n - 5 * n + 2) / ((n + 7) * (n + 9)) * np.sqrt((6.0 * (n + 3) * (n + 5)) / (n * (n - 2) * (n - 3)))
        a = 6.0 + 8.0 / sqrtbeta1 * (2.0 / sqrtbeta1 + np.sqrt(1 + 4.0 / (sqrtbeta1 ** 2)))
        term1 = 1 - 2 / (9.0 * a)
        denom = 1 + xk * np.sqrt(2 / (a - 4.0))
        term2 = np.sign(denom) * np.where(denom == 0.0, np.nan, ((1 - 2.0 / a) / np.abs(denom)) ** (1 / 3.0))
        z_kurt = (term1 - term2) / np.sqrt(2 / (9.0 * a))
        k2 = z_skew * z_skew + z_kurt * z_kurt
    return np.exp(-k2 / 2), g1, b2 - 3.0


class GaussianityAccumulator(Resumable):
    fixed = ("depths",)

    def __init__(self, depths: int, hidden: int):
        if hidden < 20:
            raise ValueError(f"gaussianity: the K^2 test needs >= 20 components per vector, the model "
                             f"has hidden size {hidden}")
        self.depths = depths
        self.p = {"token": [[] for _ in range(depths)], "text_mean": [[] for _ in range(depths)]}
        # flat: vectors whose components are all equal (no skew, kurtosis or test: left out of N)
        self.sums = {kind: {"skew": [0.0] * depths, "kurtosis": [0.0] * depths, "flat": [0] * depths}
                     for kind in ("token", "text_mean")}
        self.seconds: dict[str, float] = {}

    def restore_state(self, saved: dict) -> None:
        # a checkpoint written before the flat count (45c17d8) resumes: its flat states were
        # counted with NaN sums (those depths read NaN either way), and none are counted here
        sums = saved.get("sums")
        if isinstance(sums, dict):
            saved = {**saved, "sums": {kind: {"flat": [0] * len(v.get("skew", [])), **v}
                                       if isinstance(v, dict) and "flat" not in v else v
                                       for kind, v in sums.items()}}
        super().restore_state(saved)

    def update(self, b) -> None:
        t0 = time.perf_counter()
        mask = b.mask
        m = mask[..., None].to(b.hidden_states[0].dtype)
        n = mask.sum(1, keepdim=True).clamp(min=1).double()
        from ...backends import registry

        for l, h in enumerate(b.hidden_states):
            # each text's mean state: float64 sums of the real tokens' values (x * 1 or 0 is exact)
            groups = {"token": (h, mask), "text_mean": ((h * m).sum(1, dtype=torch.float64) / n, None)}
            for kind, (x, rows) in groups.items():
                moments = registry.cpp_kernel("row_moments", x) if rows is not None else None
                if moments is not None:  # the tokens' moments in C++ from the float32 states (no float64 copies)
                    mo = moments(x.detach().reshape(-1, x.shape[-1]).contiguous().numpy())[rows.reshape(-1).cpu().numpy()]
                    p, sk, ku = _stats_from_moments(x.shape[-1], *mo.T)
                else:
                    p, sk, ku = _stats((x.double()[rows] if rows is not None else x).cpu().numpy())
                tested = ~np.isnan(sk)  # (one flat vector had made the depth's means NaN)
                self.p[kind][l].append(torch.from_numpy(p[tested]))
                self.sums[kind]["skew"][l] += float(sk[tested].sum())
                self.sums[kind]["kurtosis"][l] += float(ku[tested].sum())
                self.sums[kind]["flat"][l] += int((~tested).sum())
        self.seconds["gaussianity"] = self.seconds.get("gaussianity", 0.0) + time.perf_counter() - t0

    def result(self) -> list[dict]:
        """[{depth, share_rejected, mean_skew, mean_excess_kurtosis, threshold, text_mean: {...}}]
        for depth 0..L."""
        out = []
        for l in range(self.depths):
            entry = {"depth": l}
            for kind in ("token", "text_mean"):
                p = torch.cat(self.p[kind][l]) if self.p[kind][l] else torch.zeros(0, dtype=torch.float64)
                N = p.numel()
                thr = ALPHA / max(N, 1)
                vals = {"share_rejected": float((p < thr).double().mean()) if N else float("nan"),
                        # (no tested state: NaN, not a symmetric, normal-tailed 0)
                        "mean_skew": self.sums[kind]["skew"][l] / N if N else float("nan"),
                        "mean_excess_kurtosis": self.sums[kind]["kurtosis"][l] / N if N else float("nan"),
                        "threshold": thr, "count": N, "flat": self.sums[kind]["flat"][l]}
                if kind == "token":
                    entry.update(vals)
                else:
                    entry["text_mean"] = vals
            out.append(entry)
        return out
