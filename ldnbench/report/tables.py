"""Leaderboards: result records → paper-style tables (CSV with provenance, LaTeX, Markdown).

:func:`collect` turns the records under ``results/`` into one row per measured model (accuracy
records) and reports unusable files; :func:`export` writes one table per group (dataset by
default), with the paper's published rows beside the user's own, marked ``published``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write_text
from ldnbench.report.records import RECORD_SCHEMA, BadRecord, read_records

#: Columns of the CSV leaderboard (percent for accuracies; provenance last).
ROW_COLUMNS = [
    "source", "method", "backbone", "down_up", "variant", "model", "train_dataset", "dataset", "split",
    "miou_pct", "iiou_pct", "cat_iou_pct", "params_m", "gmac_1mpx", "ms",
    "protocol", "precision", "kind", "run_id", "commit", "date", "table", "notes",
]
#: ``protocol`` of a full-resolution evaluation (no --resize); resized ones read ``w1024@original``.
FULL_RESOLUTION = "full"
NUMERIC = ["miou_pct", "iiou_pct", "cat_iou_pct", "params_m", "gmac_1mpx", "ms"]
#: Headers of the tables shown to people (LaTeX / Markdown), in order.
DISPLAY = {
    "source": "Source", "method": "Method", "backbone": "Backbone", "down_up": "d→u", "variant": "Variant",
    "train_dataset": "Train", "split": "Split", "miou_pct": "mIoU", "iiou_pct": "iIoU",
    "cat_iou_pct": "cat. IoU", "params_m": "Params (M)", "gmac_1mpx": "GMAC@1MPx", "ms": "ms",
    "protocol": "Protocol", "precision": "Precision",
}
DISPLAY_KEY = {v: k for k, v in DISPLAY.items()}
#: Record kinds that are not accuracy rows (their numbers feed other tables and figures).
NON_ACCURACY_KINDS = {"prune", "cross", "bench-memory", "bench-speed", "flops"}
FORMATS = ("csv", "latex", "markdown")
GROUP_BY = ("dataset", "model", "none")


@dataclass
class Collected:
    """What :func:`collect` found: accuracy rows, every good record, and the unusable files."""

    rows: pd.DataFrame
    records: list[dict[str, Any]] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)


@dataclass
class ExportResult:
    files: list[Path]
    bad: list[BadRecord]
    tables: dict[str, pd.DataFrame]


_MODEL_RE = re.compile(r"^(?P<fam>[a-z]+?)-?(?P<depth>\d+)(?:-(?P<d>\d+)to(?P<u>\d+))?(?:-(?P<rest>.+))?$")
_BACKBONE = {"ldn": "dn", "lddn": "dn", "dn": "dn", "ddn": "dn", "lrn": "rn", "rn": "rn", "resnet": "rn"}


def describe_model(name: str | None) -> dict[str, str | None]:
    """Method, backbone, d→u and variant of a canonical model name such as ``ldn121-64to4-dws``."""
    out: dict[str, str | None] = {"method": name, "backbone": None, "down_up": None, "variant": None}
    m = _MODEL_RE.match(name or "")
    if not m:
        return out
    fam, depth = m["fam"], m["depth"]
    out["method"] = f"{fam.upper()}{depth}"
    out["backbone"] = f"{_BACKBONE.get(fam, fam)}{depth}"
    if m["d"]:
        out["down_up"] = f"{m['d']}→{m['u']}"
    out["variant"] = m["rest"]
    return out


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


def _find(rec: dict, keys: Iterable[str]) -> float | None:
    """First numeric value of ``keys`` at the record's top level, in its metrics or its model stats."""
    places = [rec, rec.get("metrics") or {}]
    for sub in ("model_stats", "complexity", "model_info"):
        if isinstance(rec.get(sub), dict):
            places.append(rec[sub])
    for place in places:
        for k in keys:
            v = _number(place.get(k)) if isinstance(place, dict) else None
            if v is not None:
                return v
    return None


def _params_m(rec: dict) -> float | None:
    v = _find(rec, ("params_m",))
    if v is not None:
        return v
    v = _find(rec, ("params", "num_params", "parameters"))
    return v / 1e6 if v is not None else None


def _gmac(rec: dict) -> float | None:
    v = _find(rec, ("gmac_1mpx", "gmac", "gmacs"))
    if v is not None:
        return v
    v = _find(rec, ("macs_1mpx", "macs"))
    return v / 1e9 if v is not None else None


def _ms(rec: dict) -> float | None:
    return _find(rec, ("ms", "ms_per_image", "latency_ms_median", "latency_ms", "mean_ms"))


def _pct(metrics: dict, key: str) -> float | None:
    v = _number(metrics.get(key))
    return None if v is None else 100.0 * v


def _problem(rec: dict) -> str | None:
    """Why an ldnbench-looking record can't be used, or None."""
    if not isinstance(rec.get("kind"), str) or not isinstance(rec.get("run_id"), str):
        return "'kind' and 'run_id' must be strings"
    schema = rec.get("schema", RECORD_SCHEMA)
    if not isinstance(schema, int) or schema > RECORD_SCHEMA:
        return f"record schema {schema!r} is newer than this ldnbench understands ({RECORD_SCHEMA}); upgrade ldnbench"
    if not isinstance(rec.get("metrics", {}), dict):
        return "'metrics' is not a JSON object"
    miou = (rec.get("metrics") or {}).get("miou")
    if miou is not None and (_number(miou) is None or not 0.0 <= miou <= 1.0):
        return f"metrics.miou = {miou!r} is not a fraction in 0–1"
    if miou is not None and not rec.get("model"):
        return "an accuracy record without 'model'"
    return None


def _is_synthetic(root: Any) -> bool:
    from ldnbench.data.synthetic import MARKER

    return isinstance(root, str) and bool(root) and (Path(root) / MARKER).is_file()


def _model_key(rec: dict) -> tuple[str, str]:
    """A model is its name plus its build options (a narrow ``ldn121-64to4`` is another model)."""
    opts = rec.get("model_options") if isinstance(rec.get("model_options"), dict) else {}
    return str(rec.get("model") or ""), json.dumps(opts, sort_keys=True, default=str)


def record_protocol(rec: dict) -> tuple[str, str]:
    """(resolution protocol, precision) an accuracy record was measured with.

    ``full`` or ``w<width>@<eval_at>`` from ``eval_settings`` (no ``resize`` = full resolution);
    precision as recorded (records older than the precision rule said ``amp``: true meant bf16).
    """
    es = rec.get("eval_settings") if isinstance(rec.get("eval_settings"), dict) else {}
    width = es.get("resize")
    proto = FULL_RESOLUTION if width is None else f"w{width}@{es.get('eval_at', 'original')}"
    precision = es.get("precision") or ("bf16" if rec.get("amp") or es.get("amp") else "fp32")
    return proto, str(precision)


def record_row(rec: dict) -> dict[str, Any]:
    """One leaderboard row (``ROW_COLUMNS``) of an accuracy record."""
    metrics = rec.get("metrics") or {}
    protocol, precision = record_protocol(rec)
    env = rec.get("environment") or {}
    train_ds = rec.get("train_dataset") or (rec.get("dataset") if rec.get("kind") == "train" else None)
    row = {
        "source": "ours", **describe_model(rec.get("model")), "model": rec.get("model"),
        "train_dataset": train_ds, "dataset": rec.get("dataset"), "split": rec.get("split"),
        "miou_pct": _pct(metrics, "miou"), "iiou_pct": _pct(metrics, "iiou"),
        "cat_iou_pct": _pct(metrics, "cat_iou"), "params_m": _params_m(rec), "gmac_1mpx": _gmac(rec),
        "ms": _ms(rec), "protocol": protocol, "precision": precision, "kind": rec.get("kind"), "run_id": rec.get("run_id"),
        "commit": env.get("git_commit"), "date": str(rec.get("timestamp") or "")[:10] or None,
        "table": None, "notes": None,
    }
    if _is_synthetic(rec.get("root")):  # never group synthetic scenes with the real dataset (or the paper)
        row["dataset"] = f"synthetic-{row['dataset']}"
    if precision != "fp32":  # a reduced-precision number is another measurement, never the same row as fp32
        row["variant"] = " ".join(filter(None, [row["variant"], precision]))
    opts = rec.get("model_options") if isinstance(rec.get("model_options"), dict) else {}
    if opts:  # not the paper's configuration: say so where people look
        row["variant"] = " ".join(filter(None, [row["variant"], "custom"]))
        row["notes"] = "model options: " + ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return row


def collect(results: str | Path = "results") -> Collected:
    """Read every record below ``results``; accuracy records become rows, bad files are kept aside.

    Params, GMAC and ms missing from an accuracy record are filled from the newest other record
    (e.g. ``flops`` or ``bench-speed``) of the same model.
    """
    results = Path(results)
    if not results.is_dir():
        raise UserError(f"results folder {results} does not exist; run a command that writes records "
                        "(train, eval, cross, ...) or pass --results DIR")
    good, bad = [], []
    for rec in read_records(results):
        if isinstance(rec, BadRecord):
            bad.append(rec)
            continue
        why = _problem(rec)
        if why:
            bad.append(BadRecord(Path(rec.get("_path", "?")), why))
        else:
            good.append(rec)
    stats: dict[tuple[str, str], dict[str, float]] = {}
    for rec in sorted(good, key=lambda r: str(r.get("timestamp") or "")):
        s = stats.setdefault(_model_key(rec), {})
        for key, fn in (("params_m", _params_m), ("gmac_1mpx", _gmac), ("ms", _ms)):
            v = fn(rec)
            if v is not None and (key != "ms" or rec.get("kind") == "bench-speed" or "ms" not in s):
                s[key] = v
    rows = []
    for rec in good:
        if rec["kind"] in NON_ACCURACY_KINDS or _number((rec.get("metrics") or {}).get("miou")) is None:
            continue
        row = record_row(rec)
        for key, v in stats.get(_model_key(rec), {}).items():
            if row[key] is None:
                row[key] = v
        rows.append(row)
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    return Collected(rows=_typed(df), records=good, bad=bad)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in ROW_COLUMNS:
        df[c] = pd.to_numeric(df[c]).astype("float64") if c in NUMERIC else df[c].astype("string")
    return df


def _paper_variant(r: pd.Series) -> Any:
    """The paper's variant label plus the settings that tell otherwise equal rows apart."""
    def get(key: str) -> Any:
        return None if pd.isna(r[key]) else r[key]

    parts = [str(get("variant"))] if get("variant") is not None else []
    if get("pretrained") is not None and not get("pretrained"):
        parts.append("RI")
    if get("multiscale") and "MS" not in parts:
        parts.append("MS")
    if get("resolution") in ("half", "full"):
        parts.append(f"{r['resolution']} res.")
    return " ".join(parts) or pd.NA


def paper_rows(paper: pd.DataFrame) -> pd.DataFrame:
    """Published rows in ``ROW_COLUMNS`` form (source = ``published``)."""
    df = pd.DataFrame({c: paper[c] if c in paper.columns else pd.NA for c in ROW_COLUMNS})
    df["source"] = "published"
    df["variant"] = paper.apply(_paper_variant, axis=1) if len(paper) else df["variant"]
    df["kind"] = "paper"
    df["table"] = paper["table"].astype(str)
    df["protocol"] = "paper"  # the published protocol of each table (its resolution is in the variant)
    return _typed(df)


def _group_key(row_value: Any) -> str:
    s = str(row_value) if row_value is not None and not pd.isna(row_value) else "unknown"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s)


def build_tables(collected: Collected, group_by: str = "dataset",
                 paper: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Group the rows; with ``paper``, published rows of the same dataset follow the user's own."""
    if group_by not in GROUP_BY:
        raise UserError(f"cannot group by {group_by!r}; choose one of: {', '.join(GROUP_BY)}", 2)
    rows = collected.rows
    if group_by == "none":
        groups = {"leaderboard": rows} if len(rows) else {}
    else:
        groups = {}
        for key, df in rows.groupby(rows[group_by].fillna("unknown"), sort=True):
            groups[_group_key(key)] = df
    out = {}
    pub = paper_rows(paper) if paper is not None else None
    for name, df in groups.items():
        df = df.sort_values("miou_pct", ascending=False, na_position="last")
        if pub is not None:
            datasets = set(df["dataset"].dropna())
            p = pub[pub["dataset"].isin(datasets)]
            if group_by == "model":
                p = p.iloc[0:0]  # a model group compares runs; published rows belong to dataset tables
            df = pd.concat([df, p], ignore_index=True) if len(p) else df
        out[name] = df.reset_index(drop=True)
    return out


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "→": r"$\rightarrow$", "↓": r"$\downarrow$", "†": r"$^\dagger$", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and turn the paper's arrows into math symbols."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _fmt(v: Any, key: str) -> str:
    if pd.isna(v):
        return ""
    if key == "params_m" and abs(v) < 1:
        return f"{v:.2g}"  # a small custom model must not read as 0.0 M
    return f"{v:.2f}" if key == "ms" else f"{v:.1f}"


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The people-facing table: percent with one decimal, empty optional columns dropped."""
    src = df.apply(lambda r: f"published (T{r['table']})" if r["source"] == "published"
                   else f"ours {r['run_id'] or ''}".strip(), axis=1) if len(df) else df["source"]
    cols = {}
    for key, header in DISPLAY.items():
        col = src if key == "source" else df[key]
        if key in NUMERIC:
            col = col.map(lambda v, k=key: _fmt(v, k))
        else:
            col = col.map(lambda v: "" if v is None or pd.isna(v) else str(v))
        if key in ("variant", "iiou_pct", "cat_iou_pct", "ms", "train_dataset") and not col.astype(bool).any():
            continue
        if key in ("protocol", "precision") and not _shown(df[key], FULL_RESOLUTION if key == "protocol" else "fp32"):
            continue
        cols[header] = col
    return pd.DataFrame(cols).reset_index(drop=True)


def _shown(col: pd.Series, default: str) -> bool:
    """Show a protocol/precision column when any of the user's rows differs from the default: rows of
    different protocols then never share the mIoU column without saying so."""
    ours = col[col.notna() & (col != "paper")]
    return bool(len(ours)) and (set(ours) != {default})


def to_latex(df: pd.DataFrame, caption: str | None = None) -> str:
    """A ``tabular`` fragment (no float, no extra packages) of :func:`display_frame`."""
    disp = display_frame(df)
    esc = disp.map(latex_escape)
    esc.columns = [latex_escape(c) for c in disp.columns]
    align = "".join("r" if DISPLAY_KEY.get(c) in NUMERIC else "l" for c in disp.columns)
    styler = esc.style.hide(axis="index").set_table_styles(
        [{"selector": s, "props": ":hline;"} for s in ("toprule", "midrule", "bottomrule")])
    body = styler.to_latex(column_format=align)
    head = f"% {latex_escape(caption)}\n" if caption else ""
    return head + body



def to_markdown(df: pd.DataFrame) -> str:
    disp = display_frame(df).map(lambda s: s.replace("|", "\\|"))
    align = ["right" if DISPLAY_KEY.get(c) in NUMERIC else "left" for c in disp.columns]
    return disp.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write_text(path, df.to_csv(index=False, float_format="%.10g"))


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a leaderboard CSV written by :func:`export` back with the same dtypes."""
    df = pd.read_csv(path, dtype={c: "string" for c in ROW_COLUMNS if c not in NUMERIC})
    return _typed(df.reindex(columns=ROW_COLUMNS))  # CSVs written before a column existed read as empty there


def parse_formats(spec: str | Iterable[str]) -> list[str]:
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    items = ["markdown" if s == "md" else "latex" if s == "tex" else s for s in items]
    wrong = [s for s in items if s not in FORMATS]
    if wrong or not items:
        raise UserError(f"unknown export format {', '.join(wrong) or '(none)'}; use a comma list of "
                        f"{', '.join(FORMATS)}", 2)
    return items


def export(results: str | Path = "results", out: str | Path = "leaderboards", formats: str | Iterable[str] = FORMATS,
           group_by: str = "dataset", with_paper: bool = True, paper_dir: str | Path | None = None,
           figures: bool = True) -> ExportResult:
    """Write ``<out>/<group>.{csv,tex,md}`` (and figures) from the records under ``results``."""
    from ldnbench.report.paper import load_paper_tables

    fmts = parse_formats(formats)
    collected = collect(results)
    paper = load_paper_tables(paper_dir) if with_paper else None
    tables = build_tables(collected, group_by, paper)
    out = Path(out)
    files = []
    for name, df in tables.items():
        if "csv" in fmts:
            files.append(write_csv(df, out / f"{name}.csv"))
        if "latex" in fmts:
            files.append(atomic_write_text(out / f"{name}.tex", to_latex(df, caption=f"ldnbench leaderboard: {name}")))
        if "markdown" in fmts:
            files.append(atomic_write_text(out / f"{name}.md", f"# {name}\n\n" + to_markdown(df)))
    if figures:
        from ldnbench.report.figures import figures_from_records

        files += figures_from_records(collected.records, tables, out)
    return ExportResult(files=files, bad=collected.bad, tables=tables)
