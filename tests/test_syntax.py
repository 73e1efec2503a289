"""`embgeom syntax` on the shipped CoNLL-U sample and a tiny random BERT whose vocabulary splits
words into pieces: word-level attention, per-relation accuracy, best heads and offset baselines
against a direct float64 computation (Clark's bpe_utils / Syntax_Analysis steps re-done with
loops, one sentence at a time, from transformers' own attentions)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from embgeom.analysis.syntax import treebank, word_heads
from embgeom.cli import main
from helpers import save_pieces_bert, trained_tokenizer

SAMPLE = treebank.sample_path()


@pytest.fixture(scope="module")
def pieces_bert(tmp_path_factory):
    """2 layers x 4 heads, hidden 64; words longer than 4 letters split into 2 pieces."""
    from embgeom import load_model

    words = sorted({w.lower() for s in treebank.read_conllu(SAMPLE) for w in s.words})
    path = save_pieces_bert(tmp_path_factory.mktemp("pieces_bert"), words, [".", ",", "?", "'", "s"],
                            seed=1, hidden=64, heads=4)
    return path, load_model(path)


def _word_level(A, spans):
    """Clark's get_word_word_attention, mode "mean": A (K, T, T); spans: token indices of each
    word ([CLS] and [SEP] are words)."""
    A = A.clone()
    cols = []
    for span in spans:                      # TO a word: its pieces' columns summed
        cols.append(A[:, :, span].sum(-1))
    A = torch.stack(cols, -1)               # (K, T, Wn)
    rows = [A[:, span, :].mean(1) for span in spans]   # FROM a word: its pieces' rows averaged
    return torch.stack(rows, 1)             # (K, Wn, Wn)


def _expected(model, tokenizer, sentences):
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    K = L * H
    rels = sorted({r for s in sentences for r in s.relations})
    correct = {r: torch.zeros(K, 2, dtype=torch.float64) for r in rels + ["all"]}
    offs = {r: {o: 0 for o in word_heads.OFFSETS} for r in rels + ["all"]}
    total = {r: 0 for r in rels + ["all"]}
    for s in sentences:
        pieces = [tokenizer.tokenize(w) or [tokenizer.unk_token] for w in s.words]
        toks = [tokenizer.cls_token] + [p for ps in pieces for p in ps] + [tokenizer.sep_token]
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(toks)])
        with torch.inference_mode():
            out = model(input_ids=ids, output_attentions=True)
        A = torch.cat([a[0].double() for a in out.attentions])          # (K, T, T)
        spans, t = [[0]], 1
        for ps in pieces:
            spans.append(list(range(t, t + len(ps))))
            t += len(ps)
        spans.append([t])
        Wa = _word_level(A, spans)
        W = len(s.words)
        for k in range(K):
            for d in range(2):
                m = Wa[k] if d == 0 else Wa[k].T
                m = m.clone()
                m.fill_diagonal_(0)
                m = m[1:-1, 1:-1]                                       # drop [CLS]/[SEP]
                pred = (m.argmax(-1) + 1).tolist()
                for i in range(W):
                    p = pred[i]
                    if s.relations[i] in word_heads.POSS_RELATIONS and i + 1 < W and s.words[i + 1] in word_heads.POSS_CLITICS:
                        p = pred[i + 1]
                    hit = float(p == s.heads[i])
                    correct[s.relations[i]][k, d] += hit
                    correct["all"][k, d] += hit
        for i in range(W):
            # Clark's offset_predictor (clamped to the sentence: 0 = ROOT) under the poss rule
            q = i + 1 if (s.relations[i] in word_heads.POSS_RELATIONS and i + 1 < W
                          and s.words[i + 1] in word_heads.POSS_CLITICS) else i
            for r in (s.relations[i], "all"):
                total[r] += 1
                for o in word_heads.OFFSETS:
                    offs[r][o] += int(max(0, min(q + o + 1, W)) == s.heads[i])
    want = {}
    for r in rels + ["all"]:
        acc = correct[r] / total[r]
        flat = acc.reshape(-1)
        best = int(flat.argmax())
        o = max(word_heads.OFFSETS, key=lambda o: (offs[r][o], -word_heads.OFFSETS.index(o)))
        want[r] = {"count": total[r], "best": [best // 2 // H + 1, best // 2 % H, word_heads.DIRECTIONS[best % 2]]
                   if flat[best] > 0 else None,
                   "accuracy": float(flat[best]),
                   "offset_baseline": {"offset": o if offs[r][o] else None, "accuracy": offs[r][o] / total[r]}}
    return want, correct["all"] / total["all"]


def test_sample_is_valid_conllu():
    sentences = treebank.read_conllu(SAMPLE)
    assert 30 <= len(sentences) <= 60
    for s in sentences:
        assert sum(h == 0 for h in s.heads) == 1
        for i in range(len(s.words)):                 # every word reaches the root, no cycle
            seen, j = set(), i + 1
            while j:
                assert j not in seen
                seen.add(j)
                j = s.heads[j - 1]


def test_word_attention_matches_clark_conversion():
    torch.manual_seed(0)
    spans_per = [[[0], [1, 2], [3], [4, 5, 6], [7]], [[0], [1], [2, 3], [4]]]
    B, K, T = 2, 3, 8
    groups = torch.full((B, T), -1)
    n_words = torch.tensor([len(s) for s in spans_per])
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, spans in enumerate(spans_per):
        for w, span in enumerate(spans):
            groups[b, span] = w
            mask[b, span] = True
    s = torch.randn(B, K, T, T).masked_fill(~mask[:, None, None, :], -math.inf)
    attn = torch.softmax(s, -1) * mask[:, None, :, None]
    got = word_heads.word_attention(attn, groups, n_words)
    for b, spans in enumerate(spans_per):
        W = len(spans)
        want = _word_level(attn[b].double(), spans)
        torch.testing.assert_close(got[b, :, :W, :W], want, rtol=0, atol=1e-12)
        assert got[b, :, W:].abs().sum() == 0 and got[b, :, :, W:].abs().sum() == 0
        torch.testing.assert_close(got[b, :, :W, :W].sum(-1), torch.ones(K, W, dtype=torch.float64))


def test_exact_ties_between_words_go_to_the_first_word():
    """Uniform attention over words of 12, 28 and 8 pieces: every head->dep row is an exact tie
    (the attention to word 1 from words 2 and 3 is 12/50 both), which goes to the first word. The
    FROM mean had divided each piece's row before summing them, so the tie came out an ulp apart
    and rounding chose (predictions [3, 1, 2])."""
    sizes = [1, 12, 28, 8, 1]                                   # [CLS], three words, [SEP]
    T = sum(sizes)
    groups = torch.cat([torch.full((n,), w) for w, n in enumerate(sizes)])[None]
    attn = torch.full((1, 1, T, T), 1.0 / T, dtype=torch.float32)
    wa = word_heads.word_attention(attn, groups, torch.tensor([len(sizes)]))
    assert wa[0, 0, 2, 1] == wa[0, 0, 3, 1]
    pred = word_heads.predictions(wa, torch.tensor([len(sizes)]))[0, 0]
    assert pred[word_heads.DIRECTIONS.index("head->dep")].tolist() == [2, 1, 1]


def test_batches_of_long_texts_are_cut_to_the_memory_budget(pieces_bert, monkeypatch):
    """Batches keep their word maps under WORD_MAP_BUDGET_BYTES (64 sentences of 500 words had
    asked for 50 GB at the default batch size), at least one text each, and give the same
    accuracies as one batch."""
    order, lengths = [0, 1, 2, 3, 4], [10, 10, 20, 30, 40]
    entry = 72 * word_heads.WORD_MAP_ENTRY_BYTES
    monkeypatch.setattr(word_heads, "WORD_MAP_BUDGET_BYTES", 3 * 20 * 20 * entry)
    assert word_heads.word_batches(order, lengths, 64, 72) == [[0, 1, 2], [3], [4]]
    assert word_heads.word_batches(order, lengths, 2, 72) == [[0, 1], [2], [3], [4]]
    _, (model, tokenizer) = pieces_bert
    sentences = treebank.read_conllu(SAMPLE)
    whole = word_heads.syntax_heads(model, tokenizer, sentences, batch_size=64)
    monkeypatch.setattr(word_heads, "WORD_MAP_BUDGET_BYTES", 1)
    single = word_heads.syntax_heads(model, tokenizer, sentences, batch_size=64)
    assert single["relations"] == whole["relations"] and single["all"] == whole["all"]
    assert torch.equal(single["all_accuracy"], whole["all_accuracy"])


@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_word_pieces_are_the_sentences_own_tokens(kind, pieces_bert):
    """Each word's pieces are those the space-joined sentence gives it: a word tokenized alone
    had lost the space before it, which byte-level BPE writes into the word's first piece
    (mid-sentence "the" was 't', 'he' where the sentence has 'Ġthe')."""
    sentences = treebank.read_conllu(SAMPLE)
    words = [s.words for s in sentences] + [["New York", "is", "(", "big", ")", "!"], ["x", "\x01", "y"]]
    tokenizer = trained_tokenizer(kind, [" ".join(w) for w in words])
    got = word_heads.word_pieces(tokenizer, words)
    for ws, ps in zip(words, got):
        assert len(ps) == len(ws) and all(ps)
        if "\x01" not in ws:
            assert [t for p in ps for t in p] == tokenizer(" ".join(ws), add_special_tokens=False)["input_ids"]
    if kind == "bpe":
        first = [tokenizer.convert_ids_to_tokens(ps[1])[0] for ps in got[:-1]]
        assert all(t.startswith("Ġ") for t in first), first
    # WordPiece ignores the spaces: each word's pieces are its own, as before
    _, (_, bert_tok) = pieces_bert
    for ws, ps in zip(words[:-2], word_heads.word_pieces(bert_tok, words[:-2])):
        assert ps == [bert_tok(w, add_special_tokens=False)["input_ids"] or [bert_tok.unk_token_id] for w in ws]


def test_syntax_heads_match_direct(pieces_bert):
    _, (model, tokenizer) = pieces_bert
    sentences = treebank.read_conllu(SAMPLE)
    assert any(len(tokenizer.tokenize(w)) > 1 for s in sentences for w in s.words)
    got = word_heads.syntax_heads(model, tokenizer, sentences, batch_size=1)
    want, all_acc = _expected(model, tokenizer, sentences)
    assert got["n_sentences"] == len(sentences) and got["skipped_too_long"] == 0
    assert got["n_words"] == sum(len(s.words) for s in sentences)
    assert set(got["relations"]) == set(want) - {"all"}
    assert got["relations"]["root"]["best"] is None and got["relations"]["root"]["accuracy"] == 0.0
    for r, e in list(got["relations"].items()) + [("all", got["all"])]:
        w = want[r]
        assert e["count"] == w["count"], r
        assert e["best"] == w["best"], (r, e, w)
        assert abs(e["accuracy"] - w["accuracy"]) < 1e-12, (r, e, w)
        assert e["offset_baseline"]["offset"] == w["offset_baseline"]["offset"], (r, e, w)
        assert abs(e["offset_baseline"]["accuracy"] - w["offset_baseline"]["accuracy"]) < 1e-12, r
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    torch.testing.assert_close(got["all_accuracy"], all_acc.reshape(L, H, 2).double(), rtol=0, atol=1e-12)


def test_batching_keeps_word_maps(pieces_bert):
    _, (model, tokenizer) = pieces_bert
    sentences = treebank.read_conllu(SAMPLE)
    one = word_heads.syntax_heads(model, tokenizer, sentences, batch_size=1)
    many = word_heads.syntax_heads(model, tokenizer, sentences, batch_size=16)
    assert many["n_words"] == one["n_words"]
    # padding changes float32 attention in the last bits only: accuracies agree up to the rare
    # near-tie that flips (at most 1 word in 100 per head)
    assert (many["all_accuracy"] - one["all_accuracy"]).abs().max() <= 0.01


def test_cli_syntax(pieces_bert, tmp_path, capsys):
    path, _ = pieces_bert
    out = tmp_path / "syn"
    assert main(["syntax", SAMPLE, "--out", str(out), "--model", path, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "best head overall" in err
    report = json.loads((out / "report.json").read_text())
    s = report["syntax"]
    # layers 1..L in report.json, the CLI and report.html alike (docs/metrics.md, layers, depths and heads)
    layer, head, _ = s["all"]["best"]
    assert 1 <= layer <= report["layers"] and 0 <= head < report["heads"]
    assert f"best head overall L{layer} h{head} " in err
    assert f"<td>L{layer} h{head}</td>" in (out / "report.html").read_text()
    assert {"relations", "all", "n_sentences", "n_words"} <= set(s)
    e = s["relations"]["det"]
    assert set(e) == {"count", "best", "accuracy", "offset_baseline"}
    assert e["best"][2] in word_heads.DIRECTIONS and set(e["offset_baseline"]) == {"offset", "accuracy"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html
    # a baseline offset reads as the CLI prints it, signed (+1, -2)
    off = e["offset_baseline"]["offset"]
    assert off is None or f"<td>{off:+d}</td>" in html
    # one sentence skipped: its note in the singular ("1 sentence ... were skipped" before)
    def sentence(n):
        return "".join(f"{i}\tw\t_\tX\t_\t_\t{0 if i == 1 else 1}\t{'root' if i == 1 else 'dep'}\t_\t_\n"
                       for i in range(1, n + 1)) + "\n"

    short_and_long = tmp_path / "two.conllu"
    short_and_long.write_text(sentence(3) + sentence(12))
    assert main(["syntax", str(short_and_long), "--out", str(tmp_path / "one"), "--model", path, "--no-progress",
                 "--max-length", "8"]) == 0
    assert "1 sentence longer than the model's maximum (--max-length) was skipped" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (None, "TREEBANK: no such file"),
    ("1\tthe\t_\tDET\t_\t_\t_\tdet\t_\t_\n\n", "word 1 ('the') has HEAD '_'"),
    ("# only a comment\n\n", "has no sentence"),
    ("1\tthe\t_\tDET\t_\t_\t5\tdet\t_\t_\n\n", "outside 0..1"),
])
def test_cli_syntax_errors(tmp_path, capsys, content, message):
    f = tmp_path / "t.conllu"
    if content is not None:
        f.write_text(content, encoding="utf-8")
    assert main(["syntax", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_multiword_tokens_and_empty_nodes_skipped(tmp_path):
    f = tmp_path / "mwt.conllu"
    f.write_text("# text = I don't know\n"
                 "1\tI\t_\tPRON\t_\t_\t4\tnsubj\t_\t_\n"
                 "2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
                 "2\tdo\t_\tAUX\t_\t_\t4\taux\t_\t_\n"
                 "3\tn't\t_\tPART\t_\t_\t4\tadvmod\t_\t_\n"
                 "3.1\tx\t_\tX\t_\t_\t_\t_\t_\t_\n"
                 "4\tknow\t_\tVERB\t_\t_\t0\troot\t_\t_\n\n", encoding="utf-8")
    (s,) = treebank.read_conllu(str(f))
    assert s.words == ["I", "do", "n't", "know"] and s.heads == [4, 4, 4, 0]
    # a sentence of ranges or empty nodes alone, and a range past its words: refused, not dropped
    word = "1\tok\t_\tX\t_\t_\t0\troot\t_\t_\n\n"
    for body, message in (("1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n\n", "no word lines"),
                          ("1.1\tx\t_\tX\t_\t_\t_\t_\t_\t_\n\n", "no word lines"),
                          ("1-3\tab\t_\t_\t_\t_\t_\t_\t_\t_\n1\ta\t_\tX\t_\t_\t0\troot\t_\t_\n"
                           "2\tb\t_\tX\t_\t_\t1\tdep\t_\t_\n\n", "the multiword range 1-3 is not over words 1..2")):
        f.write_text(word + body, encoding="utf-8")
        with pytest.raises(ValueError, match=f"sentence 2: {message}"):
            treebank.read_conllu(str(f))


def test_probe_on_sample(pieces_bert):
    """--probe's word maps are Clark's word-level maps over the words; training lowers the loss
    and gives the same numbers twice."""
    from embgeom.analysis.syntax import probe

    _, (model, tokenizer) = pieces_bert
    sentences = treebank.read_conllu(SAMPLE)
    maps = []
    word_heads.syntax_heads(model, tokenizer, sentences, batch_size=8, word_maps=maps)
    assert len(maps) == len(sentences) and all(m is not None for m in maps)
    for s, m in list(zip(sentences, maps))[:4]:
        pieces = [tokenizer.tokenize(w) or [tokenizer.unk_token] for w in s.words]
        toks = [tokenizer.cls_token] + [p for ps in pieces for p in ps] + [tokenizer.sep_token]
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([tokenizer.convert_tokens_to_ids(toks)]), output_attentions=True)
        spans, t = [[0]], 1
        for ps in pieces:
            spans.append(list(range(t, t + len(ps))))
            t += len(ps)
        spans.append([t])
        want = _word_level(torch.cat([a[0].double() for a in out.attentions]), spans)[:, :-1, :-1]  # [CLS] + words
        torch.testing.assert_close(m.double(), want, rtol=0, atol=1e-6)
    H = model.config.num_attention_heads
    a = probe.attention_probe(maps, sentences, 0.8, H)
    b = probe.attention_probe(maps, sentences, 0.8, H)
    assert a["loss_end"] < a["loss_start"]
    assert a["train_sentences"] + a["test_sentences"] == len(sentences)
    assert a["train_words"] + a["test_words"] == sum(len(s.words) for s in sentences)   # roots scored too
    assert torch.equal(a["w"], b["w"]) and a["uas_test"] == b["uas_test"] and a["uas_train"] == b["uas_train"]
    assert 0 <= a["uas_test"] <= 1 and 0 <= a["best_single_head_test"]["accuracy"] <= 1


def test_cli_syntax_probe(pieces_bert, tmp_path, capsys):
    path, _ = pieces_bert
    out = tmp_path / "o"
    assert main(["syntax", SAMPLE, "--out", str(out), "--model", path, "--no-progress", "--probe",
                 "--probe-split", "0.75"]) == 0
    err = capsys.readouterr().err
    assert "probe (attention only, 16 weights" in err and "UAS test" in err
    pr = json.loads((out / "report.json").read_text())["syntax"]["probe"]
    assert pr["split"] == 0.75 and pr["train_sentences"] == round(0.75 * 42) and pr["parameters"] == 16
    assert pr["root_candidate"] == "[CLS]" and "excluded_root" not in pr
    assert len(pr["w"]) == 2 and len(pr["w"][0]) == 4
    assert f"{pr['uas_test']:.3f}" in err
    page = (out / "report.html").read_text()
    # whether LBFGS converged or stopped at its cap is on the page too, not only in report.json
    assert "Attention-only probe" in page
    assert ("iterations, converged" in page) == pr["converged"] and ("not converged" in page) != pr["converged"]
    assert main(["syntax", SAMPLE, "--out", str(tmp_path / "p"), "--model", path, "--no-progress"]) == 0
    assert "probe" not in json.loads((tmp_path / "p" / "report.json").read_text())["syntax"]
    assert pr["max_eval"] == pr["max_iter"] * 5 // 4 and pr["evaluations"] >= pr["iterations"]


def test_an_unconverged_probe_names_the_cap_it_met():
    # LBFGS stops at max_iter iterations or max_eval loss evaluations: 826 iterations that met the
    # evaluation cap had been said "stopped at its cap of 1,000 iterations"
    from embgeom.analysis.syntax.probe import cap_met

    assert cap_met({"iterations": 826, "max_iter": 1000, "max_eval": 1250}) == \
        "the cap of 1,250 loss evaluations, after 826 iterations"
    assert cap_met({"iterations": 1000, "max_iter": 1000, "max_eval": 1250}) == "the cap of 1,000 iterations"


@pytest.mark.parametrize("args, message", [
    (["--probe", "--probe-split", "0"], "strictly between 0 and 1"),
    (["--probe", "--probe-split", "1"], "strictly between 0 and 1"),
    (["--probe", "--probe-split", "1.5"], "strictly between 0 and 1"),
    (["--probe", "--probe-split", "nan"], "strictly between 0 and 1"),
    (["--probe-split", "0.5"], "--probe-split needs --probe"),
    (["--probe", "--probe-split", "0.99"], "each side needs at least one"),
])
def test_cli_probe_split_errors(pieces_bert, tmp_path, capsys, args, message):
    path, _ = pieces_bert
    assert main(["syntax", SAMPLE, "--out", str(tmp_path / "o"), "--model", path, "--no-progress"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_word_setup_batch_size_is_an_int_named_as_the_library_names_it(tiny_bert):
    """(2.5 had passed and batches were then cut by memory alone; the message named the CLI's flag)"""
    from embgeom.analysis.syntax.word_heads import word_setup

    model, tokenizer = tiny_bert
    with pytest.raises(TypeError, match="batch_size: expected an int"):
        word_setup(model, tokenizer, [["a", "b"]], 2.5, None)
    with pytest.raises(ValueError, match="batch_size: expected >= 1"):
        word_setup(model, tokenizer, [["a", "b"]], 0, None)
