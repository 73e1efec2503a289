"""Labelled and classified inputs (issue 23, item 3): `embgeom text --labels` splits the trace
metrics by class (by_label), `--class-maps N` averages the attention maps of one length per class
([SEP] zeroed) against float64, and `--correct-only` keeps the texts a classification head gets
right, against the model's own predictions."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from embgeom.analysis.text.trace import trace
from embgeom.cli import main
from embgeom.formatting import fmt

TEXTS = ["the cat sat .", "a dog ran .", "she was in the house", "red , green and blue .",
         "one two three", "he was not .", "big small", "the king and the queen"]


@pytest.fixture(scope="module")
def clf_dir(tiny_bert_dir, tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_clf")
    BertTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(str(path))
    cfg = BertConfig.from_pretrained(tiny_bert_dir, num_labels=2, id2label={0: "neg", 1: "pos"},
                                     label2id={"neg": 0, "pos": 1})
    torch.manual_seed(1)
    BertForSequenceClassification(cfg).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def run(model_dir, tmp, labels, *flags):
    corpus, lab = tmp / "corpus.txt", tmp / "labels.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    lab.write_text("\n".join(labels) + "\n", encoding="utf-8")
    out = tmp / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", model_dir, "--batch-size", "3",
                 "--labels", str(lab), "--no-progress", *flags]) == 0
    return out, json.loads((out / "report.json").read_text())


def close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and "'" in repr(a):      # token strings
        assert a == b, path
    elif isinstance(a, (list, float, int)) or a is None:
        x = np.array(a, dtype=float)
        y = np.array(b, dtype=float)
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=path)
    else:
        assert a == b, path


def test_labels_are_text_on_the_page(tiny_bert_dir, tmp_path):
    """Label names are written as text everywhere on report.html: the class maps' text counts had
    put a label "<!--<b>x" in raw, which commented out the rest of the page (its maps, the
    definitions and the provenance footer)."""
    labels = ["<!--<b>x", "y&z", "<!--<b>x", "y&z", "<!--<b>x", "<!--<b>x", "y&z", "<!--<b>x"]
    out, rep = run(tiny_bert_dir, tmp_path, labels, "--class-maps", "6")
    page = (out / "report.html").read_text()
    assert sorted(rep["by_label"]) == sorted(set(labels))
    assert "<!--" not in page and "<b>x" not in page and "&lt;!--&lt;b&gt;x" in page
    assert "<footer id='provenance'>" in page


def test_by_label_and_class_maps(tiny_bert, tiny_bert_dir, tmp_path):
    model, tokenizer = tiny_bert
    labels = ["x", "y", "x", "y", "x", "x", "y", "x"]
    out, rep = run(tiny_bert_dir, tmp_path, labels, "--class-maps", "6", "--theta", "0.05")
    assert sorted(rep["by_label"]) == ["x", "y"]
    for g in ("x", "y"):
        sub = [t for t, lab in zip(TEXTS, labels) if lab == g]
        want = trace(model, tokenizer, sub, batch_size=1).to_dict()
        for k in ("model", "truncated", "forward_passes_seconds"):
            want.pop(k)
        close(rep["by_label"][g], json.loads(json.dumps(want, default=float)), g)
    # report.html shows them: a table of the last layer and curves per label
    page = (out / "report.html").read_text()
    assert "Per label: the default metrics of each class" in page and (out / "by_label.png").exists()
    cone_last = rep["by_label"]["y"]["cone_index"]["layer_output"][-1]
    section = page.split("Per label: the default metrics")[2]
    assert f"<td>y</td><td>{labels.count('y')}</td>" in section and f"<td>{fmt(cone_last)}</td>" in section
    # class-mean maps of the texts with 6 real tokens, [SEP] rows and columns zeroed
    maps = np.load(out / "class_maps.npz")
    assert rep["class_maps"]["length"] == 6 and rep["class_maps"]["theta"] == 0.05
    for g in ("x", "y"):
        acc, n = 0.0, 0
        for t, lab in zip(TEXTS, labels):
            enc = tokenizer(t, return_tensors="pt")
            if lab != g or enc["input_ids"].shape[1] != 6:
                continue
            with torch.no_grad():
                att = model(**enc, output_attentions=True).attentions
            a = torch.stack([x[0] for x in att]).double().numpy()
            sep = (enc["input_ids"][0] == tokenizer.sep_token_id).numpy()
            a[:, :, sep, :] = 0
            a[:, :, :, sep] = 0
            acc, n = acc + a, n + 1
        assert rep["class_maps"]["texts"][g] == n and n > 0
        np.testing.assert_allclose(maps[g], acc / n, atol=1e-6)
        safe = g
        assert (out / f"class_maps_{safe}.png").exists()
        check_map_entropies(maps[g], rep["class_maps"]["entropies"][g], rep["class_maps"]["padded_to"])
    assert rep["class_maps"]["padded_to"] == model.config.max_position_embeddings


def authors_entropies(a: np.ndarray) -> tuple[float, float]:
    """The geometry-of-BERT code on one map: pandas.cut into 20 bins, -sum p ln p; eigenvalues,
    v = |lambda| / ||lambda||_2, -sum v ln v."""
    import pandas as pd

    p = pd.cut(a.ravel(), 20).value_counts().to_numpy() / a.size
    p = p[p > 0]
    lam = np.abs(np.linalg.eigvals(a))
    v = lam / np.sqrt((lam ** 2).sum())
    v = v[v > 0]
    return float(-(p * np.log(p)).sum()), float(-(v * np.log(v)).sum())


def check_map_entropies(maps, got, pad_to):
    L, H, N, _ = maps.shape
    for key in ("value_entropy", "value_entropy_padded", "von_neumann"):
        assert np.array(got[key]).shape == (L, H)
        np.testing.assert_allclose(got["layer_mean"][key], np.mean(got[key], -1), rtol=1e-12)
    for l in range(L):
        for h in range(H):
            padded = np.zeros((pad_to, pad_to))
            padded[:N, :N] = maps[l, h]
            shannon, vn = authors_entropies(maps[l, h])
            shannon_pad, vn_pad = authors_entropies(padded)
            assert got["value_entropy"][l][h] == pytest.approx(shannon, abs=1e-12)
            assert got["value_entropy_padded"][l][h] == pytest.approx(shannon_pad, abs=1e-12)
            assert got["von_neumann"][l][h] == pytest.approx(vn, abs=1e-9)
            assert vn_pad == pytest.approx(vn, abs=1e-9)        # zero padding: zero eigenvalues


def test_map_entropies_odd_maps():
    """Constant, one-hot and near-tied maps against the authors' code; pad_to below N refused."""
    from embgeom.analysis.text.labelled import map_entropies

    rng = np.random.default_rng(3)
    a = rng.random((2, 3, 5, 5))
    a /= a.sum(-1, keepdims=True)
    a[0, 0] = 0.2                                                 # constant: one bin
    a[0, 1] = np.eye(5)                                           # two values
    a[1, 2] = np.round(a[1, 2], 1)                                # values on bin edges
    got = map_entropies(torch.from_numpy(a), 9)
    check_map_entropies(a, got, 9)
    with pytest.raises(ValueError, match="pad_to"):
        map_entropies(torch.from_numpy(a), 4)


def test_correct_only(clf_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(clf_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(clf_dir)
    with torch.no_grad():
        pred = [clf.config.id2label[int(clf(**tok(t, return_tensors="pt")).logits.argmax())] for t in TEXTS]
    other = {"neg": "pos", "pos": "neg"}
    labels = [p if i % 3 else other[p] for i, p in enumerate(pred)]      # texts 0, 3, 6 wrong
    out, rep = run(clf_dir, tmp_path, labels, "--correct-only")
    sel = rep["correct_only"]
    assert (sel["texts"], sel["kept"]) == (8, 5)
    # the page says the numbers are over the kept texts (its Summary had read "texts 5" alone)
    assert "--correct-only: 5 of 8 texts kept" in (out / "report.html").read_text(encoding="utf-8")
    assert rep["n_texts"] == 5 and abs(sel["accuracy"] - 5 / 8) < 1e-12
    kept = [lab for i, lab in enumerate(labels) if i % 3]
    assert sel["kept_per_label"] == {g: kept.count(g) for g in sorted(set(labels))}
    assert sum(d["n_texts"] for d in rep["by_label"].values()) == 5
    assert sel["kept_ids"] == [1, 2, 4, 5, 7]
    # --show-texts ids are the corpus's, kept or not: text 0 was left out, 1 and 4 are drawn as 1 and 4
    (tmp_path / "shown").mkdir()
    _, rep = run(clf_dir, tmp_path / "shown", labels, "--correct-only", "--show-texts", "0,1,4")
    assert rep["attention_heads"]["sample_maps"]["texts"] == [1, 4]
    assert "selected 2 text(s) of the 3 asked for (texts --correct-only did not keep are not drawn)" \
        in capsys.readouterr().err
    assert rep["context_similarity"]["maps"]["text_ids"] == [1, 4]
    # a label the model has no class of could never be kept: refused, naming both sets
    (tmp_path / "wrong.txt").write_text("\n".join("POSITIVE" if g == "pos" else g for g in labels) + "\n")
    assert main(["text", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "unknown"), "--model", clf_dir,
                 "--labels", str(tmp_path / "wrong.txt"), "--no-progress", "--correct-only"]) == 2
    assert "labels that are none of the model's classes ('POSITIVE'; its id2label: 'neg', 'pos')" \
        in capsys.readouterr().err


def test_correct_only_class_maps_count_every_label(clf_dir, tmp_path, capsys):
    """A label none of whose texts is kept reads 0 texts in class_maps, as in kept_per_label (it
    had gone missing from class_maps.texts)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(clf_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(clf_dir)
    with torch.no_grad():
        pred = [clf.config.id2label[int(clf(**tok(t, return_tensors="pt")).logits.argmax())] for t in TEXTS]
    common = max(set(pred), key=pred.count)
    rare = {"neg": "pos", "pos": "neg"}[common]
    labels = [rare if i == pred.index(common) else common for i in range(len(TEXTS))]  # rare: never kept
    _, rep = run(clf_dir, tmp_path, labels, "--correct-only", "--class-maps", "5")
    assert rep["correct_only"]["kept_per_label"][rare] == 0
    assert rep["class_maps"]["texts"][rare] == 0 and set(rep["class_maps"]["texts"]) == {"neg", "pos"}
    # the file names two classes, the kept texts one ("the labels name one class" had been said)
    assert "note: the texts --correct-only kept are of one class" in capsys.readouterr().err


def test_class_maps_longer_than_any_input_refused_before_the_run(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    # the whole corpus had run to find no text of that length, and reported maps "padded to" it
    from embgeom.analysis.text import trace as trace_module

    forwards = []
    real = trace_module.iter_batches
    monkeypatch.setattr(trace_module, "iter_batches", lambda *a, **k: forwards.append(1) or real(*a, **k))
    corpus, lab = tmp_path / "c.txt", tmp_path / "l.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    lab.write_text("\n".join(["x", "y"] * 4) + "\n", encoding="utf-8")
    for flags, most in (([], 32), (["--max-length", "16"], 16)):   # (the tiny model takes 32)
        assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir, "--labels", str(lab),
                     "--class-maps", "600", "--no-progress", *flags]) == 2
        assert capsys.readouterr().err.strip() == (
            f"embgeom: error: --class-maps: 600 real tokens, more than an input holds here: at most {most} (the "
            "model's longest input, or --max-length)")
    assert not forwards


def test_label_option_errors(tiny_bert_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b\nc d\n", encoding="utf-8")
    lab = tmp_path / "l.txt"
    lab.write_text("x\ny\n", encoding="utf-8")
    base = ["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir, "--no-progress"]
    for flags, word in ((["--class-maps", "4"], "--class-maps"), (["--correct-only"], "--correct-only"),
                        (["--labels", str(lab), "--class-maps", "1"], "--class-maps"),
                        (["--labels", str(lab), "--class-maps", "0"], "--class-maps"),
                        (["--labels", str(lab), "--theta", "2"], "--theta"),
                        (["--labels", str(lab), "--correct-only"], "--correct-only")):
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], (flags, err)
    assert not (tmp_path / "o").exists()


def test_label_files_as_editors_write_them(tiny_bert_dir, tmp_path, capsys):
    """A byte-order mark is not part of the first label, blank lines at the end are no labels, a
    blank line between labels is refused (it would shift every later label), and one class only
    or a --class-maps length no text has get a note, on stderr and on the page."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b\nc d\n", encoding="utf-8")
    base = ["text", str(corpus), "--model", tiny_bert_dir, "--no-progress"]
    lab = tmp_path / "bom.txt"
    lab.write_bytes("\ufeffx\ny\n\n\n".encode("utf-8"))
    assert main(base + ["--out", str(tmp_path / "o1"), "--labels", str(lab), "--class-maps", "30"]) == 0
    rep = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert rep["groups"]["labels"] == ["x", "y"] and sorted(rep["by_label"]) == ["x", "y"]
    assert "no text has 30 real tokens" in capsys.readouterr().err
    assert "Note: no text has 30 real tokens" in (tmp_path / "o1" / "report.html").read_text()
    gap = tmp_path / "gap.txt"
    gap.write_text("x\n\ny\n", encoding="utf-8")
    assert main(base + ["--out", str(tmp_path / "o2"), "--labels", str(gap)]) == 2
    assert "--labels: " in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("x\nx\n", encoding="utf-8")
    assert main(base + ["--out", str(tmp_path / "o3"), "--labels", str(one)]) == 0
    assert "the labels name one class" in capsys.readouterr().err
    assert "Note: the labels name one class" in (tmp_path / "o3" / "report.html").read_text()


def test_correct_only_resumes_without_predicting_again(clf_dir, tmp_path, monkeypatch, ctrl_c_raises):
    """--checkpoint keeps --correct-only's selection: the rerun skips the prediction pass."""
    import os
    import signal

    from embgeom.analysis.text import labelled, trace as trace_module

    labels = ["neg", "pos"] * 4
    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", "0")
    (tmp_path / "clean").mkdir()
    (tmp_path / "resumed").mkdir()
    _, clean = run(clf_dir, tmp_path / "clean", labels, "--correct-only")
    real = trace_module.iter_batches

    def stop_after_one(*a, **kw):
        for i, b in enumerate(real(*a, **kw)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)
            yield b

    ckpt = str(tmp_path / "run.ckpt")
    monkeypatch.setattr(trace_module, "iter_batches", stop_after_one)
    with pytest.raises(AssertionError):       # run() asserts status 0; an interrupted run gives 130
        run(clf_dir, tmp_path / "resumed", labels, "--correct-only", "--checkpoint", ckpt)
    monkeypatch.setattr(trace_module, "iter_batches", real)
    monkeypatch.setattr(labelled, "predict_labels", lambda *a, **kw: pytest.fail("predicted again"))
    _, resumed = run(clf_dir, tmp_path / "resumed", labels, "--correct-only", "--checkpoint", ckpt)
    for rep in (clean, resumed):
        for key in ("forward_passes_seconds", "provenance", "total_seconds"):
            rep.pop(key, None)
    assert resumed == clean and resumed["correct_only"]["kept"] > 0


def test_labels_that_read_alike_as_file_names_get_a_heat_map_each(tmp_path):
    """'a b' and 'a-b' both become class_maps_a_b: the second label's picture had overwritten
    the first one's, and the page showed one map for both."""
    from embgeom.report.head_sections import class_maps_section

    means = {"a b": np.full((1, 1, 3, 3), 0.2), "a-b": np.full((1, 1, 3, 3), 0.9), "x" * 300: np.zeros((1, 1, 3, 3))}
    block = {"texts": {g: 1 for g in means}, "length": 3, "file": "class_maps.npz", "entropies": {}}
    _, _, pngs = class_maps_section(str(tmp_path), block, means, 0.1, list(means))[:3]
    names = [os.path.basename(p) for p in pngs]
    assert names == ["class_maps_a_b.png", "class_maps_a_b_1.png", f"class_maps_{'x' * 80}.png"]
    assert all(os.path.exists(p) for p in pngs)


def test_class_map_entropy_curves_take_the_scatters_colours(tmp_path, monkeypatch):
    """Under --correct-only block["texts"] also names a class with no kept text ('a'); the
    curves are coloured as the scatters, by the analysed texts' labels (they had been coloured
    by every class: b took the second colour where the scatters give it the first)."""
    from matplotlib.colors import to_hex

    import embgeom.report.head_sections as hs
    from embgeom.analysis.text.labelled import map_entropies
    from embgeom.report.interactive import label_color

    means = {"b": torch.full((1, 1, 3, 3), 1 / 3, dtype=torch.float64),
             "c": torch.eye(3, dtype=torch.float64)[None, None]}
    block = {"texts": {"a": 0, "b": 2, "c": 1}, "length": 3, "padded_to": 4, "file": "class_maps.npz",
             "entropies": {g: map_entropies(m, 4) for g, m in means.items()}}
    seen = {}
    real = hs.save_figure

    def keep(fig, out_dir, name):
        if name == "class_map_entropy":
            seen.update({line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].get_lines()})
        return real(fig, out_dir, name)

    monkeypatch.setattr(hs, "save_figure", keep)
    labels = ["b", "b", "c"]
    hs.class_maps_section(str(tmp_path), block, means, 0.1, labels)
    assert seen == {"b": label_color("b", labels), "c": label_color("c", labels)}


def test_a_byte_order_mark_inside_a_labels_file_is_no_character_of_its_label(tmp_path):
    """Two label files joined by cat: the second's byte-order mark starts a later line. It had
    made '\\ufeffa' a class of its own beside 'a' (drawn alike; a 3-class silhouette)."""
    from embgeom.analysis.text.inputs import read_labels

    lab = tmp_path / "joined.txt"
    lab.write_bytes("\ufeffa\nb\n".encode("utf-8") + "\ufeffa\nb\n".encode("utf-8"))
    assert read_labels(str(lab), 4) == ["a", "b", "a", "b"]


def test_labels_named_like_numpys_arguments_or_alike_keep_their_maps(tiny_bert_dir, tmp_path):
    """class_maps.npz holds one array per label whatever the label's name (np.savez(f, **maps)
    had taken "file" as its own argument, an error after every forward pass, and "allow_pickle",
    which left that label out), and each label's heat map its own file ("a_b_2" taken, then "a b"
    and "a.b" numbered into it: one label's picture had overwritten another's)."""
    labels = ["a_b_2", "a b", "a.b", "file", "allow_pickle"]   # (in this order "a.b" comes second to "a_b")
    corpus, lab, out = tmp_path / "c.txt", tmp_path / "l.txt", tmp_path / "out"
    corpus.write_text("the cat sat .\na dog ran .\nhe was not .\nthe cat ran .\na dog sat .\n", encoding="utf-8")
    lab.write_text("\n".join(labels) + "\n", encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--labels", str(lab),
                 "--class-maps", "6", "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["class_maps"]["texts"] == {g: 1 for g in labels}       # (every case has its map)
    assert sorted(np.load(out / "class_maps.npz").files) == sorted(labels)
    pngs = sorted(f for f in os.listdir(out) if f.startswith("class_maps_") and f.endswith(".png"))
    assert len(pngs) == len(labels)
    page = (out / "report.html").read_text()
    assert all(page.count(p) == 1 for p in pngs)


def test_class_names_with_spaces_match_the_labels(clf_dir, tmp_path):
    """id2label names are taken stripped, as --labels values are: a class 'neg ' could never be
    matched (and the refusal asked for the labels written as the model names them)."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spaced = tmp_path / "spaced"
    shutil.copytree(clf_dir, spaced)
    config = json.loads((spaced / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "neg ", "1": " pos"}, {"neg ": 0, " pos": 1}
    (spaced / "config.json").write_text(json.dumps(config))
    clf = AutoModelForSequenceClassification.from_pretrained(clf_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(clf_dir)
    with torch.no_grad():
        pred = [clf.config.id2label[int(clf(**tok(t, return_tensors="pt")).logits.argmax())] for t in TEXTS]
    (tmp_path / "o").mkdir()
    _, rep = run(str(spaced), tmp_path / "o", pred, "--correct-only")
    assert rep["correct_only"]["kept"] == len(TEXTS)
