"""PNG figures: retrieval accuracy heatmaps (depth x length) and perplexity by token position."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _draw_heatmap(ax, grid: dict, title: str, ylabel: bool = True):
    acc = grid["accuracy"]  # rows: depths, columns: lengths
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(grid["lengths"])), [_fmt_len(L) for L in grid["lengths"]])
    ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
    ax.set_xlabel("context length (tokens)")
    if ylabel:
        ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8,
                    color="black" if 0.25 < v < 0.85 else "white")
    return im


def heatmaps(panels: Sequence[tuple[str, dict]], path: str | Path, suptitle: str = "") -> Path:
    """One accuracy heatmap per (title, grid) side by side; grid = {"lengths", "depths", "accuracy"}."""
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(1.4 + 3.6 * n, 3.6), squeeze=False)
    im = None
    for k, (ax, (title, grid)) in enumerate(zip(axes[0], panels)):
        im = _draw_heatmap(ax, grid, title, ylabel=k == 0)
    fig.colorbar(im, ax=list(axes[0]), label="accuracy", fraction=0.046 / n, pad=0.02)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def ppl_by_position(curves: Sequence[tuple[str, dict]], path: str | Path, title: str = "") -> Path:
    """Mean NLL per position bucket, one line per (label, perplexity result)."""
    return ppl_panels([(title or "Perplexity by position", curves)], path)


def ppl_panels(panels: Sequence[tuple[str, Sequence[tuple[str, dict]]]], path: str | Path) -> Path:
    """ppl_by_position side by side, one panel per (title, curves): several corpora in one figure."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (title, curves) in zip(axes[0], panels):
        for label, res in curves:
            bs = [b for b in res["buckets"] if b["tokens"]]
            mids = [math.sqrt(b["start"] * b["end"]) if res.get("bucket_spec", "log") == "log"
                    else (b["start"] + b["end"]) / 2 for b in bs]
            ax.plot(mids, [b["nll"] for b in bs], marker="o",
                    label=f"{label} (overall ppl {res['overall']['ppl']:.3g})")
        if curves and curves[0][1].get("bucket_spec", "log") == "log":
            ax.set_xscale("log", base=2)
        ax.set_xlabel("token position in the document")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("mean NLL (nats/token)")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
