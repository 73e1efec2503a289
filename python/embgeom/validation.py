"""Input checks at the public edge: one message style, `name: expected ..., got ...`.

Everything past this module may assume float tensors of the right rank, finite values and
masks of matching shape; backends never re-check.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, np.ndarray):
        return f"{x.shape} {x.dtype}"
    return type(x).__name__


def optional_path(value: Any, name: str) -> str | None:
    """None, or a non-empty str / os.PathLike path as a str (TypeError / ValueError otherwise)."""
    if value is None:
        return None
    return path(value, name)


def path(value: Any, name: str) -> str:
    """A non-empty str / os.PathLike path as a str; TypeError / ValueError naming `name`."""
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name}: expected a non-empty path, got {value!r}")
    return text


def not_special_file(path: str, name: str | None = None) -> None:
    """ValueError (naming `name` where given) when path exists but is no regular file: a pipe or
    a device is never opened, since reading one hangs or never ends (a missing path passes: the
    caller says what that means)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{name + ': ' if name else ''}{path} is not a regular file")


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """torch.Tensor or numpy array -> tensor, zero-copy for numpy; detached (embgeom's numbers
    take no gradient: a parameter's float() had warned, its products had recorded a graph)."""
    if isinstance(x, torch.Tensor):
        dense_tensor(x, name)
        return x.detach().resolve_neg()  # (a view of a conjugate's imaginary part: numpy() refuses it)
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray) and np.ma.getmaskarray(x).any():
            raise ValueError(f"{name}: a masked array with {int(np.ma.getmaskarray(x).sum()):,} masked "
                             "value(s); embgeom reads every value (fill them, or drop their rows)")
        # (in either byte order: a .npy written on a big-endian machine is converted by torch_ready)
        if x.dtype.newbyteorder("=") in (np.float64, np.float32, np.float16):
            return numpy_tensor(np.asarray(x))
        raise TypeError(f"{name}: expected a float array, got {_describe(x)}")
    # (a pipeline's containers: a list of rows, a DataFrame, a datasets or pyarrow column, a JAX
    # array; which conversion copies, and into which dtype, is the caller's choice)
    how = "torch.from_dlpack(x)" if hasattr(x, "__dlpack__") else "numpy.asarray(x, dtype=numpy.float32)"
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__} ({how} converts "
                    "an array of floats)")


def dense_tensor(x: torch.Tensor, name: str) -> None:
    """TypeError / ValueError naming `name` for a tensor that holds no plain values: sparse or
    nested (a nested tensor reports the strided layout), or on the meta device."""
    if x.layout != torch.strided or x.is_nested:
        raise TypeError(f"{name}: expected a dense tensor, got {'a nested tensor' if x.is_nested else f'layout {x.layout}'}")
    if x.device.type == "meta":
        raise ValueError(f"{name}: a meta tensor holds no values")


def torch_ready(x: np.ndarray) -> np.ndarray:
    """x in a form torch.from_numpy takes: a copy where it has a negative stride (x[::-1]) or
    one that is no multiple of its item size (a field of a packed record array), or is not in
    native byte order. A read-only array is kept as it is (numpy_tensor)."""
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if any(st < 0 or st % x.itemsize for st in x.strides):
        x = x.copy()
    return x


_BUFFER_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                  np.dtype(np.float64): torch.float64}


def numpy_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor on x's memory (torch_ready's copy only where torch cannot take x's layout): a
    read-only C-contiguous float array too (np.load(mmap_mode="r"), a pyarrow or polars buffer),
    which embgeom only reads; it had been copied whole (1.5 GB for pairs_above on a 1M x 384
    memory map). It is taken through torch.frombuffer, whose note on read-only buffers is not
    shown: torch.from_numpy's, shown once a process, stays for the caller's own calls. Other
    read-only layouts are copied."""
    x = torch_ready(x)
    if x.flags.writeable:
        return torch.from_numpy(x)
    if x.flags.c_contiguous and x.size and x.dtype in _BUFFER_DTYPES:
        with warnings.catch_warnings():  # (the buffer is kept alive by the tensor)
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            return torch.frombuffer(memoryview(x).cast("B"), dtype=_BUFFER_DTYPES[x.dtype]).view(x.shape)
    return torch.from_numpy(x.copy())


def _check_float(x: torch.Tensor, name: str, shape_doc: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected {shape_doc} float, got {_describe(x)}")


SMALL_CHECK = 1 << 14  # values summed by numpy in check_finite


def check_finite(x: torch.Tensor, name: str, row_dims: int = 1, first_row: int = 0) -> None:
    """Raise ValueError naming the rows (leading `row_dims` indices) that hold NaN or Inf;
    first_row: the index of x's first row in the caller's input (x a block of its rows)."""
    if x.numel() == 0:
        return
    # Fast path: NaN or Inf anywhere makes the sum non-finite, so a finite sum proves the input
    # finite (a non-finite one may be overflow: then the full check). The vocabulary's bool mask
    # took 25 ms, its sum under 1 ms. A few CPU values are summed by numpy (4 us, torch's sum and
    # isfinite 22: an Index.add of one row).
    if x.numel() <= SMALL_CHECK and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        with np.errstate(all="ignore"):  # (NaN, Inf and overflow are what is looked for)
            total = x.detach().numpy().sum()
        if np.isfinite(total):
            return
    elif bool(torch.isfinite(x.sum())):
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    rows = bad.reshape(*x.shape[:row_dims], -1).any(dim=-1).nonzero().tolist()
    raise ValueError(f"{name}: NaN or Inf in {some_rows([r[0] + first_row if row_dims == 1 else tuple(r) for r in rows])}")


def some_rows(rows: list, shown: int = 10) -> str:
    """'3 row(s): [0, 4, 9]', the first `shown` listed and the rest counted ('(and 40 more)')."""
    more = f" (and {len(rows) - shown} more)" if len(rows) > shown else ""
    return f"{len(rows)} row(s): {list(rows[:shown])}{more}"


def matrix(x: Any, name: str = "x", *, rows_may_be_empty: bool = False) -> torch.Tensor:
    """x: (N, D) float -> tensor; rejects wrong rank, dtype, no columns and (unless
    rows_may_be_empty) no rows, without reading the values (a memory-mapped matrix stays on disk)."""
    x = as_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected (N, D) float, got {_describe(x)}")
    _check_float(x, name, "(N, D)")
    if x.shape[1] == 0 or (x.shape[0] == 0 and not rows_may_be_empty):
        need = "at least one column" if rows_may_be_empty else "at least one row and one column"
        raise ValueError(f"{name}: expected {need}, got {_describe(x)}")
    return x


def embeddings(x: Any, name: str = "x", first_row: int = 0, *, rows_may_be_empty: bool = False) -> torch.Tensor:
    """x: (N, D) float -> tensor; as `matrix`, and rejects non-finite rows (named from
    first_row on: x a block of the caller's rows)."""
    x = matrix(x, name, rows_may_be_empty=rows_may_be_empty)
    check_finite(x, name, first_row=first_row)
    fits_float32(x, name)
    return x


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def max_row_norm(x: torch.Tensor, chunk: int = 65536) -> float:
    """The largest L2 norm of x's rows, in float64 (no overflow), chunk by chunk (no full copy)."""
    best = 0.0
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].to(torch.float64)
        best = max(best, float(torch.linalg.vector_norm(part, dim=-1).max())) if part.numel() else best
    return best


def product_range(x: torch.Tensor, y: torch.Tensor | None, metric: str) -> None:
    """ValueError when the float32 products of dot or euclidean would overflow (or vanish below
    float32's normal range) for these magnitudes, with the reason and the remedy. Cosine works on
    unit rows and takes any finite magnitude."""
    if metric == "cosine":
        return
    nx = max_row_norm(x)
    norm_range(nx, nx if y is None else max_row_norm(y), metric, ("x", "y"))


def norm_range(nx: float, ny: float, metric: str, names: tuple[str, str]) -> None:
    """product_range for rows of largest norms nx and ny (named names[0] and names[1]);
    metric "dot", or "euclidean" / "l2"."""
    # |x.y| <= |x| |y| (Cauchy-Schwarz, also for every partial sum of |x_k y_k|); euclidean forms
    # |x|^2 + |y|^2 - 2 x.y <= (|x| + |y|)^2
    largest = (nx + ny) ** 2 if metric in ("euclidean", "l2") else nx * ny
    name = names[0] if nx >= ny else names[1]
    if largest > FLOAT32_MAX / 4:
        raise ValueError(f"{name}: rows with norms up to {max(nx, ny):.3g} make {metric} products up to "
                         f"{largest:.3g}, beyond float32's safe range ({FLOAT32_MAX / 4:.3g}: a quarter of its "
                         f"largest value {FLOAT32_MAX:.3g}, room for the sums); scale the rows down (values and "
                         f"statistics scale with them) or use the cosine")
    if 0 < largest < FLOAT32_TINY * 2.0**24:
        # the small side is the one to scale (with the other's largest norm)
        small = names[0] if nx <= ny else names[1]
        raise ValueError(f"{small}: rows with norms of at most {min(nx, ny):.3g} (beside norms up to "
                         f"{max(nx, ny):.3g}) make {metric} products of at most {largest:.3g}, below "
                         f"{FLOAT32_TINY * 2.0**24:.3g} (2^24 times float32's smallest normal {FLOAT32_TINY:.3g}), "
                         "where a product's terms and its smaller sums lose digits in subnormals; "
                         "scale the rows up (values and statistics scale with them)")


# the caller's names of the API's arguments inside `renamed` (a command's flags, a drop-in's
# arguments), for messages that name several inside their text (a checkpoint's differences)
_CALLER_NAMES: contextvars.ContextVar[tuple] = contextvars.ContextVar("caller_names", default=())


def require_package(module: str, package: str, extra: str, *, option: str | None = None, why: str = ""):
    """The module `module` imported, or a one-line ValueError naming the package to install (and
    the embgeom extra that brings it), led by the option that needs it (caller_name) and why."""
    import importlib

    try:
        # an ImportWarning of the package's own (umap's "Tensorflow not installed", about a
        # part embgeom never uses) had ended the command under -W error / PYTHONWARNINGS=error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportWarning)
            return importlib.import_module(module)
    except ImportError:
        lead = f"{caller_name(option)}: " if option else ""
        raise ValueError(f"{lead}{package} is not installed{f' ({why})' if why else ''}; `pip install {package}` "
                         f"(or `pip install 'embgeom[{extra}]'`)") from None


def caller_name(name: str) -> str:
    """The caller's name of an API argument inside `renamed` (`bins` -> `--bins`), else itself."""
    return dict(_CALLER_NAMES.get()).get(name, name)


@contextlib.contextmanager
def renamed(**names: str):
    """Errors of the checks inside, `name: ...`, re-raised under the caller's argument names
    (renamed(corpus="corpus_embeddings")): a drop-in reports its own arguments, not the Index's.
    Messages that name arguments inside their text take the same names (caller_name)."""
    token = _CALLER_NAMES.set(tuple({**dict(_CALLER_NAMES.get()), **names}.items()))
    try:
        yield
    except (ValueError, TypeError) as e:
        head, sep, rest = str(e).partition(":")
        base, bracket, index = head.partition("[")   # (an element: `range[1]: ...`)
        if sep and base in names:
            raise type(e)(f"{names[base]}{bracket}{index}:{rest}") from None
        raise
    finally:
        _CALLER_NAMES.reset(token)


def fits_float32(x: torch.Tensor, name: str, *, small_rows: bool = True) -> None:
    """ValueError when float64 rows (vectors along the last axis) do not fit the float32 copy
    every kernel reads: values beyond float32's range (they would become infinities), or (with
    small_rows) nonzero rows whose largest magnitude is below its smallest normal number (their
    digits would go, and below 1.4e-45 the whole row, which would then count as a zero row).
    Rows normalised in float64 before their float32 copy (an Index's queries) pass
    small_rows=False."""
    if x.dtype != torch.float64 or x.numel() == 0:
        return
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    step = max(1, (1 << 22) // max(1, rows.shape[1]))  # chunks: no full-size temporary
    big, tiny = 0.0, 0
    for a in range(0, rows.shape[0], step):
        peak = rows[a:a + step].abs().amax(dim=1)
        big = max(big, float(peak.max()))
        if small_rows:
            tiny += int(((peak > 0) & (peak < FLOAT32_TINY)).sum())
    if big > FLOAT32_MAX:
        raise ValueError(f"{name}: values up to {big:.3g} do not fit in float32 (largest {FLOAT32_MAX:.3g}); "
                         "scale the rows down")
    if tiny:
        raise ValueError(f"{name}: {tiny} nonzero row(s) with every value below float32's smallest normal "
                         f"number ({FLOAT32_TINY:.3g}): their float32 copies would lose their digits or "
                         "become zero rows; scale the rows up")


def pair_of_embeddings(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The all-pairs engine's inputs. Zero rows on either side are a run over no pairs (as one
    row in self mode is), the answer a pipeline's empty batch expects; zero columns are refused."""
    x = embeddings(x, "x", rows_may_be_empty=True)
    if y is None:
        return x, None
    y = embeddings(y, "y", rows_may_be_empty=True)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y: expected {x.shape[1]} columns, as many as the first matrix has, got {_describe(y)}")
    if y.device != x.device:
        raise ValueError(f"y: expected the same device as x ({x.device}), got {y.device}")
    return x, y


def sequences(x: Any, mask: Any = None, name: str = "x") -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: (B, T, D) float (or (N, D), taken as one set), mask: (B, T) bool or None."""
    x = as_tensor(x, name)
    _check_float(x, name, "(B, T, D) or (N, D)")  # (the shape as given, before (N, D) becomes (1, N, D))
    given = _describe(x)
    if x.dim() == 2:
        x = x.unsqueeze(0)
        if mask is not None:
            mask = _mask_tensor(mask)
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name}: expected (B, T, D) or (N, D) float, got {given}")
    if x.shape[2] == 0:
        raise ValueError(f"{name}: expected D >= 1, got {given}")
    mask = batch_mask(mask, x.shape[0], x.shape[1], x.device)
    check_finite(x, name, row_dims=2)
    fits_float32(x, name)
    return x, mask


def _mask_tensor(mask: Any) -> torch.Tensor:
    """A mask as a tensor (numpy: a copy, since torch takes no negative strides (m[:, ::-1]));
    TypeError naming `mask` for anything but a tensor or a bool / integer array."""
    if isinstance(mask, np.ndarray):
        if mask.dtype.kind not in "biuf":
            raise TypeError(f"mask: expected a (B, T) bool tensor or array, got {_describe(mask)}")
        return torch.from_numpy(torch_ready(np.array(mask)))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a (B, T) bool tensor, got {type(mask).__name__}")
    dense_tensor(mask, "mask")
    return mask


def batch_mask(mask: Any, B: int, T: int, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = _mask_tensor(mask)
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask: expected shape ({B}, {T}), got {_describe(mask)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask: expected bool or integer 0/1, got {_describe(mask)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask: expected only 0/1 values")
        mask = mask.bool()
    return mask.to(device)


def attention(attn: Any, mask: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """attn: (B, H, T, T) float probabilities (rows = queries), mask: (B, T) bool."""
    attn = as_tensor(attn, "attn")
    given = _describe(attn)
    one_sequence = attn.dim() == 3
    if one_sequence:
        attn = attn.unsqueeze(0)
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn: expected (B, H, T, T) float, got {given}")
    _check_float(attn, "attn", "(B, H, T, T)")
    if one_sequence and mask is not None and getattr(mask, "ndim", 0) == 2 \
            and tuple(mask.shape) == (attn.shape[1], attn.shape[2]) and mask.shape[0] != 1:
        # a (B, T, T) batch of one head would be read as B heads of one sequence: say so
        raise ValueError(f"mask: {tuple(mask.shape)} is a batch of {mask.shape[0]} sequences, but a 3-D attn of "
                         f"shape {tuple(attn.shape[1:])} is read as (H, T, T), the heads of one sequence; pass "
                         "attn as (B, H, T, T) (e.g. attn[:, None] for one head)")
    mask = batch_mask(mask, attn.shape[0], attn.shape[2], attn.device)
    if attn.numel():
        check_finite(attn, "attn", row_dims=3)
        if bool((attn < 0).any()):
            raise ValueError("attn: expected probabilities >= 0, found negative entries")
        check_rows_sum_to_one(attn, mask)
    return attn, mask


def _upcast_16_bit(attn: torch.Tensor) -> bool:
    """Whether float32 maps hold 16-bit values (a half-precision model's maps, `.float()`ed): their
    row sums carry that rounding (2.4e-4 from 1 for 64 keys in float16), which the float32
    tolerance had refused. Judged by the first map (one (T, T) block: no copy of them all)."""
    if attn.dtype != torch.float32 or attn.numel() == 0:
        return False
    first = attn[(0,) * (attn.dim() - 2)]
    return any(torch.equal(first, first.to(dt).float()) for dt in (torch.float16, torch.bfloat16))


def check_rows_sum_to_one(attn: torch.Tensor, mask: torch.Tensor | None) -> None:
    """ValueError naming the first row of a real query whose probabilities over the real
    (unpadded) keys do not sum to 1 (within the rounding of attn's dtype): an entropy of
    anything else has no meaning, and mass on a padded key is not a distribution over the text."""
    tol = 1e-2 if attn.dtype in (torch.float16, torch.bfloat16) or _upcast_16_bit(attn) else 1e-4
    if mask is None:
        sums = attn.sum(-1, dtype=torch.float64)  # (B, H, T)
    else:
        # a product with the key mask: no float64 copy of the maps (32 x 12 x 512^2 would be 800 MB)
        keys = mask.to(attn.dtype)[:, None, :, None]
        sums = torch.matmul(attn, keys).squeeze(-1).double()
    bad = (sums - 1).abs() > tol
    if mask is not None:
        bad &= mask[:, None, :]
    if bool(bad.any()):
        b, h, t = bad.nonzero()[0].tolist()
        over = "" if mask is None else " over its unpadded keys"
        raise ValueError(f"attn: expected each row to be a probability distribution summing to 1, "
                         f"row [{b}, {h}, {t}] sums to {float(sums[b, h, t]):.6g}{over} "
                         f"({int(bad.sum()):,} such rows)")


def positive_int(value: Any, name: str, *, allow_zero: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected {'>= 0' if allow_zero else '>= 1'}, got {value}")
    return int(value)


def token_limit(value: Any, name: str = "max_length") -> int:
    """A model input's length in tokens: an int >= 2 ([CLS] and [SEP])."""
    value = positive_int(value, name)
    if value < 2:
        raise ValueError(f"{name}: expected >= 2 tokens ([CLS] and [SEP]), got {value}")
    return value


def flag(value: Any, name: str) -> bool:
    """A yes/no argument: True or False (numpy's bools too). A string or a number is refused: "no"
    and "false" had read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {_short_repr(value)}")
    return bool(value)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    # (a str test first: a one-element array is "in" a tuple of strings)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return value


EUCLIDEAN = ("euclidean", "l2")  # one metric: pairwise_stats and projections say euclidean, Index l2


def metric(value: Any, name: str, options: tuple[str, ...]) -> str:
    """choice() where 'euclidean' and 'l2' name the same metric, returned as options spell it."""
    if isinstance(value, str) and value in EUCLIDEAN:
        value = next((o for o in options if o in EUCLIDEAN), value)
    return choice(value, name, options)


def seed(value: Any, name: str = "seed") -> int:
    """A layout seed: an int in umap-learn's and openTSNE's range, 0 .. 2^32 - 1 (beyond it they
    fail after the neighbour graph)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 0 <= int(value) < 2 ** 32:
        raise ValueError(f"{name}: expected 0 .. 2^32 - 1, got {value}")
    return int(value)


def number(value: Any, name: str) -> float:
    """Any real number as a float (a Python or numpy scalar, a 0-d tensor; inf and NaN kept);
    TypeError naming `name` otherwise."""
    # a string ("0.9") or a truth value (bool, numpy / torch bool) would convert, and hide a
    # caller's mistake
    if isinstance(value, (str, bytes, bool, np.bool_)) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}") from None


def finite_float(value: Any, name: str) -> float:
    out = number(value, name)
    if not np.isfinite(out):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return out


def is_float32_scalar(value: Any) -> bool:
    """Whether value is one float32 number: numpy.float32, or a one-element float32 array or
    tensor (a score taken from a float32 result, such as Index.search's)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or getattr(value, "size", None) is None:
        return False
    size = value.numel() if isinstance(value, torch.Tensor) else value.size
    return size == 1 and dtype in (np.float32, torch.float32)


def float32_test_threshold(threshold: float, below: bool) -> float:
    """The float64 t with `v >= t` exactly when float32(v) >= threshold (below=False), or
    `v <= t` exactly when float32(v) <= threshold (below=True), for float64 values v and a float32
    threshold: the midpoint to the next float32 outwards, itself in where round-to-nearest-even
    takes it to the threshold."""
    t = np.float32(threshold)
    out = np.nextafter(t, np.float32(np.inf) if below else np.float32(-np.inf))
    if not np.isfinite(out):
        return float(t)
    mid = (float(t) + float(out)) / 2.0   # (exact: float32 values have 24 bits)
    if np.float32(mid) == t:
        return mid
    return float(np.nextafter(mid, -np.inf if below else np.inf))


def score_threshold(value: Any, name: str, below: bool = False) -> float:
    """A finite threshold on scores (below=False: kept where value >= it; below=True: distances,
    kept where <= it) as the float64 number the exact values are tested against. A float32 one
    (a score a search returned) is compared with the values rounded to float32, as they are
    returned, so the row whose score it is passes (float32_test_threshold); a Python float is
    tested as it is."""
    as_float32 = is_float32_scalar(value)
    out = finite_float(value, name)
    return float32_test_threshold(out, below) if as_float32 else out


def interval(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected a pair (lo, hi), got {value!r}")
    lo, hi = finite_float(value[0], f"{name}[0]"), finite_float(value[1], f"{name}[1]")
    if not lo < hi:
        raise ValueError(f"{name}: expected lo < hi, got ({lo}, {hi})")
    return lo, hi


def device(value: Any, name: str = "device") -> torch.device:
    """A torch device that exists here: 'cpu', 'cuda', 'cuda:1', ... (a CUDA device only where
    torch.cuda.is_available() and the index is below the device count)."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: expected a torch device such as 'cpu' or 'cuda', got {value!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {value!r} asked for, but there is no usable CUDA device here "
                             "(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {value!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"{name}: expected 'cpu' or 'cuda[:N]', got {value!r}")
    return dev
