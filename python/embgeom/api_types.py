"""Types of the public API's arguments, for annotations: what type checkers see of what the
functions accept at run time (embgeom ships a py.typed marker; tests/test_typing.py checks a
user's script with mypy). A score or threshold may be a Python float, a numpy scalar or a
0-d tensor (a value `search` returned); a path a str or an os.PathLike."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence, SupportsFloat, SupportsIndex, Union

if TYPE_CHECKING:  # (not imported at run time: `embgeom --help` answers before torch loads)
    import torch

    from .progress import Progress

Scalar = SupportsFloat
Count = SupportsIndex
PathArg = Union[str, "os.PathLike[str]"]
DeviceArg = Union[str, "torch.device", None]
ProgressArg = Union[bool, "Progress", None]
Interval = Sequence[SupportsFloat]

__all__ = ["Scalar", "Count", "PathArg", "DeviceArg", "ProgressArg", "Interval"]
