"""Saving plots: one place, atomic (temporary file, then rename), so an interrupted run never leaves half a PNG."""

from __future__ import annotations

import os
from pathlib import Path


def save_png(fig, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write a matplotlib figure to ``path`` atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path
