"""Reading coreference files: documents with their words and mention clusters (`embgeom coref`).

One JSON object per line (blank lines are skipped):

    {"tokens": ["John", "said", "he", "was", "tired", "."], "clusters": [[[0, 0], [2, 2]]]}

* `tokens`: the document's words (non-empty strings; each is split into word pieces on its own).
* `clusters`: a list of clusters, each a non-empty list of mentions. A mention is `[start, end]`
  or `[start, end, head]`: 0-based word indices, `end` INCLUSIVE (a one-word mention is
  `[i, i]`), 0 <= start <= end < len(tokens); `head`, if given, is the mention's head word
  (start <= head <= end). Without it the head word is the span's LAST word (ours: Clark et al.
  use the syntactic head; for English noun phrases the last word is the head unless a
  post-modifier follows, as in "the president of France").
* `id` (optional): a name for the document in messages.

Mentions may nest ("his" inside "his mother"); the same span twice (in one cluster or two) is
refused. A cluster of one mention is allowed: it has no antecedent but is a candidate antecedent
of later mentions. Every error is one ValueError naming the file, the line and the field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ...io import json_line


@dataclass
class Mention:
    start: int        # first word, 0-based
    end: int          # last word, inclusive
    head: int         # head word (start <= head <= end)
    cluster: int      # index of its cluster in the line's `clusters`


@dataclass
class Document:
    tokens: list[str]
    mentions: list[Mention]   # in text order: by (start, end)
    name: str                 # `id`, or "line N"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_document(obj, where: str) -> Document:
    """One line's object -> Document; ValueError naming `where` (file and line) and the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with \"tokens\" and \"clusters\", got "
                         f"{type(obj).__name__}")
    for key in ("tokens", "clusters"):
        if key not in obj:
            raise ValueError(f"{where}: no \"{key}\" field")
    tokens = obj["tokens"]
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{where}: \"tokens\" must be a non-empty list of words")
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{where}: \"tokens\"[{i}] must be a non-empty string, got {t!r}")
    n = len(tokens)
    clusters = obj["clusters"]
    if not isinstance(clusters, list):
        raise ValueError(f"{where}: \"clusters\" must be a list of clusters (lists of [start, end] spans)")
    mentions, seen = [], {}
    for c, cluster in enumerate(clusters):
        field = f"\"clusters\"[{c}]"
        if not isinstance(cluster, list) or not cluster:
            raise ValueError(f"{where}: {field} must be a non-empty list of mentions [start, end], got "
                             f"{json.dumps(cluster)[:60]}")
        for m, span in enumerate(cluster):
            f = f"{field}[{m}]"
            if not isinstance(span, list) or len(span) not in (2, 3) or not all(_is_int(v) for v in span):
                raise ValueError(f"{where}: {f} must be [start, end] or [start, end, head] (integers), got "
                                 f"{json.dumps(span)[:60]}")
            start, end = span[0], span[1]
            if not (0 <= start <= end < n):
                raise ValueError(f"{where}: {f} = {span}: need 0 <= start <= end < {n} (the number of "
                                 "tokens; end is inclusive)")
            head = span[2] if len(span) == 3 else end
            if not (start <= head <= end):
                raise ValueError(f"{where}: {f} = {span}: the head word {head} is outside the span "
                                 f"{start}..{end}")
            if (start, end) in seen:
                raise ValueError(f"{where}: {f} = [{start}, {end}] is also {seen[(start, end)]}; "
                                 "each span is one mention")
            seen[(start, end)] = f
            mentions.append(Mention(start, end, head, c))
    mentions.sort(key=lambda x: (x.start, x.end))
    name = obj.get("id")
    return Document(list(tokens), mentions, str(name) if name is not None else where.rsplit(": ", 1)[-1])


def read_mentions(path: str) -> list[Document]:
    """The documents of a coreference JSON-lines file (format in the module docstring)."""
    from ..text.inputs import all_lines

    docs = []
    for number, line in all_lines(path, "MENTIONS"):  # (UTF-8 checked line by line, named)
        if not line.strip():
            continue
        where = f"MENTIONS: {path}: line {number}"
        docs.append(parse_document(json_line(line, where), where))
    if not docs:
        raise ValueError(f"MENTIONS: {path} has no document")
    return docs


def sample_path() -> str:
    """The coreference sample shipped with embgeom (short English texts written for the project)."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(package, "data", "coref.jsonl")
