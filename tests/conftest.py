"""Shared fixtures: devices/backends, random inputs, a tiny random BERT saved to disk."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the a an of to and in is was it that he she they we you i this with for on as at by "
         "from be are have has not but or his her its their which one two three cat dog house "
         "car tree river city king queen man woman good bad big small new old red blue green "
         "run walk read write see say go come make take").split()
PUNCT = list(".,;:!?'\"()-")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer, 4-head, hidden-64 BERT with a word-level vocab, saved as safetensors."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]"] + PUNCT + WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.model_max_length = 32
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                     type_vocab_size=2, attn_implementation="eager")
    BertModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tiny_bert_dir):
    from embgeom import load_model

    return load_model(tiny_bert_dir)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal: a shell starts background jobs (`make
    test &`, some CI runners) with SIGINT ignored, and Python then never raises it."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


# ---------------------------------------------------------------------------------------------
# Vector levels of the C++ core (EMBGEOM_CPU caps them; read on every engine construction).
# Every level this host supports runs the engine suite: `cpu_cap` as a parametrized fixture, or
# a pytest.param carrying a `cpu_cap` mark (helpers.backend_params does that for `cpp`).
# ---------------------------------------------------------------------------------------------
from helpers import CPU_CAPS  # noqa: E402


@pytest.fixture(params=CPU_CAPS, ids=lambda c: f"cpu={c}")
def cpu_cap(request, monkeypatch):
    monkeypatch.setenv("EMBGEOM_CPU", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _cpu_cap_mark(request, monkeypatch):
    mark = request.node.get_closest_marker("cpu_cap")
    if mark is not None:
        monkeypatch.setenv("EMBGEOM_CPU", mark.args[0])


# A failure printed the moment it happens (EMBGEOM_FAILURES_AT_ONCE=1; benchmarks/gpu_check.sh
# sets it): on a lent GPU a later test that hangs past the step's limit must not take the
# earlier failures' tracebacks with it.
def pytest_runtest_logreport(report):
    if report.failed and os.environ.get("EMBGEOM_FAILURES_AT_ONCE") == "1":
        print(f"\n---- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n", flush=True)
