"""PNG plots for reports (matplotlib, headless)."""
from __future__ import annotations

import os


def save_figure(fig, out_dir: str, name: str) -> str:
    """Save a matplotlib figure as out_dir/name.png, close it, return the path."""
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def new_figure(width=7.0, height=4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))
