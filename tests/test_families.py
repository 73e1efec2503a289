"""Every encoder family of analysis.adapters on a tiny random model built from its transformers
config class (no download): trace against transformers' own hidden_states and attentions (cone
index per depth, mean entropy per head), the per-head hooks against A V recomputed from the
layer's value projection, each `embgeom vocab` section present or absent as the family says, and
both CLIs on the saved model."""
from __future__ import annotations

import json
import math
import types
import warnings

import pytest
import torch

from conftest import PUNCT, WORDS
from embgeom import load_model, reference
from embgeom.analysis.text import adapters
from embgeom.analysis.text.trace import iter_batches, trace
from embgeom.cli import main

TEXTS = ["the cat sat on the mat .", "a dog !", "she was in the house ? he was not , they were .",
         "red", "the king and the queen walk to the river ( and the city ) .", "it is a big old tree ."]
BATCH = 4
MAXP = 32                        # token positions every family gets
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=MAXP)
ROBERTA_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=MAXP + 2)


def _config(family: str, V: int):
    import transformers as tf

    c = dict(COMMON, vocab_size=V)
    if family == "bert":
        return tf.BertConfig(**c)
    if family in ("roberta", "xlm-roberta", "camembert"):
        cls = {"roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig,
               "camembert": tf.CamembertConfig}[family]
        return cls(**{**c, **ROBERTA_IDS})
    if family == "electra":
        return tf.ElectraConfig(**c, embedding_size=16)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                   max_position_embeddings=MAXP, pad_token_id=0)
    if family == "albert":
        # one shared layer applied at 3 depths
        return tf.AlbertConfig(**{**c, "num_hidden_layers": 3}, embedding_size=16, num_hidden_groups=1,
                               inner_group_num=1, pad_token_id=0)
    if family == "deberta":
        return tf.DebertaConfig(**c, relative_attention=True, pos_att_type=["c2p", "p2c"],
                                position_biased_input=True, type_vocab_size=0, pad_token_id=0)
    if family == "deberta-v2":     # v3-style: relative positions only
        return tf.DebertaV2Config(**c, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                  position_biased_input=False, position_buckets=8, share_att_key=True,
                                  norm_rel_ebd="layer_norm", type_vocab_size=0, pad_token_id=0)
    if family == "mpnet":
        return tf.MPNetConfig(**{**c, **ROBERTA_IDS})
    if family == "modernbert":     # layer 0 global, layer 1 local (window 4)
        return tf.ModernBertConfig(**c, global_attn_every_n_layers=2, local_attention=4,
                                   pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2,
                                   eos_token_id=3, mask_token_id=4)
    raise KeyError(family)


# family -> (position matrix, first position id, token-type matrix)
EXPECT = {
    "bert": (True, 0, True), "roberta": (True, 2, True), "xlm-roberta": (True, 2, True),
    "camembert": (True, 2, True), "electra": (True, 0, True), "distilbert": (True, 0, False),
    "albert": (True, 0, True), "deberta": (True, 0, False), "deberta-v2": (False, 0, False),
    "mpnet": (True, 2, False), "modernbert": (False, 0, False),
}
ROBERTA_STYLE = {"roberta", "xlm-roberta", "camembert", "mpnet"}


def _tokenizer(specials):
    """A word-level tokenizer with the family's special tokens (<s> $A </s> or [CLS] $A [SEP])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(specials) + PUNCT + WORDS)}
    if specials == ROBERTA_SPECIALS:
        names = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
                     pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    else:
        names = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                     mask_token="[MASK]")
    cls, sep = names["cls_token"], names["sep_token"]
    tk = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=MAXP, **names), len(vocab)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """family -> directory of a saved tiny random model + tokenizer (safetensors)."""
    from transformers import AutoModel

    dirs = {}
    for family in EXPECT:
        path = tmp_path_factory.mktemp(family)
        tok, V = _tokenizer(ROBERTA_SPECIALS if family in ROBERTA_STYLE else BERT_SPECIALS)
        tok.save_pretrained(str(path))
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModel.from_config(_config(family, V), attn_implementation="eager")
        model.save_pretrained(str(path), safe_serialization=True)
        dirs[family] = str(path)
    return dirs


_LOADED: dict = {}


def _load(family_dirs, family):
    if family not in _LOADED:
        _LOADED[family] = load_model(family_dirs[family])
    return _LOADED[family]


def _values(model, l: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention input, V (B, H, T, d_h)) of layer l from its own weights; x = hidden_states[l]."""
    base = model.base_model
    family = model.config.model_type
    B, T, _ = x.shape
    H = model.config.num_attention_heads
    if family == "modernbert":
        layer = base.layers[l]
        x = layer.attn_norm(x)
        return x, layer.attn.Wqkv(x).view(B, T, 3, H, -1)[:, :, 2].transpose(1, 2)
    if family == "deberta":
        sa = base.encoder.layer[l].attention.self
        v = sa.in_proj(x).view(B, T, H, -1).transpose(1, 2).chunk(3, dim=-1)[2]
        return x, v + sa.v_bias.view(1, H, 1, -1)
    lin = {"distilbert": lambda: base.transformer.layer[l].attention.v_lin,
           "albert": lambda: base.encoder.albert_layer_groups[0].albert_layers[0].attention.value,
           "deberta-v2": lambda: base.encoder.layer[l].attention.self.value_proj,
           "mpnet": lambda: base.encoder.layer[l].attention.attn.v}.get(
        family, lambda: base.encoder.layer[l].attention.self.value)()
    return x, lin(x).view(B, T, H, -1).transpose(1, 2)


def _direct(model, tokenizer, texts):
    """hidden states, attentions, per-head and multi-head outputs the plain way."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    enc = adapters.model_inputs(model, dict(enc))
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True, output_attentions=True)
        mask = enc["attention_mask"].bool()
        projections = adapters.output_projections(model)
        heads, multi = [], []
        for l, a in enumerate(out.attentions):
            _, v = _values(model, l, out.hidden_states[l])
            o = a @ v                                                       # (B, H, T, d_h)
            heads.append(o)
            proj = projections[0 if len(projections) == 1 else l]
            multi.append(proj(o.transpose(1, 2).reshape(*o.shape[:1], o.shape[2], -1)))
    return mask, out, heads, multi


def _close(got, want, name, atol):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}\ngot  {got}\nwant {want}"


@pytest.mark.parametrize("family", list(EXPECT))
def test_trace_matches_transformers(family_dirs, family):
    model, tokenizer = _load(family_dirs, family)
    assert model.config.model_type == family and adapters.adapter_for(model).family == family
    L, H = adapters.num_layers(model), model.config.num_attention_heads
    if family == "albert":
        assert L == 3 and len(adapters.output_projections(model)) == 1
    # hooks: one batch against A V and the output projection of it
    (batch,) = list(iter_batches(model, tokenizer, TEXTS[:BATCH], batch_size=BATCH))
    mask, out, heads, multi = _direct(model, tokenizer, TEXTS[:BATCH])
    assert len(out.attentions) == len(batch.head_outputs) == len(batch.multihead_outputs) == L
    assert len(out.hidden_states) == L + 1 and batch.mask.equal(mask)
    m = mask[:, None, :, None]
    for l in range(L):
        got = batch.head_outputs[l].transpose(1, 2)                          # (B, H, T, d_h)
        assert got.shape == heads[l].shape
        _close(got * m, heads[l] * m, f"{family} head_outputs[{l}]", 1e-5)
        _close(batch.multihead_outputs[l] * mask[..., None], multi[l] * mask[..., None],
               f"{family} multihead_outputs[{l}]", 1e-5)
    assert batch.cls[:, 0].all() and int(batch.cls.sum()) == BATCH and int(batch.sep.sum()) == BATCH
    # corpus means against the reference over the same batches
    r = trace(model, tokenizer, TEXTS, batch_size=BATCH, metrics=("cone", "entropy"))
    want = {k: torch.zeros(L, dtype=torch.float64) for k in ("in", "out", "mh")}
    want_heads = torch.zeros(L, H, dtype=torch.float64)
    ent = torch.zeros(L, H, dtype=torch.float64)
    rows = 0
    for start in range(0, len(TEXTS), BATCH):
        mask, out, heads, multi = _direct(model, tokenizer, TEXTS[start:start + BATCH])
        rows += int(mask.sum())
        hs = [h.double() for h in out.hidden_states]
        for l in range(L):
            want["in"][l] += reference.cone_index(hs[l], mask)["normalized"].sum()
            want["out"][l] += reference.cone_index(hs[l + 1], mask)["normalized"].sum()
            want["mh"][l] += reference.cone_index(multi[l].double(), mask)["normalized"].sum()
            for h in range(H):
                want_heads[l, h] += reference.cone_index(heads[l][:, h].double(), mask)["normalized"].sum()
            row = reference.attention_entropy(out.attentions[l].double(), mask)["row_entropy"]
            ent[l] += torch.nan_to_num(row).sum(dim=(0, 2))
    n = len(TEXTS)
    _close(r.cone_layer_input, want["in"] / n, f"{family} cone layer_input", 2e-5)
    _close(r.cone_layer_output, want["out"] / n, f"{family} cone layer_output", 2e-5)
    _close(r.cone_multihead_output, want["mh"] / n, f"{family} cone multihead_output", 2e-5)
    _close(r.cone_head_output, want_heads / n, f"{family} cone head_output", 2e-5)
    _close(r.entropy, ent / rows, f"{family} entropy", 2e-5)


@pytest.mark.parametrize("family", list(EXPECT))
def test_cli_text_and_vocab(family_dirs, family, tmp_path):
    has_pos, first, has_tt = EXPECT[family]
    model, _ = _load(family_dirs, family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "text"), "--model", family_dirs[family],
                 "--no-progress"]) == 0
    rep = json.loads((tmp_path / "text" / "report.json").read_text())
    L = adapters.num_layers(model)
    assert (rep["layers"], rep["n_texts"]) == (L, len(TEXTS))
    assert all(math.isfinite(v) for v in rep["cone_index"]["layer_output"])
    assert len(rep["js_distance"]) == L * model.config.num_attention_heads

    assert main(["vocab", "--model", family_dirs[family], "--out", str(tmp_path / "vocab")]) == 0
    rep = json.loads((tmp_path / "vocab" / "report.json").read_text())
    html = (tmp_path / "vocab" / "report.html").read_text()
    pos = rep["positional"]
    if has_pos:
        assert "absent" not in pos and pos["first_position_id"] == first
        # rows from the first real position id on, row p = the p-th token's position
        w = model.base_model.embeddings.position_embeddings.weight.detach().double()[first:]
        assert pos["positions"] == MAXP
        _close(pos["norms"], w.norm(dim=1), f"{family} position norms", 1e-5)
        assert rep["token_position"]["count"] == rep["tokens_analysed"] * MAXP
    else:
        assert pos == rep["token_position"] and family in pos["absent"]
        assert ("rotary" if family == "modernbert" else "relative") in pos["absent"]
        assert "absent: " + pos["absent"] in html
    tt = rep["token_type"]
    if has_tt:
        assert "absent" not in tt and tt["types"] == model.config.type_vocab_size
    else:
        assert tt == {"absent": f"{family} has no token-type embeddings"}


def test_unknown_family_and_sdpa(family_dirs):
    with pytest.raises(ValueError, match=r"'gpt2' is not a supported.*BERT \(bert\).*ModernBERT.*ADAPTERS"):
        adapters.adapter_for(types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2")))
    from transformers import AutoModel

    model, tokenizer = _load(family_dirs, "distilbert")
    enc = {"input_ids": torch.ones(1, 3, dtype=torch.long),
           "token_type_ids": torch.zeros(1, 3, dtype=torch.long)}
    assert set(adapters.model_inputs(model, enc)) == {"input_ids"}     # DistilBERT takes no token types
    sdpa = AutoModel.from_pretrained(family_dirs["distilbert"], attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match=r'DistilBERT was loaded with .*sdpa.*attn_implementation="eager"'):
        trace(sdpa, tokenizer, TEXTS[:2])


def test_albert_with_layers_inside_its_groups_takes_every_option(tmp_path):
    """ALBERT with inner_group_num = 2 applies num_hidden_layers x 2 attention blocks: every
    analysis sizes itself by them (adapters.num_layers). The extras, kept [CLS] rows, class maps,
    syntax and coref had read num_hidden_layers (IndexError, a broadcast error, a reshape error)."""
    from transformers import AlbertConfig, AutoModel

    tok, V = _tokenizer(BERT_SPECIALS)
    tok.save_pretrained(str(tmp_path / "m"))
    torch.manual_seed(0)
    config = AlbertConfig(**{**COMMON, "vocab_size": V, "num_hidden_layers": 2}, embedding_size=16,
                          num_hidden_groups=1, inner_group_num=2, pad_token_id=0)
    AutoModel.from_config(config, attn_implementation="eager").save_pretrained(str(tmp_path / "m"))
    model, _ = load_model(str(tmp_path / "m"))
    L = adapters.num_layers(model)
    assert L == 4
    corpus, labels = tmp_path / "c.txt", tmp_path / "l.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    labels.write_text("x\ny\n" * 3, encoding="utf-8")
    model_dir = ["--model", str(tmp_path / "m"), "--quiet"]
    assert main(["text", str(corpus), "--out", str(tmp_path / "t"), *model_dir, "--heads", "--clark-js",
                 "--gaussianity", "--head-maps", "1", "--similar", "topk:2", "--labels", str(labels),
                 "--class-maps", "5", "--trajectories", "1"]) == 0
    rep = json.loads((tmp_path / "t" / "report.json").read_text())
    assert rep["layers"] == L and rep["kept"]["cls"]["shape"] == [len(TEXTS), L + 1, 32]
    assert len(rep["attention_heads"]["clark_entropy"]) == L
    assert [g["depth"] for g in rep["gaussianity"]] == list(range(L + 1))
    assert len(rep["class_maps"]["entropies"]["y"]["value_entropy"]) == L
    from embgeom.analysis.syntax import treebank

    assert main(["syntax", treebank.sample_path(), "--out", str(tmp_path / "s"), *model_dir]) == 0
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["layers"] == L and len(rep["syntax"]["all_accuracy"]) == L
    from embgeom.analysis.syntax import mentions

    assert main(["coref", mentions.sample_path(), "--out", str(tmp_path / "k"), *model_dir]) == 0
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    assert rep["layers"] == L and len(rep["coref"]["all_accuracy"]) == L
