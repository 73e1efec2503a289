"""The opt-in head and Gaussianity extras of `embgeom text` (docs/metrics.md, attention heads): the
observers that ride along trace()'s batches, the report.json blocks and the cost per metric.
"""
from __future__ import annotations

import contextlib
import sys
import time

from ...formatting import seconds
from ..text.adapters import num_layers
from .gaussianity import GaussianityAccumulator
from .matrices import MatricesAccumulator
from .measures import HeadsAccumulator, capture_qk
from .similarity import CONTEXT_MAPS_FILE, SimilarityAccumulator, parse_similar



HEAD_MAPS_FILE = "head_maps.json"


def weight_measures_check(model) -> None:
    """--matrices needs the BERT-family q/k/v projections: a ValueError before the run, not after."""
    from .matrices import projections

    projections(model)


REGEX_SHOWN = 4                # --show-texts REGEX without --head-maps: the first 4 matches


def parse_show_texts(spec: str | None, n_texts: int | None = None):
    """--show-texts: comma-separated text ids (0-based over the corpus's non-blank lines, as
    cls.npy's rows) or a regular expression searched in each text. Returns (accept(index, text)
    -> bool, how many texts it names: the ids' count, or REGEX_SHOWN for a regex), or (None, 0)
    without a spec. Ids are checked against n_texts when it is given (ValueError)."""
    import re

    if spec is None:
        return None, 0
    if not spec.strip():
        raise ValueError("--show-texts: expected comma-separated text ids or a regular expression, got an "
                         "empty one")
    parts = [p.strip() for p in spec.split(",")]
    # ids are ASCII digits: '²' and '١' are digits to str.isdigit (int('²') raised; '١' was id 1)
    if all(re.fullmatch(r"-?[0-9]+", p) for p in parts) and any(p.startswith("-") for p in parts):
        # (read as a regular expression, "-1" had matched no text, silently)
        raise ValueError(f"--show-texts: text ids are 0-based and never negative, got {spec!r}")
    if all(re.fullmatch(r"[0-9]+", p) for p in parts):
        ids = sorted({int(p) for p in parts})
        if n_texts is not None and ids[-1] >= n_texts:
            raise ValueError(f"--show-texts: text id {ids[-1]} out of range; the corpus has {n_texts} "
                             f"texts (ids 0..{n_texts - 1})")
        wanted = set(ids)
        return (lambda k, text: k in wanted), len(ids)
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        raise ValueError(f"--show-texts: neither comma-separated text ids nor a valid regular "
                         f"expression: {spec!r} ({exc})") from None
    return (lambda k, text: pattern.search(text) is not None), REGEX_SHOWN


# bytes per map entry a --head-maps text holds until the page is written: its attention maps and
# its context-similarity maps (float32 each), and the JSON text of the attention maps
MAP_ENTRY_BYTES = 16


def _check_maps_memory(texts: int, L: int, H: int, max_len: int) -> None:
    """ValueError naming --head-maps when its texts' maps (L x H x n x n each, n up to max_len)
    outgrow the memory free, before the forward passes (--head-maps 500 had failed at the end)."""
    from ...engine.limits import refuse_past_memory

    refuse_past_memory(texts * L * H * max_len * max_len * MAP_ENTRY_BYTES, lambda need, free: (
        f"--head-maps: the maps of {texts:,} texts ({L} layers x {H} heads x up to {max_len} x {max_len} each) "
        f"need up to {need}, {free}; show fewer texts (or lower --max-length)"))


class TextExtras:
    """Built from the parsed flags (or `options`, trace()'s heads= / clark_js= / gaussianity= /
    directionality=); `observers` go to trace(), `active()` wraps the run."""

    @classmethod
    def options(cls, model, tokenizer, max_len: int, *, heads: bool = False, clark_js: bool = False,
                gaussianity: bool = False, directionality: bool = False) -> "TextExtras":
        """The extras of `embgeom text --heads --clark-js --gaussianity --directionality`, without
        the page-only ones (head maps, --similar, --matrices)."""
        from types import SimpleNamespace

        return cls(SimpleNamespace(heads=heads, clark_js=clark_js, gaussianity=gaussianity,
                                   directionality=directionality, head_maps=0, show_texts=None,
                                   matrices=False, similar=None), model, tokenizer, max_len)

    def __init__(self, args, model, tokenizer, max_len: int, text_ids: list[int] | None = None):
        """text_ids: the corpus id of each text traced, where a selection of the corpus is
        (--correct-only): --show-texts ids and the maps' text ids are the corpus's."""
        if args.head_maps < 0:
            raise ValueError(f"--head-maps: expected >= 0, got {args.head_maps}")
        self.model, self.tokenizer = model, tokenizer
        self.selected = text_ids is not None
        self.show_texts = getattr(args, "show_texts", None)
        accept, named = parse_show_texts(self.show_texts)
        self.head_maps = head_maps = args.head_maps or named
        L, H = num_layers(model), model.config.num_attention_heads
        _check_maps_memory(head_maps, L, H, max_len)
        want_heads = args.heads or args.clark_js or args.directionality or head_maps > 0
        self.directionality = args.directionality
        self._qk = {}
        dev = next(model.parameters()).device
        self.heads = HeadsAccumulator(L, H, max_len, dev, js=args.clark_js,
                                      directionality=args.directionality, qk=self._qk,
                                      sample_maps=head_maps, sample_filter=accept, text_ids=text_ids) \
            if want_heads else None
        self.gauss = GaussianityAccumulator(L + 1, model.config.hidden_size) if args.gaussianity else None
        self.matrices = MatricesAccumulator(L, H, max_len, dev, spectra_texts=getattr(args, "matrices_texts", None)) \
            if getattr(args, "matrices", False) else None
        if self.matrices is not None:
            weight_measures_check(model)
        rule = parse_similar(getattr(args, "similar", None))
        self.similarity = SimilarityAccumulator(L, H, max_len, tokenizer, rule=rule, maps=head_maps,
                                                sample_filter=accept, text_ids=text_ids) \
            if rule is not None or head_maps > 0 else None
        self.observers = [o for o in (self.heads, self.gauss, self.matrices, self.similarity) if o is not None]
        self.seconds: dict[str, float] = {}
        self.sample_maps: list[dict] = []

    @contextlib.contextmanager
    def active(self):
        with contextlib.ExitStack() as stack:
            if self.heads is not None and self.directionality:
                self.heads.qk = stack.enter_context(capture_qk(self.model))
            if self.matrices is not None:
                stack.enter_context(self.matrices.capture(self.model))
            yield

    def report(self, result) -> dict:
        out = {}
        if self.heads is not None:
            t0 = time.perf_counter()
            # Clark's figure-6 markers use his per-text-first averages
            block = self.heads.result(self.model, self.tokenizer, result.attention_to_per_text)
            if "sample_maps" in block:
                # the maps go to their own file (report.html embeds them); report.json names it
                self.sample_maps = block.pop("sample_maps")
                block["sample_maps"] = {"file": HEAD_MAPS_FILE,
                                        "texts": [sm["text"] for sm in self.sample_maps],
                                        "tokens": [sm["tokens"] for sm in self.sample_maps]}
            if self.show_texts and len(self.sample_maps) < self.head_maps:
                # (a selection of the corpus: the texts it left out are not drawn, said so)
                why = " (texts --correct-only did not keep are not drawn)" if self.selected else ""
                print(f"embgeom text: note: --show-texts {self.show_texts!r} selected "
                      f"{len(self.sample_maps)} text(s) of the {self.head_maps} asked for{why}", file=sys.stderr)
            out["attention_heads"] = block
            self.seconds["heads: result (MDS, skew fraction)"] = time.perf_counter() - t0
        if self.gauss is not None:
            out["gaussianity"] = self.gauss.result()
        if self.matrices is not None:
            t0 = time.perf_counter()
            out["attention_matrices"] = self.matrices.result(self.model)
            self.seconds["matrices: result (weights)"] = time.perf_counter() - t0
        return out

    def add_context(self, report: dict) -> None:
        """report["context_similarity"] gains "similar" (--similar) and "maps" (--head-maps)."""
        if self.similarity is None:
            return
        cs = report["context_similarity"]
        if self.similarity.rule is not None:
            t0 = time.perf_counter()
            cs["similar"] = self.similarity.result()
            self.seconds["similar: result"] = time.perf_counter() - t0
        if self.similarity.samples:
            cs["maps"] = {"file": CONTEXT_MAPS_FILE, "texts": len(self.similarity.samples),
                          "text_ids": [sm["text"] for sm in self.similarity.samples],
                          "tokens": [sm["tokens"] for sm in self.similarity.samples]}

    def write_files(self, out_dir: str) -> None:
        """head_maps.json: [{"text": id, "tokens": [str], "maps": [L][H][n][n]}] (3 decimals) with
        --head-maps / --show-texts (text: 0-based index over the corpus's texts), and
        context_maps.npz (similarity.SimilarityAccumulator.write_maps) with --head-maps."""
        if self.similarity is not None and self.similarity.samples:
            import os

            self.similarity.write_maps(os.path.join(out_dir, CONTEXT_MAPS_FILE))
        if self.sample_maps:
            import json
            import os

            from ...io import atomic_write

            # a text at a time (the Python lists of every text's L x H x n x n values at once
            # had run out of memory at --head-maps 500, after all the forward passes)
            with atomic_write(os.path.join(out_dir, HEAD_MAPS_FILE), name=HEAD_MAPS_FILE) as f:
                f.write("[")
                for i, sm in enumerate(self.sample_maps):
                    one = {"text": sm["text"], "tokens": sm["tokens"],
                           "maps": [[[[round(float(v), 3) for v in row] for row in m] for m in lay]
                                    for lay in sm["maps"].tolist()]}
                    f.write(("," if i else "") + json.dumps(one, separators=(",", ":")))
                f.write("]")

    def print_profile(self, total: float, stream=None) -> None:
        stream = stream or sys.stderr
        parts = {}
        for o in self.observers:
            parts.update(o.seconds)
        parts.update(self.seconds)
        extra = sum(v for k, v in parts.items() if not k.startswith(("heads: result", "matrices: result", "similar: result")))
        print(f"embgeom text: profile: forward + default metrics {seconds(total - extra)}", file=stream)
        for k, v in parts.items():
            print(f"embgeom text: profile:   {k:34s} {seconds(v):>10s}", file=stream)
