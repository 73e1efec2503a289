"""`embgeom vocab --projections --checkpoint PATH`: each finished UMAP / t-SNE layout is kept;
a run stopped in the middle and run again writes the uninterrupted run's report and graphs; the
checkpoint of another seed or model is refused; a crafted layout is refused in one line."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from embgeom.analysis.clouds import projection as clouds
from embgeom.analysis.vocab import positions
from embgeom.analysis.vocab.layouts import LayoutCheckpoint
from embgeom.cli import main
from embgeom.commands.vocab import run
from embgeom.progress import Progress

from helpers import without_keys

pytest.importorskip("umap")
pytest.importorskip("openTSNE")

REAL_PROJECT = clouds.project
RUN_FACTS = {"timing", "provenance", "peak_rss_mb", "checkpoint", "seconds", "knn_seconds"}


def _strip(value):
    return without_keys(value, RUN_FACTS)


def _counting(monkeypatch, stop_at: int | None = None) -> list:
    """clouds.project as vocab calls it, counted; Ctrl-C instead of call number stop_at."""
    calls: list = []

    def project(*args, **kwargs):
        calls.append(kwargs.get("method"))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return REAL_PROJECT(*args, **kwargs)

    monkeypatch.setattr(positions.clouds, "project", project)
    return calls


def test_stopped_projections_resume_to_the_uninterrupted_report(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    common = ["vocab", "--model", tiny_bert_dir, "--projections", "--quiet"]
    clean, resumed, ckpt = tmp_path / "clean", tmp_path / "resumed", str(tmp_path / "layouts.ckpt")
    assert main([*common, "--out", str(clean)]) == 0
    calls = _counting(monkeypatch, stop_at=3)              # words' UMAP and t-SNE done, then Ctrl-C
    assert main([*common, "--out", str(resumed), "--checkpoint", ckpt]) == 130
    assert f"finished work is kept in {ckpt}" in capsys.readouterr().err and not resumed.exists()
    calls = _counting(monkeypatch)
    assert main([*common, "--out", str(resumed), "--checkpoint", ckpt]) == 0
    assert calls == ["umap", "tsne"]                         # the positions' layouts only
    assert f"(2 of 4 projection layouts from {ckpt})" in capsys.readouterr().err
    want = json.loads((clean / "report.json").read_text())
    got = json.loads((resumed / "report.json").read_text())
    assert got["checkpoint"] == {"path": ckpt, "layouts_resumed": ["words_umap", "words_tsne"]}
    assert _strip(got) == _strip(want)
    for name in ("words_umap", "words_tsne", "positions_umap", "positions_tsne"):
        a, b = np.load(clean / f"{name}_knn.npz"), np.load(resumed / f"{name}_knn.npz")
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    # every layout kept: a rerun projects nothing, and its progress says so first
    calls = _counting(monkeypatch)
    stream = io.StringIO()
    run(tiny_bert_dir, str(resumed), projections=True, checkpoint=ckpt,
        progress=Progress(enabled=True, prefix="embgeom vocab", stream=stream))
    assert calls == [] and f"embgeom vocab: resuming from {ckpt}: 4 of 4 projection layouts done" in stream.getvalue()
    assert _strip(json.loads((resumed / "report.json").read_text())) == _strip(want)


def test_other_seed_model_or_options_are_refused(tiny_bert_dir, tiny_bert, tmp_path, monkeypatch, capsys):
    ckpt = str(tmp_path / "layouts.ckpt")
    common = ["vocab", "--model", tiny_bert_dir, "--projections", "--quiet", "--checkpoint", ckpt]
    _counting(monkeypatch, stop_at=2)
    assert main([*common, "--out", str(tmp_path / "a")]) == 130
    assert main([*common, "--out", str(tmp_path / "b"), "--seed", "1"]) == 2
    err = capsys.readouterr().err  # (said as the flag: it had said `checkpoint:`, the API's name)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"embgeom: error: --checkpoint: {ckpt}") and "(--seed 0 then, 1 now)" in last
    assert main(["vocab", "--model", tiny_bert_dir, "--quiet", "--checkpoint", ckpt, "--out", str(tmp_path / "c")]) == 2
    assert "--checkpoint: keeps the --projections layouts" in capsys.readouterr().err
    assert main(["vocab", "--model", tiny_bert_dir, "--quiet", "--seed", "3", "--out", str(tmp_path / "d")]) == 2
    assert "--seed: seeds the --projections layouts" in capsys.readouterr().err
    # a layout of another size (as if crafted) is refused in one line
    model, tokenizer = tiny_bert
    saved = LayoutCheckpoint(ckpt, model, tokenizer, {"all_tokens": False, "positions": None, "seed": 0})
    saved.load()
    pr = saved.layouts["words_umap"]
    pr.embedding = pr.embedding[:-1]
    saved.keep("words_umap", pr)
    saved.close()
    assert main([*common, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run (layout 'words_umap': embedding: expected finite float32" in err
    assert len(err.strip().splitlines()) == 1
    # fields of a crafted file that the report would have shown as they were, or failed on
    import numpy as np

    from embgeom.analysis.vocab.layouts import FIELDS, _projection

    good = {f: getattr(pr, f) for f in FIELDS}
    good["embedding"] = np.zeros((pr.n, 2), np.float32)  # (the one cut above)
    _projection("words_umap", good)
    for change, match in [({"k": 999}, "indices"), ({"metric": "zzz"}, "metric 'zzz'"), ({"d": -1}, "d -1"),
                          ({"perplexity": "abc"}, "perplexity 'abc'"),
                          ({"indices": np.full_like(pr.indices, 999)}, "indices"),
                          ({"explained_variance": [0.5, 0.2]}, "explained_variance"),
                          ({"silhouette": {"original": 7.0}}, "silhouette"),
                          ({"similarities": np.full_like(pr.similarities, 5.0)}, "cosines within"),
                          ({"similarities": pr.similarities[:, ::-1].copy()}, "decreasing order")]:
        with pytest.raises(ValueError, match=match):
            _projection("words_umap", {**good, **change})
