"""The `cpp` backend: the C++/OpenMP core in embgeom._C, zero-copy from CPU tensors."""
from __future__ import annotations

import torch

from ..engine.config import PairwiseConfig
from ..engine.state import EngineState
from ..numerics import moment_shift
from .registry import cpp, register


def _f32(x: torch.Tensor):
    """Contiguous float32 numpy view (copies only when dtype or strides require it)."""
    return x.detach().resolve_neg().to(torch.float32).contiguous().numpy()


def _mask_u8(mask):
    return None if mask is None else mask.to(torch.uint8).contiguous().numpy()


def prepare_columns(y: torch.Tensor, metric: str, precision: str, threads: int = 0):
    """y's rows prepared once for cross-mode engines (CppEngine(..., columns=...))."""
    return cpp().prepare_columns(_f32(y), metric=metric, precision=precision, threads=threads)


def cone_unit_sums(x: torch.Tensor, mask: torch.Tensor | None):
    """x (B, T, D), or (G, B, T, D): G groups of B sets sharing mask (B, T) (takes_groups), read in
    place where it is float32 with D contiguous (a layer's head outputs as a permuted view)."""
    a = x.detach().resolve_neg()
    a = a.numpy() if a.dtype == torch.float32 and (a.shape[-1] <= 1 or a.stride(-1) == 1) else _f32(a)
    sums, used, zero = cpp().cone_unit_sums(a, _mask_u8(mask))
    return torch.from_numpy(sums), torch.from_numpy(used), torch.from_numpy(zero)


cone_unit_sums.takes_groups = True


def row_entropy(attn: torch.Tensor, mask: torch.Tensor | None, smoothing: float = 0.0):
    return torch.from_numpy(cpp().attention_row_entropy(_f32(attn), _mask_u8(mask), float(smoothing)))


def binding_options(cfg: PairwiseConfig, *, threads: int = 0, moment_shift: float = 0.0, columns=None) -> dict:
    """The keywords of embgeom._C.PairwiseEngine (which has no defaults): the config's fields,
    the OpenMP thread count (0 = its default), the moment shift (docs/metrics.md, moments) and
    the prepared columns of a cross-mode run (None: y's rows, or self mode)."""
    return {**cfg.describe(), "threads": threads, "moment_shift": moment_shift, "columns": columns}


class CppEngine:
    """Adapter from embgeom._C.PairwiseEngine to the engine protocol (engine/runner.py)."""

    name = "cpp"

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, cfg: PairwiseConfig, threads: int = 0,
                 columns=None, shift: float | None = None):
        """columns: an embgeom._C.PreparedColumns of y (prepare_columns): y's rows are not
        prepared again (y then only gives the moment shift and the column count). shift: the
        moment shift to sum around (default: numerics.moment_shift of x and y; the distributed
        jobs of one matrix share one, so their sums add)."""
        self.cfg = cfg
        self._x = _f32(x)  # keep the buffer alive
        self._y = None if (y is None or columns is not None) else _f32(y)
        self._n, self._m = x.shape[0], None if y is None else y.shape[0]
        options = binding_options(cfg, threads=threads, moment_shift=moment_shift(x, y, cfg.metric) if shift is None else shift,
                                  columns=columns)
        self._engine = cpp().PairwiseEngine(self._x, self._y, **options)

    @property
    def kernel(self) -> str:
        """The product kernel the CPU check picked (e.g. avx512-14x32)."""
        return self._engine.kernel

    def num_tiles(self):
        return self._engine.num_tiles()

    def tile_pairs(self, begin, end):
        return self._engine.tile_pairs(begin, end)

    def run(self, begin, end):
        self._engine.run(begin, end)

    def keep_lists_only(self) -> None:
        """Before the first run: the per-row lists and the outside counts and pairs are all the
        caller reads (cosine or dot, no histogram, global or near lists), so the pass skips the
        moments and extremes; the state then has no count, moments or extremes."""
        self._engine.keep_lists_only()

    def set_row_top_floor(self, floor: float) -> None:
        """Before the first run: per-row top lists of the values >= floor only."""
        self._engine.set_row_top_floor(floor)

    @property
    def tiles_done(self) -> int:
        return self._engine.tiles_done

    def state(self) -> EngineState:
        return EngineState.from_fields(self._n, self._m, self._engine.state())

    def load_state(self, state: EngineState) -> None:
        self._engine.load_state(state.to_fields())


def _engine_reasons(x, **_):
    if not hasattr(cpp(), "PairwiseEngine"):
        return ["embgeom._C was built without the pairwise engine"]
    return []


register("cpp", "pairwise_stats", CppEngine, _engine_reasons)
register("cpp", "cone_index", cone_unit_sums)
register("cpp", "attention_entropy", row_entropy)
