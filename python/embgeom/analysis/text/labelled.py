"""Labelled inputs of `embgeom text --labels` (docs/metrics.md, labelled inputs): every trace
metric split by class (`by_label`), class-mean attention maps of the texts of one length
(`--class-maps N`, the geometry-of-BERT authors' maps: [SEP] and padding rows and columns zeroed,
[CLS] kept) with the authors' Shannon and von Neumann entropies of each map, and the predictions
of a classification head for `--correct-only`.
"""
from __future__ import annotations

import dataclasses

import torch

from ...engine.checkpoint import Resumable
from . import adapters
from .trace import Batch, TraceAccumulator, encode, eval_mode, model_max_length, pad_right, sentence_tables

CLASS_MAPS_FILE = "class_maps.npz"


def slice_batch(b: Batch, idx: torch.Tensor) -> Batch:
    """The rows idx of a batch (truncated set to 0: which rows were cut is not kept)."""
    out = {}
    for f in dataclasses.fields(b):
        v = getattr(b, f.name)
        if isinstance(v, torch.Tensor):
            v = v[idx]
        elif isinstance(v, tuple):
            v = tuple(t[idx] for t in v)
        elif f.name == "texts":
            v = [v[i] for i in idx.tolist()] if v else []
        elif f.name == "truncated":
            v = 0
        out[f.name] = v
    return Batch(**out)



# Notes shown on stderr and on the page where a labelled run has nothing between classes to show.
def one_class_note(correct_only: dict | None) -> str:
    """Why the between-class numbers are null; correct_only: report.json's block of that name, or
    None. Its label file may name more classes than the texts it kept (it had said "the labels name
    one class" of a file naming two)."""
    kept_fewer = correct_only is not None and len(correct_only["texts_per_label"]) > 1
    who = "the texts --correct-only kept are of one class" if kept_fewer else "the labels name one class"
    return f"{who}: between-class numbers (silhouettes, between cosines) need two and are null"


def no_class_maps_note(length: int) -> str:
    return (f"no text has {length} real tokens: no class-mean maps "
            "(--class-maps N counts [CLS] and [SEP])")


class _Rows(Resumable):
    """Which labels the rows of the next batch carry (batches arrive in corpus order)."""

    fixed = ("labels",)

    def __init__(self, labels: list[str]):
        self.labels, self.done = labels, 0

    def check_restored(self) -> None:
        if self.done > len(self.labels):
            raise ValueError(f"_Rows: {self.done} texts done of {len(self.labels)} labels")

    def taken(self) -> list[str]:
        """The labels of the texts done."""
        return self.labels[:self.done]

    def take(self, B: int) -> list[str]:
        out = self.labels[self.done:self.done + B]
        self.done += B
        return out


class LabelSplit(Resumable):
    """Observer: one TraceAccumulator per label, updated with that label's rows of each batch."""

    not_saved = ("tokenizer",)

    def __init__(self, labels: list[str], model, tokenizer, max_len: int):
        self.rows = _Rows(labels)
        dev = next(model.parameters()).device
        tables = sentence_tables(tokenizer)
        self.acc = {g: TraceAccumulator(adapters.num_layers(model), model.config.num_attention_heads, max_len,
                                        max(model.config.vocab_size, len(tokenizer)), dev,
                                        sentence_tables=tables) for g in sorted(set(labels))}
        self.tokenizer = tokenizer
        self.seconds: dict[str, float] = {}

    def check_restored(self) -> None:
        # each label's sums hold exactly that label's texts among those done (a crafted count had
        # misaligned labels and texts, or doubled a label's means)
        done = self.rows.taken()
        if any(a.n_texts != done.count(g) for g, a in self.acc.items()):
            raise ValueError(f"LabelSplit: per-label texts {[a.n_texts for a in self.acc.values()]} are not those of "
                             f"the {self.rows.done} texts done")

    def update(self, b: Batch) -> None:
        import time

        t0 = time.perf_counter()
        labs = self.rows.take(b.mask.shape[0])
        for g in sorted(set(labs)):
            idx = torch.tensor([i for i, x in enumerate(labs) if x == g], device=b.mask.device)
            self.acc[g].update(slice_batch(b, idx))
        self.seconds["labels: per-class metrics"] = self.seconds.get("labels: per-class metrics", 0.0) \
            + time.perf_counter() - t0

    def result(self) -> dict:
        """{label: the report.json keys of TraceResult.to_dict() without model, truncated and the
        corpus-wide forward_passes_seconds}."""
        out = {}
        for g, acc in self.acc.items():
            if acc.n_texts == 0:
                continue
            d = acc.result(self.tokenizer).to_dict()
            for k in ("model", "truncated", "forward_passes_seconds"):
                d.pop(k)
            out[g] = d
        return out


class ClassMaps(Resumable):
    """Observer: per label, the sum of the attention maps (L, H, N, N) of the texts with N real
    tokens, [SEP] rows and columns zeroed (padding never enters: only the N real positions).
    pad_to: the length the authors' code pads its maps to (the model's input length), for the
    value entropy of the padded map. classes: every label to count (default: those of labels), so
    that --correct-only's labels with no text kept read 0 texts rather than going missing."""

    fixed = ("N", "L", "H", "pad_to")

    def __init__(self, labels: list[str], length: int, L: int, H: int, pad_to: int | None = None,
                 classes: list[str] | None = None):
        if length < 2:
            raise ValueError(f"--class-maps: expected a text length >= 2 tokens, got {length}")
        self.rows, self.N, self.L, self.H = _Rows(labels), length, L, H
        self.pad_to = max(pad_to or length, length)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = {g: 0 for g in sorted(set(labels) | set(classes or ()))}
        self.seconds: dict[str, float] = {}

    def check_restored(self) -> None:
        # at most each label's texts done, their map sums of this run's shape
        done = self.rows.taken()
        if not set(done) <= set(self.counts) or any(not 0 <= c <= done.count(g) for g, c in self.counts.items()) \
                or any(g not in self.counts or tuple(s.shape) != (self.L, self.H, self.N, self.N)
                       or not s.dtype.is_floating_point for g, s in self.sums.items()):
            raise ValueError(f"ClassMaps: counts {self.counts} or map sums not those of the {self.rows.done} texts done")

    def update(self, b: Batch) -> None:
        labs = self.rows.take(b.mask.shape[0])
        for i, g in enumerate(labs):
            idx = b.mask[i].nonzero().flatten()
            if idx.numel() != self.N:
                continue
            a = torch.stack([att[i][:, idx][:, :, idx] for att in b.attentions]).double().cpu()  # (L, H, N, N)
            sep = b.sep[i, idx].cpu()
            a[:, :, sep, :] = 0.0
            a[:, :, :, sep] = 0.0
            if g not in self.sums:
                self.sums[g] = torch.zeros_like(a)
            self.sums[g] += a
            self.counts[g] += 1

    def result(self) -> dict:
        """{"length": N, "texts": {label: count}, "file": CLASS_MAPS_FILE, "padded_to": P,
        "entropies": {label: ...}} (entropies: see map_entropies)."""
        return {"length": self.N, "texts": dict(self.counts), "file": CLASS_MAPS_FILE, "padded_to": self.pad_to,
                "entropies": {g: map_entropies(m, self.pad_to) for g, m in self.means().items()}}

    def means(self) -> dict[str, torch.Tensor]:
        return {g: s / self.counts[g] for g, s in self.sums.items()}

    def write(self, path: str) -> None:
        """class_maps.npz: one (L, H, N, N) float64 mean per label with texts (key = label)."""
        from ...io import atomic_write, savez_named

        with atomic_write(path, binary=True, name=CLASS_MAPS_FILE) as f:
            savez_named(f, {g: m.numpy() for g, m in self.means().items()})


def map_entropies(maps: torch.Tensor, pad_to: int) -> dict:
    """The geometry-of-BERT code's entropies of class-mean maps (L, H, N, N) float64, each (L, H)
    with its mean over heads per layer (L,), as the authors plot them: value_entropy (20-bin
    histogram of the N x N entries, measures.value_histogram_entropy), value_entropy_padded (the
    same map zero-padded to pad_to x pad_to, as their padded inputs give it) and von_neumann
    (-sum v ln v, v = |lambda| / sqrt(sum |lambda|^2) over the map's eigenvalues, LAPACK dgeev;
    the zero padding adds zero eigenvalues, which change nothing)."""
    from ..heads.matrices import block_measures
    from ..heads.measures import value_histogram_entropy

    L, H, N, _ = maps.shape
    real = torch.ones(L, N, dtype=torch.bool)
    out = {"value_entropy": value_histogram_entropy(maps, real),
           "value_entropy_padded": value_histogram_entropy(maps, real, pad_to=pad_to),
           "von_neumann": block_measures(maps)["von_neumann"]}
    return {**{k: v.tolist() for k, v in out.items()},
            "layer_mean": {k: v.mean(-1).tolist() for k, v in out.items()}}


def check_classifier(model) -> dict[int, str]:
    """The model's id2label, names stripped as --labels values are (a class 'neg ' could never be
    matched, and the message asked for labels written as the model names them), or a ValueError
    when it has no sequence-classification head or two classes share a name once stripped."""
    archs = getattr(model.config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"--correct-only: the model has no sequence-classification head "
                         f"(architectures {archs or 'unknown'})")
    names = {int(k): str(v).strip() for k, v in model.config.id2label.items()}
    if len(set(names.values())) < len(names):
        raise ValueError(f"--correct-only: the model's id2label names two classes alike (spaces around names "
                         f"dropped, as in --labels): {model.config.id2label}")
    return names


def check_label_classes(labels: list[str], model, path: str) -> None:
    """--correct-only: ValueError when a label of the file is none of the model's classes
    (id2label's names): no text of it could ever be kept, and a label file spelled otherwise than
    the model ("pos" for "POSITIVE") had kept nothing of those texts, silently."""
    classes = set(check_classifier(model).values())
    unknown = sorted(set(labels) - classes)
    if unknown:
        raise ValueError(f"--correct-only: {path} has labels that are none of the model's classes "
                         f"({', '.join(map(repr, unknown[:8]))}{', ...' if len(unknown) > 8 else ''}; its "
                         f"id2label: {', '.join(map(repr, sorted(classes)[:8]))}{', ...' if len(classes) > 8 else ''}); "
                         "no text with them could be kept: write the labels as the model names its classes")


def predict_labels(model, tokenizer, texts: list[str], *, batch_size: int = 32,
                   max_length: int | None = None) -> list[str]:
    """The classification head's predicted class (id2label) of every text, encoded as trace()
    encodes it (sentence pairs at a TAB, the same truncation)."""
    id2label = check_classifier(model)
    limit = model_max_length(model, tokenizer, max_length)
    dev = next(model.parameters()).device
    out: list[str] = []
    for done in range(0, len(texts), batch_size):
        chunk = texts[done:done + batch_size]
        enc, _ = encode(tokenizer, chunk, limit, done)
        enc = pad_right(tokenizer, enc)
        enc = {k: v.to(dev) for k, v in adapters.model_inputs(model, enc).items()}
        with torch.inference_mode(), eval_mode(model):
            logits = model(**enc).logits
        out += [id2label[int(i)] for i in logits.argmax(-1).tolist()]
    return out
