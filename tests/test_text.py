"""`embgeom text`: files written, report keys, the JSON equal to trace(), clear errors (exit 2)."""
from __future__ import annotations

import json
import re
import os

import pytest
import torch

from embgeom.cli import main
from embgeom.analysis.text.trace import trace

pytestmark = pytest.mark.filterwarnings("ignore:trace. texts longer")

CORPUS = ["the cat sat on the mat .", "", "a dog !", "she was in the house ? he was not .",
          " ".join(["one two"] * 20), "red , green and blue ."]
KEYS = ["model", "n_texts", "n_tokens", "layers", "heads", "truncated", "special_only", "forward_passes_seconds", "cone_index",
        "entropy", "attention_to", "attention_to_per_text", "js_distance", "context_similarity", "evolution"]


def test_truncation_warning_names_the_callers_line_and_other_warnings_reach_the_user(tiny_bert_dir, tiny_bert,
                                                                                      tmp_path, monkeypatch, capsys):
    """trace's truncation warning is attributed to the line that called trace (it had named a
    line of embgeom's, so filters by module saw embgeom); `embgeom text` says it as one stderr
    line with the count, and any other warning during the forward passes reaches the user as
    Python shows it (all had been recorded, the first printed and the rest dropped: -W error
    could not see a deprecation)."""
    from transformers.models.bert import modeling_bert

    model, tok = tiny_bert
    with pytest.warns(UserWarning, match="texts longer than 32 tokens") as rec:
        trace(model, tok, [" ".join(["one two"] * 40)], batch_size=1)
    assert [w.filename for w in rec] == [__file__]
    forward = modeling_bert.BertModel.forward

    def deprecated_forward(self, *a, **k):
        import warnings

        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=2)
        return forward(self, *a, **k)

    monkeypatch.setattr(modeling_bert.BertModel, "forward", deprecated_forward)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    with pytest.warns(DeprecationWarning, match="a library's deprecation"):
        assert main(["text", str(corpus), "--out", str(tmp_path / "out"), "--model", tiny_bert_dir]) == 0
    err = capsys.readouterr().err
    assert "embgeom text: warning: 1 text longer than 32 tokens truncated (report.json truncated)" in err


def test_optional_packages_import_under_warnings_as_errors(tmp_path, monkeypatch):
    """An ImportWarning a package raises about a part of itself embgeom never uses (umap's
    "Tensorflow not installed") had ended `project` and `text --labels` under -W error."""
    import warnings

    from embgeom import validation

    (tmp_path / "warns_on_import.py").write_text(
        "import warnings\nwarnings.warn('an optional part is unavailable', ImportWarning)\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validation.require_package("warns_on_import", "warns-on-import", "clouds").VALUE == 1


def test_cli_writes_report(tiny_bert_dir, tiny_bert, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"group": "g", "a": "the king", "b": "the queen"}\n'
                     '{"group": "h", "a": "big", "b": "small"}\n', encoding="utf-8")
    out = tmp_path / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--batch-size", "2",
                 "--pairs", str(pairs)]) == 0
    err = capsys.readouterr().err
    # stderr is not a terminal here: no progress (not even transformers' own bars), one last line
    assert "truncated" in err and "5/5" not in err and "Loading weights" not in err
    assert "5 texts, " in err and "(forward passes " in err
    report = json.loads((out / "report.json").read_text())
    assert list(report) == KEYS + ["cls_pairs", "provenance"]
    L, H = 2, 4
    assert (report["n_texts"], report["layers"], report["heads"], report["truncated"]) == (5, L, H, 1)
    four = ("layer_input", "head_output", "multihead_output", "layer_output")
    assert set(report["cone_index"]) == {*four, *(f"{k}_raw" for k in four)}
    assert len(report["cone_index"]["head_output"]) == L and len(report["cone_index"]["head_output"][0]) == H
    assert set(report["attention_to"]) == {"cls", "sep", "punct", "prev", "next", "period", "comma",
                                           "sep_from_other"}
    assert len(report["js_distance"]) == L * H and len(report["evolution"]["norm"]) == L + 1
    assert set(report["entropy"]) == {"mean", "uniform_baseline", "head_mean"}
    assert set(report["context_similarity"]) == {"mean_distance", "focus_token", "focus_share", "separator_share",
                                                 "distance_hist", "layer_distance_hist",
                                                 "same_sentence_share", "period_separator_share",
                                                 "repeated_token_share"}
    assert "attention_heads" not in report and "gaussianity" not in report     # opt-in
    assert report["cls_pairs"]["groups"] == ["g", "h"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"cone_index.png", "entropy.png", "js_distance.png"} <= set(pngs)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and "http" not in html

    model, tokenizer = tiny_bert
    want = json.loads(json.dumps(trace(model, tokenizer, [t for t in CORPUS if t], batch_size=2).to_dict()))
    for key in ("cone_index", "entropy", "attention_to", "evolution"):
        for sub, vals in want[key].items():
            got = torch.tensor(report[key][sub], dtype=torch.float64)
            assert torch.allclose(got, torch.tensor(vals, dtype=torch.float64), atol=1e-9), f"{key}.{sub}"
    assert report["context_similarity"]["focus_token"] == want["context_similarity"]["focus_token"]


@pytest.mark.parametrize("content,message", [
    (b"fine\n\xc3\x28 broken\n", "CORPUS: "),
    (b"fine\n\xc3\x28 broken\n", "line 2 is not UTF-8"),
    (b"", "empty corpus"),
    (b"One.\tTwo.\tThree.\nA dog.\n", "line 1 (text id 0): a text with a TAB is a sentence pair "
                                      "A<TAB>B; this one has 2 TABs"),
    # the file's line, where blank lines come first (the text count had been given: "text 2")
    (b"A dog.\n\n\n\nOne.\t\n", "line 5 (text id 1): a text with a TAB is a sentence pair and needs text on both"),
])
def test_cli_bad_corpus(tiny_bert_dir, tmp_path, capsys, content, message):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(content)
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("embgeom: error:") and message in last and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model: no such directory: /nonexistent/model"),
    (["--batch-size", "0"], "--batch-size"),
    (["--pairs", "/nonexistent/pairs.jsonl"], "--pairs: no such file"),
    (["--theta", "0.5"], "--theta: needs --class-maps N"),
    (["--max-length", "1"], "--max-length: expected >= 2"),
    (["--show-texts", ""], "--show-texts: expected comma-separated text ids or a regular expression"),
    (["--class-maps", "0"], "--class-maps: needs --labels"),
    (["--out", ""], "--out: expected a folder path, got an empty one"),
])
def test_cli_bad_options(tiny_bert_dir, tmp_path, capsys, args, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat .\n", encoding="utf-8")
    argv = ["text", str(corpus)] + (["--out", str(tmp_path / "o")] if "--out" not in args else []) + args
    if "--model" not in args:
        argv += ["--model", tiny_bert_dir]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("entry", ['{"group": "g", "a": "", "b": "the dog"}', '{"group": "g", "a": "x", "b": "  "}'])
def test_cli_pairs_with_an_empty_side(tiny_bert_dir, tmp_path, capsys, monkeypatch, entry):
    """A --pairs text that is blank has no [CLS] state: refused before the model loads, naming
    the file's entry (it had ended the run with 'not enough values to unpack')."""
    import embgeom.models

    corpus, pairs = tmp_path / "c.txt", tmp_path / "p.jsonl"
    corpus.write_text("the cat .\n", encoding="utf-8")
    pairs.write_text('{"group": "g", "a": "one", "b": "two"}\n' + entry + "\n", encoding="utf-8")
    monkeypatch.setattr(embgeom.models, "load_model", None)  # (never reached)
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir,
                 "--pairs", str(pairs)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--pairs:" in last and "line 2" in last and "is empty" in last


def test_cli_missing_corpus(tmp_path, capsys):
    assert main(["text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "CORPUS: no such file" in capsys.readouterr().err


def test_cli_heads_extras(tiny_bert_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for t in CORPUS if t) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--batch-size", "2",
                 "--clark-js", "--directionality", "--head-maps", "2", "--gaussianity", "--profile",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "profile:" in err and "clark js" in err and "gaussianity" in err
    report = json.loads((out / "report.json").read_text())
    ah = report["attention_heads"]
    share = torch.tensor(ah["directionality"]["positive_cos_share"], dtype=torch.float64)
    assert bool(((share >= 0) & (share <= 1)).all())  # a share of each row's own mass
    L, H = 2, 4
    assert len(ah["js_divergence"]) == L * H and len(ah["mds"]) == L * H and len(ah["mds"][0]) == 2
    for key in ("clark_entropy", "cls_entropy", "sep_to_sep", "value_entropy"):
        assert len(ah[key]) == L and len(ah[key][0]) == H, key
    assert set(ah["patterns"][0][0]) >= {"diagonal", "previous", "next", "back3", "forward3", "cls_sep",
                                         "top_column", "top3_columns", "k90_median",
                                         "normalised_entropy", "label"}
    assert set(ah["directionality"]) == {"skew_fraction", "asymmetry", "positive_cos_share",
                                         "spearman_qnorm_entropy"}
    assert ah["sample_maps"]["file"] == "head_maps.json" and len(ah["sample_maps"]["tokens"]) == 2
    maps = json.loads((out / "head_maps.json").read_text())
    assert len(maps) == 2 and len(maps[0]["maps"]) == L and len(maps[0]["maps"][0]) == H
    n = len(maps[0]["tokens"])
    assert len(maps[0]["maps"][0][0]) == n and abs(sum(maps[0]["maps"][0][0][0]) - 1) < 0.01
    assert [g["depth"] for g in report["gaussianity"]] == list(range(L + 1))
    # Clark's figure-6 markers from his per-text-first averages (attention_to_per_text)
    from embgeom.analysis.heads.measures import behaviours

    per_text = {k: torch.tensor(report["attention_to_per_text"][k], dtype=torch.float64)
                for k in ("cls", "sep", "period", "comma", "prev", "next")}
    assert ah["mds_behaviour"] == behaviours(torch.tensor(ah["clark_entropy"], dtype=torch.float64), per_text)
    html = (out / "report.html").read_text()
    assert "headmap-data" in html and "Contents" in html and "http" not in html
    assert {"head_mds.png", "head_patterns.png", "gaussianity.png"} <= {p.name for p in out.glob("*.png")}


def test_trace_per_head_table(tiny_bert):
    """TraceResult.to_pandas("heads"): one row per (layer 1..L, head 0..H-1) with the trace's
    (L, H) values, and the attention_heads block of a HeadsAccumulator observer joined on."""
    pytest.importorskip("pandas")
    from embgeom.analysis.heads.measures import HeadsAccumulator

    model, tokenizer = tiny_bert
    texts = [t for t in CORPUS if t]
    acc = HeadsAccumulator(2, 4, 512, torch.device("cpu"), js=True)
    r = trace(model, tokenizer, texts, batch_size=2, observers=[acc])
    block = acc.result(model, tokenizer, r.attention_to_per_text)  # (as the README shows)
    # the same block as the command's own code gives (trace(heads=True) passes the per-text masses)
    own = trace(model, tokenizer, texts, batch_size=2, heads=True, clark_js=True).attention_heads
    assert block["mds_behaviour"] == own["mds_behaviour"]
    df = r.to_pandas("heads", heads_block=block)
    assert len(df) == 2 * 4 and df["layer"].tolist() == [1] * 4 + [2] * 4
    assert df["head"].tolist() == [0, 1, 2, 3] * 2 and df["head_index"].tolist() == list(range(8))
    row = df[(df["layer"] == 2) & (df["head"] == 3)].iloc[0]
    assert row["entropy"] == pytest.approx(float(r.entropy[1, 3]))
    assert row["to_cls"] == pytest.approx(float(r.attention_to["cls"][1, 3]))
    assert row["focus_token"] == r.focus_token[1][3]
    assert row["clark_entropy"] == pytest.approx(float(block["clark_entropy"][1][3]))
    assert (row["mds_x"], row["mds_y"]) == pytest.approx(tuple(float(v) for v in block["mds"][7]))
    assert list(r.to_pandas().columns) == list(r.PER_LAYER_COLUMNS)
    with pytest.raises(ValueError, match="expected one of 'layers', 'heads', 'clark_js', 'gaussianity'"):
        r.to_pandas("pairs")
    with pytest.raises(ValueError, match=r"clark_js=True"):
        r.to_pandas("clark_js")
    with pytest.raises(ValueError, match=r"gaussianity=True"):
        r.to_pandas("gaussianity")


def test_trace_heads_clark_gaussianity_in_one_call(tiny_bert, tiny_bert_dir, tmp_path):
    """trace(..., heads=True, clark_js=True, gaussianity=True, directionality=True): the blocks
    `embgeom text --clark-js --gaussianity --directionality` writes to report.json (the same
    code, text_extras.TextExtras), as long per-(layer, head), per-pair and per-depth tables."""
    pytest.importorskip("pandas")
    import numpy as np

    model, tokenizer = tiny_bert
    texts = [t for t in CORPUS if t]
    L, H = 2, 4
    r = trace(model, tokenizer, texts, batch_size=2, heads=True, clark_js=True, gaussianity=True,
              directionality=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir, "--quiet",
                 "--batch-size", "2", "--clark-js", "--gaussianity", "--directionality"]) == 0
    cli = json.loads((tmp_path / "o" / "report.json").read_text())
    ah, js = cli["attention_heads"], np.asarray(cli["attention_heads"]["js_divergence"])

    heads = r.to_pandas("heads")                          # the kept block joins by default
    assert len(heads) == L * H and heads["head_index"].tolist() == list(range(L * H))
    np.testing.assert_allclose(heads["clark_entropy"], np.ravel(ah["clark_entropy"]), rtol=1e-9)
    np.testing.assert_allclose(heads["sep_to_sep"], np.ravel(ah["sep_to_sep"]), rtol=1e-9)
    np.testing.assert_allclose(heads["asymmetry"], np.ravel(ah["directionality"]["asymmetry"]), rtol=1e-9)
    np.testing.assert_allclose(heads[["mds_x", "mds_y"]], ah["mds"], atol=1e-9)
    assert heads["behaviour"].tolist() == [b for row in ah["mds_behaviour"] for b in row]

    pairs = r.to_pandas("clark_js")
    assert len(pairs) == (L * H) ** 2
    assert list(pairs.columns) == ["layer_a", "head_a", "head_index_a", "layer_b", "head_b",
                                   "head_index_b", "js_divergence"]
    row = pairs[(pairs["layer_a"] == 2) & (pairs["head_a"] == 1) & (pairs["layer_b"] == 1) & (pairs["head_b"] == 3)]
    assert row["head_index_a"].item() == 5 and row["head_index_b"].item() == 3
    matrix = pairs.pivot(index="head_index_a", columns="head_index_b", values="js_divergence").to_numpy()
    np.testing.assert_allclose(matrix, js, rtol=1e-9, atol=1e-12)
    assert np.all(np.diag(matrix) == 0) and np.all(matrix[~np.eye(L * H, dtype=bool)] > 0)

    gauss = r.to_pandas("gaussianity")
    assert gauss["depth"].tolist() == [d for d in range(L + 1) for _ in range(2)]
    assert gauss["kind"].tolist() == ["token", "text_mean"] * (L + 1)
    for e in cli["gaussianity"]:
        tok = gauss[(gauss["depth"] == e["depth"]) & (gauss["kind"] == "token")].iloc[0]
        mean = gauss[(gauss["depth"] == e["depth"]) & (gauss["kind"] == "text_mean")].iloc[0]
        assert tok["share_rejected"] == pytest.approx(e["share_rejected"], abs=1e-12)
        assert tok["mean_skew"] == pytest.approx(e["mean_skew"], rel=1e-9)
        assert tok["count"] == e["count"] and mean["count"] == e["text_mean"]["count"]
        assert mean["mean_excess_kurtosis"] == pytest.approx(e["text_mean"]["mean_excess_kurtosis"], rel=1e-9)
    # to_dict carries the blocks as report.json has them
    d = json.loads(json.dumps(r.to_dict()))
    np.testing.assert_allclose(d["attention_heads"]["js_divergence"], js, rtol=1e-9, atol=1e-12)
    assert [e["depth"] for e in d["gaussianity"]] == [e["depth"] for e in cli["gaussianity"]]
    # without the options nothing is kept and the default metrics are unchanged
    plain = trace(model, tokenizer, texts, batch_size=2)
    assert plain.attention_heads is None and plain.gaussianity is None
    assert "attention_heads" not in plain.to_dict() and "gaussianity" not in plain.to_dict()
    assert torch.equal(plain.entropy, r.entropy)


def test_layer_summaries_of_maps_holding_nan(monkeypatch):
    """A real row holding NaN in a column no key reads: the key masses and [SEP]'s mass of the
    other rows are NaN on the C++ path as on torch's (the column sums had left them finite once
    the masses came from them)."""
    import embgeom.analysis.text.attention as A

    pytest.importorskip("embgeom._C")
    attn = torch.softmax(torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(1)), -1)
    attn[0, 1, 2, 3] = float("nan")
    mask = torch.ones(2, 6, dtype=torch.bool)
    cls, sep = torch.zeros(2, 6, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)
    cls[:, 0], sep[:, 5] = True, True
    none = torch.zeros_like(mask)
    args = (mask, cls, sep, none, none, none, 8)
    got = A.layer_summaries(attn, *args)
    with monkeypatch.context() as m:
        m.setattr(A.registry, "cpp", lambda: None)
        want = A.layer_summaries(attn, *args)
    for key in ("cls", "sep", "sep_from_other"):
        assert torch.equal(got[0][key].isnan(), want[0][key].isnan()), key
        assert got[0][key].isnan().tolist() == [[False, True], [False, False]], key


def test_torch_target_distribution_sums_in_float64():
    """The torch path's relative-offset sums (what js_distance compares) are float64 sums of the
    float32 maps' exact products: equal to those of the same maps in float64 (float32 sums over a
    batch of 64 texts had been up to 7e-7 off per entry)."""
    import embgeom.analysis.text.attention as A

    g = torch.Generator().manual_seed(2)
    B, H, T = 64, 3, 24
    attn = torch.softmax(3 * torch.randn(B, H, T, T, generator=g), -1)
    mask = torch.rand(B, T, generator=g) < 0.9
    mask[:, 0] = True
    cls = torch.zeros(B, T, dtype=torch.bool)
    cls[:, 0] = True
    sep = torch.rand(B, T, generator=g) < 0.1
    got = A.target_distribution(attn, mask, cls, sep, 30)
    want = A.target_distribution(attn.double(), mask, cls, sep, 30)
    torch.testing.assert_close(got[:, 2:], want[:, 2:], rtol=1e-15, atol=0)


@pytest.mark.parametrize("T", [1, 2, 37])
def test_layer_summaries_kernel_equals_torch_path(T, cpu_cap, monkeypatch):
    """The one-pass C++ attention summaries (every vector level) against the torch functions on
    the same maps: padding, texts with one real token, [CLS]/[SEP]/punctuation/'.'/',' keys, T not
    a multiple of the kernel's 8 lanes, strided maps."""
    import embgeom.analysis.text.attention as A

    _C = pytest.importorskip("embgeom._C")
    assert "attention_sums" in _C.cpu_info()
    g = torch.Generator().manual_seed(T)
    B, H, max_len = 3, 4, 40
    attn = torch.softmax(3 * torch.randn(B, H, T, T, generator=g), -1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, max(1, T - 5):] = False
    mask[2, 1:] = False
    flags = [torch.rand(B, T, generator=g) < 0.2 for _ in range(5)]
    cls, sep, punct, period, comma = (f & mask for f in flags)
    cls[:, 0] = True
    args = (mask, cls, sep, punct, period, comma, max_len)
    got = A.layer_summaries(attn, *args)
    strided = A.layer_summaries(attn.transpose(0, 1).contiguous().transpose(0, 1), *args)
    with monkeypatch.context() as m:
        m.setattr(A.registry, "cpp", lambda: None)
        want = A.layer_summaries(attn, *args)
    for key in A.TARGETS:
        torch.testing.assert_close(got[0][key], want[0][key].double(), rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(strided[0][key], got[0][key], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2].double(), rtol=1e-5, atol=1e-6)
    # the kernel's sums are float64 throughout: the torch functions on the float64 maps; and the
    # torch path's target distribution sums float64 too (float32 sums had put js_distance 7e-6 off)
    with monkeypatch.context() as m:
        m.setattr(A.registry, "cpp", lambda: None)
        want64 = A.layer_summaries(attn.double(), *args)
    for key in A.TARGETS:
        torch.testing.assert_close(got[0][key], want64[0][key], rtol=1e-12, atol=1e-14, msg=key)
    torch.testing.assert_close(got[1], want64[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[2], want64[2], rtol=1e-12, atol=1e-14)
    # the rows' entropies taken in the same pass: the entropy kernel's values, bit for bit (NaN
    # on padded rows), and the summaries unchanged
    assert A.fused_row_entropy(attn)
    *same, ent = A.layer_summaries(attn, *args, row_entropy=True)
    alone = A.registry.pick("attention_entropy", attn)[1](attn, mask, 0.0)   # (rows sum to 1 over all keys)
    assert torch.equal(ent.isnan(), ~mask[:, None, :].expand(B, H, T))
    assert torch.equal(torch.nan_to_num(ent, nan=-1.0), torch.nan_to_num(alone, nan=-1.0))
    assert all(torch.equal(a, b) for a, b in zip(same[1:], got[1:]))
    assert all(torch.equal(same[0][k], got[0][k]) for k in A.TARGETS)


def test_cli_refuses_a_checkpoint_missing_layers(tiny_bert_dir, tmp_path, capsys):
    """A config with more layers than the weights hold: transformers would initialise the rest at
    random; the command refuses in one line instead."""
    model = tmp_path / "m"
    model.mkdir()
    for f in os.listdir(tiny_bert_dir):
        os.symlink(os.path.join(tiny_bert_dir, f), model / f)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").unlink()
    cfg["num_hidden_layers"] += 1
    (model / "config.json").write_text(json.dumps(cfg))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat .\n", encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", str(model), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weight(s) missing from the checkpoint" in err[0] and "encoder.layer." in err[0]
    assert not (tmp_path / "o").exists()


def _close_results(a, b, tol=1e-6):
    da, db = a.to_dict(), b.to_dict()

    def walk(x, y, path):
        if isinstance(x, dict):
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, float) and isinstance(y, float):
            assert abs(x - y) <= tol * max(1.0, abs(y)), (path, x, y)
        else:
            assert x == y, (path, x, y)

    for key in ("cone_index", "entropy", "attention_to", "context_similarity", "evolution"):
        walk(da[key], db[key], key)


def test_left_padding_tokenizer_and_training_mode_model(tiny_bert_dir):
    """A tokenizer that pads on the left gives the numbers of one text a batch (trace pads on
    the right: no position ids are passed, and absolute positions count from index 0); a model
    in training mode runs without its dropout and is left in training mode."""
    from transformers import AutoTokenizer, BertModel

    texts = [t for t in CORPUS if t]
    model = BertModel.from_pretrained(tiny_bert_dir, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model.eval()
    one = trace(model, tok, texts, batch_size=1)
    tok.padding_side = "left"
    _close_results(trace(model, tok, texts, batch_size=3), one)
    assert tok.padding_side == "left"
    dropped = BertModel.from_pretrained(tiny_bert_dir, attn_implementation="eager",
                                        hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    _close_results(trace(dropped, tok, texts, batch_size=3), one)
    assert dropped.training


def test_token_flags_follow_each_tokenizer_object():
    """The punctuation tables are kept per tokenizer object while it lives: keyed by id(), a
    freed tokenizer's table was handed to a new one of the same size given its id."""
    import gc

    from transformers import BertTokenizer

    from embgeom.analysis.text.trace import _FLAG_CACHE, punctuation_table

    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    gc.collect()
    before = len(_FLAG_CACHE)  # (other tests' tokenizers still alive)
    for round_ in range(8):
        words = ["dog", "cat", "red", "blue"] if round_ % 2 else [".", ",", "!", "?"]
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(base + words)})
        table = punctuation_table(tok)
        assert table[5:9].tolist() == [round_ % 2 == 0] * 4, round_
        del tok
        gc.collect()
    assert len(_FLAG_CACHE) <= before  # the loop's tokenizers are not held


def test_byte_level_tokens_are_read_as_their_characters():
    """Byte-level BPE writes each byte as a printable stand-in: '“' is the token 'âĢľ' (with a
    space before it 'ĠâĢľ'). The tables read the decoded characters: curly quotes, dashes and
    the ellipsis are punctuation, a piece of a character (U+FFFD) and 'Ġthe' are not."""
    from helpers import trained_tokenizer

    from embgeom.analysis.text.trace import mark_tables, punctuation_table

    texts = ["he said “ yes ” — then … left .", "a “ b ” , c — d … e ."] * 20
    tok = trained_tokenizer("bpe", texts)
    table, (period, comma) = punctuation_table(tok), mark_tables(tok)
    ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    marks = [p for p, i in zip(pieces, ids) if table[i]]
    assert [tok.convert_tokens_to_string([p]).strip() for p in marks] == ["“", "”", "—", "…", "."], pieces
    vocab = tok.get_vocab()
    assert not any(table[i] for p, i in vocab.items() if p.lstrip("Ġ").isascii() and p.lstrip("Ġ").isalpha())
    assert sorted(p for p, i in vocab.items() if period[i]) == sorted(p for p in vocab if p.lstrip("Ġ") == ".")
    assert sorted(p for p, i in vocab.items() if comma[i]) == sorted(p for p in vocab if p.lstrip("Ġ") == ",")


def test_sixteen_bit_maps_are_summed_as_float32():
    """Attention summaries and the context argmax of float16 / bfloat16 tensors equal those of
    the same values widened to float32 (they had summed and multiplied in 16 bits)."""
    import embgeom.analysis.text.attention as A

    g = torch.Generator().manual_seed(5)
    B, H, T, d = 2, 3, 19, 16
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 12:] = False
    flags = [torch.rand(B, T, generator=g) < 0.2 for _ in range(5)]
    cls, sep, punct, period, comma = (f & mask for f in flags)
    attn = torch.softmax(2 * torch.randn(B, H, T, T, generator=g), -1)
    out = torch.randn(B, H, T, d, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        low = attn.to(dt)
        got = A.layer_summaries(low, mask, cls, sep, punct, period, comma, 40)
        want = A.layer_summaries(low.float(), mask, cls, sep, punct, period, comma, 40)
        for key in A.TARGETS:
            assert torch.equal(got[0][key], want[0][key]), (dt, key)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        o = out.to(dt)
        assert torch.equal(A.context_argmax(o, mask), A.context_argmax(o.float(), mask))
        assert torch.equal(A.head_mean_entropy(low, mask), A.head_mean_entropy(low.float(), mask))


def test_trace_metrics_left_out_are_nan_and_a_text_string_is_named(tiny_bert):
    """With metrics=, what was not computed is NaN (None in to_dict), not zeros; a single metric
    may be given as a str; a str that is no file but looks like a text says to pass a list."""
    import math

    model, tokenizer = tiny_bert
    texts = [t for t in CORPUS if t]
    r = trace(model, tokenizer, texts, batch_size=2, metrics="cone")
    assert bool(torch.isfinite(r.cone_layer_output).all())
    for v in (r.entropy, r.head_mean_entropy, r.attention_to["cls"], r.step_distance, r.norm, r.focus_share,
              r.context_mean_distance):
        assert bool(torch.isnan(v).all())
    assert math.isnan(r.uniform_baseline) and r.focus_token[0][0] is None
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["entropy"]["uniform_baseline"] is None and d["evolution"]["norm"][0] is None
    with pytest.raises(ValueError, match=r"texts: no such file: 'the dog is big'; one text goes in a list"):
        trace(model, tokenizer, "the dog is big")
    # entropy alone takes the entropy kernel; with the attention summaries, their pass: the same sums
    alone = trace(model, tokenizer, texts, batch_size=2, metrics="entropy")
    both = trace(model, tokenizer, texts, batch_size=2, metrics=("entropy", "attention"))
    assert torch.equal(alone.entropy, both.entropy) and bool(torch.isfinite(both.entropy).all())


def test_behaviour_marker_takes_periods_and_commas_only():
    """Clark's Fig. 6 marker for punctuation heads is his code's: the mass on the tokens '.' and
    ',' together >= 0.6. A head on ';' (punctuation, but neither) is "other"."""
    from embgeom.analysis.heads.measures import PERIOD_COMMA, behaviours

    entropy = torch.ones(1, 3, dtype=torch.float64)
    to = {k: torch.zeros(1, 3, dtype=torch.float64) for k in ("cls", "sep", "prev", "next", "period", "comma")}
    to["punct"] = torch.tensor([[1.0, 0.65, 0.0]], dtype=torch.float64)   # head 0: all on ';'
    to["period"][0, 1], to["comma"][0, 1] = 0.35, 0.3                      # head 1: '.' and ',' 0.65
    to["period"][0, 2] = 0.59                                              # head 2: below 0.6
    assert behaviours(entropy, to) == [["other", PERIOD_COMMA, "other"]]


def test_layer_summaries_equal_on_every_vector_level(monkeypatch):
    """The one-pass sums take the same order at every level (8 partial sums a key; the AVX-512
    build widens only the float64 loops): the summaries are bit for bit the same."""
    import embgeom.analysis.text.attention as A
    from helpers import CPU_CAPS

    g = torch.Generator().manual_seed(1)
    attn = torch.softmax(3 * torch.randn(3, 4, 45, 45, generator=g), -1)
    mask = torch.ones(3, 45, dtype=torch.bool)
    mask[1, 40:] = False
    flags = [(torch.rand(3, 45, generator=g) < 0.2) & mask for _ in range(5)]
    got = []
    for cap in CPU_CAPS:
        monkeypatch.setenv("EMBGEOM_CPU", cap)
        per, hme, dist, ent = A.layer_summaries(attn, mask, *flags, 64, row_entropy=True)
        got.append(torch.cat([per[k].flatten() for k in A.TARGETS] + [hme.flatten(), dist.flatten()]))
    assert all(torch.equal(g, got[0]) for g in got[1:])


def test_a_max_length_past_the_models_is_lowered_with_a_note(tiny_bert_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat .\na dog ran .\n", encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir,
                 "--max-length", "100", "--no-progress"]) == 0
    assert "note: --max-length 100 lowered to 32, the longest input the model takes" in capsys.readouterr().err
    assert main(["text", str(corpus), "--out", str(tmp_path / "p"), "--model", tiny_bert_dir,
                 "--max-length", "32", "--no-progress"]) == 0
    assert "lowered" not in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("one\ttwo\tthree", "has 2 TABs"), ("one\t ", "needs text on both sides")])
def test_cli_pairs_texts_are_checked_as_corpus_lines_before_the_run(tiny_bert_dir, tmp_path, capsys, monkeypatch,
                                                                     text, message):
    """A --pairs text with a TAB is a sentence pair, as a corpus line: two TABs or an empty side
    are refused before the model loads, naming the file and line (the run had ended after the
    corpus's passes with 'texts[2]: ...')."""
    import json as json_module

    import embgeom.models

    corpus, pairs = tmp_path / "c.txt", tmp_path / "p.jsonl"
    corpus.write_text("the cat .\n", encoding="utf-8")
    pairs.write_text('{"group": "g", "a": "one", "b": "two\\tthree"}\n\n'
                     + json_module.dumps({"group": "h", "a": "x", "b": text}) + "\n", encoding="utf-8")
    monkeypatch.setattr(embgeom.models, "load_model", None)  # (never reached)
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir,
                 "--pairs", str(pairs)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--pairs: {pairs} line 3: text 'b': a text with a TAB is a sentence pair" in last and message in last


def test_text_inputs_that_are_no_utf8_text_files(tmp_path):
    """A named pipe had been called missing ('no such file'); a UTF-16 file of ASCII letters is
    valid UTF-8 with a NUL after each, whose NULs the tokenizer dropped (and its last NUL made a
    phantom text)."""
    from embgeom.analysis.text.inputs import read_labels, read_lines

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"^CORPUS: .*pipe.txt is not a regular file \(a named pipe"):
        list(read_lines(str(fifo), "CORPUS"))
    wide = tmp_path / "utf16.txt"
    wide.write_bytes("one text\nanother\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"^CORPUS: .*utf16.txt line 1 holds NUL bytes: is the file UTF-16\?"):
        list(read_lines(str(wide), "CORPUS"))
    with pytest.raises(ValueError, match=r"^--labels: .*line 1 holds NUL bytes"):
        read_labels(str(wide))


def test_texts_the_tokenizer_empties_are_counted_and_said(tiny_bert_dir, tmp_path, capsys):
    """A line of zero-width or control characters is a text of [CLS] [SEP] alone: it counts in
    every mean, and report.json, the page and stderr say how many there were (they had been
    counted with no word); a resumed run keeps the count."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat .\n\u200b\u200b\na dog !\n\x07\u200d\nred and blue .\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--batch-size", "2",
                 "--checkpoint", str(tmp_path / "ck")]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert (report["n_texts"], report["special_only"]) == (5, 2)
    assert "2 texts came out of the tokenizer as special tokens alone" in err
    assert "2 texts came out of the tokenizer as special tokens alone" in (out / "report.html").read_text()
    assert main(["text", str(corpus), "--out", str(tmp_path / "again"), "--model", tiny_bert_dir,
                 "--batch-size", "2", "--checkpoint", str(tmp_path / "ck")]) == 0
    assert json.loads((tmp_path / "again" / "report.json").read_text())["special_only"] == 2
    assert "2 texts came out of the tokenizer" in capsys.readouterr().err
    corpus.write_text("the cat sat .\n", encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "plain"), "--model", tiny_bert_dir]) == 0
    assert "special tokens alone" not in capsys.readouterr().err
    assert "special tokens alone" not in (tmp_path / "plain" / "report.html").read_text()


def test_batches_and_head_maps_past_memory_are_refused_by_their_option(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    """A batch whose forward pass (attention maps of every layer, states) would not fit is
    refused before it runs, naming --batch-size (2,000 texts had failed in torch's allocator);
    --head-maps texts whose maps would not fit, before any forward pass (500 had failed at the
    end, writing head_maps.json)."""
    from embgeom.analysis.heads import text_extras
    from embgeom.engine import limits

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat .\na dog !\n", encoding="utf-8")
    monkeypatch.setattr(limits, "memory_available", lambda: (1 << 10, "the machine has"))
    monkeypatch.setattr(limits, "MEMORY_CHECK_FLOOR", 0)
    assert main(["text", str(corpus), "--out", str(tmp_path / "o"), "--model", tiny_bert_dir]) == 2
    err = capsys.readouterr().err
    assert re.search(r"embgeom: error: --batch-size: a batch of 2 texts padded to \d+ tokens needs about [\d.]+ GiB "
                     r"for its forward pass \(2 layers x 4 heads of \d+ x \d+ attention maps a text, and the "
                     r"states\), the machine has 0\.0 GiB available; lower --batch-size \(or --max-length\)", err), err
    monkeypatch.setattr(limits, "memory_available", lambda: (1 << 30, "the machine has"))
    with pytest.raises(ValueError, match=r"^--head-maps: the maps of 2,000 texts \(6 layers x 12 heads x up to 512 "
                                         r"x 512 each\) need up to [\d.]+ GiB, the machine has 1\.0 GiB available"):
        text_extras._check_maps_memory(2000, 6, 12, 512)
    text_extras._check_maps_memory(2, 6, 12, 512)   # a few texts' maps fit


def test_reports_leave_the_callers_matplotlib_as_it_was(tiny_bert_dir, tmp_path):
    """A report written from a notebook or a caller's process (cli.main) keeps the caller's
    matplotlib backend, open figures and rcParams: matplotlib.use("Agg") had switched a
    notebook's inline backend off for the rest of its session. A child process, which picks its
    own backend first."""
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    script = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import matplotlib.pyplot as plt\n"
        "fig = plt.figure(); before = dict(matplotlib.rcParams)\n"
        "from embgeom.cli import main\n"
        "assert main(['text', sys.argv[1], '--out', sys.argv[2], '--model', sys.argv[3], '--heads']) == 0\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert plt.get_fignums() == [fig.number] and dict(matplotlib.rcParams) == before\n"
        "print('matplotlib untouched')\n")
    run = subprocess.run([sys.executable, "-c", script, str(corpus), str(tmp_path / "out"), tiny_bert_dir],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and "matplotlib untouched" in run.stdout, run.stdout + run.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) > 3


def test_result_reprs_are_one_short_line(tiny_bert):
    """TraceResult, Projection and KnnResult print one line, as PairwiseStats does: the
    dataclasses' own reprs printed every tensor (55 KB for 20 texts with heads=True), into a
    notebook's saved output and a console."""
    import numpy as np

    import embgeom

    model, tok = tiny_bert
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    results = [trace(model, tok, CORPUS, heads=True), embgeom.project(x, method="pca", labels=["a", "b"] * 30),
               embgeom.knn(x, 3)]
    for r in results:
        text = repr(r)
        assert "\n" not in text and len(text) < 300 and text.startswith(type(r).__name__ + "("), text
