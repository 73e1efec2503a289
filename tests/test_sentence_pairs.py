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

pytestmark = pytest.mark.filterwarnings("ignore:trace. texts longer")

LONG_A = " ".join(["the cat , the dog ."] * 2)
LONG_B = " ".join(["red green blue , one two ."] * 5)
TEXTS = ["the cat sat , he ran .\tshe was in the house .", "a dog , a cat .",
         f"{LONG_A}\t{LONG_B}", "big , small\tred . green , blue", "no marks here"]


def hand_encode(tokenizer, text, limit):
    """ids and token types by hand: longest_first = drop the last token of the longer side
    (the first side on equal lengths) until [CLS] A [SEP] B [SEP] fits."""
    vocab = tokenizer.get_vocab()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    if "\t" not in text:
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[:limit - 2]
        return [cls] + ids + [sep], [0] * (len(ids) + 2)
    a, b = text.split("\t", 1)
    ia = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(a))
    ib = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(b))
    while len(ia) + len(ib) + 3 > limit:
        if len(ia) > len(ib):
            ia = ia[:-1]
        else:
            ib = ib[:-1]
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
