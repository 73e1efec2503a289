"""Types of the public API's arguments, for annotations: what type checkers see of what the
functions accept at run time (embgeom ships a py.typed marker; tests/test_typing.py checks a
user's script with mypy, and typing.get_type_hints on every public name). A score or threshold
may be a Python float, a numpy scalar or a 0-d tensor (a value `search` returned); a count an
int or a numpy integer; a path a str or an os.PathLike."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence, SupportsFloat, Union

from .progress import Progress

if TYPE_CHECKING:
    import numpy as np
    import torch
    from pandas import DataFrame
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    Count = Union[int, np.integer]
    DeviceArg = Union[str, torch.device, None]
else:  # the libraries are not imported for annotations at run time (`embgeom --help` answers
    # before torch loads; pandas and transformers are optional): what get_type_hints then gives
    DataFrame = PreTrainedModel = PreTrainedTokenizerBase = Any
    Count = Union[int, Any]
    DeviceArg = Union[str, Any, None]

Scalar = SupportsFloat
PathArg = Union[str, os.PathLike]
ProgressArg = Union[bool, Progress, None]
Interval = Sequence[SupportsFloat]

__all__ = ["Scalar", "Count", "PathArg", "DeviceArg", "ProgressArg", "Interval", "DataFrame", "PreTrainedModel",
           "PreTrainedTokenizerBase"]
