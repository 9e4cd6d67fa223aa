"""Training curves of a run folder: ``history.csv`` and ``curves.png`` from the trainer's per-epoch history."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ldnbench.fileio import atomic_write

HISTORY_COLUMNS = ["epoch", "iterations", "loss", "loss_main", "loss_aux", "lr", "time_s", "images_per_s", "val_miou"]


def history_frame(history: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished epoch (``HISTORY_COLUMNS``); ``val_miou`` (0–1) where that epoch validated."""
    rows = [{**{k: h.get(k) for k in HISTORY_COLUMNS[:-1]},
             "val_miou": (h.get("val") or {}).get("miou")} for h in history]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def training_curves(history: Sequence[dict[str, Any]], final: dict[str, Any] | None, path: str | Path,
                    title: str | None = None) -> Path:
    """Three panels over epochs: loss (total, main, aux), learning rate, validation mIoU (the final
    validation, after the BatchNorm recomputation, as a star). Written atomically as PNG."""
    import seaborn as sns
    from matplotlib.figure import Figure

    df = history_frame(history)
    fig = Figure(figsize=(11, 3.2))
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(1, 3)
    loss, lr, val = axes
    for col, label in (("loss", "loss"), ("loss_main", "main"), ("loss_aux", "aux")):
        if df[col].notna().any():
            loss.plot(df["epoch"], df[col].astype(float), marker="." if len(df) < 30 else None, label=label)
    loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    if len(df):
        loss.legend(fontsize=8)
    lr.plot(df["epoch"], df["lr"].astype(float), color="tab:green")
    lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (head)")
    v = df.dropna(subset=["val_miou"])
    val.plot(v["epoch"], 100 * v["val_miou"].astype(float), marker="o", label="during training")
    if final and final.get("miou") is not None:
        last = int(df["epoch"].max()) if len(df) else 0
        val.plot([last], [100 * final["miou"]], marker="*", markersize=12, linestyle="", color="tab:red",
                 label=f"final {100 * final['miou']:.1f}%")
    val.set(xlabel="epoch", ylabel="mIoU (%)", title="validation mIoU")
    if len(v) or (final and final.get("miou") is not None):
        val.legend(fontsize=8)
    else:
        val.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=val.transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
