"""The zoo table: every registered model's size and cost at 1×3×1024×1024 beside the paper's numbers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pandas as pd

from ldnbench.errors import UserError
from ldnbench.models.complexity import Complexity, model_complexity
from ldnbench.models.peers import PEERS
from ldnbench.models.registry import MODELS, get_spec, resolve_model_name

FORMATS = ("table", "csv", "latex", "markdown", "json")
JSON_KEYS = ("model", "params_m", "gmac", "gflop", "paper_params_m", "paper_gmac")


@dataclass
class ZooRow:
    model: str
    params_m: float
    gmac: float
    gflop: float
    paper_params_m: float | None
    paper_gmac: float | None
    params_dev: float | None  # relative deviation from the paper, e.g. 0.006 = +0.6 %
    gmac_dev: float | None
    paper_table: str | None
    note: str


def _dev(ours: float, paper: float | None) -> float | None:
    return None if paper is None else ours / paper - 1


def zoo_row(name: str, height: int = 1024, width: int = 1024, imagenet_compatible: bool = False) -> ZooRow:
    key = resolve_model_name(name)
    if key in PEERS:  # torchvision peers: one layout, no paper row (21 classes as their COCO/VOC weights)
        c = model_complexity(key, height, width, num_classes=21)
        return ZooRow(key, c.params_m, c.gmac, c.gflop, None, None, None, None, None, PEERS[key].description)
    spec = get_spec(key)
    c: Complexity = model_complexity(spec.name, height, width, imagenet_compatible=imagenet_compatible)
    # The paper's numbers are for 1 MPx and the paper layout; other sizes/layouts get no comparison.
    paper = (height, width) == (1024, 1024) and not imagenet_compatible
    pp = spec.paper_params_m if paper else None
    pg = spec.paper_gmac if paper else None
    return ZooRow(spec.name, c.params_m, c.gmac, c.gflop, pp, pg, _dev(c.params_m, pp), _dev(c.gmac, pg),
                  spec.paper_table, spec.note if paper else "")


def zoo_rows(imagenet_compatible: bool = False, names: list[str] | None = None, peers: bool = False) -> list[ZooRow]:
    """One row per registered model (or per name in ``names``) at 1×3×1024×1024; ``peers`` appends the
    torchvision peers (``tv-*``)."""
    names = list(names or MODELS) + (list(PEERS) if peers else [])
    return [zoo_row(n, imagenet_compatible=imagenet_compatible) for n in names]


def _frame(rows: list[ZooRow]) -> pd.DataFrame:
    df = pd.DataFrame([asdict(r) for r in rows])
    out = pd.DataFrame({
        "model": df["model"],
        "params (M)": df["params_m"].round(3),
        "GMAC": df["gmac"].round(2),
        "GFLOP": df["gflop"].round(2),
        "paper params (M)": df["paper_params_m"],
        "paper GMAC": df["paper_gmac"],
        "Δ params": df["params_dev"].map(lambda v: "" if pd.isna(v) else f"{v:+.1%}"),
        "Δ GMAC": df["gmac_dev"].map(lambda v: "" if pd.isna(v) else f"{v:+.1%}"),
        "paper table": df["paper_table"].fillna(""),
    })
    return out


def format_rows(rows: list[ZooRow], fmt: str) -> str:
    """Render rows as ``table`` (plain text), ``csv``, ``latex``, ``markdown`` or ``json``."""
    if fmt == "json":
        return json.dumps([{k: getattr(r, k) for k in JSON_KEYS} for r in rows], indent=2)
    df = _frame(rows)
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    digits = {"params (M)": 3, "GMAC": 2, "GFLOP": 2, "paper params (M)": 1, "paper GMAC": 1}
    shown = df.copy()
    for col, d in digits.items():  # fixed decimals, blank where the paper has no row
        shown[col] = df[col].map(lambda v, d=d: "" if pd.isna(v) else f"{v:.{d}f}")
    if fmt == "table":
        return shown.to_string(index=False)
    if fmt == "markdown":
        return shown.to_markdown(index=False, disable_numparse=True, colalign=["left"] + ["right"] * 7 + ["left"])
    if fmt == "latex":
        return shown.to_latex(index=False, escape=True, column_format="l" + "r" * 7 + "l")
    raise UserError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}", 2)


def format_complexity(c: Complexity) -> str:
    """Human-readable report of one count (``ldnbench flops``)."""
    pad = f" (the model pads it to {c.padded[0]}x{c.padded[1]})" if c.padded != (c.height, c.width) else ""
    lines = [f"model: {c.model}", f"input: 1x3x{c.height}x{c.width}{pad}", f"params: {c.params_m:.3f} M ({c.params})",
             f"GMAC: {c.gmac:.3f}", f"GFLOP: {c.gflop:.3f}", "counted ops (GMAC):"]
    lines += [f"  {op}: {v:.3f}" for op, v in sorted(c.counted_ops.items())]
    lines.append("ran but not counted: " + (", ".join(c.uncounted_ops) or "-"))
    return "\n".join(lines)
