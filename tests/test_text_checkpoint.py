"""Resumable corpus runs (`embgeom text --checkpoint PATH`, `trace(checkpoint=PATH)`): a run
stopped by Ctrl-C and run again gives the report of an uninterrupted run, with every observer on;
a checkpoint of other texts, settings or model is refused naming what differs; nothing in a
checkpoint is executed (the tree format's decoder builds plain values only)."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import time
import sys

import numpy as np
import pytest
import torch

from embgeom.analysis.text import trace as trace_module
from embgeom.analysis.text.trace import trace
from embgeom.cli import main
from embgeom.engine.checkpoint import (Resumable, SavedObject, TreeState, decode_payload, decode_tree,
                                       encode_payload, encode_tree)

from helpers import without_keys

TEXTS = ["the cat sat .", "a dog ran , fast .", "she was in the house", "red , green and blue .",
         "one two three", "he was not .", "big small", "the king and the queen", "a b", "it is new .",
         "they walk to the river", "good bad old new"]
LABELS = ["x", "y", "x", "y", "x", "x", "y", "x", "y", "x", "y", "y"]
EVERY_OPTION = ["--batch-size", "3", "--keep", "cls", "--trajectories", "4", "--class-maps", "6",
                "--heads", "--clark-js", "--directionality", "--head-maps", "2", "--similar", "topk:2",
                "--matrices", "--gaussianity"]
REAL_BATCHES = trace_module.iter_batches
# report keys that time the run or describe this invocation, not the corpus
TIMING = {"forward_passes_seconds", "total_seconds", "provenance", "seconds"}


@pytest.fixture(autouse=True)
def _save_every_batch(monkeypatch):
    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", "0")


pytestmark = pytest.mark.usefixtures("ctrl_c_raises")   # conftest.py: Ctrl-C raises, as in a terminal


def _files(tmp_path):
    corpus, labels = tmp_path / "corpus.txt", tmp_path / "labels.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return str(corpus), str(labels)


def _strip(value):
    return without_keys(value, TIMING)


def _interrupt_at_batch(monkeypatch, k: int):
    """Ctrl-C while the forward pass of batch k + 1 would run (after k batches are summed)."""
    def batches(*args, **kwargs):
        for i, b in enumerate(REAL_BATCHES(*args, **kwargs)):
            if i == k - (kwargs.get("skip", 0) // 3):
                os.kill(os.getpid(), signal.SIGINT)
            yield b

    monkeypatch.setattr(trace_module, "iter_batches", batches)


def test_interrupted_text_run_resumes_to_the_uninterrupted_report(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    corpus, labels = _files(tmp_path)
    common = ["text", corpus, "--model", tiny_bert_dir, "--labels", labels, "--no-progress", *EVERY_OPTION]
    assert main([*common, "--out", str(tmp_path / "clean")]) == 0
    ckpt = str(tmp_path / "run.ckpt")
    out = str(tmp_path / "resumed")
    _interrupt_at_batch(monkeypatch, 2)
    assert main([*common, "--out", out, "--checkpoint", ckpt]) == 130
    assert f"finished work is kept in {ckpt}" in capsys.readouterr().err
    assert not os.path.exists(out) and os.path.exists(ckpt) and os.path.exists(ckpt + ".cls.npy")
    _interrupt_at_batch(monkeypatch, 3)          # a second interruption, after the resumed first one
    assert main([*common, "--out", out, "--checkpoint", ckpt]) == 130
    monkeypatch.undo()
    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", "0")
    assert main([*common, "--out", out, "--checkpoint", ckpt]) == 0
    err = capsys.readouterr().err
    assert f"12 texts, 9 of them from {ckpt}" in err and "this run and the earlier ones) ->" in err, err
    clean = json.loads((tmp_path / "clean" / "report.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert _strip(resumed) == _strip(clean)
    for name in ("cls.npy", "trajectories.npz", "class_maps.npz", "context_maps.npz"):
        a, b = np.load(tmp_path / "clean" / name), np.load(tmp_path / "resumed" / name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    # a finished checkpoint: the rerun does no forward pass and writes the same report
    monkeypatch.setattr(trace_module, "iter_batches", lambda *a, **kw: iter(()))
    assert main([*common, "--out", out, "--checkpoint", ckpt]) == 0
    assert _strip(json.loads((tmp_path / "resumed" / "report.json").read_text())) == _strip(clean)


def test_pairs_phase_resumes_after_ctrl_c(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    """--pairs with --checkpoint: Ctrl-C between batches of pairs keeps the finished ones in
    PATH.pairs; the rerun takes the corpus and those pairs from the checkpoint, runs the rest and
    writes the uninterrupted run's report and pair_differences.npz; another pairs file is refused
    for PATH.pairs only."""
    corpus, _ = _files(tmp_path)
    pairs_file = tmp_path / "pairs.jsonl"
    rows = [{"group": f"g{i % 3}", "a": TEXTS[i], "b": TEXTS[(i + 5) % len(TEXTS)]} for i in range(10)]
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["text", corpus, "--model", tiny_bert_dir, "--no-progress", "--batch-size", "3", "--pairs",
              str(pairs_file)]
    assert main([*common, "--out", str(tmp_path / "clean")]) == 0
    ckpt = str(tmp_path / "run.ckpt")
    calls, stop = [], {"at": 6}   # the corpus is call 1; pairs batch c runs calls 2c + 2 and 2c + 3

    def batches(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop["at"]:
            os.kill(os.getpid(), signal.SIGINT)
        yield from REAL_BATCHES(*args, **kwargs)

    monkeypatch.setattr(trace_module, "iter_batches", batches)
    out = str(tmp_path / "resumed")
    assert main([*common, "--out", out, "--checkpoint", ckpt]) == 130
    assert f"finished work is kept in {ckpt}" in capsys.readouterr().err
    assert os.path.exists(ckpt + ".pairs") and not os.path.exists(out)
    calls.clear()
    stop["at"] = 0   # no interruption this time
    assert main([*common, "--out", out, "--checkpoint", ckpt]) == 0
    err = capsys.readouterr().err
    assert f"12 texts, 12 of them from {ckpt} (6 --pairs pairs from {ckpt}.pairs)" in err, err
    assert len(calls) == 1 + 2 * 2   # the corpus (nothing left to run) and the last two batches of pairs
    clean = json.loads((tmp_path / "clean" / "report.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert _strip(resumed) == _strip(clean)
    a, b = np.load(tmp_path / "clean" / "pair_differences.npz"), np.load(tmp_path / "resumed" / "pair_differences.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # other pairs: PATH.pairs is refused, naming it; the corpus sums in PATH are not touched
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]), encoding="utf-8")
    assert main([*common, "--out", str(tmp_path / "other"), "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt}.pairs" in err and "inputs: --pairs differs" in err, err


def test_other_settings_texts_or_model_are_refused(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    corpus, labels = _files(tmp_path)
    ckpt = str(tmp_path / "run.ckpt")
    base = ["text", corpus, "--model", tiny_bert_dir, "--no-progress", "--out", str(tmp_path / "o"),
            "--checkpoint", ckpt]
    _interrupt_at_batch(monkeypatch, 1)
    assert main([*base, "--batch-size", "3"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*base, "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "written for another input or other settings" in err and "--batch-size 3 then, 4 now" in err  # (the flag: it had said batch_size)
    assert main([*base, "--batch-size", "3", "--heads"]) == 2
    assert "--heads false then, true now" in capsys.readouterr().err
    # another torch thread count splits the forward's sums otherwise: a resumed report would
    # match neither run's
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert main([*base, "--batch-size", "3"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert f"torch_threads {threads} then, {threads + 1} now" in capsys.readouterr().err
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("one more text\n")
    assert main([*base, "--batch-size", "3"]) == 2
    assert "inputs: CORPUS differs" in capsys.readouterr().err
    # the page-only options and the inputs' paths are not part of it: the same texts elsewhere,
    # with --profile, resume
    import shutil

    # the model by its contents: a copy with another layer norm epsilon is another model ...
    shutil.copytree(tiny_bert_dir, tmp_path / "model_eps")
    config = json.loads((tmp_path / "model_eps" / "config.json").read_text())
    config["layer_norm_eps"] = config.get("layer_norm_eps", 1e-12) * 10
    (tmp_path / "model_eps" / "config.json").write_text(json.dumps(config))
    assert main([*base[:3], str(tmp_path / "model_eps"), *base[4:], "--batch-size", "3"]) == 2
    assert "model: config_sha256 differs" in capsys.readouterr().err
    # ... a moved copy named with a trailing slash the same one (its path string had counted)
    shutil.copytree(tiny_bert_dir, tmp_path / "model_moved")
    base[3] = str(tmp_path / "model_moved") + os.sep
    moved = tmp_path / "moved.txt"
    moved.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    base[1] = str(moved)
    assert main([*base, "--batch-size", "3", "--profile"]) == 0
    assert "of them from" in capsys.readouterr().err


def test_missing_cls_rows_are_named(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    corpus, _ = _files(tmp_path)
    ckpt = str(tmp_path / "run.ckpt")
    cmd = ["text", corpus, "--model", tiny_bert_dir, "--no-progress", "--out", str(tmp_path / "o"),
           "--checkpoint", ckpt, "--batch-size", "3", "--keep", "cls"]
    _interrupt_at_batch(monkeypatch, 2)
    assert main(cmd) == 130
    monkeypatch.undo()
    rows = open(ckpt + ".cls.npy", "rb").read()
    # a finished row changed in place, or another run's rows of the same shape: the header alone
    # had been checked, and the report's cls.npy had taken them
    changed = np.load(ckpt + ".cls.npy")
    changed[3, 2, 5] += 1.0
    np.save(ckpt + ".cls.npy", changed)
    capsys.readouterr()
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert f"the [CLS] rows of its 6 finished texts in {ckpt}.cls.npy are not the rows it saved" in err, err
    assert err.count("delete") == 1, err
    changed[3, 2, 5] -= 1.0
    np.save(ckpt + ".cls.npy", changed)   # the same rows again: resumable
    for damage in ("cut short", "missing"):
        if damage == "cut short":      # a memory map would have grown it with zero rows
            with open(ckpt + ".cls.npy", "wb") as f:
                f.write(rows[:1000])
        else:
            os.remove(ckpt + ".cls.npy")
        capsys.readouterr()
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert f"{ckpt}.cls.npy" in err and "delete it or pass another path" in err, err
        assert err.count("delete") == 1, err
    with open(ckpt + ".cls.npy", "wb") as f:
        f.write(rows)
    capsys.readouterr()
    assert main(cmd) == 0


def test_one_run_at_a_time_and_nothing_kept_before_the_first_save(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from embgeom.analysis.text.resume import TraceCheckpoint

    corpus, _ = _files(tmp_path)
    ckpt = str(tmp_path / "run.ckpt")
    cmd = ["text", corpus, "--model", tiny_bert_dir, "--no-progress", "--out", str(tmp_path / "o"),
           "--checkpoint", ckpt, "--batch-size", "3"]
    other = TraceCheckpoint(ckpt, {"another": "run"})
    other.load()                                   # another run holds PATH
    assert main(cmd) == 2
    # (said as the flag: it had said `checkpoint:`, the API's name)
    assert f"error: --checkpoint: {ckpt} is in use by another run" in capsys.readouterr().err
    other.close()
    _interrupt_at_batch(monkeypatch, 0)            # Ctrl-C before the first batch is summed
    monkeypatch.setenv("EMBGEOM_CHECKPOINT_SECONDS", "600")
    assert main(cmd) == 130
    assert f"stopped before the first save to {ckpt}: nothing was kept" in capsys.readouterr().err
    assert main([*cmd[:-2], "--checkpoint", str(tmp_path / "no" / "run.ckpt")]) == 2
    assert "--checkpoint: cannot write" in capsys.readouterr().err


def test_a_crafted_state_does_not_fit():
    from embgeom.engine.checkpoint import restore_value

    class Acc(Resumable):
        fixed = ("n",)
        count = "seen"

        def __init__(self):
            self.n, self.seen, self.s = 5, 0, {"a": torch.zeros(3)}

    def fields(**kw):
        return SavedObject("Acc", {**dict(n=5, seen=2, s={"a": torch.ones(3)}), **kw})

    acc = restore_value(Acc(), fields(), "acc")
    assert acc.seen == 2 and torch.equal(acc.s["a"], torch.ones(3))
    for bad, why in [(dict(n=6), "Acc.n 6 saved, this run has 5"), (dict(seen="2"), "a str saved, this run has a number"),
                     (dict(s={"a": np.ones(3)}), "a ndarray saved, this run has a Tensor"),
                     (dict(s={"b": torch.ones(3)}), "keys"), (dict(s={"a": torch.ones(4)}), "this run has"),
                     (dict(extra=1), "is not saved by embgeom")]:
        with pytest.raises(ValueError, match=why):
            restore_value(Acc(), fields(**bad), "acc")
    saved = fields()
    del saved.fields["s"]
    with pytest.raises(ValueError, match="fields s missing"):
        restore_value(Acc(), saved, "acc")


class Stopper(Resumable):
    """An observer that sends `sig` to its process in the middle of its update of batch `at`."""

    def __init__(self, at: int, sig: int = signal.SIGINT):
        self.at, self.sig, self.batches = at, int(sig), 0
        self.after_signal = False

    def update(self, b) -> None:
        self.batches += 1
        if self.batches == self.at:
            os.kill(os.getpid(), self.sig)
            self.after_signal = True   # still runs: the interrupt waits for the batch's sums


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_inside_an_update_waits_for_the_batch(tiny_bert, tmp_path, sig):
    model, tokenizer = tiny_bert
    ckpt = str(tmp_path / "api.ckpt")
    clean = trace(model, tokenizer, TEXTS, batch_size=2, heads=True, gaussianity=True).to_dict()
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted: 6 texts are saved in .*api.ckpt; the same call resumes"):
        trace(model, tokenizer, TEXTS, batch_size=2, heads=True, gaussianity=True,
              observers=[Stopper(3, sig)], checkpoint=ckpt)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # the run's handler is gone
    stopper = Stopper(0, sig)
    resumed = trace(model, tokenizer, TEXTS, batch_size=2, heads=True, gaussianity=True,
                    observers=[stopper], checkpoint=ckpt)
    # saved after the third batch's update ran to its end (the signal waited), then three more
    assert stopper.after_signal and stopper.batches == 6 and stopper.at == 3
    assert resumed.n_texts == len(TEXTS)
    assert _strip(json.loads(json.dumps(resumed.to_dict(), default=float))) == \
        _strip(json.loads(json.dumps(clean, default=float)))
    class Unsaveable:  # (an observer, but not a Resumable)
        def update(self, b) -> None:
            pass

    with pytest.raises(TypeError, match="observer Unsaveable cannot be saved"):
        trace(model, tokenizer, TEXTS, observers=[Unsaveable()], checkpoint=ckpt)
    with pytest.raises(TypeError, match="needs texts as a list or a file path"):
        trace(model, tokenizer, iter(TEXTS), checkpoint=str(tmp_path / "other.ckpt"))


class _SignalsInItsFinalizer:
    """An object whose finalizer sends SIGTERM to its process: the handler's KeyboardInterrupt is
    raised inside the finalizer, where Python prints "Exception ignored" and drops it."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


class SwallowedStop(Resumable):
    """An observer whose update of batch `at` drops a finalizer that is sent SIGTERM."""

    def __init__(self, at: int):
        self.at, self.batches = at, 0

    def update(self, b) -> None:
        self.batches += 1
        if self.batches == self.at:
            _SignalsInItsFinalizer()   # (collected at once: the signal lands in __del__)


def test_a_stop_dropped_inside_a_finalizer_still_stops_the_run(tiny_bert, tmp_path):
    """A SIGTERM whose KeyboardInterrupt lands in a finalizer (dropped by Python as "Exception
    ignored") stops the run at the next batch, its sums saved, as any SIGTERM does: the run had
    gone on to the end with status 0. Other unraisable exceptions still reach Python's hook."""
    from embgeom.interrupts import raise_swallowed, terminate_as_interrupt

    model, tokenizer = tiny_bert
    ckpt = str(tmp_path / "api.ckpt")
    stopper = SwallowedStop(2)
    with pytest.raises(KeyboardInterrupt):
        trace(model, tokenizer, TEXTS, batch_size=2, observers=[stopper], checkpoint=ckpt)
    assert stopper.batches == 2                                    # stopped before the third batch
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = trace(model, tokenizer, TEXTS, batch_size=2, observers=[SwallowedStop(0)], checkpoint=ckpt)
    assert resumed.n_texts == len(TEXTS)
    # a block that ends right after the drop raises at its end; the flag is not left behind
    with pytest.raises(KeyboardInterrupt):
        with terminate_as_interrupt():
            _SignalsInItsFinalizer()
    raise_swallowed()                                              # nothing pending
    seen = []
    real = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with terminate_as_interrupt():
            class Fails:
                def __del__(self):
                    raise RuntimeError("another error")
            Fails()
    finally:
        sys.unraisablehook = real
    assert [type(u.exc_value) for u in seen] == [RuntimeError]


def test_a_stop_dropped_inside_a_finalizer_is_raised_at_the_next_figure(tmp_path):
    """A stop a finalizer dropped is raised when the next figure is saved, not held to the end of
    a phase of figures (`vocab`'s plots: 6-14 s); once."""
    from embgeom import interrupts
    from embgeom.report.plots import new_figure, save_figure

    saved = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.terminate_as_interrupt():
            _SignalsInItsFinalizer()
            for k in range(3):
                saved.append(save_figure(new_figure()[0], str(tmp_path), f"f{k}"))
    assert saved == [] and not interrupts._swallowed


class _UnblocksSignals:
    """A finalizer that unblocks SIGINT and SIGTERM, both pending: SIGINT's KeyboardInterrupt is
    dropped in it, and SIGTERM's handler runs as the unraisable hook starts."""

    def __del__(self):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        self.done = True   # (Python code: the pending handlers run here)


def test_a_second_signal_in_the_unraisable_hook_is_not_lost():
    """Two signals together, the first dropped in a finalizer and the second's handler running
    inside the hook that notes the first: one KeyboardInterrupt (the second raise had been lost
    in the hook and the first never noted: the run ended with status 0)."""
    from embgeom import interrupts

    both = {signal.SIGINT, signal.SIGTERM}
    raised = 0
    try:
        with interrupts.terminate_as_interrupt():
            signal.pthread_sigmask(signal.SIG_BLOCK, both)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            _UnblocksSignals()
            for _ in range(3):
                time.sleep(0.05)
    except KeyboardInterrupt:
        raised += 1
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
    assert raised == 1 and not interrupts._swallowed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_tree_roundtrip_and_refusals():
    value = {"t": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": torch.tensor([True, False]),
             "a": np.arange(3, dtype=np.int64), "s": np.float64(0.1), "tuple": (1, "x", None, float("nan")),
             "set": {"b", "a"}, 3: "int key", "$x": [1.5, -0.0, float("inf")], "nested": [{"k": (2,)}]}
    tree, arrays = encode_tree(value)
    back = decode_tree(json.loads(json.dumps(tree)), arrays)
    assert torch.equal(back["t"], value["t"]) and back["t"].dtype == torch.float64
    assert torch.equal(back["b"], value["b"]) and np.array_equal(back["a"], value["a"])
    assert isinstance(back["s"], np.float64) and back["s"] == value["s"]
    assert back["tuple"][:3] == (1, "x", None) and np.isnan(back["tuple"][3])
    assert back["set"] == {"a", "b"} and back[3] == "int key" and back["nested"] == [{"k": (2,)}]
    assert back["$x"][0] == 1.5 and str(back["$x"][1]) == "-0.0" and back["$x"][2] == float("inf")
    with pytest.raises(TypeError, match="cannot save the function at state.f"):
        encode_tree({"f": lambda: 0})
    with pytest.raises(TypeError, match="bfloat16"):
        encode_tree([torch.zeros(2, dtype=torch.bfloat16)])
    # a payload names classes only as strings: restoring one into another class is refused
    meta, arrays = encode_payload(TreeState({"obj": Stopper(1)}))
    saved = decode_payload(meta, arrays).value["obj"]
    assert isinstance(saved, SavedObject) and saved.kind == "Stopper" and saved.fields["at"] == 1
    for bad in ({"$tensor": "a9"}, {"$tuple": 3}, {"$dict": [[1]]}, {"$object": 1, "fields": {}},
                {"$array": "a0", "x": 1}):
        with pytest.raises(ValueError):
            decode_tree(bad, {"a0": np.zeros(1)})
    with pytest.raises(ValueError, match="arrays no value refers to"):
        decode_tree([1], {"a0": np.zeros(1)})
    # a saved field may not shadow a method of the live object
    from embgeom.engine.checkpoint import restore_value

    for field in ("update", "not_saved", "1x"):
        with pytest.raises(ValueError, match="is not saved by embgeom"):
            restore_value(Stopper(1), SavedObject("Stopper", {field: "x"}), "s")
    with pytest.raises(ValueError, match="holds a Other, this run has Stopper"):
        restore_value(Stopper(1), SavedObject("Other", {}), "s")


def test_a_saved_selection_must_be_text_ids(tmp_path):
    from embgeom.commands.text import saved_selection

    class Ckpt:
        path, extra = "run.ckpt", {}

    c = Ckpt()
    assert saved_selection(c, 5) is None
    c.extra = {"kept": [0, 2, 4]}
    assert saved_selection(c, 5) == [0, 2, 4]
    for bad in ([0, 5], [2, 1], [1, 1], ["0"], [True], "0,1", [0.0]):
        c.extra = {"kept": bad}
        with pytest.raises(ValueError, match="selection is not a list of text ids"):
            saved_selection(c, 5)


def test_sigkill_then_rerun_gives_the_uninterrupted_report(tiny_bert_dir, tmp_path):
    """A real process killed with SIGKILL once its checkpoint exists (wherever it was: a forward
    pass, an update, a save, a [CLS] row write), then run again."""
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 10) + "\n", encoding="utf-8")
    ckpt = tmp_path / "run.ckpt"
    env = dict(os.environ, EMBGEOM_CHECKPOINT_SECONDS="0", HF_HUB_OFFLINE="1")

    def cmd(out):
        return [sys.executable, "-m", "embgeom", "text", str(corpus), "--model", tiny_bert_dir, "--out",
                str(tmp_path / out), "--batch-size", "2", "--keep", "cls", "--no-progress"]

    subprocess.run(cmd("clean"), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd("resumed") + ["--checkpoint", str(ckpt)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()                                   # after its first save, 59 batches before the end
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "resumed").exists()
    done = subprocess.run(cmd("resumed") + ["--checkpoint", str(ckpt)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "of them from" in done.stderr          # it resumed (the kill came before the end)
    clean = json.loads((tmp_path / "clean" / "report.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert _strip(resumed) == _strip(clean)
    np.testing.assert_array_equal(np.load(tmp_path / "resumed" / "cls.npy"), np.load(tmp_path / "clean" / "cls.npy"))


def test_a_resumed_run_still_warns_of_earlier_truncations(tiny_bert, tmp_path):
    model, tokenizer = tiny_bert
    texts = ["a b c d e f g h i j"] + ["a b"] * 5      # only the first batch has a text over 5 tokens
    ckpt = str(tmp_path / "cut.ckpt")
    with pytest.warns(UserWarning, match="truncated"), pytest.raises(KeyboardInterrupt):
        trace(model, tokenizer, texts, batch_size=2, max_length=5, observers=[Stopper(1, signal.SIGINT)],
              checkpoint=ckpt)
    with pytest.warns(UserWarning, match="longer than 5 tokens are truncated") as caught:
        resumed = trace(model, tokenizer, texts, batch_size=2, max_length=5, observers=[Stopper(0, signal.SIGINT)],
                        checkpoint=ckpt)
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert resumed.truncated == 1 and resumed.n_texts == len(texts)


def test_a_file_that_is_no_checkpoint_is_left_alone(tiny_bert, tmp_path):
    model, tokenizer = tiny_bert
    theirs = tmp_path / "notes.txt"
    theirs.write_text("my notes\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is not an embgeom checkpoint .*left as it is: pass another path") as e:
        trace(model, tokenizer, TEXTS, checkpoint=str(theirs))
    assert "delete" not in str(e.value) and theirs.read_text(encoding="utf-8") == "my notes\n"


def test_another_commands_checkpoint_is_named_in_short(tiny_bert, tmp_path):
    import embgeom

    model, tokenizer = tiny_bert
    ckpt = str(tmp_path / "pairs.ckpt")
    embgeom.pairwise_stats(torch.randn(40, 8), checkpoint=ckpt, block=16)
    with pytest.raises(ValueError, match=r"\(the checkpoint of an all-pairs run \(pairwise_stats\), this is an "
                                         r"`embgeom text` run\); delete it or pass another path$") as e:
        trace(model, tokenizer, TEXTS, checkpoint=ckpt)
    assert len(str(e.value).replace(ckpt, "")) < 200  # (short but for the path, whose length varies)


@pytest.mark.parametrize("options", [
    ["--show-texts", "1,5,10", "--matrices", "--matrices-texts", "5", "--max-length", "6"],
    ["--show-texts", "the|a", "--head-maps", "3", "--similar", "tau:0.5", "--keep", "cls", "--class-maps", "5"],
], ids=["show-ids,matrices-texts,truncated", "show-regex,similar-tau"])
def test_other_options_resume_to_the_same_files(tiny_bert_dir, tmp_path, monkeypatch, options):
    corpus, labels = _files(tmp_path)
    common = ["text", corpus, "--model", tiny_bert_dir, "--labels", labels, "--no-progress", "--batch-size", "3",
              *options]
    clean, resumed, ckpt = tmp_path / "clean", tmp_path / "resumed", str(tmp_path / "run.ckpt")
    assert main([*common, "--out", str(clean)]) == 0
    _interrupt_at_batch(monkeypatch, 2)
    assert main([*common, "--out", str(resumed), "--checkpoint", ckpt]) == 130
    monkeypatch.setattr(trace_module, "iter_batches", REAL_BATCHES)
    assert main([*common, "--out", str(resumed), "--checkpoint", ckpt]) == 0
    names = sorted(os.listdir(clean))
    assert names == sorted(os.listdir(resumed))
    for name in names:   # (manifest.json and the pages name the command line, which differs)
        if name.endswith(".json") and name != "manifest.json":
            assert _strip(json.loads((clean / name).read_text())) == _strip(json.loads((resumed / name).read_text()))
        elif name.endswith((".npy", ".npz")):
            a, b = np.load(clean / name), np.load(resumed / name)
            for key in ([None] if isinstance(a, np.ndarray) else a.files):
                np.testing.assert_array_equal(a if key is None else a[key], b if key is None else b[key],
                                              err_msg=f"{name}: {key}")


@pytest.mark.parametrize("first,then", [
    (["--labels", "{labels}"], ["--labels", "{labels}", "--keep", "cls"]),   # --labels keeps [CLS] rows anyway
    ([], ["--max-length", "32"]),                                           # the model's longest, asked or not
    (["--max-length", "100"], ["--max-length", "32"]),                      # lowered to it
    (["--head-maps", "1"], ["--head-maps", "1", "--heads"]),                # --head-maps N implies --heads
    (["--show-texts", "0,2"], ["--show-texts", "0,2", "--head-maps", "2", "--heads"]),  # draws the 2 it names
])
def test_spellings_of_one_run_share_its_checkpoint(tiny_bert_dir, tmp_path, monkeypatch, capsys, first, then):
    # options meaning the same run had been refused: "--keep [] then, ["cls"] now"
    corpus, labels = _files(tmp_path)
    ckpt = str(tmp_path / "run.ckpt")
    base = ["text", corpus, "--model", tiny_bert_dir, "--no-progress", "--batch-size", "3", "--checkpoint", ckpt]
    _interrupt_at_batch(monkeypatch, 2)
    assert main([*base, "--out", str(tmp_path / "a"), *[a.format(labels=labels) for a in first]]) == 130
    monkeypatch.setattr(trace_module, "iter_batches", REAL_BATCHES)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "b"), *[a.format(labels=labels) for a in then]]) == 0
    assert f"6 of them from {ckpt}" in capsys.readouterr().err


def test_a_second_ctrl_c_waits_for_the_save(tiny_bert, tmp_path, monkeypatch):
    from embgeom.analysis.text.resume import TraceCheckpoint

    model, tokenizer = tiny_bert
    ckpt = str(tmp_path / "twice.ckpt")
    clean = trace(model, tokenizer, TEXTS, batch_size=2).to_dict()
    stopper = Stopper(3)
    save, restore = TraceCheckpoint.save, TraceCheckpoint.restore

    def save_hit_again(self, *args):
        if stopper.after_signal:              # the save after the first Ctrl-C: press it again
            os.kill(os.getpid(), signal.SIGINT)
        save(self, *args)

    monkeypatch.setattr(TraceCheckpoint, "save", save_hit_again)
    with pytest.raises(KeyboardInterrupt):
        trace(model, tokenizer, TEXTS, batch_size=2, observers=[stopper], checkpoint=ckpt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(TraceCheckpoint, "save", save)
    resumed_from = []
    monkeypatch.setattr(TraceCheckpoint, "restore", lambda self, objects: resumed_from.append(
        restore(self, objects)) or resumed_from[-1])
    resumed = trace(model, tokenizer, TEXTS, batch_size=2, observers=[Stopper(0)], checkpoint=ckpt)
    assert resumed_from == [6]               # the third batch's save ran to its end
    assert _strip(json.loads(json.dumps(resumed.to_dict(), default=float))) == \
        _strip(json.loads(json.dumps(clean, default=float)))


def test_restored_values_must_be_what_the_fields_hold():
    # a crafted file (its sha256 recomputed) had put None, a float or a negative count in a
    # count's place: a ZeroDivisionError or a wrong report after the resumed run
    from embgeom.engine.checkpoint import Resumable, SavedObject, restore_value

    class Sums(Resumable):
        count = None

        def __init__(self):
            self.n_texts, self.total, self.items = 0, 0.0, []

    for fields, match in [({"n_texts": None}, "nothing saved"), ({"n_texts": 4.0}, "counts in integers"),
                          ({"n_texts": -73}, "a count is never negative")]:
        with pytest.raises(ValueError, match=match):
            restore_value(Sums(), SavedObject("Sums", {"total": 1.5, "items": [], **fields}), "acc")
    done = restore_value(Sums(), SavedObject("Sums", {"n_texts": 3, "total": -1.5, "items": [1]}), "acc")
    assert (done.n_texts, done.total, done.items) == (3, -1.5, [1])


def test_restored_samples_must_be_maps_of_texts_seen(tiny_bert):
    # a sample's text id reached report.html unescaped and a file name ("<img src=x onerror=...>")
    from embgeom.analysis.heads.similarity import SimilarityAccumulator
    from embgeom.engine.checkpoint import SavedObject, restore_value

    model, tok = tiny_bert
    acc = SimilarityAccumulator(2, 4, 32, tok, maps=2)
    state = dict(acc.checkpoint_state(), seen=5)
    good = {"text": 1, "tokens": ["a"], "maps": torch.zeros(2, 4, 1, 1)}
    restore_value(SimilarityAccumulator(2, 4, 32, tok, maps=2), SavedObject(
        "SimilarityAccumulator", dict(state, samples=[good])), "acc")
    for samples in ([dict(good, text="<img src=x onerror=alert(1)>")], [dict(good, text=7)], [good, good],
                    [good] * 3, [dict(good, extra=1)]):
        with pytest.raises(ValueError, match="SimilarityAccumulator.samples"):
            restore_value(SimilarityAccumulator(2, 4, 32, tok, maps=2),
                          SavedObject("SimilarityAccumulator", dict(state, samples=samples)), "acc")


def test_an_error_after_a_resumed_run_names_the_checkpoint(tiny_bert, tmp_path, monkeypatch):
    # sums of a crafted file that do not fit together (a token count of 0 beside finished texts)
    # surfaced as a ZeroDivisionError traceback once the resumed run reduced them
    model, tok = tiny_bert
    ckpt = str(tmp_path / "ckpt")
    trace(model, tok, TEXTS[:4], batch_size=2, checkpoint=ckpt)   # finished: every text saved

    def divides_by_zero(self, *args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(trace_module.TraceAccumulator, "result", divides_by_zero)
    with pytest.raises(ValueError, match=r"^checkpoint: .*ckpt: the run resumed from it failed \(ZeroDivisionError: "
                                         r"division by zero\); the sums it held do not fit together"):
        trace(model, tok, TEXTS[:4], batch_size=2, checkpoint=ckpt)
    with pytest.raises(ZeroDivisionError):  # a run that resumed nothing: the error as it is
        trace(model, tok, TEXTS[:4], batch_size=2, checkpoint=str(tmp_path / "fresh"))


def test_restored_counts_must_fit_the_corpus_and_each_other(tiny_bert):
    # texts done past the corpus had ended the run at once, reporting them; tokens that do not fit
    # the texts (none beside finished texts) had divided by zero
    model, tok = tiny_bert
    with pytest.raises(ValueError, match="a checkpoint counts 100 texts done, this corpus has fewer"):
        next(trace_module.iter_batches(model, tok, TEXTS, batch_size=4, max_length=32, skip=100))
    acc = trace_module.TraceAccumulator(2, 4, 32, 60, "cpu")
    acc.n_texts, acc.n_tokens = 4, 0
    with pytest.raises(ValueError, match="0 tokens, 0 truncated and 0 of special tokens only in 4 texts of at most 32"):
        acc.check_restored()
    acc.n_tokens = 40
    acc.check_restored()
    acc.special_only = 5
    with pytest.raises(ValueError, match="5 of special tokens only in 4 texts"):
        acc.check_restored()
    acc.special_only = 0
    # sums no run reaches (a crafted file's, its checksum made anew): NaN, a negative count, a
    # cone index past 1
    for key, value, message in (("entropy", math.nan, "sums 'entropy' hold NaN or Inf"),
                                ("ctx_rows", -5, "counts 'ctx_rows' hold a negative count"),
                                ("cone_in", 3.0, "cone sums 'cone_in' pass what 4 texts of 40 tokens allow")):
        saved = acc.s[key].clone()
        acc.s[key].view(-1)[0] = value
        with pytest.raises(ValueError, match=message):
            acc.check_restored()
        acc.s[key] = saved
    acc.check_restored()


def test_restored_observers_must_fit_the_texts_done(tiny_bert, tmp_path):
    # a crafted file's extra trajectory texts, per-label counts that misalign labels and texts
    # (or double a label's means), a class count past its texts: reported as they were
    from embgeom.analysis.text.keeper import Keeper
    from embgeom.analysis.text.labelled import ClassMaps, LabelSplit

    model, tok = tiny_bert
    keeper = Keeper(str(tmp_path), 12, 2, 64, keep_cls=False, trajectories=3, tokenizer=tok)
    keeper.done, keeper.texts = 4, ["a", "b", "c"]
    keeper.check_restored()
    for texts, traj in ((["a", "b", "c", "d", "e"], []), (["a", "b", "c"], [(999, 0, "x", np.zeros((3, 64), np.float32))])):
        keeper.texts, keeper.traj = texts, traj
        with pytest.raises(ValueError, match="Keeper: "):
            keeper.check_restored()
    split = LabelSplit(LABELS, model, tok, 32)
    split.rows.done = 4
    with pytest.raises(ValueError, match="LabelSplit: per-label texts"):
        split.check_restored()
    split.acc["x"].n_texts, split.acc["y"].n_texts = 2, 2   # x y x y
    split.check_restored()
    maps = ClassMaps(LABELS, 6, 2, 4)
    maps.rows.done, maps.counts["x"] = 2, 5
    with pytest.raises(ValueError, match="ClassMaps: counts"):
        maps.check_restored()


def test_labels_count_by_what_is_read(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    # the labels as read, as the corpus by its texts: the same labels with CRLF line ends and
    # spaces around them resume (their file's bytes had counted: refused as "--labels differs");
    # another label does not
    corpus, labels = _files(tmp_path)
    ckpt = str(tmp_path / "run.ckpt")
    base = ["text", corpus, "--model", tiny_bert_dir, "--no-progress", "--out", str(tmp_path / "o"),
            "--checkpoint", ckpt, "--batch-size", "3"]
    _interrupt_at_batch(monkeypatch, 1)
    assert main([*base, "--labels", labels]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    other = tmp_path / "labels_crlf.txt"
    other.write_bytes(("\r\n".join(f" {g}\t" for g in LABELS) + "\r\n\r\n").encode())
    changed = tmp_path / "labels_changed.txt"
    changed.write_text("\n".join(["zz"] + LABELS[1:]) + "\n", encoding="utf-8")
    assert main([*base, "--labels", str(changed)]) == 2
    assert "inputs: --labels differs" in capsys.readouterr().err
    assert main([*base, "--labels", str(other)]) == 0
    assert "of them from" in capsys.readouterr().err


def test_a_finished_checkpoint_is_not_rewritten(tiny_bert, tmp_path, monkeypatch):
    """A rerun with every text done had saved the unchanged sums again (95 MB and 9 s silent
    after the bar on a 400-text run with the extras); the file stays as it is."""
    from embgeom.analysis.text import resume

    model, tokenizer = tiny_bert
    ckpt = tmp_path / "c.ckpt"
    first = trace(model, tokenizer, TEXTS, batch_size=3, checkpoint=str(ckpt))
    saves = []
    real = resume.TraceCheckpoint.save
    monkeypatch.setattr(resume.TraceCheckpoint, "save", lambda self, *a: saves.append(a) or real(self, *a))
    again = trace(model, tokenizer, TEXTS, batch_size=3, checkpoint=str(ckpt))
    assert saves == []
    assert _strip(again.to_dict()) == _strip(first.to_dict())


def test_a_finished_checkpoint_says_it_holds_the_finished_run(tiny_bert, tmp_path):
    """A rerun on a finished checkpoint said 'resuming ... 12 of 12 texts done'."""
    import io

    from embgeom.progress import Progress

    model, tokenizer = tiny_bert
    ckpt = str(tmp_path / "done.ckpt")
    trace(model, tokenizer, TEXTS, batch_size=4, checkpoint=ckpt)
    said = io.StringIO()
    trace(model, tokenizer, TEXTS, batch_size=4, checkpoint=ckpt, progress=Progress(enabled=True, stream=said, log=True))
    assert f"embgeom text: {ckpt} holds the finished run ({len(TEXTS)} texts)" in said.getvalue()


@pytest.mark.parametrize("where", ["out", "checkpoint"])
def test_cls_rows_take_their_disk_space_before_any_row_is_stored(tmp_path, monkeypatch, where):
    """The [CLS] rows file is allocated whole when it is opened (not a sparse file that the
    memory map fills: a full disk had ended `text --keep cls` with SIGBUS, exit 135 and no word);
    a disk too small is a one-line ValueError naming the option and folder, and a new rows file
    is not left behind."""
    import errno

    from embgeom.analysis.text.keeper import Keeper

    stage = tmp_path / ".out.1.x.partial"
    stage.mkdir()
    rows = None if where == "out" else str(tmp_path / "ck.cls.npy")
    keeper = Keeper(str(stage), 300, 2, 64, keep_cls=True, trajectories=0, tokenizer=None, rows_path=rows)
    keeper._open()
    st = os.stat(keeper.rows_path)
    assert st.st_blocks * 512 >= st.st_size == 128 + 300 * 3 * 64 * 4

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this system (the rows are written as zeros instead)")
    monkeypatch.setattr(os, "posix_fallocate", full)
    other = Keeper(str(stage), 300, 2, 64, keep_cls=True, trajectories=0, tokenizer=None,
                   rows_path=None if rows is None else str(tmp_path / "ck2.cls.npy"))
    option = "--out" if where == "out" else "--checkpoint"
    with pytest.raises(ValueError, match=rf"^{option}: the \[CLS\] rows \(230,528 bytes\) cannot be written in "
                                         rf"{re.escape(str(tmp_path))}: No space left on device$"):
        other._open()
    assert not os.path.exists(other.rows_path)
