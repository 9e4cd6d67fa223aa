"""Figures (seaborn on matplotlib's object API, so no global backend is touched).

Each function draws one figure and writes ``<stem>.png`` and ``<stem>.pdf``; it returns the paths.
Missing numbers stay missing: a heatmap cell without a value is hatched and labelled, never 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ldnbench.fileio import atomic_write

_THEME = {"axes.grid": True, "grid.alpha": 0.3, "font.size": 10}


def _save(fig: Figure, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        atomic_write(path, lambda f, e=ext: fig.savefig(f, format=e, dpi=150, bbox_inches="tight"))
        paths.append(path)
    return paths


def _figure(w: float = 6.4, h: float = 4.4) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h))
    with sns.axes_style("whitegrid"):
        ax = fig.add_subplot()
    return fig, ax


def iou_vs_tflop(rows: pd.DataFrame, stem: str | Path, title: str | None = None) -> list[Path]:
    """Fig. 4 style: mIoU (%) against TFLOP@1MPx (= paper's multiply-adds / 1000) per method.

    ``rows`` has ``miou_pct``, ``gmac_1mpx``, ``source`` (ours/published), ``split`` and a label
    in ``method`` (+ ``down_up``); rows lacking either number are left out.
    """
    df = rows.dropna(subset=["miou_pct", "gmac_1mpx"]).copy()
    if df.empty:
        raise ValueError("no row has both mIoU and GMAC@1MPx")
    df["TFLOP@1MPx"] = df["gmac_1mpx"].astype(float) / 1000.0
    df["mIoU (%)"] = df["miou_pct"].astype(float)
    df["who"] = df["source"].fillna("ours").astype(str) + " · " + df["split"].fillna("?").astype(str)
    df["label"] = df["method"].fillna(df.get("model")).astype(str) + df["down_up"].fillna("").map(
        lambda s: f" {s}" if s else "")
    if "train_dataset" in df:  # the user's runs of one model differ by training set
        ours = df["source"] != "published"
        df.loc[ours, "label"] += df.loc[ours, "train_dataset"].map(lambda t: f" [{t}]" if isinstance(t, str) else "")
    fig, ax = _figure()
    sns.scatterplot(data=df, x="TFLOP@1MPx", y="mIoU (%)", hue="who", style="who", s=60, ax=ax)
    # one label per method (at its best point) keeps val/test pairs readable
    for _, r in df.sort_values("mIoU (%)", ascending=False).drop_duplicates("label").iterrows():
        ax.annotate(r["label"], (r["TFLOP@1MPx"], r["mIoU (%)"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if df["TFLOP@1MPx"].max() / max(df["TFLOP@1MPx"].min(), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_title(title or "Accuracy vs forward-pass complexity")
    ax.legend(fontsize=8, title=None)
    return _save(fig, stem)


def cross_heatmap(matrix: pd.DataFrame, stem: str | Path, title: str | None = None) -> list[Path]:
    """Rows: training set, columns: evaluation set, values mIoU (%); NaN cells drawn as missing."""
    values = matrix.astype(float)
    fig, ax = _figure(1.6 + 1.3 * values.shape[1], 1.2 + 0.7 * values.shape[0])
    ax.grid(False)
    annot = values.map(lambda v: "missing" if pd.isna(v) else f"{v:.1f}")
    sns.heatmap(values, annot=annot.values, fmt="", cmap="viridis", vmin=0, vmax=100, ax=ax,
                cbar_kws={"label": "mIoU (%)"}, linewidths=0.5, linecolor="white",
                annot_kws={"fontsize": 9})
    for i, j in zip(*np.where(values.isna().values)):
        ax.add_patch(Rectangle((j, i), 1, 1, fill=False, hatch="//", edgecolor="0.6", lw=0))
        ax.text(j + 0.5, i + 0.5, "missing", ha="center", va="center", fontsize=9, color="0.3")
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained on")
    ax.set_title(title or "Cross-dataset mIoU (%)")
    return _save(fig, stem)


def pruning_curves(curves: pd.DataFrame, stem: str | Path, title: str | None = None) -> list[Path]:
    """Fig. 5 left: mIoU (%) against the pruned fraction, one line per model (``model`` column)."""
    df = curves.copy()
    df["mIoU (%)"] = df["miou_pct"].astype(float)
    df["pruned fraction"] = df["fraction"].astype(float)
    fig, ax = _figure()
    sns.lineplot(data=df, x="pruned fraction", y="mIoU (%)", hue="model", style="model", markers=True, ax=ax)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Pruning the backbone tail (no retraining)")
    return _save(fig, stem)


def pruning_class_curves(curves: pd.DataFrame, classes: list[str], stem: str | Path,
                         title: str | None = None) -> list[Path]:
    """Fig. 5 right: per-class IoU (%) against the pruned fraction for one model.

    ``curves`` has a ``fraction`` column and one ``iou_<class>`` column (fraction 0–1) per class.
    """
    long = []
    for c in classes:
        col = f"iou_{c}"
        if col in curves:
            long.append(pd.DataFrame({"pruned fraction": curves["fraction"].astype(float),
                                      "IoU (%)": 100 * curves[col].astype(float), "class": c}))
    if not long:
        raise ValueError("no per-class IoU columns to draw")
    df = pd.concat(long, ignore_index=True)
    fig, ax = _figure(7.2, 4.8)
    palette = sns.color_palette("tab20", n_colors=len(long))
    sns.lineplot(data=df, x="pruned fraction", y="IoU (%)", hue="class", ax=ax, palette=palette)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(title or "Per-class IoU after pruning")
    return _save(fig, stem)


def memory_bars(rows: pd.DataFrame, stem: str | Path, title: str | None = None) -> list[Path]:
    """Peak training memory (MB) per checkpointing policy (``policy``, ``peak_mb``, ``model``)."""
    df = rows.dropna(subset=["peak_mb"]).copy()
    if df.empty:
        raise ValueError("no memory measurement to draw")
    df["peak MB"] = df["peak_mb"].astype(float)
    fig, ax = _figure(7.2, 0.8 + 0.45 * df["policy"].nunique() * max(1, df["model"].nunique()))
    sns.barplot(data=df, y="policy", x="peak MB", hue="model", ax=ax, orient="h", errorbar=None)
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.0f", fontsize=7, padding=2)
    ax.set_title(title or "Training memory per checkpointing policy")
    return _save(fig, stem)


def _newest(records: list[dict], kind: str) -> list[dict]:
    return sorted((r for r in records if r.get("kind") == kind), key=lambda r: str(r.get("timestamp") or ""))


def prune_curves_frame(record: dict) -> pd.DataFrame:
    """The ``curve`` of a ``prune`` record as a frame: fraction, miou_pct, iou_<class> (0–1)."""
    rows = []
    for p in record.get("curve") or []:
        row = {"fraction": p["fraction"], "miou_pct": None if p.get("miou") is None else 100 * p["miou"]}
        row.update({f"iou_{k}": (np.nan if v is None else v) for k, v in (p.get("class_iou") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def prune_label(record: dict) -> str:
    """``model (trained on X)`` for a ``prune`` record, or just the model name."""
    train = record.get("train_dataset")
    return f"{record.get('model')} (trained on {train})" if train else str(record.get("model"))


def cross_matrix_frame(record: dict) -> pd.DataFrame:
    """The mIoU (%) matrix of a ``cross`` record (rows: training sets, columns: evaluation sets)."""
    m = record["matrix"]
    return pd.DataFrame(m["miou_pct"], index=m["train"], columns=m["eval"], dtype=float)


def figures_from_records(records: list[dict], tables: dict[str, pd.DataFrame], out: str | Path) -> list[Path]:
    """Every figure the records support, written into ``out`` next to the tables."""
    out = Path(out)
    files: list[Path] = []
    for name, df in tables.items():
        pts = df.dropna(subset=["miou_pct", "gmac_1mpx"])
        if not (pts["source"] == "ours").any():
            continue  # a figure of published numbers only says nothing about the user's runs
        fig4 = pts["table"].isin(["3", "4"])
        if fig4.any():  # Fig. 4 plots Tables 3/4; other published tables use other resolutions
            pts = pts[fig4 | (pts["source"] == "ours")]
        files += iou_vs_tflop(pts, out / f"{name}_iou_vs_tflop", title=f"{name}: accuracy vs complexity")
    cross = _newest(records, "cross")
    if cross:
        files += cross_heatmap(cross_matrix_frame(cross[-1]), out / "cross_matrix")
    prune = _newest(records, "prune")
    if prune:
        latest = {(r.get("model"), r.get("train_dataset"), r.get("dataset")): r for r in prune}
        several_sets = len({k[2] for k in latest}) > 1
        curves = []
        for (model, train, dataset), r in latest.items():
            c = prune_curves_frame(r)
            if not c.empty:
                curves.append(c.assign(model=prune_label(r) + (f", on {dataset}" if several_sets else "")))
        if curves:
            files += pruning_curves(pd.concat(curves, ignore_index=True)[["fraction", "miou_pct", "model"]],
                                    out / "pruning_miou")
            ldn = [r for r in prune if str(r.get("model", "")).startswith("ldn")] or prune
            c = prune_curves_frame(ldn[-1])
            classes = ldn[-1].get("classes") or [k[4:] for k in c.columns if k.startswith("iou_")]
            files += pruning_class_curves(c, classes, out / "pruning_classes",
                                          title=f"Per-class IoU after pruning ({ldn[-1].get('model')})")
    mem_rows = [row for r in _newest(records, "bench-memory") for row in (r.get("rows") or [])
                if isinstance(row, dict)]
    if mem_rows:
        mem = pd.DataFrame(mem_rows)
        if {"policy", "peak_mb", "model"} <= set(mem.columns) and mem["peak_mb"].notna().any():
            mem = mem.drop_duplicates(["model", "policy"], keep="last")
            files += memory_bars(mem, out / "checkpointing_memory")
    return files
