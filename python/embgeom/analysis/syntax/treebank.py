"""Reading CoNLL-U treebanks: sentences with their words, heads and relations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from ..text.inputs import all_lines, require_file



@dataclass
class Sentence:
    words: list[str]
    heads: list[int]          # gold heads, 1-based, 0 = root
    relations: list[str]


def read_conllu(path: str) -> list[Sentence]:
    """The sentences of a CoNLL-U file (`conllu` package); one-line errors for a missing file, a
    malformed line (not 10 columns, a HEAD that is no word number: check_lines names its line)
    and a sentence that is not a tree: word ids 1..n in order, exactly one root, no word its own
    head, no cycle. Each error names the sentence (its sent_id, or its number in the file)."""
    try:
        import conllu
    except ImportError:
        raise ValueError("syntax: the conllu package is not installed; `pip install conllu`") from None
    require_file(path, "TREEBANK")
    check_lines(path)
    out = []
    with open(path, encoding="utf-8-sig") as f:  # (a leading byte-order mark is not part of the first line)
        try:
            for number, sent in enumerate(conllu.parse_incr(f), 1):
                where = f"TREEBANK: {path} sentence {number}" + (
                    f" ({sent.metadata['sent_id']})" if "sent_id" in sent.metadata else "")
                words, heads, rels, ranges = [], [], [], []
                for tok in sent:
                    if len(tok) < 10 or not all(k in tok for k in ("id", "form", "head", "deprel")):
                        raise ValueError(f"{where}: a word line has {len(tok)} columns, CoNLL-U has 10")
                    if not isinstance(tok["id"], int):        # 1-2 multiword range, 1.1 empty node
                        if isinstance(tok["id"], tuple) and len(tok["id"]) == 3 and tok["id"][1] == "-":
                            ranges.append(tok["id"])
                        continue
                    if not isinstance(tok["head"], int):
                        raise ValueError(f"{where}, word {tok['id']} ({tok['form']!r}) has no head")
                    if tok["id"] != len(words) + 1:
                        raise ValueError(f"{where}: word ids must run 1..n in order, found {tok['id']} "
                                         f"after {len(words)}")
                    words.append(str(tok["form"]))
                    heads.append(int(tok["head"]))
                    rels.append(str(tok["deprel"]))
                if not len(sent):  # comments alone: no sentence
                    continue
                if not words:
                    raise ValueError(f"{where}: no word lines (only multiword ranges or empty nodes)")
                for first, _, last in ranges:
                    if not 1 <= first < last <= len(words):
                        raise ValueError(f"{where}: the multiword range {first}-{last} is not over words "
                                         f"1..{len(words)} of the sentence")
                check_tree(heads, where)
                out.append(Sentence(words, heads, rels))
        except (conllu.exceptions.ParseException, UnicodeDecodeError, KeyError) as exc:
            raise ValueError(f"TREEBANK: {path} is not valid CoNLL-U: {exc}".splitlines()[0]) from None
    if not out:
        raise ValueError(f"TREEBANK: {path} has no sentence")
    return out


def check_lines(path: str) -> None:
    """ValueError naming the line (and sentence) of the first word line the conllu package would
    misread: not 10 TAB-separated columns (it drops an 11th, a TAB inside MISC, silently) or, on
    a word (an integer ID), a HEAD that is not a word number (its own error named no line)."""
    sentence, sent_id, in_sentence = 0, None, False
    for number, line in all_lines(path, "TREEBANK"):
        if not line.strip():
            in_sentence, sent_id = False, None
            continue
        if not in_sentence:
            sentence, in_sentence = sentence + 1, True
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip() == "sent_id":
                sent_id = value.strip()
            continue
        where = f"TREEBANK: {path} line {number}, sentence {sentence}" + (f" ({sent_id})" if sent_id else "")
        cols = line.split("\t")
        if len(cols) != 10:
            raise ValueError(f"{where}: a word line has {len(cols)} TAB-separated columns, CoNLL-U has 10")
        if cols[0].isascii() and cols[0].isdigit() and not (cols[6].isascii() and cols[6].isdigit()):
            raise ValueError(f"{where}: word {cols[0]} ({cols[1]!r}) has HEAD {cols[6]!r}, expected a "
                             "word number (0 = root)")


def check_tree(heads: list[int], where: str) -> None:
    """ValueError unless heads (1-based, 0 = root) form one tree over words 1..n."""
    n = len(heads)
    for word, head in enumerate(heads, 1):
        if head < 0 or head > n:
            raise ValueError(f"{where}: word {word} has head {head}, outside 0..{n}")
        if head == word:
            raise ValueError(f"{where}: word {word} is its own head")
    roots = [w for w, h in enumerate(heads, 1) if h == 0]
    if len(roots) != 1:
        raise ValueError(f"{where}: expected exactly one root (head 0), found {len(roots)}"
                         + (f" (words {roots[:5]})" if roots else ""))
    reaches_root = [False] * (n + 1)
    reaches_root[0] = True
    for word in range(1, n + 1):
        path, on_path, node = [], set(), word   # (a set: `in` on the list made a long chain quadratic)
        while not reaches_root[node]:
            if node in on_path:
                cycle = path[path.index(node):]
                raise ValueError(f"{where}: the heads form a cycle {' -> '.join(map(str, cycle + [node]))}")
            path.append(node)
            on_path.add(node)
            node = heads[node - 1]
        for w in path:
            reaches_root[w] = True


def sample_path() -> str:
    """The CoNLL-U sample shipped with embgeom (42 English sentences written for the project)."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(package, "data", "sample.conllu")
