"""`embgeom coref` on the shipped sample and a tiny random BERT whose vocabulary splits words into
pieces: every head's antecedent selection accuracy, the best head and Clark's nearest / head-match
baselines against an independent pure-numpy recomputation (one document at a time, no padding,
the JSON lines re-read here, word-level maps by loops over transformers' own attentions); the
input format's errors; documents too long for the model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embgeom.analysis.syntax import coreference, mentions
from embgeom.cli import main
from helpers import save_pieces_bert

SAMPLE = mentions.sample_path()


def _lines(path=SAMPLE):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


@pytest.fixture(scope="module")
def pieces_bert(tmp_path_factory):
    """2 layers x 3 heads, hidden 48; words longer than 4 letters split into 2 pieces."""
    from embgeom import load_model

    words = sorted({w.lower() for d in _lines() for w in d["tokens"]})
    path = save_pieces_bert(tmp_path_factory.mktemp("coref_bert"), words, [".", ","], seed=3, hidden=48, heads=3)
    return path, load_model(path)


def _numpy_word_map(model, tokenizer, words):
    """(K, W, W) float64 word map over the words (Clark's "mean" mode) by loops in numpy."""
    pieces = [tokenizer.tokenize(w) or [tokenizer.unk_token] for w in words]
    toks = [tokenizer.cls_token] + [p for ps in pieces for p in ps] + [tokenizer.sep_token]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokenizer.convert_tokens_to_ids(toks)]), output_attentions=True)
    A = np.concatenate([a[0].double().numpy() for a in out.attentions])      # (K, T, T)
    spans, t = [], 1
    for ps in pieces:
        spans.append(list(range(t, t + len(ps))))
        t += len(ps)
    K, W = A.shape[0], len(words)
    M = np.zeros((K, W, W))
    for k in range(K):
        for i, si in enumerate(spans):
            for j, sj in enumerate(spans):
                M[k, i, j] = np.mean([sum(A[k, a, b] for b in sj) for a in si])
    return M


def _expected(model, tokenizer, lines):
    K = model.config.num_hidden_layers * model.config.num_attention_heads
    ok, n, near_ok, match_ok = np.zeros(K), 0, 0, 0
    for d in lines:
        words = d["tokens"]
        ms = sorted(((s[0], s[1], s[2] if len(s) == 3 else s[1], c) for c, cl in enumerate(d["clusters"])
                     for s in cl), key=lambda m: (m[0], m[1]))
        M = _numpy_word_map(model, tokenizer, words)
        for q, (_, _, hq, cq) in enumerate(ms):
            cands = [ms[p] for p in range(q - 1, -1, -1) if ms[p][2] != hq]   # nearest first
            if not any(c[3] == cq for c in cands):
                continue
            n += 1
            for k in range(K):
                best = cands[0]
                for c in cands[1:]:
                    if M[k, hq, c[2]] > M[k, hq, best[2]]:
                        best = c
                ok[k] += best[3] == cq
            near_ok += cands[0][3] == cq
            same = [c for c in cands if words[c[2]].lower() == words[hq].lower()]
            match_ok += (same[0] if same else cands[0])[3] == cq
    return ok / n, n, near_ok / n, match_ok / n


def test_coref_heads_match_numpy(pieces_bert):
    _, (model, tokenizer) = pieces_bert
    docs = mentions.read_mentions(SAMPLE)
    assert any(len(tokenizer.tokenize(w)) > 1 for d in docs for w in d.tokens)
    got = coreference.coreference_heads(model, tokenizer, docs, batch_size=1)
    acc, n, near, match = _expected(model, tokenizer, _lines())
    H = model.config.num_attention_heads
    assert got["n_scored"] == n == 38 and got["n_mentions"] == 74 and got["n_documents"] == 11
    assert got["skipped_too_long"] == 0
    np.testing.assert_allclose(got["all_accuracy"].reshape(-1).numpy(), acc, rtol=0, atol=1e-12)
    best = int(np.argmax(acc))
    assert got["best"] == [best // H + 1, best % H] and abs(got["accuracy"] - acc[best]) < 1e-12
    assert abs(got["baselines"]["nearest"] - near) < 1e-12
    assert abs(got["baselines"]["head_match"] - match) < 1e-12
    # padding in a batch changes float32 attention in the last bits only
    many = coreference.coreference_heads(model, tokenizer, docs, batch_size=8)
    assert (many["all_accuracy"] - got["all_accuracy"]).abs().max() <= 1 / n + 1e-12


def test_selection_on_a_built_map():
    """A document whose head 0 points every mention's head word at a chosen earlier mention."""
    doc = mentions.parse_document({"tokens": ["a", "b", "c", "d", "e", "f"],
                                   "clusters": [[[0, 0], [3, 4], [5, 5]], [[1, 2, 1]]]}, "test")
    assert [(m.start, m.end, m.head, m.cluster) for m in doc.mentions] == [
        (0, 0, 0, 0), (1, 2, 1, 1), (3, 4, 4, 0), (5, 5, 5, 0)]
    t = coreference.targets(doc)
    assert t == [(2, [1, 0]), (3, [2, 1, 0])]
    assert coreference.baseline_choices(doc, 2, [1, 0]) == (1, 1)          # no head match: nearest


def test_no_head_right_names_no_best_head(pieces_bert, tmp_path, monkeypatch, capsys):
    """Maps that tie everywhere (each head takes the nearest candidate, wrong on every mention):
    `best` is null, as in the syntax report, and the page and the summary line say none (a head
    had been named best at accuracy 0)."""
    path, (model, tokenizer) = pieces_bert
    real = coreference.word_attention_batches

    def tied(*args, **kwargs):
        for chunk, wa in real(*args, **kwargs):
            yield chunk, torch.zeros_like(wa)

    monkeypatch.setattr(coreference, "word_attention_batches", tied)
    corpus = tmp_path / "zero.jsonl"
    corpus.write_text(json.dumps({"tokens": ["john", "met", "mary", ".", "john", "left"],
                                  "clusters": [[[0, 0], [4, 4]], [[2, 2]]]}) + "\n")
    out = tmp_path / "c"
    assert main(["coref", str(corpus), "--out", str(out), "--model", path, "--no-progress"]) == 0
    c = json.loads((out / "report.json").read_text())["coref"]
    assert c["best"] is None and c["accuracy"] == 0.0 and c["n_scored"] == 1
    assert "best head none 0.000" in capsys.readouterr().err
    assert "<td>best head: none (no head is right on any mention)</td>" in (out / "report.html").read_text()


def test_cli_coref(pieces_bert, tmp_path, capsys):
    path, _ = pieces_bert
    out = tmp_path / "c"
    assert main(["coref", SAMPLE, "--out", str(out), "--model", path, "--no-progress"]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    c = report["coref"]
    layer, head = c["best"]
    assert 1 <= layer <= report["layers"] and 0 <= head < report["heads"]
    assert f"best head L{layer} h{head} {c['accuracy']:.3f}" in err
    assert f"nearest {c['baselines']['nearest']:.3f}" in err
    prov = report["provenance"]
    assert prov["command"].startswith("embgeom coref ") and prov["inputs"][0]["name"] == "MENTIONS"
    assert {"version", "git_sha", "model", "seed", "total_seconds"} <= set(prov)
    assert len(c["all_accuracy"]) == report["layers"] and len(c["all_accuracy"][0]) == report["heads"]
    html = (out / "report.html").read_text()
    assert f"<td>best head: L{layer} h{head}</td>" in html
    assert "data:image/png;base64," in html and "http" not in html
    assert "href='#def-coref'" in html and "id='def-coref'" in html and "id='provenance'" in html
    assert json.loads((out / "manifest.json").read_text())


def test_help_documents_the_format(capsys):
    with pytest.raises(SystemExit):
        main(["coref", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "END INCLUSIVE" in out and "[start, end, head]" in out


def test_too_long_documents_are_skipped(pieces_bert, tmp_path, capsys):
    path, (model, tokenizer) = pieces_bert
    docs = mentions.read_mentions(SAMPLE)
    lengths = sorted(2 + sum(len(tokenizer.tokenize(w)) for w in d.tokens) for d in docs)
    limit = lengths[-3]                                                      # the two longest go
    got = coreference.coreference_heads(model, tokenizer, docs, max_length=limit)
    assert got["skipped_too_long"] == sum(x > limit for x in lengths) >= 1
    assert got["n_documents"] == len(docs) - got["skipped_too_long"]
    # every skipped document named (the list had been cut at 20)
    too_long = {d.name for d in docs if 2 + sum(len(tokenizer.tokenize(w)) for w in d.tokens) > limit}
    assert set(got["skipped"]) == too_long and len(got["skipped"]) == got["skipped_too_long"]
    assert main(["coref", SAMPLE, "--out", str(tmp_path / "o"), "--model", path, "--no-progress",
                 "--max-length", str(limit)]) == 0
    assert "longer than the model's maximum (--max-length) were skipped" in capsys.readouterr().err
    assert main(["coref", SAMPLE, "--out", str(tmp_path / "p"), "--model", path, "--no-progress",
                 "--max-length", "5"]) == 2
    assert "no mention has an earlier mention" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ('{"clusters": []}', 'line 2: no "tokens" field'),
    ('{"tokens": [], "clusters": []}', 'line 2: "tokens" must be a non-empty list'),
    ('{"tokens": ["a", ""], "clusters": []}', 'line 2: "tokens"[1] must be a non-empty string'),
    ('{"tokens": ["a"], "clusters": {}}', 'line 2: "clusters" must be a list'),
    ('{"tokens": ["a", "b"], "clusters": [[]]}', 'line 2: "clusters"[0] must be a non-empty list'),
    ('{"tokens": ["a", "b"], "clusters": [[[0, 0]], [[1]]]}', 'line 2: "clusters"[1][0] must be [start, end]'),
    ('{"tokens": ["a", "b"], "clusters": [[[0, 1.5]]]}', 'line 2: "clusters"[0][0] must be [start, end]'),
    ('{"tokens": ["a", "b"], "clusters": [[[0, true]]]}', 'line 2: "clusters"[0][0] must be [start, end]'),
    ('{"tokens": ["a", "b"], "clusters": [[[0, 0], [1, 2]]]}', 'line 2: "clusters"[0][1] = [1, 2]: need 0 <= start <= end < 2'),
    ('{"tokens": ["a", "b"], "clusters": [[[1, 0]]]}', 'line 2: "clusters"[0][0] = [1, 0]: need 0 <= start <= end'),
    ('{"tokens": ["a", "b"], "clusters": [[[-1, 0]]]}', 'need 0 <= start <= end < 2'),
    ('{"tokens": ["a", "b", "c"], "clusters": [[[0, 1, 2]]]}', '"clusters"[0][0] = [0, 1, 2]: the head word 2 is outside'),
    ('{"tokens": ["a", "b"], "clusters": [[[0, 0]], [[1, 1], [0, 0]]]}',
     '"clusters"[1][1] = [0, 0] is also "clusters"[0][0]'),
])
def test_bad_input(tmp_path, capsys, line, message):
    f = tmp_path / "m.jsonl"
    f.write_text('{"tokens": ["ok"], "clusters": []}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        mentions.read_mentions(str(f))
    assert message in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)
    assert main(["coref", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="MENTIONS: no such file"):
        mentions.read_mentions(str(tmp_path / "none.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no document"):
        mentions.read_mentions(str(tmp_path / "e.jsonl"))
    (tmp_path / "b.jsonl").write_bytes(b'{"tokens": ["ok"], "clusters": []}\n{"tokens": ["\xff"]}\n')
    with pytest.raises(ValueError, match=r"^MENTIONS: .*b\.jsonl line 2 is not UTF-8"):
        mentions.read_mentions(str(tmp_path / "b.jsonl"))
