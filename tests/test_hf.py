"""embgeom.trace on a tiny random BERT: every report number against a direct float64 computation
from the model's own outputs (same batches, padding included), and the hooks against
softmax(Q K^T / sqrt(d) + mask) V recomputed from the layer weights."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from embgeom import reference
from embgeom.analysis.text.trace import cls_differences, iter_batches, model_max_length, punctuation_table, trace

TEXTS = [
    "the cat sat on the mat .",
    "a dog !",
    "the king and the queen , the man and the woman ; they walk to the river ( and the city ) .",
    "red",
    "she was in the house ? he was not .",
    " ".join(["one two three"] * 14),   # > 32 tokens: truncated
    "it is a big old tree , and it is green .",
]
BATCH = 3
pytestmark = pytest.mark.filterwarnings("ignore:trace. texts longer")


def _direct(model, tokenizer, texts):
    """Model outputs of one batch computed the plain way, float64 from here on."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True, output_attentions=True)
    mask = enc["attention_mask"].bool()
    H = model.config.num_attention_heads
    hs = [h.double() for h in out.hidden_states]
    heads, multi = [], []
    ext = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)[:, None, None, :]
    for layer, x in zip(model.encoder.layer, out.hidden_states):
        sa = layer.attention.self
        B, T, D = x.shape
        d = D // H

        def proj(lin):
            return (x.double() @ lin.weight.double().T + lin.bias.double()).view(B, T, H, d).transpose(1, 2)

        q, k, v = proj(sa.query), proj(sa.key), proj(sa.value)
        o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + ext, -1) @ v      # (B, H, T, d)
        heads.append(o)
        dense = layer.attention.output.dense
        multi.append(o.transpose(1, 2).reshape(B, T, D) @ dense.weight.double().T + dense.bias.double())
    ids = enc["input_ids"]
    special = {"cls": (ids == tokenizer.cls_token_id) & mask, "sep": (ids == tokenizer.sep_token_id) & mask,
               "punct": punctuation_table(tokenizer)[ids] & mask}
    return dict(ids=ids, mask=mask, hs=hs, attn=[a.double() for a in out.attentions], heads=heads,
                multi=multi, special=special)


def _expected(model, tokenizer, texts, batch):
    """Every report number from the reference, batch by batch."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    V = model.config.vocab_size
    max_len = 32
    acc = {k: torch.zeros(L, dtype=torch.float64) for k in ("cin", "cout", "mh")}
    acc["head"] = torch.zeros(L, H, dtype=torch.float64)
    raw = {k: torch.zeros_like(v) for k, v in acc.items()}   # the same sums of I itself
    ent = torch.zeros(L, H, dtype=torch.float64)
    head_mean = torch.zeros(L, H, dtype=torch.float64)   # entropy of each sequence's mean row
    to = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("cls", "sep", "punct", "prev", "next")}
    dist = torch.zeros(L * H, 2 + 2 * max_len - 1, dtype=torch.float64)
    ctx_d = torch.zeros(L, H, dtype=torch.float64)
    ctx_s = torch.zeros(L, H, dtype=torch.float64)
    ctx_n = torch.zeros(L, H, dtype=torch.float64)
    focus = torch.zeros(L, H, V, dtype=torch.int64)
    step_d, step_c, norm = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64), torch.zeros(L + 1, dtype=torch.float64)
    n_texts = rows = 0
    baseline = 0.0
    for start in range(0, len(texts), batch):
        d = _direct(model, tokenizer, texts[start:start + batch])
        mask = d["mask"]
        B = mask.shape[0]
        n_texts += B
        n = mask.sum(1)
        rows += int(n.sum())
        baseline += float((n * n.double().log()).sum())
        for l in range(L):
            for key, t in (("cin", d["hs"][l]), ("cout", d["hs"][l + 1]), ("mh", d["multi"][l])):
                cone = reference.cone_index(t, mask)
                acc[key][l] += cone["normalized"].sum()
                raw[key][l] += cone["index"].sum()
            re = reference.attention_entropy(d["attn"][l], mask)["row_entropy"]
            ent[l] += torch.nan_to_num(re).sum(dim=(0, 2))
            for b in range(B):
                real = mask[b]
                mean_row = d["attn"][l][b][:, real][:, :, real].mean(1)           # (H, n)
                head_mean[l] -= torch.special.xlogy(mean_row, mean_row).sum(-1)
            summ = reference.attention_summary(d["attn"][l], mask, d["special"])
            for k in to:
                to[k][l] += summ[k] * int(n.sum())
            dist[l * H:(l + 1) * H] += reference.head_target_distribution(d["attn"][l], mask, d["special"], max_len)
            for h in range(H):
                o = d["heads"][l][:, h]
                cone = reference.cone_index(o, mask)
                acc["head"][l, h] += cone["normalized"].sum()
                raw["head"][l, h] += cone["index"].sum()
                cs = reference.context_similarity(o, mask, d["special"]["sep"])
                ctx_d[l, h] += sum(cs["distances"])
                ctx_n[l, h] += len(cs["distances"])
                ctx_s[l, h] += cs["separator_share"] * len(cs["distances"])
                for b, pos in enumerate(cs["focus_token"]):
                    if pos >= 0:
                        focus[l, h, d["ids"][b, pos]] += 1
        for l in range(L + 1):
            norm[l] += (d["hs"][l].norm(dim=-1) * mask).sum()
        for l in range(L):
            a, b = d["hs"][l], d["hs"][l + 1]
            step_d[l] += ((b - a).norm(dim=-1) * mask).sum()
            step_c[l] += (torch.nn.functional.cosine_similarity(a, b, dim=-1) * mask).sum()
    ids = focus.argmax(-1)
    return {
        "n_texts": n_texts, "n_tokens": rows,
        "cone_index": {"layer_input": acc["cin"] / n_texts, "head_output": acc["head"] / n_texts,
                       "multihead_output": acc["mh"] / n_texts, "layer_output": acc["cout"] / n_texts,
                       "raw": {"layer_input": raw["cin"] / n_texts, "head_output": raw["head"] / n_texts,
                               "multihead_output": raw["mh"] / n_texts, "layer_output": raw["cout"] / n_texts}},
        "entropy": {"mean": ent / rows, "uniform_baseline": baseline / rows, "head_mean": head_mean / n_texts},
        "attention_to": {k: v / rows for k, v in to.items()},
        "js_distance": reference.js_distance(dist),
        "context_similarity": {"mean_distance": ctx_d / ctx_n, "separator_share": ctx_s / ctx_n,
                               "focus_token": [tokenizer.convert_ids_to_tokens(r) for r in ids.tolist()],
                               "focus_share": focus.amax(-1).double() / focus.sum(-1).clamp(min=1)},
        "evolution": {"step_distance": step_d / rows, "step_cosine": step_c / rows, "norm": norm / rows},
    }


def _close(got, want, name, atol=2e-5):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}\ngot  {got}\nwant {want}"


@pytest.fixture(scope="module")
def traced(tiny_bert):
    model, tokenizer = tiny_bert
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trace(model, tokenizer, TEXTS, batch_size=BATCH)
    return result, caught


def test_trace_matches_direct_computation(tiny_bert, traced):
    model, tokenizer = tiny_bert
    result, _ = traced
    got = result.to_dict()
    want = _expected(model, tokenizer, TEXTS, BATCH)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    assert (got["layers"], got["heads"], got["n_texts"]) == (L, H, len(TEXTS))
    assert got["n_tokens"] == want["n_tokens"]
    for k in ("layer_input", "head_output", "multihead_output", "layer_output"):
        _close(got["cone_index"][k], want["cone_index"][k], f"cone_index.{k}")
        # I itself grows with the text's length (up to n): the same relative accuracy
        _close(got["cone_index"][f"{k}_raw"], want["cone_index"]["raw"][k], f"cone_index.{k}_raw", 2e-5 * 32)
    _close(got["entropy"]["mean"], want["entropy"]["mean"], "entropy.mean")
    _close(got["entropy"]["uniform_baseline"], want["entropy"]["uniform_baseline"], "uniform_baseline", 1e-12)
    _close(got["entropy"]["head_mean"], want["entropy"]["head_mean"], "entropy.head_mean")
    for k in ("cls", "sep", "punct", "prev", "next"):
        _close(got["attention_to"][k], want["attention_to"][k], f"attention_to.{k}")
    _close(got["js_distance"], want["js_distance"], "js_distance", 1e-4)
    cs = got["context_similarity"]
    _close(cs["mean_distance"], want["context_similarity"]["mean_distance"], "mean_distance", 1e-12)
    _close(cs["separator_share"], want["context_similarity"]["separator_share"], "separator_share", 1e-12)
    assert cs["focus_token"] == want["context_similarity"]["focus_token"]
    _close(cs["focus_share"], want["context_similarity"]["focus_share"], "focus_share", 1e-12)
    for k in ("step_distance", "step_cosine", "norm"):
        _close(got["evolution"][k], want["evolution"][k], f"evolution.{k}", 1e-4)


def test_truncation_counted_and_warned_once(tiny_bert, traced):
    model, tokenizer = tiny_bert
    result, caught = traced
    long = [len(ids) > 32 for ids in tokenizer(TEXTS)["input_ids"]]
    assert result.truncated == sum(long) == 1
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    doubled = trace(model, tokenizer, TEXTS * 2, batch_size=2, max_length=8)
    assert doubled.truncated == 2 * sum(len(ids) > 8 for ids in tokenizer(TEXTS)["input_ids"])


def test_hooks_match_recomputed_heads(tiny_bert):
    model, tokenizer = tiny_bert
    (batch,) = list(iter_batches(model, tokenizer, TEXTS[:4], batch_size=4))
    want = _direct(model, tokenizer, TEXTS[:4])
    H = model.config.num_attention_heads
    D = model.config.hidden_size
    assert batch.mask.equal(want["mask"])
    assert len(batch.head_outputs) == len(batch.attentions) == model.config.num_hidden_layers
    assert len(batch.hidden_states) == model.config.num_hidden_layers + 1
    m = want["mask"][:, :, None, None]
    for l in range(model.config.num_hidden_layers):
        assert batch.head_outputs[l].shape == (4, batch.mask.shape[1], H, D // H)
        got = batch.head_outputs[l].transpose(1, 2)       # (B, H, T, d)
        _close(got * m.transpose(1, 2), want["heads"][l] * m.transpose(1, 2), f"head_outputs[{l}]", 1e-5)
        _close(batch.multihead_outputs[l] * want["mask"][..., None], want["multi"][l] * want["mask"][..., None],
               f"multihead_outputs[{l}]", 1e-5)
    assert batch.cls[:, 0].all() and batch.cls.sum() == 4
    assert batch.sep.sum() == 4
    punct = {t for t, i in tokenizer.get_vocab().items() if punctuation_table(tokenizer)[i]}
    assert {".", ",", ";", "(", ")", "!", "?"} <= punct and not punct & {"the", "[SEP]", "[CLS]"}


def test_batch_size_and_input_kinds_agree(tiny_bert, traced, tmp_path):
    model, tokenizer = tiny_bert
    want = traced[0].to_dict()
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(TEXTS[:3]) + "\n\n   \n" + "\n".join(TEXTS[3:]) + "\n", encoding="utf-8")
    from_file = trace(model, tokenizer, str(f), batch_size=len(TEXTS)).to_dict()
    from_gen = trace(model, tokenizer, (t for t in TEXTS), batch_size=2).to_dict()
    for got in (from_file, from_gen):
        assert got["n_texts"] == want["n_texts"] and got["n_tokens"] == want["n_tokens"]
        _close(got["cone_index"]["layer_output"], want["cone_index"]["layer_output"], "cone", 1e-5)
        _close(got["entropy"]["mean"], want["entropy"]["mean"], "entropy", 1e-5)
        _close(got["js_distance"], want["js_distance"], "js", 1e-4)


def test_metric_subset_and_max_length(tiny_bert):
    model, tokenizer = tiny_bert
    assert model_max_length(model, tokenizer) == 32
    assert model_max_length(model, tokenizer, 1000) == 32
    r = trace(model, tokenizer, TEXTS[:2], metrics=("cone",))
    assert torch.isfinite(r.cone_layer_output).all()
    with pytest.raises(ValueError, match="metrics: unknown"):
        trace(model, tokenizer, TEXTS[:2], metrics=("cone", "nope"))
    with pytest.raises(ValueError, match="max_length"):
        trace(model, tokenizer, TEXTS[:2], max_length=1)
    # numpy ints are ints (they had been refused as "expected an int >= 1, got 8"); 2.5 is no int
    a = trace(model, tokenizer, TEXTS[:3], metrics=("cone",), batch_size=np.int64(2), max_length=np.int64(16))
    b = trace(model, tokenizer, TEXTS[:3], metrics=("cone",), batch_size=2, max_length=16)
    torch.testing.assert_close(a.cone_layer_output, b.cone_layer_output, rtol=0, atol=0)
    with pytest.raises(TypeError, match="batch_size: expected an int, got float"):
        trace(model, tokenizer, TEXTS[:2], batch_size=2.5)


@pytest.mark.parametrize("content,match", [(b"ok\n\xff\xfe bad\n", "line 2 is not UTF-8"),
                                           (b"", "empty corpus"), (b"\n  \n\n", "empty corpus")])
def test_bad_corpus_files(tiny_bert, tmp_path, content, match):
    model, tokenizer = tiny_bert
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        trace(model, tokenizer, str(f))
    with pytest.raises(ValueError, match="no such file"):
        trace(model, tokenizer, str(tmp_path / "missing.txt"))


def test_cls_differences(tiny_bert):
    model, tokenizer = tiny_bert
    pairs = [{"group": "g", "a": "the king", "b": "the queen"},
             {"group": "g", "a": "a man", "b": "a woman ."},
             {"group": "h", "a": "big", "b": "small"}]
    got = cls_differences(model, tokenizer, pairs, batch_size=2)

    def cls(text):
        with torch.inference_mode():
            return model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0, 0].double()

    diffs = {"g": [cls(p["a"]) - cls(p["b"]) for p in pairs[:2]], "h": [cls("big") - cls("small")]}
    means = torch.stack([torch.stack(diffs[g]).mean(0) for g in ("g", "h")])
    assert got["groups"] == ["g", "h"] and got["counts"].tolist() == [2, 1]
    _close(got["mean_norm"], means.norm(dim=1), "mean_norm", 1e-4)
    cos = torch.nn.functional.cosine_similarity(means[:, None], means[None], dim=-1)
    _close(got["cosine"], cos, "cosine", 1e-5)


@pytest.mark.parametrize("device", ["foo", "cuda:7"])
def test_a_device_that_is_not_here_is_named(tiny_bert_dir, tiny_bert, device):
    """trace and load_model check `device` (torch's RuntimeError / 'Torch not compiled with CUDA'
    AssertionError before); the model stays where it was."""
    from embgeom import load_model
    from embgeom.analysis.text.trace import trace

    model, tok = tiny_bert
    with pytest.raises(ValueError, match="^device: "):
        trace(model, tok, ["a b c"], device=device)
    assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="^device: "):
        load_model(tiny_bert_dir, device=device)
