"""Backends: one module per `backend=` name (cpp, torch, triton, cuda; `reference` lives in
float64.py) and the
registry that dispatches to them (see registry.py for the order and the reasons protocol)."""
from .registry import ALL_BACKENDS, AUTO_ORDER, pick, usable_report

__all__ = ["ALL_BACKENDS", "AUTO_ORDER", "pick", "usable_report"]
