"""Binding layer (docs/metrics.md, binding layer): BERT-family forward passes in batches, tensors straight to the kernels.

`iter_batches` yields one `Batch` per forward pass (hidden states, attention probabilities,
per-head outputs from forward hooks, masks), all on the model's device; `trace` reduces the
metrics of every batch into a `TraceAccumulator` and returns a `TraceResult`, so memory does not
grow with the corpus.
"""
from __future__ import annotations

import contextlib
import html
import itertools
import math
import os
import re
import sys
import unicodedata
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ... import validation
from ...formatting import fmt
from ...api_types import DataFrame, DeviceArg, PathArg, ProgressArg
from ...backends import registry
from ...engine.checkpoint import Resumable
from ...numerics import cosine_matrix
from ...progress import as_progress
from . import adapters, attention
from .inputs import read_lines

METRICS = ("cone", "entropy", "attention", "context", "evolution")


def count_texts(texts: Any) -> int | None:
    """Number of texts (non-blank lines for a file) when it can be known without consuming an
    iterator; None otherwise."""
    if isinstance(texts, (str, os.PathLike)):
        return sum(1 for _ in read_lines(os.fspath(texts)))  # the lines trace() runs
    try:
        return len(texts)
    except TypeError:
        return None


def _texts(texts: Any) -> Iterator[str]:
    if isinstance(texts, (str, os.PathLike)):
        yield from read_lines(os.fspath(texts))
        return
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:  # (the tokenizer's own message names no text)
            raise ValueError(f"texts[{i}]: a lone surrogate {t[exc.start]!r} at character {exc.start} is no "
                             "Unicode text (decode the bytes with errors='replace')") from None
        if t.strip():
            yield t


def check_model_inputs(model, tokenizer, texts) -> None:
    """TypeError naming the argument, before any work, for a model, tokenizer or texts that
    trace() cannot take (batch_size is checked by iter_batches, which every runner goes through)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers model (torch.nn.Module with .config), "
                        f"got {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise TypeError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    if texts is None or isinstance(texts, (bytes, dict)) or not (
            isinstance(texts, (str, os.PathLike)) or hasattr(texts, "__iter__")):
        raise TypeError(f"texts: expected a list/iterable of str or a path to a text file, "
                        f"got {type(texts).__name__}")
    if isinstance(texts, str) and not os.path.isfile(texts) and (" " in texts or "\n" in texts):
        # (a str is a path: one text passed as it is would be read as a file name)
        raise ValueError(f"texts: no such file: {texts[:60]!r}; one text goes in a list, [text]")


def _chunks(it: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for t in it:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- model parts
def model_max_length(model, tokenizer, max_length: int | None = None) -> int:
    limit = adapters.max_positions(model)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 10**6:
        limit = min(limit, int(tok_max))
    if max_length is None:
        return int(limit)
    return min(validation.token_limit(max_length), int(limit))


# What a vocabulary token is, once its '##' / 'Ġ' / '▁' prefix is stripped
TOKEN_FLAGS = {
    "punctuation": lambda t: bool(t) and all(unicodedata.category(ch).startswith("P") for ch in t),
    "sentence_end": lambda t: t in (".", "!", "?"),
    "period": lambda t: t == ".",
    "comma": lambda t: t == ",",
}
# per tokenizer object (weakly held: keyed by id(), a freed tokenizer's tables had been handed to
# the next one given its id, marking ordinary words as punctuation), then by (size, name)
_FLAG_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple[int, str], torch.Tensor]]" = weakref.WeakKeyDictionary()


def token_flags(tokenizer, *names: str) -> tuple[torch.Tensor, ...]:
    """One (V,) bool table per name of TOKEN_FLAGS: the token ids with that property (cached per
    tokenizer object while it lives)."""
    try:
        mine = _FLAG_CACHE.setdefault(tokenizer, {})
    except TypeError:  # (an object that takes no weak reference: no cache)
        mine = {}
    vocab = None
    out = []
    for name in names:
        key = (len(tokenizer), name)
        if key not in mine:
            vocab = vocab or tokenizer.get_vocab()
            table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
            test = TOKEN_FLAGS[name]
            text = token_text(tokenizer)
            for tok, i in vocab.items():
                table[i] = test(text(tok))
            mine[key] = table
        out.append(mine[key])
    return tuple(out)


def token_text(tokenizer):
    """tok -> the characters a vocabulary token stands for, without its word marker ('##', 'Ġ',
    '▁'). Byte-level BPE (RoBERTa, DeBERTa, ModernBERT) writes each byte as a printable stand-in:
    its tokens are decoded ('ĠâĢľ' is '“'; a piece of a character decodes to U+FFFD), where the
    stand-ins had been read as letters and no curly quote or dash counted as punctuation."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        return lambda tok: decoder.decode([tok]).strip()
    return lambda tok: tok[2:] if tok.startswith("##") else tok.lstrip("Ġ▁")


def punctuation_table(tokenizer) -> torch.Tensor:
    """(V,) bool: token ids made only of Unicode punctuation (categories P*)."""
    return token_flags(tokenizer, "punctuation")[0]


def sentence_tables(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens that end a sentence: '.', '!', '?'; tokens that are '.'), the context-similarity
    separators (arXiv 2512.21956)."""
    return token_flags(tokenizer, "sentence_end", "period")


def mark_tables(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens that are '.', tokens that are ','): Clark's attention to periods and commas apart."""
    return token_flags(tokenizer, "period", "comma")


def split_pair(text: str, where: str) -> tuple[str, str | None]:
    """A text with a TAB is a sentence pair: (the part before the TAB, the part after it); else
    (text, None). Both parts must hold non-blank text, and a text holds at most one TAB (a
    ValueError starting with `where`, the text's place: "texts[3]", a file's line)."""
    if "\t" not in text:
        return text, None
    if text.count("\t") > 1:
        raise ValueError(f"{where}: a text with a TAB is a sentence pair A<TAB>B; this one has "
                         f"{text.count(chr(9))} TABs: {text[:60]!r}")
    a, b = text.split("\t", 1)
    if not a.strip() or not b.strip():
        raise ValueError(f"{where}: a text with a TAB is a sentence pair and needs text on both "
                         f"sides of the TAB, got {text[:60]!r}")
    return a, b


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the forward passes inside, then back in the mode it had: a model
    built in training mode (BertModel(config)) ran with its dropout, and two calls on the same
    texts disagreed."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def pad_right(tokenizer, enc: dict) -> dict:
    """tokenizer.pad(enc) as torch tensors, padded on the right whatever the tokenizer's
    padding_side: no position ids are passed, so a model with absolute position embeddings counts
    positions from index 0, and a left-padded text's tokens took shifted positions (its numbers
    then changed with the batch size). transformers >= 4.40 (the floor) has no padding_side
    argument to pad() everywhere: the attribute is set for the call."""
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    # transformers 4.x says on every run that __call__ pads faster than pad(): the ids exist already
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned.setdefault("Asking-to-pad-a-fast-tokenizer", True)
    try:
        return tokenizer.pad(enc, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


# the whitespace run before the last word, and that word. Whitespace = what every tokenizer here
# splits words at: space, tab, newline, carriage return and the Unicode space separators (Zs).
# Python's \s also takes characters BERT's normaliser deletes (\x1c-\x1f, \x85, \x0b, \x0c) or
# keeps inside a word (U+2028): a cut there split a word the whole text has joined ('q', '##z').
_SPACE = " \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_LAST_WORD = re.compile(f"[{_SPACE}]+[^{_SPACE}]*\\Z")


# BERT's normaliser puts spaces around CJK ideographs (handle_chinese_chars) and its
# pre-tokenizer makes every punctuation character a word: for tokenizers built of those two, a
# cut before or after such a character is a word boundary too, so a 12 MB line of Chinese or of
# comma-joined numbers (no whitespace) need not be tokenized whole. The ideograph blocks are
# BERT's (_is_chinese_char); of punctuation only ASCII's, which every version of the tokenizers
# library splits alike (Unicode's category P grows with its version).
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f"
_ASCII_PUNCT = re.escape("".join(c for c in map(chr, range(33, 127)) if not c.isalnum()))
_SPLIT_CHARS = {cjk: re.compile(f"[{_ASCII_PUNCT}{_CJK if cjk else ''}][^{_ASCII_PUNCT}{_CJK if cjk else ''}]*\\Z")
                for cjk in (False, True)}


def _split_chars(tokenizer) -> re.Pattern | None:
    """The last character a word of this tokenizer's cannot run through (pattern searched to a
    budget's end; None: a tokenizer not of BERT's normaliser and pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.pre_tokenizer).__name__ != "BertPreTokenizer":
        return None
    normaliser = backend.normalizer
    if normaliser is not None and type(normaliser).__name__ != "BertNormalizer":
        return None
    return _SPLIT_CHARS[bool(normaliser is not None and getattr(normaliser, "handle_chinese_chars", False))]


def _last_cut(text: str, budget: int, split_chars: re.Pattern | None) -> int:
    """The last position in (0, budget) where the tokenizer ends a word (0: none): before a
    whitespace run, or before or after a split character."""
    cut = _LAST_WORD.search(text, 0, budget)
    best = cut.start() if cut is not None else 0
    if split_chars is not None:
        hit = split_chars.search(text, 0, budget)
        if hit is not None:   # before the character, or after it where it is the first
            best = max(best, hit.start() or 1)
    return best


def _token_count(tokenizer, text: str) -> int:
    """The tokens of text, special tokens left out."""
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def clip_text(tokenizer, text: str, tokens: int) -> tuple[str, int | None]:
    """(a prefix of text, its token count without special tokens): cut before whitespace, holding at
    least `tokens` tokens, which are then text's own first tokens (every tokenizer here splits at
    whitespace before anything else, so whole words tokenize alike in a prefix; BERT's also at
    CJK ideographs and punctuation, _split_chars); a text a model keeps 512 tokens of had been
    tokenized whole (a 38 MB line: 57 s and 6.9 GB). (text, None) when text is short, or no such
    prefix exists (whitespace runs, one long word)."""
    budget = 16 * tokens + 64
    split_chars = _split_chars(tokenizer)
    while budget < len(text):
        cut = _last_cut(text, budget, split_chars)
        if cut > 0:
            prefix = text[:cut]
            count = _token_count(tokenizer, prefix)
            if count >= tokens:
                return prefix, count
        budget *= 4
    return text, None


def clip_pair(tokenizer, a: str, b: str, tokens: int, kept: int) -> tuple[str, str]:
    """A sentence pair with long sides clipped (clip_text) so that truncation="longest_first" to
    `kept` tokens of text keeps the same tokens: what it keeps of each side depends on the
    shorter side's length, on which side is longer (equal: the second) when `kept` is odd, and
    on nothing else once a side is longer than `kept`; so a clipped side still holds more tokens
    than the other side whole, and when both are clipped and kept is odd, which one is longer is
    kept. (The tokenizer's truncation of two long sides took 18 s for 30,000 characters.)"""
    ca, na = clip_text(tokenizer, a, tokens)
    cb, nb = clip_text(tokenizer, b, tokens)
    if na is None and nb is None:
        return a, b
    if nb is None:   # only the first side clipped: more tokens than the second whole
        whole_b = _token_count(tokenizer, b)
        if na <= whole_b:
            ca, na = clip_text(tokenizer, a, whole_b + 1)
        return ca, b
    if na is None:
        whole_a = _token_count(tokenizer, a)
        if nb <= whole_a:
            cb, nb = clip_text(tokenizer, b, whole_a + 1)
        return a, cb
    if kept % 2 == 0:  # both longer than kept: kept / 2 of each, whichever is longer
        return ca, cb
    if _token_count(tokenizer, a) > _token_count(tokenizer, b):   # the first longer: it stays longer
        if na <= nb:
            ca, na = clip_text(tokenizer, a, nb + 1)
    elif nb < na:               # the second longer or equal: it stays so
        cb, nb = clip_text(tokenizer, b, na)
    return ca, cb


def encode(tokenizer, chunk: list[str], limit: int, first_index: int = 0) -> tuple[dict, int]:
    """Token ids of a chunk of texts, not padded -> (dict of lists, number truncated). One text:
    [CLS] text [SEP], cut to its first limit - 1 tokens + the closing special token. A text with a
    TAB (split_pair): [CLS] A [SEP] B [SEP] with token types 0 / 1, over limit cut from the longer
    side first (the tokenizer's truncation="longest_first"). Token types are always asked for (a
    tokenizer whose model_input_names leave them out would give none, and a pair would run as
    one segment); adapters.model_inputs drops them for families without token types."""
    parts = [split_pair(t, f"texts[{first_index + i}]") for i, t in enumerate(chunk)]
    kept = limit - tokenizer.num_special_tokens_to_add(pair=True)
    parts = [(clip_text(tokenizer, a, limit)[0], None) if b is None else clip_pair(tokenizer, a, b, limit, kept)
             for a, b in parts]
    singles = [i for i, (_, b) in enumerate(parts) if b is None]
    pairs = [i for i, (_, b) in enumerate(parts) if b is not None]
    rows: list[dict] = [{} for _ in chunk]
    truncated = 0
    if singles:
        enc = tokenizer([parts[i][0] for i in singles], add_special_tokens=True, return_token_type_ids=True,
                        verbose=False)
        for slot, i in enumerate(singles):
            row = {k: list(v[slot]) for k, v in enc.items()}
            if len(row["input_ids"]) > limit:
                row = {k: v[:limit - 1] + v[-1:] for k, v in row.items()}
                truncated += 1
            rows[i] = row
    if pairs:
        least = tokenizer.num_special_tokens_to_add(pair=True) + 2
        if limit < least:  # (the tokenizer cannot cut a pair below its special tokens)
            raise ValueError(f"max_length: a sentence pair (texts[{first_index + pairs[0]}], a line with a TAB) "
                             f"needs at least {least} tokens (its special tokens and one of each text), "
                             f"got {limit}")
        a, b = [parts[i][0] for i in pairs], [parts[i][1] for i in pairs]
        enc = tokenizer(a, b, add_special_tokens=True, return_token_type_ids=True, verbose=False)
        long = [slot for slot in range(len(pairs)) if len(enc["input_ids"][slot]) > limit]
        cut = tokenizer([a[s] for s in long], [b[s] for s in long], add_special_tokens=True,
                        return_token_type_ids=True, truncation="longest_first", max_length=limit,
                        verbose=False) if long else None
        for slot, i in enumerate(pairs):
            src, at = (cut, long.index(slot)) if slot in long else (enc, slot)
            rows[i] = {k: list(v[at]) for k, v in src.items()}
        truncated += len(long)
    return {k: [r[k] for r in rows] for k in rows[0]}, truncated


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class Batch:
    """One forward pass. B texts, T padded length, L layers, H heads, D hidden, d_h = D / H.

    input_ids, mask, cls, sep, punct: (B, T) (mask True = real token); hidden_states: L+1 of
    (B, T, D) (index = depth, 0 = embeddings output); attentions: L of (B, H, T, T) (index i =
    layer i + 1; docs/metrics.md, layers, depths and heads); head_outputs: L of
    (B, T, H, d_h), each head's output before the output projection (O_lh of docs/metrics.md, context similarity);
    multihead_outputs: L of (B, T, D), after the output projection, before dropout/residual/
    LayerNorm. truncated: how many texts of this batch were cut to max_length. period, comma:
    (B, T) bool, the '.' and ',' tokens (None: not marked); token_types: (B, T) the token type
    ids (1 = the second text of a sentence pair; None when the family has none)."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    cls: torch.Tensor
    sep: torch.Tensor
    punct: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]
    head_outputs: tuple[torch.Tensor, ...]
    multihead_outputs: tuple[torch.Tensor, ...]
    truncated: int
    texts: list[str] = field(repr=False, default_factory=list)
    period: torch.Tensor | None = None
    comma: torch.Tensor | None = None
    token_types: torch.Tensor | None = None


def _device_of(model, device):
    """The device the model runs on: `device` (checked: 'foo' or an absent GPU had raised torch's
    RuntimeError / AssertionError), the model moved there, or else its own."""
    if device is not None:
        from ...validation import device as checked_device

        dev = checked_device(device)
        model.to(dev)
        return dev
    return next(model.parameters()).device


def special_only_note(count: int) -> str:
    """What report.json's special_only counts, for the page and the command's stderr."""
    return (f"{count:,} {'text' if count == 1 else 'texts'} came out of the tokenizer as special tokens "
            "alone (lines of control or zero-width characters, which it deletes); each counts in every "
            "mean as a text of [CLS] [SEP] (report.json special_only)")


TRUNCATED_WARNING = "trace: texts longer than {limit} tokens are truncated (counted in TraceResult.truncated)"


def warn_truncated(limit: int) -> None:
    """A UserWarning attributed to the caller's line that called into embgeom (the first frame
    outside the package): a fixed stacklevel had named a line of embgeom's own, so filters by
    module, pytest's summary and the once-per-line display saw embgeom instead."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    level, frame = 1, sys._getframe(0)  # (stacklevel 1: this function)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        level, frame = level + 1, frame.f_back
    warnings.warn(TRUNCATED_WARNING.format(limit=limit), UserWarning, stacklevel=level)


def _check_batch_memory(B: int, T: int, L: int, H: int, D: int, dev) -> None:
    """ValueError naming batch_size when a batch's forward pass would need more memory than is
    free (a batch of 2,000 texts had failed in torch's allocator): the attention maps of every
    layer kept (B H T^2 each) and two more of the layer being computed (scores and
    probabilities), the hidden states and per-head outputs of every depth (B T D each, three
    times), float32."""
    from ...engine.limits import refuse_past_memory

    refuse_past_memory(4 * B * T * (H * T * (L + 2) + D * (3 * L + 2)), lambda need, free: (
        f"batch_size: a batch of {B:,} texts padded to {T:,} tokens needs about {need} for its forward pass "
        f"({L} layers x {H} heads of {T} x {T} attention maps a text, and the states), {free}; lower "
        f"{validation.caller_name('batch_size')} (or {validation.caller_name('max_length')})"), dev)


def iter_batches(model, tokenizer, texts, *, batch_size: int = 32, max_length: int | None = None,
                 device=None, warn: bool = True, skip: int = 0) -> Iterator[Batch]:
    """Yield a `Batch` per forward pass over `texts` (a list, an iterable of str, or a path to a
    UTF-8 file with one text per line; blank lines are skipped). A text with a TAB is a
    sentence pair, [CLS] A [SEP] B [SEP] with token types 0 and 1 (see `encode`). Forward passes
    run under torch.inference_mode with eager attention; tensors stay on the model's device.
    Texts longer than max_length (default: the model's maximum) are truncated; the first batch
    with a truncation warns once. skip: start after that many texts (a resumed run)."""
    batch_size = validation.positive_int(batch_size, "batch_size", allow_zero=False)
    dev = _device_of(model, device)
    limit = model_max_length(model, tokenizer, max_length)
    H = model.config.num_attention_heads
    adapter = adapters.adapter_for(model)
    adapters.check_attention(model)
    L = adapters.num_layers(model)
    cls_id = adapters.special_token_id(tokenizer, "cls", adapter)
    sep_id = adapters.special_token_id(tokenizer, "sep", adapter)
    punct_table = punctuation_table(tokenizer).to(dev)
    period_table, comma_table = (t.to(dev) for t in mark_tables(tokenizer))
    # input of the attention output projection = every head's output; ALBERT's one shared
    # projection fires once per depth, so `captured` holds L entries in application order
    denses = adapters.output_projections(model)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, inputs, output):
        captured.append((inputs[0], output))

    warned = False
    done = skip
    handles = [m.register_forward_hook(hook) for m in denses]
    try:
        with eval_mode(model):  # (dropout off for the passes, the model's own mode after)
            source = _texts(texts)
            if skip and sum(1 for _ in itertools.islice(source, skip)) < skip:
                # (a resumed run's count past the corpus: the run had ended at once, reporting it)
                raise ValueError(f"texts: a checkpoint counts {skip:,} texts done, this corpus has fewer")
            for chunk in _chunks(source, batch_size):
                # long texts are cut here (so that they can be counted), pairs from the longer side
                enc, truncated = encode(tokenizer, chunk, limit, done)
                done += len(chunk)
                if truncated and warn and not warned:
                    warn_truncated(limit)
                    warned = True
                enc = pad_right(tokenizer, enc)
                _check_batch_memory(*enc["input_ids"].shape, L, H, model.config.hidden_size, dev)
                enc = {k: v.to(dev) for k, v in adapters.model_inputs(model, enc).items()}
                captured.clear()
                with torch.inference_mode():
                    out = model(**enc, output_hidden_states=True, output_attentions=True, return_dict=True)
                if out.attentions is None or any(a is None for a in out.attentions):
                    raise ValueError("model: no attention probabilities; load it with "
                                     "attn_implementation=\"eager\" (embgeom.load_model does)")
                if not len(captured) == len(out.attentions) == L:
                    raise ValueError(f"model: {adapter.name}: {len(captured)} per-head outputs and "
                                     f"{len(out.attentions)} attention maps for {L} layers")
                ids = enc["input_ids"]
                mask = enc["attention_mask"].bool()
                heads = tuple(i.reshape(*i.shape[:-1], H, i.shape[-1] // H) for i, _ in captured)
                yield Batch(
                    input_ids=ids, mask=mask,
                    cls=(ids == cls_id) & mask, sep=(ids == sep_id) & mask,
                    punct=punct_table[ids] & mask, hidden_states=tuple(out.hidden_states),
                    attentions=tuple(out.attentions), head_outputs=heads,
                    multihead_outputs=tuple(o for _, o in captured), truncated=truncated, texts=chunk,
                    period=period_table[ids] & mask, comma=comma_table[ids] & mask,
                    token_types=enc.get("token_type_ids"))
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------ reduction
@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class TraceResult:
    """Corpus-level means (L layers, H heads; tensors float64 on the model's device, counts
    int64). Per-layer
    tensors have index i = layer i + 1, per-depth ones (norm) index = depth (0 = embeddings);
    the tables (per_layer, to_pandas, the HTML) number layers 1..L (docs/metrics.md, layers,
    depths and heads).

    cone_layer_input (L,), cone_head_output (L, H), cone_multihead_output (L,),
    cone_layer_output (L,): per text I/n over its real tokens, then the mean over texts;
    cone_raw: {layer_input, head_output, multihead_output, layer_output}: the same means of I
    itself (the authors' code reports I, which grows with the text's length).
    entropy (L, H): row entropy (nats) over every real query row; uniform_baseline: mean of
    ln(n_valid) over the same rows; head_mean_entropy (L, H): entropy of the head's mean row per
    text, mean over texts. attention_to: {cls, sep, punct, prev, next, period, comma: (L, H)}
    mass per real row; sep_from_other (L, H): mass on [SEP] per real row that is neither [CLS]
    nor [SEP] (NaN without such rows). attention_to_per_text: the same keys averaged as Clark et
    al. do (arXiv 1906.04341): each text's mean over its own real rows (sep_from_other: over its
    rows that are neither [CLS] nor [SEP], texts without one left out), then the mean over texts.
    target_distribution (L*H, R): each head's mean attention over [CLS], [SEP], relative offsets
    (see attention.target_distribution); js_distance (L*H, L*H) between those rows (head index
    (layer - 1) * H + head). context_*: context similarity (attention.context_similarity):
    context_mean_distance and context_separator_share (L, H), context_distance_hist (L, H, T)
    int64 counts of |i - j| over each real token i and its most similar other token j (T = max_length; report.json trims it
    after the largest distance seen), focus_token[l][h] the token most often the focus of a text
    and focus_share (L, H) its share, context_repeated (L, H) the share of argmax hits on another
    occurrence of the token's own id; evolution: step_distance (L,), step_cosine (L,), norm (L+1,)
    means over every real token."""

    model: str
    n_texts: int
    n_tokens: int
    layers: int
    heads: int
    truncated: int
    special_only: int   # texts the tokenizer left nothing of but their special tokens
    cone_layer_input: torch.Tensor
    cone_head_output: torch.Tensor
    cone_multihead_output: torch.Tensor
    cone_layer_output: torch.Tensor
    entropy: torch.Tensor
    uniform_baseline: float
    head_mean_entropy: torch.Tensor
    attention_to: dict[str, torch.Tensor]
    attention_to_per_text: dict[str, torch.Tensor]
    target_distribution: torch.Tensor
    js_distance: torch.Tensor
    context_mean_distance: torch.Tensor
    context_separator_share: torch.Tensor
    context_distance_hist: torch.Tensor
    focus_token: list[list[str]]
    focus_share: torch.Tensor
    step_distance: torch.Tensor
    step_cosine: torch.Tensor
    norm: torch.Tensor
    seconds: float = 0.0
    context_same_sentence: torch.Tensor | None = None
    context_period_separator: torch.Tensor | None = None
    context_repeated: torch.Tensor | None = None
    attention_heads: dict | None = None
    gaussianity: list | None = None
    cone_raw: dict[str, torch.Tensor] | None = None

    def per_layer(self) -> list[list]:
        """One row per layer: the layer (1..L), cone index I/n of the layer input, the multi-head
        output and the layer output, mean row entropy over heads, step distance and step cosine."""
        return [[l + 1, float(self.cone_layer_input[l]), float(self.cone_multihead_output[l]),
                 float(self.cone_layer_output[l]), float(self.entropy[l].mean()),
                 float(self.step_distance[l]), float(self.step_cosine[l])] for l in range(self.layers)]

    PER_LAYER_COLUMNS = ("layer", "cone_input", "cone_multihead", "cone_output", "entropy_mean",
                         "step_distance", "step_cosine")

    def per_head(self, heads_block: dict | None = None) -> tuple[list[str], list[list]]:
        """(columns, rows): one row per (layer 1..L, head 0..H-1) with head_index (layer - 1) * H +
        head, the row entropy, the mean row's entropy, the cone index of the head output, every
        attention_to target (to_cls, to_sep, ...), the context-similarity mean |i - j|, focus token
        and its share. heads_block: the `attention_heads` dict of
        analysis.heads.measures.HeadsAccumulator.result (an observer of trace(); default
        self.attention_heads, kept by trace(..., heads=True)); its [L][H] numeric entries
        (clark_entropy, cls_entropy, sep_to_sep, value_entropy, ...) and those of its
        directionality block join as columns, its MDS coordinates as mds_x, mds_y and Clark's
        behaviour marker of the MDS map as behaviour."""
        L, H = self.layers, self.heads
        if heads_block is None:
            heads_block = self.attention_heads
        cols = {"entropy": self.entropy, "head_mean_entropy": self.head_mean_entropy,
                "cone_head_output": self.cone_head_output,
                **{f"to_{k}": v for k, v in self.attention_to.items()},
                "context_mean_distance": self.context_mean_distance, "focus_share": self.focus_share}
        table = {k: torch.as_tensor(v).double().cpu().reshape(L, H).tolist() for k, v in cols.items()}
        table["focus_token"] = self.focus_token
        block = dict(heads_block or {})
        block.update((heads_block or {}).get("directionality") or {})
        for k, v in block.items():
            v = v.tolist() if hasattr(v, "tolist") else v
            if (isinstance(v, list) and len(v) == L and all(isinstance(r, list) and len(r) == H for r in v)
                    and all(x is None or isinstance(x, (int, float)) for r in v for x in r)):
                table[k] = v
        if heads_block and "mds" in heads_block:
            xy = torch.as_tensor(heads_block["mds"], dtype=torch.float64).reshape(L, H, 2).tolist()
            table["mds_x"] = [[p[0] for p in r] for r in xy]
            table["mds_y"] = [[p[1] for p in r] for r in xy]
        if heads_block and "mds_behaviour" in heads_block:
            table["behaviour"] = heads_block["mds_behaviour"]
        names = list(table)
        rows = [[l + 1, h, l * H + h] + [table[k][l][h] for k in names] for l in range(L) for h in range(H)]
        return ["layer", "head", "head_index"] + names, rows

    def per_head_pair(self, heads_block: dict | None = None) -> tuple[list[str], list[list]]:
        """(columns, rows): Clark's summed JS divergence (nats) between every ordered pair of
        heads, one row per (head a, head b), both given as layer (1..L), head (0..H-1) and
        head_index (layer - 1) * H + head; the diagonal (0) included, so a pivot on the indices
        gives the (L*H, L*H) matrix. heads_block: default self.attention_heads; it must hold
        js_divergence (trace(..., clark_js=True) or HeadsAccumulator(js=True))."""
        block = self.attention_heads if heads_block is None else heads_block
        if not block or "js_divergence" not in block:
            raise ValueError("no JS divergences between heads: run trace(..., clark_js=True) "
                             "(or pass the attention_heads block of HeadsAccumulator(js=True))")
        js = torch.as_tensor(block["js_divergence"], dtype=torch.float64).cpu().tolist()
        H = self.heads
        rows = [[a // H + 1, a % H, a, b // H + 1, b % H, b, js[a][b]]
                for a in range(len(js)) for b in range(len(js))]
        return ["layer_a", "head_a", "head_index_a", "layer_b", "head_b", "head_index_b",
                "js_divergence"], rows

    def per_depth_gaussianity(self, entries: list | None = None) -> tuple[list[str], list[list]]:
        """(columns, rows): the K^2 normality of the hidden states (docs/metrics.md,
        Gaussianity), one row per (depth 0..L, kind): kind "token" tests every real token's
        vector, "text_mean" each text's mean vector; share of coordinates rejecting normality at
        the Bonferroni threshold, mean skewness, mean excess kurtosis, the threshold and the
        number of tests. entries: default self.gaussianity (trace(..., gaussianity=True))."""
        entries = self.gaussianity if entries is None else entries
        if not entries:
            raise ValueError("no Gaussianity measures: run trace(..., gaussianity=True)")
        keys = ["share_rejected", "mean_skew", "mean_excess_kurtosis", "threshold", "count"]
        rows = []
        for e in entries:
            rows.append([e["depth"], "token"] + [e[k] for k in keys])
            if "text_mean" in e:
                rows.append([e["depth"], "text_mean"] + [e["text_mean"][k] for k in keys])
        return ["depth", "kind"] + keys, rows

    TABLES = ("layers", "heads", "clark_js", "gaussianity")

    def to_pandas(self, what: str = "layers", heads_block: dict | None = None) -> DataFrame:
        """A long DataFrame (pandas optional) of one of TABLES:
        "layers": the per-layer table (PER_LAYER_COLUMNS; column "layer" runs 1..L);
        "heads": one row per (layer, head), `per_head` (heads_block: the `attention_heads` block
        to join, default the one trace(..., heads=True) kept);
        "clark_js": one row per ordered pair of heads with their summed JS divergence,
        `per_head_pair` (trace(..., clark_js=True));
        "gaussianity": one row per (depth, token / text_mean), `per_depth_gaussianity`
        (trace(..., gaussianity=True))."""
        try:
            import pandas
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from None
        if what == "layers":
            return pandas.DataFrame(self.per_layer(), columns=list(self.PER_LAYER_COLUMNS))
        tables = {"heads": self.per_head, "clark_js": self.per_head_pair}
        if what in tables:
            cols, rows = tables[what](heads_block)
        elif what == "gaussianity":
            cols, rows = self.per_depth_gaussianity()
        else:
            raise ValueError(f"what: expected one of {', '.join(map(repr, self.TABLES))}, got {what!r}")
        return pandas.DataFrame(rows, columns=cols)

    def __repr__(self) -> str:
        """One line (the dataclass's own repr printed every tensor: 55 KB for 20 texts with heads=True)."""
        extras = [name for name in ("attention_heads", "gaussianity") if getattr(self, name) is not None]
        return (f"TraceResult(model={self.model!r}, texts={fmt(self.n_texts)}, tokens={fmt(self.n_tokens)}, "
                f"layers={self.layers}, heads={self.heads}, truncated={fmt(self.truncated)}, "
                f"seconds={fmt(self.seconds, 3)}{''.join(f', {e}=...' for e in extras)})")

    def _repr_html_(self) -> str:
        from ...tables import table_html

        head = (f"<b>TraceResult</b> {html.escape(self.model)}: {self.n_texts} texts, {self.n_tokens} tokens, "
                f"{self.layers} layers x {self.heads} heads, {self.seconds:.1f} s")
        return head + table_html(["layer (1..L)", *self.PER_LAYER_COLUMNS[1:]], self.per_layer())

    def to_dict(self) -> dict:
        """The report.json keys of `embgeom text` (NaN -> None), with `attention_heads` and
        `gaussianity` where trace(..., heads=True / gaussianity=True) computed them."""
        from ...results import as_list, jsonable

        extras = {k: jsonable(v) for k, v in (("attention_heads", self.attention_heads),
                                               ("gaussianity", self.gaussianity)) if v is not None}
        return {
            "model": self.model, "n_texts": self.n_texts, "n_tokens": self.n_tokens,
            "layers": self.layers, "heads": self.heads, "truncated": self.truncated,
            "special_only": self.special_only,
            # the page's "forward passes (s)": the passes with every metric taken on them
            "forward_passes_seconds": self.seconds,
            "cone_index": {"layer_input": as_list(self.cone_layer_input),
                           "head_output": as_list(self.cone_head_output),
                           "multihead_output": as_list(self.cone_multihead_output),
                           "layer_output": as_list(self.cone_layer_output),
                           **{f"{k}_raw": as_list(v) for k, v in (self.cone_raw or {}).items()}},
            "entropy": {"mean": as_list(self.entropy),
                        "uniform_baseline": self.uniform_baseline if math.isfinite(self.uniform_baseline) else None,
                        "head_mean": as_list(self.head_mean_entropy)},
            "attention_to": {k: as_list(v) for k, v in self.attention_to.items()},
            "attention_to_per_text": {k: as_list(v) for k, v in self.attention_to_per_text.items()},
            "js_distance": as_list(self.js_distance),
            "context_similarity": {"mean_distance": as_list(self.context_mean_distance),
                                   "focus_token": self.focus_token,
                                   "focus_share": as_list(self.focus_share),
                                   "separator_share": as_list(self.context_separator_share),
                                   **self._context_extras()},
            "evolution": {"step_distance": as_list(self.step_distance),
                          "step_cosine": as_list(self.step_cosine), "norm": as_list(self.norm)},
            **extras,
        }


    def _context_extras(self) -> dict:
        """The |i - j| histograms (trimmed after the largest distance seen) and, when the
        sentence tables were given, the same-sentence and '.'-or-[SEP] shares (2512.21956)."""
        hist = self.context_distance_hist
        seen = (hist.sum(dim=(0, 1)) > 0).nonzero()
        width = int(seen.max()) + 1 if seen.numel() else 0
        out = {"distance_hist": hist[..., :width].cpu().tolist(),
               "layer_distance_hist": hist[..., :width].sum(1).cpu().tolist()}
        if self.context_repeated is not None:
            from ...results import as_list

            out["repeated_token_share"] = as_list(self.context_repeated)
        if self.context_same_sentence is not None:
            from ...results import as_list

            out["same_sentence_share"] = as_list(self.context_same_sentence)
            out["period_separator_share"] = as_list(self.context_period_separator)
        return out


class TraceAccumulator(Resumable):
    """Running sums of every metric over batches, on the model's device. `update(batch)` per
    batch, `merge(other)` to combine shards, `result()` for the means."""

    not_saved = ("sentence_tables", "_ws")
    fixed = ("L", "H", "max_len", "V", "metrics")
    count = "n_texts"

    def __init__(self, L: int, H: int, max_len: int, vocab_size: int, device, *,
                 metrics: Iterable[str] = METRICS, model_name: str = "",
                 sentence_tables: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.L, self.H, self.max_len, self.V = L, H, max_len, vocab_size
        self.metrics = {metrics} if isinstance(metrics, str) else set(metrics)  # ("cone" as ("cone",))
        unknown = self.metrics - set(METRICS)
        if unknown:
            raise ValueError(f"metrics: unknown {sorted(unknown)}; expected a subset of {METRICS}")
        self.model_name = model_name
        self.sentence_tables = None if sentence_tables is None else tuple(t.to(device) for t in sentence_tables)
        z = lambda *s, dt=torch.float64: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.n_texts = 0
        self.n_tokens = 0
        self.truncated = 0
        self.special_only = 0
        self.s = {
            "cone_in": z(L), "cone_head": z(L, H), "cone_mh": z(L), "cone_out": z(L),
            "cone_in_n": z(L), "cone_head_n": z(L, H), "cone_mh_n": z(L), "cone_out_n": z(L),
            "cone_in_raw": z(L), "cone_head_raw": z(L, H), "cone_mh_raw": z(L), "cone_out_raw": z(L),
            "entropy": z(L, H), "baseline": z(()), "hme": z(L, H), "hme_n": z(()),
            "targets": z(len(attention.TARGETS), L, H), "dist": z(L * H, 2 + 2 * max_len - 1),
            "ctx_rows": z(L, H, dt=torch.int64), "ctx_dist": z(L, H, dt=torch.int64),
            "ctx_sep": z(L, H, dt=torch.int64), "ctx_hist": z(L, H, max_len, dt=torch.int64),
            "focus": z(L, H, vocab_size, dt=torch.int64) if "context" in self.metrics else z(L, H, 1, dt=torch.int64),
            "step_dist": z(L), "step_cos": z(L), "norm": z(L + 1),
            "ctx_same": z(L, H, dt=torch.int64), "ctx_rep": z(L, H, dt=torch.int64), "ctx_period": z(L, H, dt=torch.int64),
            "other_rows": z(()),
            "targets_text": z(len(attention.TARGETS), L, H), "texts_other": z(()),
        }
        self._ws: dict = {}     # reusable scratch buffers (no page faults per batch)

    def check_restored(self) -> None:
        # each text holds at least one token and at most max_len: counts of a crafted file that
        # do not fit (no tokens beside finished texts had divided by zero)
        if not self.n_texts <= self.n_tokens <= self.n_texts * self.max_len or self.truncated > self.n_texts \
                or self.special_only > self.n_texts:
            raise ValueError(f"TraceAccumulator: {self.n_tokens} tokens, {self.truncated} truncated and "
                             f"{self.special_only} of special tokens only in {self.n_texts} texts of at most "
                             f"{self.max_len}")
        # sums a run cannot reach: NaN or Inf, a negative count, a cone index past 1 (a crafted
        # file under a recomputed checksum had reported them as means)
        for key, v in self.s.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"TraceAccumulator: its sums {key!r} hold NaN or Inf")
            if not v.is_floating_point() and bool((v < 0).any()):
                raise ValueError(f"TraceAccumulator: its counts {key!r} hold a negative count")
        slack = 1 + 1e-9
        for key in ("in", "head", "mh", "out"):
            texts, per_text, raw = (self.s[f"cone_{key}{end}"] for end in ("_n", "", "_raw"))
            if bool(((texts < 0) | (texts > self.n_texts) | (per_text < 0) | (per_text > texts * slack)
                     | (raw < 0) | (raw > self.n_tokens * slack)).any()):
                raise ValueError(f"TraceAccumulator: its cone sums {f'cone_{key}'!r} pass what {self.n_texts} "
                                 f"texts of {self.n_tokens} tokens allow (I/n <= 1 a text, I <= n)")

    @staticmethod
    def _cone_sum(xs: list[torch.Tensor], mask: torch.Tensor, groups: tuple[int, ...]):
        """xs: tensors (B, T, d), or (G, B, T, d) for G groups of B sets sharing mask (B, T), prod(groups)
        * B sets in all, in order; -> (sum of I/n over texts, sum of I, n texts) per group, sets
        without a non-zero vector left out. Calls the cone kernel (embgeom.cone_index without its input
        checks: the tensors come from the model); the C++ core's kernel reads each tensor in place, a
        layer's head outputs (B, T, H, d) as H groups (stacked copies of the states and head
        outputs had cost 12-14 ms of a 32 x 128 batch's 47 ms of cone work, Emerald Rapids),
        other backends get the groups as (G * B, T, d)."""
        _, run = registry.pick("cone_index", xs[0])
        sums, used = [], []
        for x in xs:
            m = mask
            if x.dim() == 4 and not getattr(run, "takes_groups", False):
                x, m = x.reshape(-1, *x.shape[2:]), mask.repeat(x.shape[0], 1)
            s, u, _zero = run(x, m)
            sums.append(s)
            used.append(u)
        dev = xs[0].device
        raw = torch.linalg.vector_norm(torch.cat(sums).to(dev).double(), dim=-1)
        used = torch.cat(used).to(dev).reshape(*groups, -1)
        raw = torch.minimum(raw.reshape(*groups, -1), used.double())  # (I <= n: rounding aside)
        r = raw / used.clamp(min=1)
        some = used > 0
        return (torch.where(some, r, torch.zeros_like(r)).sum(-1), torch.where(some, raw, torch.zeros_like(raw)).sum(-1),
                some.sum(-1).double())

    def _buf(self, key, shape, like: torch.Tensor) -> torch.Tensor:
        k = (key, tuple(shape), like.dtype, str(like.device))
        if k not in self._ws:
            for old in [o for o in self._ws if o[0] == key]:
                del self._ws[old]
            self._ws[k] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._ws[k]

    def update(self, b: Batch) -> None:
        L, H = self.L, self.H
        mask = b.mask
        B, T = mask.shape
        s = self.s
        self.n_texts += B
        n_tok = int(mask.sum())
        self.n_tokens += n_tok
        self.truncated += b.truncated
        # (a line of control or zero-width characters: [CLS] [SEP] alone, counted in every mean)
        self.special_only += int((~(mask & ~b.cls & ~b.sep).any(1)).sum())
        if "cone" in self.metrics:
            # one kernel call per layer and tensor kind, each read in place where it lies
            sums, raw, cnt = self._cone_sum(list(b.hidden_states), mask, (L + 1,))  # (B, T, D) each
            s["cone_in"] += sums[:L]; s["cone_in_raw"] += raw[:L]; s["cone_in_n"] += cnt[:L]     # noqa: E702
            s["cone_out"] += sums[1:]; s["cone_out_raw"] += raw[1:]; s["cone_out_n"] += cnt[1:]  # noqa: E702
            heads = [o.permute(2, 0, 1, 3) for o in b.head_outputs]         # (H, B, T, d_h) views
            sums, raw, cnt = self._cone_sum(heads, mask, (L, H))
            s["cone_head"] += sums; s["cone_head_raw"] += raw; s["cone_head_n"] += cnt  # noqa: E702
            sums, raw, cnt = self._cone_sum(list(b.multihead_outputs), mask, (L,))
            s["cone_mh"] += sums; s["cone_mh_raw"] += raw; s["cone_mh_n"] += cnt        # noqa: E702
        n_valid = mask.sum(1).double()
        s["baseline"] += (n_valid * torch.log(n_valid.clamp(min=1))).sum()
        none = torch.zeros_like(mask)
        dot_key = b.period if b.period is not None else none
        comma_key = b.comma if b.comma is not None else none
        other_n = (mask & ~b.cls & ~b.sep).sum(1)
        s["other_rows"] += other_n.sum()
        s["texts_other"] += (other_n > 0).sum()
        # per text: its real rows, or (for sep_from_other) its rows that are neither [CLS] nor [SEP]
        text_rows = torch.stack([mask.sum(1).clamp(min=1) if k != "sep_from_other" else other_n.clamp(min=1)
                                 for k in attention.TARGETS]).double()                # (K, B)
        sentence = period = None
        if "context" in self.metrics and self.sentence_tables is not None:
            ends, period = (t[b.input_ids] & mask for t in self.sentence_tables)
            sentence = attention.sentence_index(ends | b.sep)
        # the row entropies inside the attention summaries' pass over each map where both run on
        # the C++ core (the maps are read from memory once, not twice: 10-15 ms of a 32 x 128 batch)
        fused = bool(b.attentions) and {"entropy", "attention"} <= self.metrics \
            and attention.fused_row_entropy(b.attentions[0])
        if b.attentions and "entropy" in self.metrics and not fused:
            # the row-entropy kernel (embgeom.attention_entropy without its input checks)
            _, entropy_kernel = registry.pick("attention_entropy", b.attentions[0])
        for l, attn in enumerate(b.attentions):
            ent = None
            if "entropy" in self.metrics and not fused:
                ent = entropy_kernel(attn, mask, 0.0).to(attn.device)         # (B, H, T), NaN pads
            if "attention" in self.metrics:
                t, hme, dist, *rows = attention.layer_summaries(attn, mask, b.cls, b.sep, b.punct, dot_key,
                                                                comma_key, self.max_len, workspace=self._ws,
                                                                row_entropy=fused)
                if fused:
                    ent = rows[0]
                per = torch.stack([t[k] for k in attention.TARGETS]).to(s["targets"].device)  # (K, B, H)
                s["targets"][:, l] += per.sum(1)
                # Clark's average: each text's mean over its own real rows, summed over texts
                # (texts without a row that is neither [CLS] nor [SEP] add nothing to that key)
                s["targets_text"][:, l] += (per / text_rows[:, :, None]).sum(1)
                s["hme"][l] += hme.to(s["hme"].device)
                s["dist"][l * H:(l + 1) * H] += dist.to(s["dist"].device)
            if ent is not None:
                s["entropy"][l] += torch.nan_to_num(ent, nan=0.0).sum(dim=(0, 2)).double()
            if "context" in self.metrics:
                c = attention.context_similarity(b.head_outputs[l].transpose(1, 2), mask, b.sep,
                                            b.input_ids, self.V, workspace=self._ws,
                                            sentence=sentence, period=period, focus_counts=s["focus"][l])
                s["ctx_rows"][l] += c["rows"]
                s["ctx_dist"][l] += c["distance"]
                s["ctx_sep"][l] += c["separator"]
                s["ctx_rep"][l] += c["repeated"]
                s["ctx_hist"][l, :, :T] += c["distance_hist"]
                if sentence is not None:
                    s["ctx_same"][l] += c["same_sentence"]
                    s["ctx_period"][l] += c["period_or_separator"]
        s["hme_n"] += B
        if "evolution" in self.metrics:
            m = mask.double()
            for l in range(L):
                sq_prev, sq_cur, step_sq, dot = step_sums(b.hidden_states[l], b.hidden_states[l + 1])
                norm_prev, norm_cur = sq_prev.sqrt(), sq_cur.sqrt()
                if l == 0:
                    s["norm"][0] += (norm_prev * m).sum()
                s["norm"][l + 1] += (norm_cur * m).sum()
                s["step_dist"][l] += (step_sq.sqrt() * m).sum()
                s["step_cos"][l] += ((dot / (norm_prev * norm_cur).clamp(min=1e-300)).clamp(-1.0, 1.0) * m).sum()

    def merge(self, other: "TraceAccumulator") -> None:
        for k, v in other.s.items():
            self.s[k] += v.to(self.s[k].device)
        self.n_texts += other.n_texts
        self.n_tokens += other.n_tokens
        self.truncated += other.truncated
        self.special_only += other.special_only

    def result(self, tokenizer=None, seconds: float = 0.0) -> TraceResult:
        if self.n_texts == 0:
            raise ValueError("texts: no non-blank text to analyse (empty corpus)")
        s, L, H = self.s, self.L, self.H
        rows = float(self.n_tokens)
        div = lambda a, n: a / n if isinstance(n, float) else a / n.clamp(min=1)  # noqa: E731
        ctx_rows = s["ctx_rows"].double()
        nan_if = lambda v, n: torch.where(n > 0, v, torch.full_like(v, math.nan))  # noqa: E731
        focus_ids = s["focus"].argmax(-1)
        focus_total = s["focus"].sum(-1).clamp(min=1)
        focus_share = s["focus"].gather(-1, focus_ids[..., None])[..., 0].double() / focus_total
        if "context" not in self.metrics:
            focus = [[None] * H for _ in range(L)]
        elif tokenizer is not None:
            toks = tokenizer.convert_ids_to_tokens(focus_ids.reshape(-1).tolist())
            focus = [toks[l * H:(l + 1) * H] for l in range(L)]
        else:
            focus = [[str(int(i)) for i in row] for row in focus_ids.tolist()]
        # a metric left out (metrics=) is NaN, not the zeros of sums never taken
        skip = {"cone", "entropy", "attention", "context", "evolution"} - self.metrics
        got = lambda name, v: torch.full_like(v, math.nan) if name in skip else v  # noqa: E731
        baseline = float(s["baseline"]) / rows if "entropy" not in skip else math.nan
        return TraceResult(
            model=self.model_name, n_texts=self.n_texts, n_tokens=self.n_tokens, layers=L, heads=H,
            truncated=self.truncated, special_only=self.special_only,
            cone_layer_input=nan_if(div(s["cone_in"], s["cone_in_n"]), s["cone_in_n"]),
            cone_head_output=nan_if(div(s["cone_head"], s["cone_head_n"]), s["cone_head_n"]),
            cone_multihead_output=nan_if(div(s["cone_mh"], s["cone_mh_n"]), s["cone_mh_n"]),
            cone_layer_output=nan_if(div(s["cone_out"], s["cone_out_n"]), s["cone_out_n"]),
            cone_raw={name: nan_if(div(s[f"cone_{key}_raw"], s[f"cone_{key}_n"]), s[f"cone_{key}_n"])
                      for name, key in (("layer_input", "in"), ("head_output", "head"),
                                        ("multihead_output", "mh"), ("layer_output", "out"))},
            entropy=got("entropy", s["entropy"] / rows), uniform_baseline=baseline,
            head_mean_entropy=got("attention", s["hme"] / float(s["hme_n"])),
            attention_to={k: got("attention", s["targets"][i] / (rows if k != "sep_from_other"
                                                                  else float(s["other_rows"])))
                          for i, k in enumerate(attention.TARGETS)},
            attention_to_per_text={k: got("attention", s["targets_text"][i] / float(
                self.n_texts if k != "sep_from_other" else s["texts_other"])) for i, k in enumerate(attention.TARGETS)},
            target_distribution=got("attention", s["dist"] / rows),
            js_distance=attention.js_distance(s["dist"]) if "attention" in self.metrics
            else torch.full((L * H, L * H), math.nan, dtype=torch.float64),
            context_mean_distance=nan_if(s["ctx_dist"].double() / ctx_rows.clamp(min=1), ctx_rows),
            context_separator_share=nan_if(s["ctx_sep"].double() / ctx_rows.clamp(min=1), ctx_rows),
            context_repeated=nan_if(s["ctx_rep"].double() / ctx_rows.clamp(min=1), ctx_rows),
            context_distance_hist=s["ctx_hist"], focus_token=focus, focus_share=got("context", focus_share),
            step_distance=got("evolution", s["step_dist"] / rows), step_cosine=got("evolution", s["step_cos"] / rows),
            norm=got("evolution", s["norm"] / rows), seconds=seconds,
            context_same_sentence=None if self.sentence_tables is None else
            nan_if(s["ctx_same"].double() / ctx_rows.clamp(min=1), ctx_rows),
            context_period_separator=None if self.sentence_tables is None else
            nan_if(s["ctx_period"].double() / ctx_rows.clamp(min=1), ctx_rows))


def step_sums(prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A token's states at adjacent depths, (B, T, D) each -> four (B, T) float64 tensors:
    |prev|^2, |cur|^2, |cur - prev|^2 and cur . prev. Float64 throughout: the states can be nearly
    collinear (1 - cos down to 1e-6), where float32 sums keep one or two digits of 1 - cos and of
    the step length. On CPU float32 states the C++ kernel (one pass over both, the difference
    taken of the float64 values); elsewhere torch in float64."""
    row_pair_sums = registry.cpp_kernel("row_pair_sums", prev, cur)
    if row_pair_sums is not None:
        B, T, D = prev.shape
        a, c = (x.reshape(B * T, D) for x in (prev, cur))
        a, c = (x if x.stride(-1) == 1 else x.contiguous() for x in (a, c))
        out = torch.from_numpy(row_pair_sums(a.detach().numpy(), c.detach().numpy())).view(B, T, 4)
        return out[..., 0], out[..., 1], out[..., 2], out[..., 3]
    p, q = prev.double(), cur.double()
    diff = q - p
    # row dot products as einsum (a batched matrix product): torch.linalg.vecdot and
    # vector_norm of the difference took 3x longer in float64 on an AVX2 CPU
    rows = lambda x, y: torch.einsum("btd,btd->bt", x, y)  # noqa: E731
    return rows(p, p), rows(q, q), rows(diff, diff), rows(q, p)


def trace(model, tokenizer, texts, *, batch_size: int = 32, max_length: int | None = None,
          device: DeviceArg = None, metrics: Iterable[str] = METRICS, progress: ProgressArg = False,
          observers: Iterable = (), heads: bool = False, clark_js: bool = False,
          gaussianity: bool = False, directionality: bool = False,
          checkpoint: PathArg | None = None) -> TraceResult:
    """Run `texts` through an encoder `model` (any family of adapters.ADAPTERS) in batches and
    reduce the cone, attention and context metrics and the layer evolution over the corpus (see TraceResult for every
    field and its definition).

    texts: list / iterable of str, or a path to a UTF-8 file with one text per line (blank lines
    skipped; no text left is a ValueError). metrics: subset of ("cone", "entropy", "attention",
    "context", "evolution"). batch_size: texts per forward pass (default 32). max_length: tokens
    per text with the special tokens, at most the model's positions (and the tokenizer's
    model_max_length), which is also the default; longer texts are truncated and counted in
    result.truncated. device: "cpu", "cuda" or "cuda:i" to run on, where the model is moved
    (model.to(device): it stays there after the call); default the model's own device.
    progress: True (or a progress.Progress) shows a bar of texts on stderr.
    Tensors never leave the model's device; memory does not grow with the number of texts.
    observers: more accumulators, each `update(batch)`ed after the trace metrics (e.g.
    embgeom.analysis.heads.measures.HeadsAccumulator, or analysis.text.keeper.Keeper keeping vectors).

    heads / clark_js / gaussianity / directionality: the analyses of `embgeom text --heads
    --clark-js --gaussianity --directionality` (analysis/heads/text_extras.py, the same code) in
    the same passes: result.attention_heads (the report.json block `attention_heads`: Clark's
    entropies, [SEP]->[SEP], gate patterns; with clark_js the summed JS divergence between heads
    and its MDS map; with directionality its block) and result.gaussianity (K^2 normality per
    depth); to_pandas("heads" | "clark_js" | "gaussianity") gives them as long tables.

    checkpoint: a file path (or a resume.TraceCheckpoint): the sums of finished batches are
    saved there (at most a minute apart, on Ctrl-C and at the end), and a call with the same
    texts, model and settings resumes after the texts they cover, with the same result as an
    uninterrupted run (analysis/text/resume.py). texts must then be a list or a file path;
    every observer must be a Resumable (embgeom's are)."""
    import contextlib
    import time

    check_model_inputs(model, tokenizer, texts)  # batch_size: iter_batches checks it
    start = time.perf_counter()
    dev = _device_of(model, device)
    max_len = model_max_length(model, tokenizer, max_length)
    prog = as_progress(progress, "embgeom text")
    total = count_texts(texts) if prog.enabled else None
    acc = TraceAccumulator(adapters.num_layers(model), model.config.num_attention_heads,
                           max_len, max(model.config.vocab_size, len(tokenizer)), dev,
                           metrics=metrics, model_name=str(getattr(model.config, "_name_or_path", "")),
                           sentence_tables=sentence_tables(tokenizer))
    observers = list(observers)
    for k, obs in enumerate(observers):
        if not callable(getattr(obs, "update", None)):
            raise TypeError(f"observers: item {k} ({type(obs).__name__}) has no update(batch) method")
    heads, clark_js, gaussianity, directionality = (validation.flag(v, name) for v, name in (
        (heads, "heads"), (clark_js, "clark_js"), (gaussianity, "gaussianity"), (directionality, "directionality")))
    extras = None
    if heads or clark_js or gaussianity or directionality:
        from ..heads.text_extras import TextExtras

        extras = TextExtras.options(model, tokenizer, max_len, heads=heads, clark_js=clark_js,
                                    gaussianity=gaussianity, directionality=directionality)
        observers = extras.observers + observers
    ckpt = _trace_checkpoint(checkpoint, model, tokenizer, texts, dev, observers, dict(
        batch_size=batch_size, max_length=max_len, metrics=sorted(acc.metrics), heads=heads, clark_js=clark_js,
        gaussianity=gaussianity, directionality=directionality))
    own = ckpt is not None and not isinstance(checkpoint, type(ckpt))   # made here: closed here
    try:
        done = ckpt.restore([acc, *observers]) if ckpt is not None else 0
        if done and prog.enabled:
            prog.stream.write(f"embgeom text: {ckpt.path} holds the finished run ({done:,} texts)\n" if done == total
                              else f"embgeom text: resuming from {ckpt.path}: {done:,} of "
                                   f"{'?' if total is None else format(total, ',')} texts done\n")
        warned = done > 0 and acc.truncated > 0   # texts of the earlier runs were cut: said once, here
        if warned:
            warn_truncated(max_len)
        with extras.active() if extras is not None else contextlib.nullcontext(), \
                prog.bar(total, "forward passes", unit="text", initial=done) as bar:
            done = _run_batches(model, tokenizer, texts, batch_size, max_len, done, [acc, *observers], ckpt,
                                bar, start, warn=not warned)
        # forward-pass seconds: this run's (none when every text was done before) and the earlier runs'
        before = 0.0 if ckpt is None else ckpt.seconds_before
        ran = time.perf_counter() - start if ckpt is None or done > ckpt.resumed_texts else 0.0
        if ckpt is not None and done > ckpt.resumed_texts:  # (a run with nothing left to do keeps the file)
            with prog.phase("saving the checkpoint"):
                ckpt.save(done, [acc, *observers], ran)
    finally:
        if own:
            ckpt.close()
    with ckpt.blamed(ckpt.resumed_texts > 0) if ckpt is not None else contextlib.nullcontext():
        result = acc.result(tokenizer, seconds=before + ran)
        if extras is not None:
            t0 = time.perf_counter()
            with prog.phase("head measures"):
                blocks = extras.report(result)
            result.attention_heads = blocks.get("attention_heads")
            result.gaussianity = blocks.get("gaussianity")
            result.seconds += time.perf_counter() - t0
    return result


def _trace_checkpoint(checkpoint, model, tokenizer, texts, device, observers, settings):
    """None, the TraceCheckpoint given, or one for a path (its fingerprint: texts, model,
    `settings` and the observers' kinds); observers that cannot be saved are refused first."""
    from .resume import TraceCheckpoint

    if checkpoint is None:
        return None
    for obs in observers:
        if not isinstance(obs, Resumable):
            raise TypeError(f"checkpoint: the observer {type(obs).__name__} cannot be saved (not an "
                            "embgeom.engine.checkpoint.Resumable)")
    if isinstance(checkpoint, TraceCheckpoint):
        return checkpoint
    settings = dict(settings, observers=[type(o).__name__ for o in observers])
    return TraceCheckpoint.for_trace(checkpoint, model, tokenizer, texts, device, settings)


def _run_batches(model, tokenizer, texts, batch_size, max_len, done, accumulators, ckpt, bar, start,
                 warn: bool = True) -> int:
    """Update every accumulator with each batch after the first `done` texts; save the
    checkpoint when due and on Ctrl-C or SIGTERM (which wait for the batch in hand). The texts done."""
    import time

    from ...interrupts import interrupt_after, terminate_as_interrupt

    whole = True   # the sums hold whole batches (False while one is being added)
    try:
        with terminate_as_interrupt(ckpt is not None):
            for batch in iter_batches(model, tokenizer, texts, batch_size=batch_size, max_length=max_len,
                                      device=None, skip=done, warn=warn):
                with interrupt_after():
                    whole = False
                    for a in accumulators:
                        a.update(batch)
                    done += batch.mask.shape[0]
                    whole = True
                bar.update(batch.mask.shape[0])
                if ckpt is not None and ckpt.due():
                    ckpt.save(done, accumulators, time.perf_counter() - start)
    except KeyboardInterrupt as exc:
        if ckpt is not None and whole and done > 0:
            with interrupt_after():  # a second Ctrl-C waits for the save (it had cut it short)
                ckpt.save(done, accumulators, time.perf_counter() - start)
            exc.args = (f"interrupted: {done:,} texts are saved in {ckpt.path}; the same call resumes from them",)
        raise
    return done


class PairDiffs(Resumable):
    """The running sums of cls_differences: per group the sum and count of the finished pairs'
    [CLS] differences (added in pair order, a batch at a time), and with keep every pair's
    vector (rows past `done` are zeros). A checkpoint keeps it (`embgeom text --pairs
    --checkpoint`: resume.PairsCheckpoint)."""

    fixed = ("groups", "n_pairs", "keep")

    def __init__(self, groups: list, n_pairs: int, dim: int, keep: bool, device):
        self.groups, self.n_pairs, self.keep = list(groups), int(n_pairs), bool(keep)
        self.done = 0
        self.sums = torch.zeros(len(groups), dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(groups), dtype=torch.int64, device=device)
        self.vectors = torch.zeros(n_pairs if keep else 0, dim, dtype=torch.float64)

    def add(self, idx: torch.Tensor, diff: torch.Tensor) -> None:
        self.sums.index_add_(0, idx, diff)
        self.counts += torch.bincount(idx, minlength=len(self.groups))
        if self.keep:
            self.vectors[self.done:self.done + diff.shape[0]] = diff.cpu()
        self.done += diff.shape[0]


def cls_differences(model, tokenizer, pairs: list[dict], *, batch_size: int = 32,
                    max_length: int | None = None, device=None, keep: bool = False, checkpoint=None) -> dict:
    """[CLS] difference vectors (Luisto 2024, section 4.4.2): per pair cls(a) - cls(b) of the last hidden
    state, the mean per group and the cosine matrix between group means.

    Returns {"groups": [g], "counts": [n_g], "mean_norm": [||mean_g||], "cosine": (G, G)}
    (tensors float64; cosine NaN for a zero mean); keep=True adds "vectors": (P, D) float64, the
    difference vector of every pair in input order. checkpoint: a resume.PairsCheckpoint; the
    finished batches of pairs are saved when due and on Ctrl-C or SIGTERM (which wait for the
    batch in hand), and a rerun continues after them with the same batches."""
    from ...interrupts import interrupt_after, terminate_as_interrupt

    groups = sorted({p["group"] for p in pairs})
    gi = {g: i for i, g in enumerate(groups)}
    dev = _device_of(model, device)
    acc = PairDiffs(groups, len(pairs), model.config.hidden_size, keep, dev)
    if checkpoint is not None:
        checkpoint.restore(acc)
    try:
        with terminate_as_interrupt(checkpoint is not None):
            for start in range(acc.done, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                cls = {}
                for side in ("a", "b"):
                    texts = [p[side] for p in chunk]
                    (batch,) = list(iter_batches(model, tokenizer, texts, batch_size=len(texts),
                                                 max_length=max_length, warn=False))
                    cls[side] = batch.hidden_states[-1][:, 0].double()
                idx = torch.tensor([gi[p["group"]] for p in chunk], device=dev)
                with interrupt_after():   # the sums hold whole batches
                    acc.add(idx, cls["a"] - cls["b"])
                if checkpoint is not None and checkpoint.due():
                    checkpoint.save(acc)
    except KeyboardInterrupt:
        if checkpoint is not None and acc.done > 0:
            checkpoint.save(acc)
        raise
    if checkpoint is not None:
        checkpoint.save(acc)   # finished: a rerun runs no pair again
    means = acc.sums / acc.counts.clamp(min=1)[:, None].double()
    norms = torch.linalg.vector_norm(means, dim=1)
    cos = cosine_matrix(means)   # (a group without a direction: NaN, as cosine_matrix gives zero rows)
    out = {"groups": groups, "counts": acc.counts, "mean_norm": norms, "cosine": cos}
    if keep:
        out["vectors"] = acc.vectors
    return out
