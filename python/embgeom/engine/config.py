"""Settings of one all-pairs run: the one place where the options of `pairwise_stats` get their
defaults and allowed values. `make_config` validates user options into a `PairwiseConfig`; the
Python API, `embgeom pairs`, the float64 reference and the backends all start from it (the C++
bindings take every field explicitly and have no defaults of their own)."""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field, fields

from .. import validation

METRICS = ("cosine", "dot", "euclidean")
PRECISIONS = ("exact", "fast")


def _option(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class PairwiseConfig:
    metric: str = _option("cosine", "similarity of a pair (euclidean also spelled l2, as the Index does)",
                          choices=(*METRICS, "l2"))
    bins: int = _option(2000, "histogram bins over the range (0: no histogram)")
    lo: float = _option(-1.0, "histogram range, lower edge (option `range`)")
    hi: float = _option(1.0, "histogram range, upper edge (option `range`)")
    topk: int = _option(10, "largest pairs over the whole matrix")
    bottomk: int = _option(10, "smallest pairs over the whole matrix")
    near: float | None = _option(None, "also list the pairs closest to this value")
    near_k: int = _option(10, "how many pairs closest to `near`", needs="near")
    row_topk: int = _option(0, "largest values per row (the nearest neighbours under cosine and dot; "
                                "under euclidean the farthest)")
    row_bottomk: int = _option(0, "smallest values per row (the nearest neighbours under euclidean)")
    outside: tuple[float, float] | None = _option(None, "count (and list) the pairs outside [a, b]")
    outside_limit: int = _option(1000, "how many outside pairs are listed (all are counted)",
                                 needs="outside")
    precision: str = _option("exact", "exact: fp32 products; fast: bf16 products where the CPU "
                             "has them, every listed value rescored exactly", choices=PRECISIONS)
    # Tile edge (rows and columns per tile). 512 x 512 tiles measured 5-8 % faster than 256 in the
    # C++ engine on the 30,522 x 384 default vocabulary, exact and fast; a tile's buffers stay ~1 MB.
    block: int = _option(512, "tile edge: rows and columns per tile")

    def describe(self) -> dict:
        return asdict(self)


DEFAULTS = PairwiseConfig()


def user_options() -> dict[str, dict]:
    """The options a user passes (pairwise_stats keywords, `embgeom pairs` flags) -> their
    default, help and choices: the config's fields, with lo/hi given as one `range`."""
    out = {}
    for f in fields(PairwiseConfig):
        if f.name == "hi":
            continue
        if f.name == "lo":
            out["range"] = {"default": None, "help": "histogram range (lo, hi); default (-1, 1) for "
                            "cosine, required for dot and euclidean when bins > 0", "pair": ("LO", "HI")}
            continue
        entry = {"default": getattr(DEFAULTS, f.name), "help": f.metadata["help"]}
        for key in ("choices", "needs"):  # needs: the option it sizes, without which it means nothing
            if key in f.metadata:
                entry[key] = f.metadata[key]
        if f.name == "outside":
            entry["pair"] = ("A", "B")
        out[f.name] = entry
    return out


def options_doc(indent: str = "    ") -> str:
    """The options of user_options() as docstring lines (pairwise_stats's help: one source for
    their defaults, choices and meaning)."""
    import textwrap

    lines = []
    for name, spec in user_options().items():
        said = [f"default {spec['default']!r}"]
        if "choices" in spec:
            said.append("one of " + ", ".join(repr(c) for c in spec["choices"]))
        if "needs" in spec:
            said.append(f"with {spec['needs']} only")
        lines.append(textwrap.fill(f"{name} ({'; '.join(said)}): {spec['help']}", width=96,
                                   initial_indent=indent, subsequent_indent=indent + "    "))
    return "\n".join(lines)


def make_config(**options) -> PairwiseConfig:
    """Validate the user options of pairwise_stats (names as in `user_options()`, missing ones
    take their defaults) into a PairwiseConfig: one place for every caller."""
    known = user_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of pairwise_stats (options: {', '.join(known)})")
    o = {name: spec["default"] for name, spec in known.items()}
    o.update(options)
    metric = validation.metric(o["metric"], "metric", METRICS)
    precision = validation.choice(o["precision"], "precision", PRECISIONS)
    bins = validation.positive_int(o["bins"], "bins")
    rng = o["range"]
    if bins:
        if rng is None and metric == "cosine":
            rng = (DEFAULTS.lo, DEFAULTS.hi)
        if rng is None:
            raise ValueError(f"range: required for the {metric} metric when there are bins: its (lo, hi)")
        lo, hi = validation.interval(rng, "range")
        # the bin rule scales by bins / (hi - lo) (docs/metrics.md, bin index): both finite and nonzero
        width = hi - lo
        if not (math.isfinite(width) and math.isfinite(bins / width) and bins / width > 0):
            raise ValueError(f"range: ({lo}, {hi}) with {bins} bins gives a bin scale bins / (hi - lo) = "
                             f"{bins / width if width else math.inf}, which float64 cannot hold; narrow or widen it")
    else:
        if rng is not None:  # (it had been ignored without a word, as near_k without near is not)
            raise ValueError("range: the histogram's range, only with bins > 0 (bins=0: no histogram)")
        lo, hi = DEFAULTS.lo, DEFAULTS.hi
    outside = o["outside"]
    if outside is not None:
        if not isinstance(outside, (tuple, list)) or len(outside) != 2:
            raise TypeError(f"outside: expected a pair (a, b), got {outside!r}")
        a = validation.finite_float(outside[0], "outside[0]")
        b = validation.finite_float(outside[1], "outside[1]")
        if a > b:
            raise ValueError(f"outside: expected a <= b, got ({a}, {b})")
        outside = (a, b)
    near = o["near"]
    return PairwiseConfig(
        metric=metric, bins=bins, lo=lo, hi=hi, topk=validation.positive_int(o["topk"], "topk"),
        bottomk=validation.positive_int(o["bottomk"], "bottomk"),
        near=None if near is None else validation.finite_float(near, "near"),
        near_k=validation.positive_int(o["near_k"], "near_k"),
        row_topk=validation.positive_int(o["row_topk"], "row_topk"),
        row_bottomk=validation.positive_int(o["row_bottomk"], "row_bottomk"), outside=outside,
        outside_limit=validation.positive_int(o["outside_limit"], "outside_limit"), precision=precision,
        block=_block(o["block"]))


# a tile edge past this gains nothing (one tile holds any input's rows) and the tile count's
# (N + block - 1) // block had wrapped around in the core's int64 at 2^63 - 1: no tile, count 0
MAX_BLOCK = 1 << 31


def _block(value) -> int:
    block = validation.positive_int(value, "block", allow_zero=False)
    if block > MAX_BLOCK:
        raise ValueError(f"block: expected 1 to {MAX_BLOCK:,} (2^31), got {block:,}")
    return block
