"""One adapter per encoder family: where `trace` and `embgeom vocab` find what they analyse.

The model's `config.model_type` picks the entry of `ADAPTERS`. An entry says
- which modules are the attention output projections: their input is the concatenation of every
  head's output softmax(Q K^T / sqrt(d_h) + bias + mask) V (B, T, H * d_h), their output the
  multi-head output (before dropout, residual and LayerNorm). The pattern is a regular expression
  over module names relative to `model.base_model`, so task heads (ForMaskedLM, ...) and
  sentence-embedding checkpoints built on the same encoder resolve to the same modules;
- whether the attention probabilities come from transformers' attention functions (then only the
  eager one returns them) or are computed by the module itself under any setting;
- the word / position / token-type embedding matrices (attribute paths from the base model) or
  why a family has none, and the first real position id (RoBERTa-style models count positions
  from padding_idx + 1, arXiv:1907.11692 as implemented in fairseq);
- whether the forward pass takes token_type_ids, and which tokenizer attributes name the tokens
  the attention metrics call [CLS] and [SEP].

ALBERT (arXiv:1909.11942) applies one shared layer at every depth: a hook on its output
projection fires once per application, so `output_projections` returns the one module and the
hooks record num_hidden_layers outputs, in order.

Adding a family: one `Adapter(...)` entry in `ADAPTERS`, keyed by its `config.model_type`, then
the family tests in tests/test_families.py (a tiny config, a tokenizer, a value projection).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

BERT_PROJECTION = r"encoder\.layer\.\d+\.attention\.output\.dense"


@dataclass(frozen=True)
class Adapter:
    """How one family exposes what the analyses need (see the module docstring).

    projection: regex (full match) over base-model module names of the attention output projection.
    interface_attention: True when the probabilities come from transformers' attention functions
    (eager needed); False when the module computes them itself (DeBERTa, MPNet).
    position / token_type: attribute path of the matrix from the base model, or None with the
    reason in position_absent / token_type_absent. position_kind: "absolute", "rotary",
    "relative" or "absolute+relative". first_position: "zero" or "after_padding"
    (padding_idx + 1). token_type_ids: whether the forward pass accepts them.
    cls / sep: tokenizer attributes tried in order for the [CLS]-like and [SEP]-like token."""

    family: str
    name: str
    projection: str
    interface_attention: bool = True
    position: str | None = "embeddings.position_embeddings"
    position_kind: str = "absolute"
    position_absent: str = ""
    token_type: str | None = "embeddings.token_type_embeddings"
    token_type_absent: str = ""
    first_position: str = "zero"
    token_type_ids: bool = True
    shared_layers: bool = False
    cls: tuple[str, ...] = ("cls_token", "bos_token")
    sep: tuple[str, ...] = ("sep_token", "eos_token")


def _roberta_like(family: str, name: str) -> Adapter:
    return Adapter(family, name, BERT_PROJECTION, first_position="after_padding")


_DEBERTA_POS = ("{family} uses relative positions (disentangled attention, arXiv:2006.03654); "
                "this checkpoint has position_biased_input=False, so no absolute position matrix")

ADAPTERS: dict[str, Adapter] = {a.family: a for a in (
    Adapter("bert", "BERT", BERT_PROJECTION),
    _roberta_like("roberta", "RoBERTa"),
    _roberta_like("xlm-roberta", "XLM-RoBERTa"),
    _roberta_like("camembert", "CamemBERT"),
    Adapter("electra", "ELECTRA", BERT_PROJECTION),
    Adapter("distilbert", "DistilBERT", r"transformer\.layer\.\d+\.attention\.out_lin",
            token_type=None, token_type_absent="distilbert has no token-type embeddings",
            token_type_ids=False),
    Adapter("albert", "ALBERT", r"encoder\.albert_layer_groups\.\d+\.albert_layers\.\d+\.attention\.dense",
            shared_layers=True),
    Adapter("deberta", "DeBERTa", BERT_PROJECTION, interface_attention=False,
            position_kind="relative", position_absent=_DEBERTA_POS.format(family="deberta")),
    Adapter("deberta-v2", "DeBERTa-v2/v3", BERT_PROJECTION, interface_attention=False,
            position_kind="relative", position_absent=_DEBERTA_POS.format(family="deberta-v2")),
    Adapter("mpnet", "MPNet", r"encoder\.layer\.\d+\.attention\.attn\.o", interface_attention=False,
            position_kind="absolute+relative", first_position="after_padding",
            token_type=None, token_type_absent="mpnet has no token-type embeddings", token_type_ids=False),
    Adapter("modernbert", "ModernBERT", r"layers\.\d+\.attn\.Wo",
            position=None, position_kind="rotary",
            position_absent="modernbert uses rotary positions (arXiv:2104.09864), no position matrix",
            token_type=None, token_type_absent="modernbert has no token-type embeddings",
            token_type_ids=False),
)}


def supported() -> str:
    return ", ".join(f"{a.name} ({k})" for k, a in ADAPTERS.items())


def adapter_for(model) -> Adapter:
    """The entry for `model.config.model_type`; a ValueError listing the families otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model: model_type {model_type!r} is not a supported encoder family; supported: "
            f"{supported()} (sentence-embedding models built on these report their model_type). "
            "To add a family, add an Adapter entry for its model_type to "
            "embgeom.analysis.text.adapters.ADAPTERS (output projection pattern, embedding matrices).")
    return ADAPTERS[model_type]


def _base(model):
    return getattr(model, "base_model", model)


def _attr(root, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def num_layers(model) -> int:
    """Attention blocks applied per forward pass (ALBERT: depth x layers per group)."""
    cfg = model.config
    if adapter_for(model).shared_layers:
        return int(cfg.num_hidden_layers) * int(getattr(cfg, "inner_group_num", 1) or 1)
    return int(cfg.num_hidden_layers)


def check_attention(model) -> None:
    """Attention probabilities exist only under eager attention for families that use
    transformers' attention functions; a ValueError naming the fix otherwise."""
    a = adapter_for(model)
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if a.interface_attention and impl != "eager":
        raise ValueError(
            f"model: {a.name} was loaded with attn_implementation={impl!r}, which returns no "
            "attention probabilities; load it with attn_implementation=\"eager\" "
            "(embgeom.load_model does)")


def output_projections(model) -> list[torch.nn.Module]:
    """The distinct attention output projection modules, in module order (one for ALBERT's shared
    layer); a ValueError when the family's pattern matches none."""
    a = adapter_for(model)
    pattern = re.compile(a.projection)
    mods = [m for name, m in _base(model).named_modules() if pattern.fullmatch(name)]
    if not mods:
        raise ValueError(f"model: no attention output projection matching {a.projection!r} in this "
                         f"{a.name} model; per-head outputs cannot be hooked (check its "
                         "transformers version against embgeom.analysis.text.adapters.ADAPTERS)")
    return mods


def first_position_id(model) -> int:
    """Position id of the first token: 0, or padding_idx + 1 for RoBERTa-style models."""
    a = adapter_for(model)
    if a.first_position == "zero":
        return 0
    emb = _attr(_base(model), "embeddings")
    pad = getattr(emb, "padding_idx", None)
    if pad is None:
        pad = model.config.pad_token_id
    return int(pad) + 1


def max_positions(model) -> int:
    """Longest input the position scheme allows: max_position_embeddings, less the ids before the
    first real one."""
    limit = int(getattr(model.config, "max_position_embeddings", None) or 512)
    if adapter_for(model).position is not None:
        limit -= first_position_id(model)
    return limit


@dataclass
class EmbeddingMatrices:
    """word: (V, E); position: (P, E) from the first real position id on (row p = the p-th
    token's position), or None; token_type: (K, E) or None; absent: {"position" |
    "token_type": why}; first_position: the position id of row 0. Float32, detached."""

    word: torch.Tensor
    position: torch.Tensor | None
    token_type: torch.Tensor | None
    first_position: int
    absent: dict[str, str]


def _as_computed(w: torch.Tensor) -> torch.Tensor:
    """An embedding weight as the analyses take it: float64 as it is (a float64 checkpoint's
    sections keep its digits), anything else as float32."""
    w = w.detach()
    return w if w.dtype == torch.float64 else w.float()


def embedding_matrices(model) -> EmbeddingMatrices:
    a = adapter_for(model)
    word = model.get_input_embeddings()
    if word is None:
        raise ValueError("model: it has no input embeddings (get_input_embeddings() is None)")
    base = _base(model)
    absent = {}

    def matrix(path, key, reason):
        w = getattr(_attr(base, path), "weight", None) if path else None
        if w is None:
            absent[key] = reason or f"{a.family} has no {key.replace('_', '-')} embeddings"
            return None
        return _as_computed(w)

    first = first_position_id(model)
    pos = matrix(a.position, "position", a.position_absent)
    if pos is not None:
        pos = pos[first:]
    tt = matrix(a.token_type, "token_type", a.token_type_absent)
    return EmbeddingMatrices(_as_computed(word.weight), pos, tt, first, absent)


def special_token_id(tokenizer, role: str, adapter: Adapter) -> int:
    """Id of the [CLS]-like (role "cls") or [SEP]-like ("sep") token: the first of the adapter's
    tokenizer attributes that is set; -1 (matches nothing) when none is."""
    for attr in getattr(adapter, role):
        i = getattr(tokenizer, f"{attr}_id", None)
        if i is not None:
            return int(i)
    return -1


def model_inputs(model, enc: dict) -> dict:
    """The tokenizer's output without the inputs this family's forward pass does not take;
    ValueError for a token type past the model's (a sentence pair's second side, type 1, on a
    model of one token type: an IndexError in its embeddings)."""
    if adapter_for(model).token_type_ids:
        types, n = enc.get("token_type_ids"), getattr(model.config, "type_vocab_size", None)
        # (type_vocab_size 0: no token-type embeddings, the ids are not read: DeBERTa)
        if types is not None and isinstance(n, int) and n > 0 and types.numel() and int(types.max()) >= n:
            raise ValueError(f"texts: a sentence pair (a TAB in a line) gives its second side token type 1, "
                             f"and this model has {n} token type(s) (type_vocab_size); give it one text a line")
        return enc
    return {k: v for k, v in enc.items() if k != "token_type_ids"}
