"""The `cuda` backend: the Triton all-pairs engine with its per-row top-k merge done by the
CUDA kernel of embgeom._cuda (data-dependent insertion that Triton expresses poorly). Used only
when a GPU is usable and _cuda is built."""
from __future__ import annotations

import torch

from .registry import cuda_ext, load, register
from .triton import TritonEngine


class CudaEngine(TritonEngine):
    """TritonEngine whose per-row candidate merge runs in the CUDA kernel of embgeom._cuda."""

    name = "cuda"

    def _merge_rows(self, kind, i, j, v, largest):
        k = self.kinds_k[kind]
        order = torch.argsort(i, stable=True)
        i, j, v = i[order], j[order].contiguous(), v[order].float().contiguous()
        uniq, counts = torch.unique_consecutive(i, return_counts=True)
        starts = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=i.device)
        starts[1:] = torch.cumsum(counts, 0)
        uniq = uniq.contiguous()
        sv, si = self.rows[kind]
        cuda_ext().row_topk_merge(
            sv.data_ptr(), si.data_ptr(), self.n, k, uniq.data_ptr(), starts.data_ptr(),
            uniq.numel(), v.data_ptr(), j.data_ptr(), bool(largest),
            torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0)


def _cuda_pairwise_reasons(x, **_):
    if load("triton", "pip install triton") is None:
        return ["the cuda engine runs the Triton kernels too: pip install triton"]
    if not hasattr(cuda_ext(), "row_topk_merge"):
        return ["embgeom._cuda has no row_topk_merge (rebuild with nvcc)"]
    return []


register("cuda", "pairwise_stats", CudaEngine, _cuda_pairwise_reasons)
