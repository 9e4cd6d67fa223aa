"""The paper's published numbers (Tables 1–9), shipped as CSV under ``leaderboards/paper/``.

Every table uses the same columns (:data:`PAPER_COLUMNS`). Accuracies are percent exactly as
printed (``*_pct``); ``gmac_1mpx`` is what the paper calls GFLOP at 1 MPx, which counts
multiply-adds (Tables 3 and 4 print TFLOP; they are stored ×1000). ``n/a`` cells are omitted.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ldnbench.errors import UserError

PAPER_COLUMNS = [
    "table", "method", "backbone", "down_up", "variant", "train_dataset", "dataset", "split",
    "resolution", "pretrained", "multiscale", "miou_pct", "iiou_pct", "cat_iou_pct", "params_m",
    "gmac_1mpx", "ms", "notes",
]

_DTYPES = {
    "table": "int64", "method": "string", "backbone": "string", "down_up": "string", "variant": "string",
    "train_dataset": "string", "dataset": "string", "split": "string", "resolution": "string",
    "pretrained": "boolean", "multiscale": "boolean", "miou_pct": "float64", "iiou_pct": "float64",
    "cat_iou_pct": "float64", "params_m": "float64", "gmac_1mpx": "float64", "ms": "float64", "notes": "string",
}


def default_paper_dir() -> Path:
    """``leaderboards/paper`` of the source checkout this package is installed from."""
    return Path(__file__).resolve().parents[2] / "leaderboards" / "paper"


def load_paper_tables(directory: str | Path | None = None, tables: list[int] | None = None) -> pd.DataFrame:
    """All published rows (optionally only ``tables``) as one DataFrame with :data:`PAPER_COLUMNS`."""
    directory = Path(directory) if directory is not None else default_paper_dir()
    files = sorted(directory.glob("table*.csv"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else 0)
    if not files:
        raise UserError(f"no published tables (table*.csv) in {directory}; pass the leaderboards/paper folder "
                        "of an ldnbench checkout, or export with --no-paper")
    frames = []
    for f in files:
        try:
            df = pd.read_csv(f, dtype=str, keep_default_na=False, encoding="utf-8")
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read published table {f}: {e}") from None
        missing = [c for c in PAPER_COLUMNS if c not in df.columns]
        if missing:
            raise UserError(f"published table {f} lacks columns {', '.join(missing)}; restore it from the repository")
        frames.append(df[PAPER_COLUMNS])
    df = pd.concat(frames, ignore_index=True).replace("", pd.NA)
    for col, dtype in _DTYPES.items():
        if dtype == "boolean":
            df[col] = df[col].map({"true": True, "false": False}).astype("boolean")
        elif dtype == "string":
            df[col] = df[col].astype("string")
        else:
            df[col] = pd.to_numeric(df[col]).astype(dtype)
    if tables is not None:
        df = df[df["table"].isin(tables)].reset_index(drop=True)
    return df
