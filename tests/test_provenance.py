"""How a report was made (provenance), progress on stderr, and the one number formatter."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from embgeom.cli import main
from embgeom.formatting import fmt, seconds
from embgeom.progress import Progress, wanted
from embgeom.provenance import Provenance, git_sha, model_record

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "python", "embgeom", "data", "sample.conllu")


def _check(prov: dict, command: str) -> None:
    assert prov["command"].startswith(f"embgeom {command} ")
    assert set(prov) >= {"command", "version", "git_sha", "model", "seed", "inputs", "total_seconds"}
    assert prov["total_seconds"] > 0
    for entry in prov["inputs"]:
        assert os.path.isabs(entry["path"]) and entry["bytes"] == os.path.getsize(entry["path"])


def test_text_and_syntax_provenance(tiny_bert_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat.\nthe dog ran.\n", encoding="utf-8")
    out = tmp_path / "t"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--quiet"]) == 0
    prov = json.loads((out / "report.json").read_text())["provenance"]
    _check(prov, "text")
    assert prov["command"].endswith("--quiet") and str(corpus) in prov["command"]
    assert prov["inputs"] == [{"name": "CORPUS", "path": str(corpus), "bytes": corpus.stat().st_size}]
    assert prov["model"]["name"] == tiny_bert_dir and prov["model"]["path"] == os.path.abspath(tiny_bert_dir)
    page = (out / "report.html").read_text()
    assert "id='provenance'" in page and "embgeom text " in page and "http" not in page
    # section titles in words, metric names linked to the definitions the page carries
    assert "(M3)" not in page and "(M4)" not in page
    for key in ("cone_index", "entropy", "attention_to", "js_distance", "context", "evolution"):
        assert f"href='#def-{key}'" in page and f"id='def-{key}'" in page
    out = tmp_path / "s"
    assert main(["syntax", SAMPLE, "--out", str(out), "--model", tiny_bert_dir, "--quiet"]) == 0
    prov = json.loads((out / "report.json").read_text())["provenance"]
    _check(prov, "syntax")
    assert prov["inputs"][0]["name"] == "TREEBANK"
    assert "id='provenance'" in (out / "report.html").read_text()


def test_project_records_depth_and_input(tmp_path):
    x = np.random.default_rng(0).standard_normal((30, 3, 8)).astype(np.float32)
    np.save(tmp_path / "cls.npy", x)
    out = tmp_path / "p"
    assert main(["project", str(tmp_path / "cls.npy"), "--method", "umap", "--k", "5", "--depth", "-1", "--seed", "3",
                 "--out", str(out)]) == 0
    prov = json.loads((out / "report.json").read_text())["provenance"]
    _check(prov, "project")
    assert prov["depth"] == 2 and prov["seed"] == 3
    assert prov["input"] == {"file": str(tmp_path / "cls.npy"), "shape": [30, 3, 8], "dtype": "float32"}
    assert "depth 2 of 2" in (out / "projection.html").read_text()
    np.save(tmp_path / "rows.npy", x[:, 0])  # (N, D): no depth, null in report.json, "none" on the page
    assert main(["project", str(tmp_path / "rows.npy"), "--method", "pca", "--out", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "report.json").read_text())["provenance"]["depth"] is None
    page = (tmp_path / "q" / "projection.html").read_text()
    assert "<th style='text-align:left'>depth</th><td>none</td>" in page and ">None<" not in page


def test_pairs_json_provenance(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32))
    assert main(["pairs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "o.json")]) == 0
    prov = json.loads((tmp_path / "o.json").read_text())["provenance"]
    _check(prov, "pairs")
    assert prov["model"] is None and prov["inputs"][0]["name"] == "X"


def test_git_sha_and_model_record(tiny_bert_dir):
    sha = git_sha()
    assert sha is None or (len(sha) == 40 and int(sha, 16) >= 0)
    rec = model_record(tiny_bert_dir)
    assert rec["path"] == os.path.abspath(tiny_bert_dir) and rec["revision"] is None
    snap = os.path.join("hub", "models--x", "snapshots", "a" * 40)
    assert model_record(snap)["revision"] == "a" * 40
    assert Provenance().record()["model"] is None


def test_progress_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not wanted(stream=io.StringIO()) and wanted(stream=Tty()) and not wanted(True, stream=Tty())
    silent = io.StringIO()
    prog = Progress(enabled=False, stream=silent)
    with prog.phase("loading"), prog.bar(3, "texts") as bar:
        bar.update(3)
    assert silent.getvalue() == ""
    shown = Tty()
    prog = Progress(enabled=True, prefix="embgeom text", stream=shown)
    with prog.bar(3, "forward passes", unit="text") as bar:
        bar.update(3)
    with prog.phase("plots"):
        pass
    text = shown.getvalue()
    assert "embgeom text: forward passes" in text and "3/3" in text and "embgeom text: plots" in text
    resumed = Tty()
    with Progress(enabled=True, prefix="embgeom text", stream=resumed).bar(10, "forward passes", initial=7) as bar:
        bar.update(3)
    assert "10/10" in resumed.getvalue()          # a resumed run's bar starts at the texts done before


@pytest.mark.parametrize("value,want", [
    (435789003, "435,789,003"), (9.0, "9"), (0.4490249454975128, "0.449"), (-0.0, "0"),
    (-0.00000001, "-1e-08"), (12345.678, "12,346"), (1.23e-05, "1.23e-05"), (None, "n/a"),
    (float("nan"), "n/a"), (float("inf"), "inf"), (True, "yes"), ("L3 h2", "L3 h2"),
    (np.float32(0.5), "0.5"), (np.int64(25021), "25,021"), (-0.123456, "-0.1235"),
    (9999.96, "10,000"), (-9999.96, "-10,000"), (9999.4, "9999"), (999.96, "1000"), (2.5e17, "2.5e+17")])
def test_number_formatter(value, want):
    assert fmt(value) == want


def test_seconds_formatter():
    assert [seconds(v) for v in (0.42, 6.04, 34.2, 133.0)] == ["0.42 s", "6.0 s", "34 s", "2 min 13 s"]


def test_identifier_columns_keep_their_digits():
    from embgeom.tables import table_html

    page = table_html(["token id", "token", "i", "cosine"], [[25021, "x", 123456, 12345.6]])
    assert "<td>25021</td>" in page and "<td>123456</td>" in page and "<td>12,346</td>" in page
