"""Reading CoNLL-U treebanks: sentences with their words, heads and relations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass



@dataclass
class Sentence:
    words: list[str]
    heads: list[int]          # gold heads, 1-based, 0 = root
    relations: list[str]


def read_conllu(path: str) -> list[Sentence]:
    """The sentences of a CoNLL-U file (`conllu` package); clear errors for a missing file, a
    malformed line or a missing head."""
    try:
        import conllu
    except ImportError:
        raise ValueError("syntax: the conllu package is not installed; `pip install conllu`") from None
    if not os.path.isfile(path):
        raise ValueError(f"TREEBANK: no such file: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        try:
            for number, sent in enumerate(conllu.parse_incr(f), 1):
                words, heads, rels = [], [], []
                for tok in sent:
                    if not isinstance(tok["id"], int):        # 1-2 multiword range, 1.1 empty node
                        continue
                    if not isinstance(tok["head"], int):
                        raise ValueError(f"TREEBANK: {path} sentence {number}, word {tok['id']} "
                                         f"({tok['form']!r}) has no head")
                    words.append(str(tok["form"]))
                    heads.append(int(tok["head"]))
                    rels.append(str(tok["deprel"]))
                if words:
                    if any(h < 0 or h > len(words) for h in heads):
                        raise ValueError(f"TREEBANK: {path} sentence {number}: a head is outside 0..{len(words)}")
                    out.append(Sentence(words, heads, rels))
        except (conllu.exceptions.ParseException, UnicodeDecodeError) as exc:
            raise ValueError(f"TREEBANK: {path} is not valid CoNLL-U: {exc}".splitlines()[0]) from None
    if not out:
        raise ValueError(f"TREEBANK: {path} has no sentence")
    return out


def sample_path() -> str:
    """The CoNLL-U sample shipped with embgeom (42 English sentences written for the project)."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # embgeom/
    return os.path.join(package, "data", "sample.conllu")
