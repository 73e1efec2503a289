"""Gaussianity of hidden states by depth (docs/metrics.md, attention heads; our measurable reading of the
geometry-of-BERT paper's data-distribution analysis, arXiv 2502.12033).

Per depth 0..L (0 = embedding output) and per real token ([CLS]/[SEP] included): the
D'Agostino-Pearson K^2 test (`scipy.stats.normaltest`) of its D hidden-state components, with
`scipy.stats.skew` and `scipy.stats.kurtosis` (their defaults: biased, Fisher/excess). A token
rejects normality at p < 0.05 / N, N = the number of real tokens in the corpus (Bonferroni), so
the threshold is known only at the end: the accumulator keeps one p-value per token and depth
(8 bytes each) and running sums of skew and kurtosis; no token matrix is kept. The same three
numbers for each text's mean vector over its real tokens, at p < 0.05 / (number of texts).
"""
from __future__ import annotations

import time

import torch

ALPHA = 0.05


def _stats(x):
    """x (N, D) float64 numpy -> (p-values, skew, excess kurtosis), each (N,)."""
    from scipy import stats

    return (stats.normaltest(x, axis=1).pvalue, stats.skew(x, axis=1), stats.kurtosis(x, axis=1))


class GaussianityAccumulator:
    def __init__(self, depths: int, hidden: int):
        if hidden < 20:
            raise ValueError(f"gaussianity: the K^2 test needs >= 20 components per vector, the model "
                             f"has hidden size {hidden}")
        try:
            import scipy.stats  # noqa: F401
        except ImportError:
            raise ValueError("gaussianity: scipy is not installed; `pip install scipy`") from None
        self.depths = depths
        self.p = {"token": [[] for _ in range(depths)], "text_mean": [[] for _ in range(depths)]}
        self.sums = {kind: {"skew": [0.0] * depths, "kurtosis": [0.0] * depths}
                     for kind in ("token", "text_mean")}
        self.seconds: dict[str, float] = {}

    def update(self, b) -> None:
        t0 = time.perf_counter()
        mask = b.mask
        m = mask[..., None].double()
        n = mask.sum(1, keepdim=True).clamp(min=1).double()
        for l, h in enumerate(b.hidden_states):
            hd = h.double()
            groups = {"token": hd[mask], "text_mean": (hd * m).sum(1) / n}
            for kind, x in groups.items():
                p, sk, ku = _stats(x.cpu().numpy())
                self.p[kind][l].append(torch.from_numpy(p))
                self.sums[kind]["skew"][l] += float(sk.sum())
                self.sums[kind]["kurtosis"][l] += float(ku.sum())
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
                        "mean_skew": self.sums[kind]["skew"][l] / max(N, 1),
                        "mean_excess_kurtosis": self.sums[kind]["kurtosis"][l] / max(N, 1),
                        "threshold": thr, "count": N}
                if kind == "token":
                    entry.update(vals)
                else:
                    entry["text_mean"] = vals
            out.append(entry)
        return out
