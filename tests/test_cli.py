"""The `embgeom` command line: pairs JSON vs the reference, errors, checkpoint resume."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import embgeom
from embgeom import reference
from embgeom.cli import main

from helpers import make_embeddings, small_int_embeddings


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "embgeom", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("cross", [False, True])
def test_pairs_json_matches_reference(tmp_path, cross):
    # small integers and metric dot: fp32 values are exact, so counts and ties must match exactly
    x = small_int_embeddings(53, 24, seed=1).numpy()
    np.save(tmp_path / "x.npy", x)
    args = ["pairs", tmp_path / "x.npy", "--metric", "dot", "--range", "-30", "30", "--bins", "20",
            "--topk", "4", "--bottomk", "3", "--near", "0", "--near-k", "2", "--row-topk", "3",
            "--outside", "-2", "2", "--json", tmp_path / "out.json"]
    y = None
    if cross:
        y = small_int_embeddings(17, 24, seed=2).numpy()
        np.save(tmp_path / "y.npy", y)
        args[2:2] = ["--against", tmp_path / "y.npy"]
    assert main([str(a) for a in args]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    want = reference.pairwise_stats(x, y, metric="dot", range=(-30.0, 30.0), bins=20, topk=4, bottomk=3,
                                    near=0.0, near_k=2, row_topk=3, outside=(-2.0, 2.0))
    assert out["mode"] == ("cross" if cross else "self")
    assert (out["n"], out["m"], out["d"]) == (53, 17 if cross else 53, 24)
    assert out["count"] == want["count"]
    assert out["mean"] == pytest.approx(want["mean"], rel=1e-12)
    assert out["std"] == pytest.approx(want["std"], rel=1e-12)
    assert out["hist"]["counts"] == want["hist"]["counts"].tolist()
    for key in ("top_pairs", "bottom_pairs", "near_pairs"):
        assert [p[:2] for p in out[key]] == [p[:2] for p in want[key]], key
        assert [p[2] for p in out[key]] == [p[2] for p in want[key]], key
    assert out["min"] == want["min"] and out["max"] == want["max"]
    assert out["row_topk"]["indices"] == want["row_topk"]["indices"].tolist()
    assert out["outside"]["count"] == want["outside"]["count"]
    assert [p[:2] for p in out["outside"]["pairs"]] == [p[:2] for p in want["outside"]["pairs"]]
    assert out["excluded_rows"] == want["excluded_rows"]
    assert isinstance(out["seconds"], float)


def test_a_file_of_several_tensors_gives_its_only_matrix_or_is_refused(tmp_path, capsys):
    """Of several tensors the only (N, D) float one is read; several such (or none) are refused
    naming them: the first by key order had been taken without a word (a .safetensors file's
    keys come sorted: its 20 queries analysed instead of its 200 rows)."""
    from safetensors.torch import save_file

    x, q = make_embeddings(12, 4), make_embeddings(3, 4)
    torch.save({"ids": torch.arange(12), "emb": x, "name": "vocab"}, tmp_path / "one.pt")
    assert main(["pairs", str(tmp_path / "one.pt"), "--json", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["count"] == 66
    save_file({"z_embeddings": x, "a_queries": q}, str(tmp_path / "two.safetensors"))
    torch.save({"ids": torch.arange(12), "mask": torch.ones(12, 4, dtype=torch.bool)}, tmp_path / "none.pt")
    for name, listed in (("two.safetensors", "2 tensors, 2 of them (N, D) float (a_queries (3, 4) float32, "
                                             "z_embeddings (12, 4) float32)"),
                         ("none.pt", "2 tensors, none of them (N, D) float (ids (12,) int64, mask (12, 4) bool)")):
        capsys.readouterr()
        assert main(["pairs", str(tmp_path / name), "--json", str(tmp_path / "r.json")]) == 2
        assert f"{name} holds {listed}; save the one to analyse alone" in capsys.readouterr().err


def test_pairs_reads_pt_and_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file

    x = make_embeddings(10, 4)
    torch.save(x, tmp_path / "x.pt")
    save_file({"emb": x}, str(tmp_path / "x.safetensors"))
    for name in ("x.pt", "x.safetensors"):
        assert main(["pairs", str(tmp_path / name), "--json", str(tmp_path / "o.json")]) == 0
        assert json.loads((tmp_path / "o.json").read_text())["count"] == 45
    # the last line goes where every command's goes: stderr (stdout stays free for a pipe)
    assert main(["knn", str(tmp_path / "x.pt"), "--k", "2", "--json", str(tmp_path / "k.json")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "embgeom pairs: 45 pairs in " in err and "embgeom knn: 10 queries x 2 " in err
    np.save(tmp_path / "two.npy", x[:2].numpy())  # counts of one in the singular
    assert main(["pairs", str(tmp_path / "two.npy"), "--json", str(tmp_path / "o.json")]) == 0
    assert main(["knn", str(tmp_path / "x.pt"), "--k", "2", "--queries", str(tmp_path / "two.npy"),
                 "--json", str(tmp_path / "k.json")]) == 0
    err = capsys.readouterr().err
    assert "embgeom pairs: 1 pair in " in err and "embgeom knn: 2 queries x 2 " in err
    prov = json.loads((tmp_path / "k.json").read_text())["provenance"]  # (as pairs --json has it)
    assert prov["command"].startswith("embgeom knn") and [i["name"] for i in prov["inputs"]] == ["X", "--queries"]


@pytest.mark.parametrize("setup,args,message", [
    (None, ["pairs", "{t}/missing.npy"], "file not found"),
    ("nan", ["pairs", "{t}/x.npy"], r"NaN or Inf in 2 row\(s\): \[1, 4\]"),
    ("1d", ["pairs", "{t}/x.npy"], r"expected \(N, D\)"),
    ("int", ["pairs", "{t}/x.npy"], "float"),
    ("no columns", ["pairs", "{t}/x.npy"], "expected at least one column"),
    # the engine's words said as the command's: the first matrix (it said "to match x"), --backend
    # and --precision's values (it said backend 'torch' ... use precision='exact', or backend='cpp')
    ("ok", ["pairs", "{t}/x.npy", "--against", "{t}/y.npy"],
     r"error: --against: expected 3 columns, as many as the first matrix has, got \(2, 4\)"),
    # (the second file's loading said Y, a name no one typed)
    ("ok", ["pairs", "{t}/x.npy", "--against", "{t}/y.csv"], r"error: --against: file not found"),
    ("ok", ["pairs", "{t}/x.npy", "--backend", "torch", "--precision", "fast"],
     "error: --backend: 'torch' cannot run pairwise_stats: precision 'fast' is not implemented here"),
    ("ok", ["pairs", "{t}/x.npy", "--metric", "dot"], "error: --range: required"),
    ("ok", ["pairs", "{t}/x.npy", "--range", "1", "0"], "error: --range: .*lo < hi"),
    ("ok", ["pairs", "{t}/x.npy", "--range", "1", "nan"], r"error: --range\[1\]: expected a finite number"),
    ("ok", ["pairs", "{t}/x.npy", "--outside", "nan", "1"], r"error: --outside\[0\]: expected a finite number"),
    ("ok", ["pairs", "{t}/x.npy", "--topk", "-1"], "error: --topk: "),
    ("ok", ["pairs", "{t}/x.npy", "--bins", "-3"], "error: --bins: "),
    ("garbage", ["pairs", "{t}/x.npy"], "is not a .npy file"),
    ("ok", ["pairs", "{t}/x.npy", "--backend", "cuda"], "cannot run"),
    ("ok", ["pairs", "{t}/x.npy", "--near-k", "5"], "--near-k: only with --near"),
    ("ok", ["pairs", "{t}/x.npy", "--outside-limit", "5"], "--outside-limit: only with --outside"),
    # knn's checks name its flags (they had said k:, nlist:, queries:, the API's names)
    ("ok", ["knn", "{t}/x.npy", "--k", "0"], "error: --k: expected >= 1"),
    ("ok", ["knn", "{t}/x.npy", "--k", "2", "--index", "ivf", "--nlist", "0"], "error: --nlist: "),
    ("ok", ["knn", "{t}/x.npy", "--k", "2", "--queries", "{t}/y.npy"], "error: --queries: "),
])
def test_pairs_errors_are_clear(tmp_path, capsys, setup, args, message):
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    if setup == "nan":
        x[1, 0] = np.nan
        x[4, 2] = np.inf
    if setup == "1d":
        x = x[0]
    if setup == "int":
        x = np.arange(6).reshape(2, 3)
    if setup == "no columns":
        x = np.zeros((3, 0), np.float32)
    if setup == "garbage":
        (tmp_path / "x.npy").write_bytes(b"not numpy")
    elif setup is not None:
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", np.ones((2, 4), np.float32))
    argv = [a.format(t=tmp_path) for a in args] + ["--json", str(tmp_path / "o.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("embgeom: error:")
    assert "Traceback" not in err
    import re
    assert re.search(message, err), err


def test_project_knn_and_unknown_options_name_what_was_typed(tmp_path, capsys):
    """project's checks name its flags and X (they had said k:, perplexity:, x:, the API's
    names); knn's integer --queries says --queries (it had said Q); an option no parser knows is
    refused by the command it follows, pointing at that command's --help; a list of zero rows
    says how many there are."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    x[3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    np.save(tmp_path / "zero.npy", np.zeros((50, 4), np.float32))
    np.save(tmp_path / "int.npy", np.ones((2, 4), np.int32))
    out = ["--out", str(tmp_path / "p")]
    for args, message in (
            (["project", "{t}/x.npy", "--k", "0"], "embgeom: error: --k: expected"),
            (["project", "{t}/x.npy", "--method", "tsne", "--perplexity", "0"], "embgeom: error: --perplexity: "),
            (["project", "{t}/nan.npy"], r"embgeom: error: X: NaN or Inf in 1 row\(s\): \[3\]"),
            (["project", "{t}/x.npy", "--backend", "foo"], "embgeom: error: --backend: "),
            (["project", "{t}/zero.npy"], r"embgeom: error: X: zero rows have no cosine neighbours: 50 row\(s\): "
                                          r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] \(and 40 more\)"),
            (["knn", "{t}/x.npy", "--k", "2", "--queries", "{t}/int.npy", "--json", "{t}/k.json"],
             "embgeom: error: --queries: expected a float array"),
            (["project", "{t}/x.npy", "--bogus", "1"],
             r"embgeom project: error: unrecognized arguments: --bogus 1 \(see embgeom project --help\)"),
            # a misspelt required option is named, not "required: --json"; options are taken as
            # spelled (a prefix had run as the option it begins), the one meant said beside
            (["knn", "{t}/x.npy", "--k", "2", "--jsn", "{t}/k.json"],
             r"embgeom knn: error: unrecognized arguments: --jsn \(did you mean --json\?\) \(see embgeom knn --help\)"),
            (["project", "{t}/x.npy", "--meth", "pca"],
             r"embgeom project: error: unrecognized arguments: --meth \(did you mean --method\?\) pca "),
            (["project", "{t}/x.npy", "--perplexty=5"],
             r"embgeom project: error: unrecognized arguments: --perplexty=5 \(did you mean --perplexity\?\) ")):
        argv = [a.format(t=tmp_path) for a in args] + (out if args[0] == "project" else [])
        with pytest.raises(SystemExit) if "unrecognized" in message else contextlib.nullcontext():
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search("^" + message, err) and err.count("\n") == 1, err


def test_info_runs():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert "backend" in r.stdout and "cpp" in r.stdout
    assert "text: context_argmax" in r.stdout  # every C++ text kernel's path is listed
    r = subprocess.run([sys.executable, "-m", "embgeom.info", "--json"], capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["built"]["_C"] is True
    assert {"entropy", "cone_index", "context_argmax", "row_pair_sums", "attention_sums", "js_pair_sums",
            "rows_dot", "pair_values"} <= set(info["cpu"])


def test_checkpoint_survives_sigkill_and_resumes_identically(tmp_path):
    x = make_embeddings(1500, 32, zero_rows=2, seed=3).numpy()
    np.save(tmp_path / "x.npy", x)
    common = ["pairs", tmp_path / "x.npy", "--row-topk", "5", "--outside", "-0.3", "0.3", "--block", "32",
              "--backend", "torch"]
    ref = run_cli(*common, "--json", tmp_path / "ref.json")
    assert ref.returncode == 0, ref.stderr
    ckpt = tmp_path / "run.ckpt"
    env = dict(os.environ, EMBGEOM_CHECKPOINT_SECONDS="0.05")
    proc = subprocess.Popen([sys.executable, "-m", "embgeom", *map(str, common), "--checkpoint", str(ckpt),
                             "--json", str(tmp_path / "out.json")], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "run finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out.json").exists()
    resumed = run_cli(*common, "--checkpoint", ckpt, "--progress", "--json", tmp_path / "out.json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    done = int(resumed.stderr.split("resuming from")[1].split(":")[1].split("of")[0].replace(",", ""))
    assert done > 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("ref.json", "out.json"))
    a.pop("seconds"), b.pop("seconds")
    a.pop("provenance"), b.pop("provenance")  # the command line and wall time of each run
    assert a == b


def test_checkpoint_from_other_settings_is_refused(tmp_path, capsys):
    np.save(tmp_path / "x.npy", make_embeddings(40, 8).numpy())
    ckpt = str(tmp_path / "c.ckpt")
    assert main(["pairs", str(tmp_path / "x.npy"), "--checkpoint", ckpt, "--json", str(tmp_path / "a.json")]) == 0
    assert main(["pairs", str(tmp_path / "x.npy"), "--checkpoint", ckpt, "--topk", "3", "--json",
                 str(tmp_path / "b.json")]) == 2
    assert "another input or other settings (--topk 10 then, 3 now)" in capsys.readouterr().err
    np.save(tmp_path / "y.npy", make_embeddings(41, 8).numpy())
    assert main(["pairs", str(tmp_path / "y.npy"), "--checkpoint", ckpt, "--json", str(tmp_path / "b.json")]) == 2
    assert "(X: shape [40, 8] then, [41, 8] now)" in capsys.readouterr().err
    (tmp_path / "c.ckpt").write_bytes(b"EMBGEOM-CKPT9\nbad\nbody")
    assert main(["pairs", str(tmp_path / "x.npy"), "--checkpoint", ckpt, "--json", str(tmp_path / "a.json")]) == 2
    assert "checksum" in capsys.readouterr().err
    (tmp_path / "c.ckpt").write_bytes(b"EMBGEOM-CKPT1\nbad\nbody")  # pickled formats: refused unread
    assert main(["pairs", str(tmp_path / "x.npy"), "--checkpoint", ckpt, "--json", str(tmp_path / "a.json")]) == 2
    assert "old embgeom format" in capsys.readouterr().err


def test_outputs_never_write_over_inputs(tmp_path, capsys):
    """--json or --checkpoint naming an input file is refused before any work (it had written
    the JSON report over X)."""
    np.save(tmp_path / "x.npy", make_embeddings(30, 8).numpy())
    x = str(tmp_path / "x.npy")
    before = (tmp_path / "x.npy").read_bytes()
    for argv in (["pairs", x, "--json", x], ["pairs", x, "--json", str(tmp_path / "a.json"), "--checkpoint", x],
                 ["pairs", x, "--json", str(tmp_path / "c.ckpt"), "--checkpoint", str(tmp_path / "c.ckpt")],
                 ["knn", x, "--k", "3", "--json", x]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "file this run reads" in err[0], (argv, err)
    assert (tmp_path / "x.npy").read_bytes() == before


def test_checkpoint_refusal_names_only_what_changed(tmp_path):
    """A tuple setting (outside) is the list its file holds: not listed as changed."""
    x = make_embeddings(50, 8)
    ckpt = str(tmp_path / "m.ckpt")
    embgeom.pairwise_stats(x, outside=(-0.2, 0.2), checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"other settings \(topk 10 then, 5 now\)"):
        embgeom.pairwise_stats(x, outside=(-0.2, 0.2), topk=5, checkpoint=ckpt)


@pytest.mark.parametrize("value", ["abc", "nan", "-1", ""])
def test_bad_checkpoint_seconds_name_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", value)
    with pytest.raises(ValueError, match="^EMBGEOM_CHECKPOINT_SECONDS: expected seconds >= 0"):
        embgeom.pairwise_stats(make_embeddings(30, 8), checkpoint=str(tmp_path / "c.ckpt"))


def test_infinite_checkpoint_seconds_save_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", "inf")
    x = make_embeddings(200, 8)
    got = embgeom.pairwise_stats(x, checkpoint=str(tmp_path / "c.ckpt"), block=16)
    assert got.count == 200 * 199 // 2 and os.path.exists(tmp_path / "c.ckpt")


def test_checkpoint_is_not_resumed_on_other_arithmetic(tmp_path, monkeypatch):
    """A run resumed under another product kernel (EMBGEOM_CPU, another host, another OpenBLAS
    core) would mix two runs' roundings: refused, naming what changed."""
    from embgeom.backends import registry

    x = make_embeddings(60, 8)
    ckpt = str(tmp_path / "c.ckpt")
    embgeom.pairwise_stats(x, checkpoint=ckpt, block=16)
    real = registry.numerics
    monkeypatch.setattr(registry, "numerics", lambda *a: {**real(*a), "product": "another-kernel"})
    with pytest.raises(ValueError, match=r"other settings \(product '[^']*' then, 'another-kernel' now\)"):
        embgeom.pairwise_stats(x, checkpoint=ckpt, block=16)
    monkeypatch.setattr(registry, "numerics", real)
    assert embgeom.pairwise_stats(x, checkpoint=ckpt, block=16).count == 60 * 59 // 2


@pytest.mark.parametrize("argv,message", [
    (["pairs", "x.npy", "--json", "o.json", "--device", "foo"], "expected a torch device"),
    (["pairs", "x.npy", "--json", "o.json", "--device", "mps"], "expected 'cpu' or 'cuda"),
    (["vocab", "--device", "cuda:7"], "cuda:7"),
    (["text", "corpus.txt", "--out", "o", "--device", "bogus"], "expected a torch device"),
    (["syntax", "tb.conllu", "--out", "o", "--device", "bogus"], "expected a torch device"),
    (["knn", "x.npy", "--k", "2", "--json", "k.json", "--device", "gpu"], "expected a torch device"),
    (["pairs", "x.npy", "--json", "o.json", "--metric", "manhattan"], "invalid choice"),
])
def test_bad_options_are_one_line_before_any_work(capsys, argv, message):
    """Refused while parsing: one line, exit 2, nothing loaded or written."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "--help" in err


@pytest.mark.parametrize("extra,says", [
    (["--checkpoint", "CK"], "finished work is kept in CK; the same command resumes from it"),
    ([], "nothing was kept; --checkpoint PATH keeps finished work"),
])
def test_interrupt_and_lost_peer_are_one_line(tmp_path, monkeypatch, capsys, extra, says):
    """Ctrl-C says what the command keeps (a checkpoint, nothing, or the report folder as it was);
    a distributed rank that lost a peer prints one line, not a traceback."""
    import embgeom.commands.pairs as pairs_command
    from embgeom.distributed import PeerLost

    np.save(tmp_path / "x.npy", make_embeddings(10, 4).numpy())
    argv = ["pairs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "o.json"),
            *[str(tmp_path / a) if a == "CK" else a for a in extra]]

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairs_command, "main", interrupted)
    if extra:  # stopped before its first save: nothing to resume from
        assert main(argv) == 130
        assert f"stopped before the first save to {tmp_path / 'CK'}: nothing was kept" in capsys.readouterr().err
        (tmp_path / "CK").write_bytes(b"a saved checkpoint")
    assert main(argv) == 130
    assert says.replace("CK", str(tmp_path / "CK")) in capsys.readouterr().err
    if extra:  # --distributed keeps one checkpoint per rank: this rank's (RANK) is named
        monkeypatch.setenv("RANK", "1")
        assert main([*argv, "--distributed"]) == 130
        assert f"before the first save to {tmp_path / 'CK'}.rank1: nothing was kept" in capsys.readouterr().err
        (tmp_path / "CK.rank1").write_bytes(b"a saved checkpoint")
        assert main([*argv, "--distributed"]) == 130
        assert f"finished work is kept in {tmp_path / 'CK'}.rank1; the same command resumes" in capsys.readouterr().err
        monkeypatch.delenv("RANK")

    def lost(args):
        raise PeerLost("distributed: rank 1: gathering results failed (Connection closed by peer)")

    monkeypatch.setattr(pairs_command, "main", lost)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("embgeom: error: distributed: rank 1") and err.count("\n") == 1


def test_interrupted_report_command_says_its_folder_is_as_before(tmp_path, monkeypatch, capsys):
    import embgeom.commands.project as project_command

    np.save(tmp_path / "x.npy", make_embeddings(10, 4).numpy())
    monkeypatch.setattr(project_command, "main", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "p").mkdir()  # an earlier report's folder
    assert main(["project", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p")]) == 130
    assert f"{tmp_path / 'p'} holds what it held before; no partial report" in capsys.readouterr().err
    # a folder the run was to make (it had said it 'holds what it held before')
    assert main(["project", str(tmp_path / "x.npy"), "--out", str(tmp_path / "new")]) == 130
    assert f"{tmp_path / 'new'} was not created; no partial report" in capsys.readouterr().err


def test_sigterm_ends_a_command_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) in any command: the Ctrl-C path (staging removed, what was
    kept said, exit 130), where it had killed outright and left a hidden staging folder."""
    import os
    import signal

    import embgeom.commands.project as project_command

    np.save(tmp_path / "x.npy", make_embeddings(10, 4).numpy())

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(project_command, "main", terminated)
    assert main(["project", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p")]) == 130
    assert "was not created; no partial report" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL          # put back after the command


@pytest.mark.parametrize("command", ["pairs", "pairs-above", "project"])
def test_a_signal_after_the_output_is_whole_ends_the_command_as_finished(tmp_path, monkeypatch, capsys, command):
    """SIGTERM or Ctrl-C once the command's output is whole (its --json written, its folder
    swapped in, its pairs folder complete) stops nothing: status 0 and no 'interrupted' line
    (exit 130 had told a scheduler the finished run failed); the Ctrl-C handler is put back."""
    import os
    import signal

    from embgeom import interrupts

    np.save(tmp_path / "x.npy", make_embeddings(30, 4).numpy())
    real = interrupts.output_complete

    def then_signals():
        real()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(interrupts, "output_complete", then_signals)
    for module in ("embgeom.io", "embgeom.commands.pairs", "embgeom.commands.knn", "embgeom.commands.pairs_above"):
        monkeypatch.setattr(f"{module}.output_complete", then_signals, raising=False)
    handler = signal.getsignal(signal.SIGINT)
    argv = {"pairs": ["pairs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "o.json")],
            "pairs-above": ["pairs-above", str(tmp_path / "x.npy"), "--threshold", "0.5", "--out", str(tmp_path / "pa")],
            "project": ["project", str(tmp_path / "x.npy"), "--method", "pca", "--out", str(tmp_path / "p")]}[command]
    assert main(argv) == 0
    assert "interrupted" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_files_the_machine_refuses_are_one_line(tmp_path, capsys, monkeypatch):
    """A folder given for a file, an unreadable file, an unwritable folder: one line naming the
    file, exit 2 (unreadable and unwritable had ended in PermissionError tracebacks, exit 1)."""
    (tmp_path / "folder").mkdir()
    assert main(["text", str(tmp_path / "folder"), "--out", str(tmp_path / "o")]) == 2
    assert f"CORPUS: {tmp_path / 'folder'} is a folder, expected a file" in capsys.readouterr().err
    assert main(["syntax", str(tmp_path / "folder"), "--out", str(tmp_path / "o")]) == 2
    assert "TREEBANK: " in capsys.readouterr().err
    # (as root every file is readable: the refusal is made where the file is opened)
    import embgeom.io

    np.save(tmp_path / "x.npy", make_embeddings(10, 4).numpy())

    def refused(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(embgeom.io, "load_matrix", refused)
    assert main(["pairs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"embgeom: error: Permission denied: {tmp_path / 'x.npy'}\n"


def test_project_refuses_a_seed_its_method_ignores_or_cannot_take(tmp_path, capsys):
    np.save(tmp_path / "x.npy", make_embeddings(10, 4).numpy())
    base = ["project", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p")]
    assert main([*base, "--method", "pca", "--seed", "5"]) == 2
    assert "--seed: only for --method umap or tsne, got --method pca" in capsys.readouterr().err
    assert main([*base, "--seed", "-1"]) == 2
    assert "--seed: expected 0 .. 2^32 - 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_vocab_refuses_a_seed_out_of_range_before_the_model(tmp_path, capsys, monkeypatch):
    """(it had been refused by the layouts, after the model load and every other section)"""
    from embgeom import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(models, "load_model", no_load)
    assert main(["vocab", "--projections", "--seed", "-1", "--out", str(tmp_path / "v")]) == 2
    assert "--seed: expected 0 .. 2^32 - 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_a_json_or_checkpoint_never_lands_in_a_sealed_folder(tmp_path, capsys):
    """`pairs --json DIR/manifest.json` into a pairs_above folder had replaced its manifest (the
    folder then read as damaged), `--json REPORT/report.json` a sealed report's file: refused."""
    import embgeom

    x = make_embeddings(30, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    embgeom.pairs_above(x, 0.5, tmp_path / "pa")
    assert main(["project", str(tmp_path / "x.npy"), "--method", "pca", "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    for target, what in ((tmp_path / "pa" / "manifest.json", "a pairs_above folder"),
                         (tmp_path / "rep" / "report.json", "the report folder of `embgeom project`")):
        before = target.read_bytes()
        assert main(["pairs", str(tmp_path / "x.npy"), "--json", str(target)]) == 2
        assert f"is inside {target.parent}, {what}" in capsys.readouterr().err
        assert target.read_bytes() == before
    embgeom.read_pairs(tmp_path / "pa")


def test_no_output_is_written_inside_a_sealed_folder_at_any_depth(tmp_path, capsys):
    """A report or a pairs folder inside a sealed report (or inside a folder of it) had been
    accepted, then deleted without a word when the outer report was written again."""
    import embgeom

    x = make_embeddings(30, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    project = ["project", str(tmp_path / "x.npy"), "--method", "pca", "--out"]
    assert main([*project, str(tmp_path / "rep")]) == 0
    (tmp_path / "rep" / "sub").mkdir()
    for inner in (tmp_path / "rep" / "inner", tmp_path / "rep" / "sub" / "inner"):
        capsys.readouterr()
        assert main([*project, str(inner)]) == 2
        assert f"is inside {tmp_path / 'rep'}, the report folder of `embgeom project`" in capsys.readouterr().err
        assert main(["pairs-above", str(tmp_path / "x.npy"), "--threshold", "0.5", "--out", str(inner)]) == 2
        with pytest.raises(ValueError, match="out: .* is inside .*, the report folder of `embgeom project`"):
            embgeom.pairs_above(x, 0.5, inner)
        assert main(["pairs", str(tmp_path / "x.npy"), "--json", str(inner.parent / "x.json")]) == 2
        assert not inner.exists() and not (inner.parent / "x.json").exists()


def test_an_output_file_that_is_a_pipe_or_a_link(tmp_path, capsys):
    """`--json /dev/null` had replaced the device with a regular file (as root, the system's
    /dev/null), a pipe likewise; a link to a file is written through (the link had been replaced
    by the file, its target left as it was); a dangling link is refused."""
    x = make_embeddings(20, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x.json")
    # (never the real /dev/null here: run against the code before, as root, it was replaced)
    for target in (pipe, tmp_path / "dangling"):
        assert main(["pairs", str(tmp_path / "x.npy"), "--json", str(target)]) == 2
        assert f"--json: cannot write {target}: it is not a regular file" in capsys.readouterr().err
    assert pipe.is_fifo() and (tmp_path / "dangling").is_symlink()
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert main(["pairs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "link.json")]) == 0
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real.json").read_text())["count"] == 190


def test_a_model_folder_inside_out_is_refused(tiny_bert_dir, tmp_path, capsys):
    """`vocab --model OUT/model --out OUT` had read the model, then deleted it with the old report."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_bert_dir, out / "model")
    (tmp_path / "corpus.txt").write_text("a b c\n")
    for command in (["vocab"], ["text", str(tmp_path / "corpus.txt")]):
        capsys.readouterr()
        assert main([*command, "--model", str(out / "model"), "--out", str(out)]) == 2
        assert f"--model: {out / 'model'} lies inside --out {out}" in capsys.readouterr().err
    assert (out / "model" / "config.json").is_file()


def test_ctrl_c_while_the_command_imports_is_one_line(monkeypatch, capsys):
    import embgeom.cli as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["pairs", "x.npy"]) == 130
    err = capsys.readouterr().err
    assert err == "embgeom: interrupted before the command started: nothing was written\n"


def test_the_package_and_help_load_without_torch():
    """`import embgeom` and `embgeom --help` import no torch (it took 2 s before the parser
    existed, and a Ctrl-C there was a traceback); each public name still loads on first use."""
    probe = ("import sys, embgeom, embgeom.cli as cli\n"
             "try:\n    cli.build_parser(['--help']).parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
             "assert 'torch' not in sys.modules, 'torch loaded'\n"
             "assert set(embgeom.__all__) <= set(dir(embgeom))\n"
             "assert all(getattr(embgeom, name) is not None for name in embgeom.__all__)\n"
             "import embgeom.community_detection\n"
             "assert callable(embgeom.communities) and embgeom.communities.__module__ == 'embgeom.community_detection'\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("broken", ["missing", "oserror"])
def test_a_torch_that_cannot_load_is_named_in_one_line(tmp_path, broken):
    """Without torch, `embgeom pairs X --json O` had said `unrecognized arguments: X --json O`,
    and `embgeom info` two tracebacks; a torch whose CUDA library is missing (an OSError) had
    been a traceback, or `error: OSError` with the library's name lost."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n' if broken == "missing" else
        'raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    why = ("No module named 'torch' (embgeom needs torch >= 2.4: pip install torch)" if broken == "missing" else
           "OSError: libcudnn.so.9: cannot open shared object file: No such file or directory")
    for argv, want in ((["pairs", "x.npy", "--json", "o.json"], f"pairs is unavailable: importing its modules failed: {why}"),
                       (["vocab", "--out", "r"], f"vocab is unavailable: importing its modules failed: {why}"),
                       (["info"], "torch cannot be imported here")):
        done = subprocess.run([sys.executable, "-m", "embgeom", *argv], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and want in done.stderr, (argv, done.stderr)
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "r").exists()
    helped = subprocess.run([sys.executable, "-m", "embgeom", "pairs", "--help"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert helped.returncode == 0 and "Unavailable here: importing its modules failed" in " ".join(helped.stdout.split())


@pytest.mark.parametrize("stderr", ["reader_left", "closed"])
def test_a_lost_stderr_loses_notes_not_the_result(tmp_path, stderr):
    """`2>&1 | head` or `2>&-`: a note or bar on stderr had raised mid-run (BrokenPipeError,
    or tqdm writing to None) and the result was dropped, with status 0 or 1."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    read, write = os.pipe()
    os.close(read)  # every write to `write` fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "embgeom", "pairs", "x.npy", "--json", "o.json", "--row-topk", "400",
             "--progress", "--block", "16"], cwd=tmp_path, timeout=300,
            stderr=write if stderr == "reader_left" else None,
            preexec_fn=(lambda: os.close(2)) if stderr == "closed" else None)
    finally:
        os.close(write)
    assert done.returncode == 0
    assert json.loads((tmp_path / "o.json").read_text())["count"] == 300 * 299 // 2


def test_sigterm_while_the_command_loads_is_one_line(monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) in the second a command's modules load had killed the
    process silently (status -15) where Ctrl-C said it in one line."""
    import embgeom.cli as cli

    def stopped(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler raises before this ends)

    monkeypatch.setattr(cli, "build_parser", stopped)
    assert cli.main(["pairs", "x.npy"]) == 130
    assert capsys.readouterr().err == "embgeom: interrupted before the command started: nothing was written\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_signal_after_the_first_keeps_status_130(tmp_path):
    """A second Ctrl-C while the interrupt's line was made, or a SIGTERM during the interpreter's
    exit, had given a traceback or a death by signal (-2, -15) after the one line."""
    script = tmp_path / "run.py"
    script.write_text(
        "import atexit, os, signal, sys, types\n"
        "import embgeom.cli as cli\n"
        "def command(args):\n    raise KeyboardInterrupt\n"
        "def kept(args, out_existed):\n    os.kill(os.getpid(), signal.SIGINT)\n    return 'x'\n"
        "cli._what_was_kept = kept\n"
        "parser = types.SimpleNamespace(parse_args=lambda argv: types.SimpleNamespace(func=command))\n"
        "cli.build_parser = lambda argv: parser\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
        "sys.argv = ['embgeom', 'pairs']\n"
        "sys.exit(cli.main())\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    assert (done.returncode, done.stderr) == (130, "embgeom: interrupted (x)\n")


def test_a_rerun_says_it_resumed(tmp_path, capsys):
    """pairs and pairs-above reruns resumed without a word (text and vocab say so)."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32))
    x, ck, o, out = (str(tmp_path / n) for n in ("x.npy", "ck", "o.json", "pa"))
    for run in range(2):
        assert main(["pairs", x, "--json", o, "--checkpoint", ck]) == 0
        assert (f"resumed from {ck}" in capsys.readouterr().err) == (run == 1)
        assert main(["pairs-above", x, "--threshold", "0.5", "--out", out]) == 0
        assert ("the pairs of 60 rows from an earlier run" in capsys.readouterr().err) == (run == 1)


def test_pairs_checkpoint_refusal_names_the_flags(tmp_path, capsys):
    """A checkpoint written with other options is refused naming them as typed (it said `bins 10
    then`, `y: shape`, a lowered `outside_limit` the user never gave, the backend twice)."""
    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ck, out = str(tmp_path / "ck"), str(tmp_path / "o.json")
    base = ["pairs", str(tmp_path / "x.npy"), "--checkpoint", ck, "--json", out]
    assert main(base + ["--bins", "10"]) == 0
    for extra, said in ((["--bins", "20"], "(--bins 10 then, 20 now)"),
                        (["--bins", "10", "--against", str(tmp_path / "x.npy")], "(--against: shape null then, [5, 12] now)")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"embgeom: error: --checkpoint: {ck} was written for") and said in err, err
    assert main(base + ["--bins", "10", "--backend", "torch"]) == 2
    assert capsys.readouterr().err.count("--backend 'cpp' then, 'torch' now") == 1


def test_pairs_shows_its_bar_on_a_terminal_as_every_command(tmp_path, capsys, monkeypatch):
    """pairs had shown progress only with --progress (the other commands: on a terminal unless
    --quiet); --progress now also writes it where stderr is no terminal, and --quiet beside it
    is refused."""
    np.save(tmp_path / "x.npy", make_embeddings(300, 8).numpy())
    base = ["pairs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "o.json")]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(base) == 0
    assert "embgeom pairs: pairs: 100%" in capsys.readouterr().err
    assert main([*base, "--quiet"]) == 0
    assert "100%" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert main(base) == 0
    assert "100%" not in capsys.readouterr().err
    assert main([*base, "--progress"]) == 0  # (into a log: plain lines)
    assert "embgeom pairs: pairs: 44,850/44,850 pairs (100 %) in " in capsys.readouterr().err
    assert main([*base, "--progress", "--no-progress"]) == 2
    assert "embgeom: error: --progress: asks for the progress that --no-progress turns off" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["text", "knn", "pairs-above", "project"])
def test_progress_into_a_log_is_plain_lines(command, tmp_path, capsys, monkeypatch, tiny_bert_dir):
    """Every command's --progress where stderr is no terminal (nohup, a scheduler's log): plain
    lines, where each phase starts and ends and a bar's count (they had written nothing but the
    last line, or tqdm's redrawn line with its carriage returns); --progress beside --quiet is
    refused before X is read (test_a_logged_bar_says_how_far_and_how_long_is_left: the lines
    between)."""
    from embgeom import progress

    monkeypatch.setattr(progress, "LOG_SECONDS", 0.02)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    x = tmp_path / "x.npy"
    np.save(x, make_embeddings(300, 8).numpy())
    (tmp_path / "c.txt").write_text("the cat sat .\na dog ran .\nred and blue\n", encoding="utf-8")
    argv = {"text": ["text", str(tmp_path / "c.txt"), "--model", str(tiny_bert_dir), "--out", str(tmp_path / "o")],
            "knn": ["knn", str(x), "--k", "3", "--json", str(tmp_path / "k.json")],
            "pairs-above": ["pairs-above", str(x), "--threshold", "0.5", "--out", str(tmp_path / "o")],
            "project": ["project", str(x), "--method", "pca", "--out", str(tmp_path / "o")]}[command]
    assert main(argv) == 0
    assert "\r" not in capsys.readouterr().err and main([*argv[:-1], str(tmp_path / "o2"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err, err
    lines = err.splitlines()
    assert len(lines) >= 3 and lines[-1].startswith(f"embgeom {command}: "), err
    if command != "project":  # (a counted phase: its lines say how far, the last one where it ended)
        assert " (100 %) in " in err, err
    if command != "text":
        missing = [a if a != str(x) else str(tmp_path / "missing.npy") for a in argv]
        assert main([*missing, "--progress", "--quiet"]) == 2
        assert "embgeom: error: --progress: asks for the progress that --quiet turns off" in capsys.readouterr().err


def test_json_dash_is_standard_output(tmp_path, capsys, monkeypatch):
    """`--json -` had written a file named '-' (and a later run replaced it without a word);
    it is the pipe the command feeds, its last line on stderr as ever."""
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", make_embeddings(10, 4).numpy())
    assert main(["pairs", "x.npy", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["count"] == 45 and err.rstrip().endswith("-> standard output")
    assert main(["knn", "x.npy", "--k", "2", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["k"] == 2 and "-> standard output" in err
    assert not (tmp_path / "-").exists()


def test_a_logged_bar_says_how_far_and_how_long_is_left(monkeypatch):
    import io

    from embgeom import progress

    clock = iter([0.0, 61.0, 122.0, 130.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    with progress.Progress(enabled=True, prefix="p", stream=out, log=True).bar(400, "queries", unit="query") as bar:
        bar.update(100)   # at 61 s: 100 of 400, 183 s left at that rate
        bar.update(100)   # at 122 s
    assert out.getvalue().splitlines() == [
        "p: queries: 0/400 queries (0 %)",
        "p: queries: 100/400 queries (25 %) after 61 s, about 3 min 3 s left",
        "p: queries: 200/400 queries (50 %) after 2 min 2 s, about 2 min 2 s left",
        "p: queries: 200/400 queries (50 %) in 2 min 10 s"]


def test_progress_true_draws_bars_only_where_they_can_be_redrawn(monkeypatch, capsys):
    """progress=True: tqdm's bars on a terminal (tqdm.std: tqdm.auto had warned "IProgress not
    found" in a notebook without ipywidgets), plain lines elsewhere (a log, such a notebook: its
    redrawn bars had left hundreds of lines in the saved notebook), widgets in a notebook that
    has them."""
    import io
    import sys

    from embgeom import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, log in ((io.StringIO(), True), (Terminal(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        p = progress.as_progress(True, "embgeom.test")
        assert p.enabled and p.log is log
        with p.bar(total=3, desc="rows", unit="row") as bar:
            bar.update(3)
        text = stream.getvalue()
        assert ("embgeom.test: rows: 3/3 rows (100 %) in " in text) is log and ("\r" in text) is not log
        assert not progress.as_progress(False, "x").enabled
    class WriteOnly:  # a caller's replaced stderr: no flush, or closed
        def write(self, text):
            return len(text)

    closed = io.StringIO()
    closed.close()
    for stream in (WriteOnly(), closed):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress.as_progress(True, "embgeom.test").bar(total=3, desc="rows") as bar:
            bar.update(3)
    monkeypatch.setattr(progress, "_notebook_widgets", lambda: True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.as_progress(True, "embgeom.test").log is False


def test_a_cut_short_or_object_npy_is_named_as_such(tmp_path, capsys):
    """A .npy file cut short said numpy's 'mmap length is greater than file size', an object
    array 'Array can't be memory-mapped: Python objects in dtype'."""
    np.save(tmp_path / "x.npy", np.ones((50, 8), np.float32))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])
    np.save(tmp_path / "obj.npy", np.array([[1.0, "a"]], dtype=object), allow_pickle=True)
    for name, said in (("cut.npy", "cut.npy is cut short: its header says (50, 8) float32 (1,728 bytes), the "
                                   "file has 1,628"),
                       ("obj.npy", "expected a float array in ")):
        assert main(["pairs", str(tmp_path / name), "--json", str(tmp_path / "o.json")]) == 2
        assert said in capsys.readouterr().err
