"""Clark's inputs and averages (issue 23, item 4): a corpus line with a TAB is a sentence pair
([CLS] A [SEP] B [SEP], token types 0 / 1, the longer side truncated first), and
attention_to.period / .comma / .sep_from_other, against a float64 computation by hand from
transformers' own attentions, one text at a time without padding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embgeom.analysis.text.trace import encode, trace
from embgeom.cli import main
from helpers import trained_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:trace. texts longer")

LONG_A = " ".join(["the cat , the dog ."] * 2)
LONG_B = " ".join(["red green blue , one two ."] * 5)
TEXTS = ["the cat sat , he ran .\tshe was in the house .", "a dog , a cat .",
         f"{LONG_A}\t{LONG_B}", "big , small\tred . green , blue", "no marks here"]


def hand_encode(tokenizer, text, limit):
    """ids and token types by hand: longest_first = [CLS] A [SEP] B [SEP] cut to limit, each side
    keeping its first tokens (how many: below)."""
    vocab = tokenizer.get_vocab()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    if "\t" not in text:
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[:limit - 2]
        return [cls] + ids + [sep], [0] * (len(ids) + 2)
    a, b = text.split("\t", 1)
    ia = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(a))
    ib = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(b))
    m = limit - 3
    if len(ia) + len(ib) > m:
        # the shorter side keeps what the longer leaves it, at most half; an odd token goes to
        # the longer side (to the second on equal lengths)
        short, long = (len(ib), len(ia)) if len(ia) > len(ib) else (len(ia), len(ib))
        keep_short = min(short, max(m // 2, m - long))
        keep_long = min(long, m - keep_short)
        if keep_short + keep_long > m or keep_short > m // 2:
            keep_short, keep_long = m // 2, m - m // 2
        na, nb = (keep_long, keep_short) if len(ia) > len(ib) else (keep_short, keep_long)
        ia, ib = ia[:na], ib[:nb]
    return [cls] + ia + [sep] + ib + [sep], [0] * (len(ia) + 2) + [1] * (len(ib) + 1)


def test_encode_pairs_and_truncation(tiny_bert):
    _, tokenizer = tiny_bert
    enc, truncated = encode(tokenizer, TEXTS, 32)
    assert truncated == 1
    for i, t in enumerate(TEXTS):
        ids, types = hand_encode(tokenizer, t, 32)
        assert enc["input_ids"][i] == ids and enc["token_type_ids"][i] == types, t
    with pytest.raises(ValueError, match=r"texts\[1\]: a text with a TAB"):
        encode(tokenizer, ["fine", "\tno first side"], 32)
    # a tokenizer whose model_input_names leave token types out still gives them (a pair had run
    # as one segment, every token type 0, with no word of it)
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.model_input_names = ["input_ids", "attention_mask"]
    assert "token_type_ids" not in bare("a\tb".split("\t")[0], "b")
    enc, _ = encode(bare, TEXTS, 32)
    assert enc["token_type_ids"] == [hand_encode(tokenizer, t, 32)[1] for t in TEXTS]
    # a pair cannot be cut below its special tokens and one token of each text: said at once
    with pytest.raises(ValueError, match=r"^max_length: a sentence pair \(texts\[4\], a line with a TAB\) "
                                         r"needs at least 5 tokens .*got 4"):
        encode(tokenizer, ["one", "a\tb"], 4, first_index=3)


def _long(words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = "the cat , dog . red green blue one two unbelievably tokenization house".split()
    return " ".join(rng.choice(vocab, words))


LONG_TEXTS = [
    _long(3000, 0),                                  # one long text
    " " * 3000 + _long(2000, 1),                     # a whitespace run past the first budget
    "x" * 5000 + " " + _long(2000, 2),               # one long word first
    f"{_long(3000, 3)}\tshort b side .",             # pairs: the long side first, second, both
    f"short a side .\t{_long(3000, 4)}",
    f"{_long(3000, 5)}\t{_long(2500, 6)}",           # both long: the first longer, the second, equal
    f"{_long(2500, 10)}\t{_long(3000, 11)}",
    f"{_long(3000, 12)}\t{_long(3000, 12)}",
    f"{_long(3000, 7)}\t{', ' * 300}",                # the other side short in characters, long in tokens
    _long(20, 8),
]


@pytest.mark.parametrize("which", ["tiny", "default"])
@pytest.mark.parametrize("limit", [32, 33, 128])
def test_long_texts_are_clipped_before_tokenizing_without_changing_a_token(tiny_bert, which, limit, monkeypatch):
    # a text a model keeps `limit` tokens of is cut at whitespace first (a 38 MB line had taken
    # 57 s and 6.9 GB to tokenize whole); the ids, token types and truncated count are those of
    # the whole text's
    from embgeom.analysis.text import trace as trace_module

    if which == "tiny":
        tokenizer = tiny_bert[1]
    else:
        from transformers import AutoTokenizer

        from embgeom.models import default_model_path

        tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    clipped = encode(tokenizer, LONG_TEXTS, limit)
    assert trace_module.clip_text(tokenizer, LONG_TEXTS[0], limit)[1] is not None
    a, b = LONG_TEXTS[3].split("\t")
    assert trace_module.clip_pair(tokenizer, a, b, limit, limit - 3)[0] != a
    calls = []
    monkeypatch.setattr(trace_module, "clip_text", lambda tok, text, n: calls.append(1) or (text, None))
    monkeypatch.setattr(trace_module, "clip_pair", lambda tok, a, b, n, kept: (a, b))
    assert clipped == encode(tokenizer, LONG_TEXTS, limit)
    assert calls  # (the whole texts were tokenized this time)
    if which == "tiny":
        for i, t in enumerate(LONG_TEXTS):
            ids, types = hand_encode(tokenizer, t, limit)
            assert clipped[0]["input_ids"][i] == ids and clipped[0]["token_type_ids"][i] == types


@pytest.mark.parametrize("sep", ["\x1c", "\x85", "\x0b", "\x0c", "\u2028"])
@pytest.mark.parametrize("fill", [28, 29])
def test_clipping_cuts_only_where_the_tokenizer_splits_words(sep, fill):
    # Python's \s takes characters BERT's normaliser deletes or keeps inside a word: a cut there,
    # a prefix of just enough tokens, ended in 'q', '##z' where the whole text has one word
    # 'qzxv...blorf' (the whole text's tokens are the reference)
    from transformers import AutoTokenizer

    from embgeom.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    text = ("the" + " " * 13) * fill + "qzxv" * 5 + sep + "blorf" * 30 + " more words" * 10
    enc, _ = encode(tokenizer, [text], 32)
    assert enc["input_ids"][0] == tokenizer(text, truncation=True, max_length=32)["input_ids"]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_clipping_keeps_the_tokens_of_other_tokenizer_kinds(kind, monkeypatch):
    from embgeom.analysis.text import trace as trace_module

    tokenizer = trained_tokenizer(kind, [_long(300, seed) for seed in range(3)] + ["x y z xx zz , ."])
    # (shorter than the others: the tokenizers' own truncation of two long sides, the reference
    # here, takes minutes and gigabytes for a unigram model)
    texts = [_long(500, 20), " " * 1500 + _long(400, 21), "x" * 2000 + " " + _long(400, 22),
             f"{_long(500, 23)}\tshort b .", f"short a .\t{_long(500, 24)}", f"{_long(500, 25)}\t{_long(400, 26)}",
             f"{_long(400, 27)}\t{_long(500, 28)}", f"{_long(450, 29)}\t{_long(450, 29)}",
             "a   b  c " * 300, "  ".join(["x y"] * 500) + "\t" + "z " * 300]
    for limit in (63, 64):
        clipped = encode(tokenizer, texts, limit)
        assert trace_module.clip_text(tokenizer, texts[-2], limit)[1] is not None
        with monkeypatch.context() as m:
            m.setattr(trace_module, "clip_text", lambda tok, text, n: (text, None))
            m.setattr(trace_module, "clip_pair", lambda tok, a, b, n, kept: (a, b))
            assert clipped == encode(tokenizer, texts, limit)


@pytest.mark.parametrize("chinese_chars", [True, False])
def test_clipping_cuts_at_cjk_and_punctuation_for_bert_tokenizers(chinese_chars):
    # a line without whitespace (Chinese; numbers joined by commas) had been tokenized whole: a
    # 12 MB line of ideographs for 13 s; BERT's normaliser and pre-tokenizer end a word at each
    # ideograph (when it spaces them) and each ASCII punctuation character. The whole text's
    # tokens are the reference; kana and accented letters run on inside words.
    from tokenizers.normalizers import BertNormalizer
    from transformers import AutoTokenizer

    from embgeom.analysis.text.trace import clip_text
    from embgeom.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    tokenizer.backend_tokenizer.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                            strip_accents=None, lowercase=True)
    rng = np.random.default_rng(3)
    ideographs = "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, 30_000))
    kana = "".join(chr(c) for c in rng.integers(0x3041, 0x3096, 600))
    numbers = ",".join(str(v) for v in rng.integers(0, 10**6, 6_000))
    # (the last two: one word of 18,000 letters, an [UNK]; a cut after the first character)
    texts = [ideographs, kana + ideographs, numbers, "é" * 300 + "," + numbers, "x" * 9000 + numbers,
             "\u4e00" + "ab" * 9000, "," + "abc" * 8000 + "\u4e00"]
    for limit in (32, 128):
        enc, _ = encode(tokenizer, texts, limit)
        for i, text in enumerate(texts):
            assert enc["input_ids"][i] == tokenizer(text, truncation=True, max_length=limit)["input_ids"], i
    clipped = [clip_text(tokenizer, t, 128)[1] is not None for t in texts]
    assert clipped == [chinese_chars, chinese_chars, True, True, True, False, False]


def test_clip_text_cuts_long_texts_only():
    from embgeom.analysis.text.trace import clip_text

    class Words:  # a tokenizer of whitespace-separated words
        def __call__(self, text, add_special_tokens, verbose):
            return {"input_ids": text.split()}

    text = _long(5000, 9)
    prefix, count = clip_text(Words(), text, 100)
    assert text.startswith(prefix) and 100 <= count < 1000 and len(prefix) < len(text) // 10
    assert prefix.split() == text.split()[:count]
    assert clip_text(Words(), "a b c", 100) == ("a b c", None)
    assert clip_text(Words(), "y" * 100_000, 100) == ("y" * 100_000, None)  # no whitespace: whole


def expected(model, tokenizer, texts, limit=32):
    """attention_to by hand: per real row, float64, row-weighted over the corpus."""
    vocab = tokenizer.get_vocab()
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    sums = {k: np.zeros((L, H)) for k in ("cls", "sep", "punct", "period", "comma", "sep_from_other")}
    rows = other_rows = 0
    for t in texts:
        ids, types = hand_encode(tokenizer, t, limit)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]),
                        output_attentions=True)
        toks = tokenizer.convert_ids_to_tokens(ids)
        is_sep = np.array([i == vocab["[SEP]"] for i in ids])
        is_cls = np.array([i == vocab["[CLS]"] for i in ids])
        sets = {"cls": is_cls, "sep": is_sep, "period": np.array([s == "." for s in toks]),
                "comma": np.array([s == "," for s in toks]),
                "punct": np.array([s in ".,;:!?'\"()-" for s in toks])}
        n = len(ids)
        rows += n
        for l in range(L):
            a = out.attentions[l][0].double().numpy()
            for h in range(H):
                for i in range(n):
                    for k, cols in sets.items():
                        sums[k][l, h] += a[h, i][cols].sum()
                    if not (is_cls[i] or is_sep[i]):
                        sums["sep_from_other"][l, h] += a[h, i][is_sep].sum()
        other_rows += int((~is_cls & ~is_sep).sum())
    return {k: v / (other_rows if k == "sep_from_other" else rows) for k, v in sums.items()}


def expected_per_text(model, tokenizer, texts, limit=32):
    """attention_to_per_text by hand (Clark et al.'s average): each text alone, without padding,
    its mean over its own rows (sep_from_other: over its rows that are neither [CLS] nor [SEP]),
    then the plain mean over texts; prev / next = A[i, i-1] / A[i, i+1] (none past the ends)."""
    vocab = tokenizer.get_vocab()
    keys = ("cls", "sep", "punct", "period", "comma", "sep_from_other", "prev", "next")
    per_text = {k: [] for k in keys}
    for t in texts:
        ids, types = hand_encode(tokenizer, t, limit)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]),
                        output_attentions=True)
        a = np.stack([x[0].double().numpy() for x in out.attentions])       # (L, H, n, n)
        toks = tokenizer.convert_ids_to_tokens(ids)
        is_sep = np.array([i == vocab["[SEP]"] for i in ids])
        is_cls = np.array([i == vocab["[CLS]"] for i in ids])
        other = ~is_cls & ~is_sep
        sets = {"cls": is_cls, "sep": is_sep, "period": np.array([s == "." for s in toks]),
                "comma": np.array([s == "," for s in toks]),
                "punct": np.array([s in ".,;:!?'\"()-" for s in toks])}
        n = len(ids)
        for k, cols in sets.items():
            per_text[k].append(a[..., cols].sum(-1).mean(-1))
        per_text["sep_from_other"].append(a[:, :, other][..., is_sep].sum(-1).mean(-1))
        per_text["prev"].append(np.diagonal(a, offset=-1, axis1=2, axis2=3).sum(-1) / n)
        per_text["next"].append(np.diagonal(a, offset=1, axis1=2, axis2=3).sum(-1) / n)
    return {k: np.mean(v, axis=0) for k, v in per_text.items()}


def test_attention_to_per_text(tiny_bert, tiny_bert_dir, tmp_path):
    """Clark's per-text-first average, with texts of different lengths padded in one batch
    (padding must not count), and apart from the row-weighted attention_to."""
    model, tokenizer = tiny_bert
    want = expected_per_text(model, tokenizer, TEXTS)
    got = trace(model, tokenizer, TEXTS, batch_size=3)
    assert set(got.attention_to_per_text) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got.attention_to_per_text[k].numpy(), v, atol=2e-6, rtol=0, err_msg=k)
    rows = expected(model, tokenizer, TEXTS)
    assert not np.allclose(rows["cls"], want["cls"], atol=1e-4)      # lengths differ: the two differ
    one = trace(model, tokenizer, TEXTS[1:2], batch_size=1)             # one text: the two agree
    for k in want:
        np.testing.assert_allclose(one.attention_to_per_text[k].numpy(), one.attention_to[k].numpy(),
                                   atol=1e-12, rtol=0, err_msg=k)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--batch-size", "2",
                 "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    for k, v in want.items():
        np.testing.assert_allclose(rep["attention_to_per_text"][k], v, atol=2e-6, rtol=0, err_msg=k)


def test_attention_to_marks_and_pairs(tiny_bert, tiny_bert_dir, tmp_path):
    model, tokenizer = tiny_bert
    want = expected(model, tokenizer, TEXTS)
    got = trace(model, tokenizer, TEXTS, batch_size=2)
    assert got.truncated == 1
    for k, v in want.items():
        np.testing.assert_allclose(got.attention_to[k].numpy(), v, atol=2e-6, rtol=0, err_msg=k)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    for k, v in want.items():
        np.testing.assert_allclose(rep["attention_to"][k], v, atol=2e-6, rtol=0, err_msg=k)
