"""Cross-dataset matrix (paper Table 7): train one model per training set, evaluate it on every set.

A training set is a dataset name or several joined with ``+`` (one training set in their shared
label space). A finished training run with the same configuration hash is reused, from anywhere
under ``results/``; an unfinished one in the study's folder is resumed. Each evaluation (a *cell*)
is stored as its own record, so rerunning the study skips every finished cell. A cell that could
not be computed stays missing (NaN, shown as ``missing``), never 0, and the means of a row are
taken over its present cells only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ldnbench.checkpoints import load_checkpoint
from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write_text
from ldnbench.studies.common import EvaluateFn, default_evaluate, model_mapping

#: TrainConfig fields that do not change the trained weights (left out of the configuration hash).
HASH_EXCLUDED = {"out", "resume", "progress", "workers", "device", "val_every", "val_limit", "val_split",
                 "save_every", "ckpt", "eval_at", "tensorboard"}
#: Fields added after runs were recorded: at these values they are left out of the hash, so the
#: full-resolution runs recorded before ``resize`` existed keep their hash (and are reused).
HASH_OMITTED_DEFAULTS = {"resize": None}


def config_hash(config: Any) -> str:
    """Stable hash of a training configuration (TrainConfig or the ``config`` dict of a train record).

    ``resize`` is part of it: a run at another resolution protocol is another training run.
    """
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    d = {k: v for k, v in d.items() if k not in HASH_EXCLUDED
         and not (k in HASH_OMITTED_DEFAULTS and v == HASH_OMITTED_DEFAULTS[k])}
    text = json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class JoinedDataset(torch.utils.data.ConcatDataset):
    """Several adapters in one label space, seen as one training set (``cityscapes+vistas``)."""

    def __init__(self, name: str, datasets: Sequence[Any]):
        spaces = {d.label_space for d in datasets}
        if len(spaces) != 1:
            names = ", ".join(f"{getattr(d, 'name', '?')}: {d.label_space.name}" for d in datasets)
            raise UserError(f"cannot join {name}: the datasets have different label spaces ({names}); join only "
                            "datasets that share one label space", 2)
        super().__init__(list(datasets))
        self.name = name
        self.label_space = datasets[0].label_space
        self.crop_size = min(getattr(d, "crop_size", 768) for d in datasets)
        self.files = [f for d in datasets for f in getattr(d, "files", [])]


@dataclass
class CrossConfig:
    """The study: training sets × evaluation sets for one model and one training recipe."""

    train: list[str]
    eval: list[str]
    model: str = "ldn121"
    roots: dict[str, str] = field(default_factory=dict)
    results: str | Path = "results"
    train_split: str = "train"
    eval_split: str = "val"
    eval_limit: int | None = None
    device: str = "cpu"
    #: TrainConfig overrides (epochs, batch_size, crop, max_iters, lr, pretrained, seed, workers ...).
    train_options: dict[str, Any] = field(default_factory=dict)
    #: image width per dataset name, ``"*"`` for all (``--resize vistas=2048 --resize 1024``); {} = full resolution
    resize: dict[str, int] = field(default_factory=dict)
    #: label resolution of the evaluation cells when resized (see ldnbench.data.resize)
    eval_at: str = "original"


@dataclass
class CrossResult:
    matrix: pd.DataFrame  #: rows: training sets; columns: eval sets + "harmonic mean", "arithmetic mean" (mIoU %)
    missing: dict[tuple[str, str], str]  #: (train, eval) -> why the cell is missing
    trained: list[str]  #: training sets trained in this call
    reused: list[str]  #: training sets whose finished run was reused
    evaluated: list[tuple[str, str]]  #: cells computed in this call
    skipped: list[tuple[str, str]]  #: cells already finished before this call
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    checkpoints: dict[str, Path] = field(default_factory=dict)  #: training set -> checkpoint evaluated


def parse_names(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if s.strip()]


def parse_roots(items: Sequence[str]) -> dict[str, str]:
    """``name=DIR`` items (``--roots``) into a dict."""
    out = {}
    for it in items:
        for part in it.split(","):
            if not part.strip():
                continue
            name, sep, root = part.partition("=")
            if not sep or not name.strip() or not root.strip():
                raise UserError(f"--roots {part!r}: write NAME=DIR, e.g. cityscapes=/data/cityscapes", 2)
            out[name.strip()] = root.strip()
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def assemble_matrix(cells: dict[tuple[str, str], float | None], train: Sequence[str],
                    evals: Sequence[str]) -> pd.DataFrame:
    """mIoU (%) matrix with harmonic and arithmetic means over each row's present cells."""
    m = pd.DataFrame(np.nan, index=list(train), columns=list(evals), dtype=float)
    for (t, e), v in cells.items():
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and t in m.index and e in m.columns:
            m.loc[t, e] = float(v)
    present = [row.dropna() for _, row in m.iterrows()]
    m["harmonic mean"] = [len(r) / sum(1.0 / v for v in r) if len(r) and (r > 0).all() else
                          (0.0 if len(r) else np.nan) for r in present]
    m["arithmetic mean"] = [r.mean() if len(r) else np.nan for r in present]
    m.index.name = "train \\ eval"
    return m


def format_matrix(m: pd.DataFrame) -> str:
    """Plain-text matrix: one decimal, ``missing`` for absent cells."""
    shown = m.map(lambda v: "missing" if pd.isna(v) else f"{v:.1f}")
    return shown.to_string()


class _Study:
    def __init__(self, cfg: CrossConfig, train_fn: Callable | None, evaluate_fn: EvaluateFn | None,
                 open_dataset: Callable | None, progress: Callable[[str], None]):
        from ldnbench.models import resolve_model_name

        self.cfg = cfg
        self.model = resolve_model_name(cfg.model)
        self.results = Path(cfg.results)
        self.out = self.results / "cross" / _slug(f"{self.model}__{'_'.join(cfg.train)}__on__{'_'.join(cfg.eval)}")
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.open_dataset = open_dataset or self._open_dataset
        self.say = progress

    # --- datasets ---------------------------------------------------------------------------------

    def root(self, name: str) -> str:
        from ldnbench.data.registry import default_root

        return str(Path(self.cfg.roots.get(name) or default_root(name)).resolve())

    def _open_dataset(self, name: str, split: str):
        from ldnbench.data.registry import get_dataset

        root = Path(self.root(name))
        if not root.is_dir():
            raise UserError(f"dataset root {root} does not exist; pass --roots {name}=DIR")
        return get_dataset(name, root, split)

    def check_names(self) -> None:
        from ldnbench.data.registry import DATASETS

        names = {p for t in self.cfg.train for p in t.split("+")} | set(self.cfg.eval)
        unknown = sorted(n for n in names if n not in DATASETS)
        if unknown and self.open_dataset == self._open_dataset:
            raise UserError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(sorted(DATASETS))}", 2)
        if not self.cfg.train or not self.cfg.eval:
            raise UserError("cross needs at least one --train and one --eval dataset", 2)
        extra = set(self.cfg.roots) - names
        if extra:
            raise UserError(f"--roots names {', '.join(sorted(extra))} are neither trained nor evaluated on", 2)

    # --- training ---------------------------------------------------------------------------------

    def train_config(self, train: str):
        from ldnbench.train import TrainConfig

        parts = train.split("+")
        root = ";".join(f"{p}={self.root(p)}" for p in parts) if len(parts) > 1 else self.root(parts[0])
        opts = {k: v for k, v in self.cfg.train_options.items() if v is not None}
        cfg = TrainConfig.preset(self.model, train, **opts)
        return dataclasses.replace(cfg, root=root, split=self.cfg.train_split, val_split=None,
                                   device=self.cfg.device if "device" not in opts else opts["device"],
                                   resize=self.train_resize(train))

    def train_resize(self, train: str) -> int | dict[str, int] | None:
        """The training config's ``resize``: a width for one dataset, ``{part: width}`` for a joined set."""
        from ldnbench.data.resize import width_for

        parts = train.split("+")
        if len(parts) == 1:
            return width_for(self.cfg.resize, parts[0])
        widths = {p: width_for(self.cfg.resize, p) for p in parts}
        return {p: w for p, w in widths.items() if w is not None} or None

    def find_finished(self, h: str) -> Path | None:
        """Checkpoint of a finished train run under ``results/`` whose config hashes to ``h``."""
        from ldnbench.report.records import BadRecord, read_records

        found = []
        for rec in read_records(self.results):
            if isinstance(rec, BadRecord) or rec.get("kind") != "train" or rec.get("status") != "finished":
                continue
            if not isinstance(rec.get("config"), dict) or config_hash(rec["config"]) != h:
                continue
            ck = (rec.get("checkpoints") or {}).get("last")
            if ck and Path(ck).is_file():
                found.append((str(rec.get("timestamp")), Path(ck)))
            elif (Path(rec["_path"]).parent / "last.pt").is_file():
                found.append((str(rec.get("timestamp")), Path(rec["_path"]).parent / "last.pt"))
        return max(found)[1] if found else None

    def ensure_trained(self, train: str) -> tuple[Path, str, bool]:
        """(checkpoint, config hash, reused?) for training set ``train``; trains or resumes if needed."""
        tcfg = self.train_config(train)
        h = config_hash(tcfg)
        ck = self.find_finished(h)
        if ck is not None:
            self.say(f"[{train}] reusing finished run {ck.parent} (config {h})")
            return ck, h, True
        out = self.out / f"train-{_slug(train)}-{h[:8]}"
        tcfg = dataclasses.replace(tcfg, out=str(out), resume=(out / "last.pt").is_file())
        from ldnbench.data.resize import Resized, width_for

        parts = train.split("+")
        # every part at its own width (Vistas 2048 beside Cityscapes 1024), marked resized even at full
        # resolution so that train() does not resize the joined set again
        sets = [self.open_dataset(p, self.cfg.train_split) for p in parts]
        sets = [Resized(s, width_for(self.cfg.resize, p), "resized") if width_for(self.cfg.resize, p) else s
                for s, p in zip(sets, parts)]
        train_set = sets[0] if len(sets) == 1 else JoinedDataset(train, sets)
        self.say(f"[{train}] training {self.model} ({'resuming' if tcfg.resume else 'new run'}) -> {out}")
        train_fn = self.train_fn
        if train_fn is None:
            from ldnbench.train import train as train_fn
        res = train_fn(tcfg, train_set=train_set)
        return Path(res.last_checkpoint), h, False

    # --- evaluation -------------------------------------------------------------------------------

    def eval_protocol(self, ev: str) -> tuple[int | None, str]:
        from ldnbench.data.resize import width_for

        w = width_for(self.cfg.resize, ev)
        return w, (self.cfg.eval_at if w is not None else "original")

    def cell_path(self, train: str, h: str, ev: str) -> Path:
        limit = f"-first{self.cfg.eval_limit}" if self.cfg.eval_limit else ""
        w, at = self.eval_protocol(ev)
        proto = f"-w{w}-at-{at}" if w is not None else ""
        return self.out / "cells" / f"{_slug(train)}-{h[:8]}" / f"{_slug(ev)}-{self.cfg.eval_split}{limit}{proto}.json"

    def finished_cell(self, path: Path, h: str, ev: str | None = None) -> dict | None:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(rec, dict) and rec.get("train_hash") == h and isinstance(rec.get("metrics"), dict)
        if ok and ev is not None:
            s = rec.get("eval_settings") or {}
            ok = (s.get("resize"), s.get("eval_at", "original")) == self.eval_protocol(ev)
        return rec if ok and rec["metrics"].get("miou") is not None else None

    def evaluate_cell(self, train: str, h: str, ckpt: Path, ev: str, model_cache: dict) -> dict:
        from ldnbench.data.resize import apply_resize
        from ldnbench.report.records import make_record, write_record

        dataset = self.open_dataset(ev, self.cfg.eval_split)
        if self.cfg.eval_limit is not None and self.cfg.eval_limit < len(dataset):
            dataset = torch.utils.data.Subset(dataset, range(self.cfg.eval_limit))
        width, eval_at = self.eval_protocol(ev)
        dataset = apply_resize(dataset, width, eval_at)
        if train not in model_cache:
            model_cache.clear()  # one model in memory at a time
            model_cache[train] = load_checkpoint(ckpt, self.model)
        model, meta = model_cache[train]
        mapping = model_mapping(meta.label_space, dataset)
        evaluate_fn = self.evaluate_fn or default_evaluate(self.cfg.device, meta.normalization)
        metrics = evaluate_fn(model, dataset, mapping)
        rec = make_record("cross-cell", model=self.model, model_options=self.cfg.train_options.get("model_options"),
                          dataset=ev, root=self.root(ev), split=self.cfg.eval_split,
                          metrics=metrics, device=self.cfg.device, train_dataset=train, train_hash=h,
                          checkpoint=str(ckpt), eval_limit=self.cfg.eval_limit,
                          label_mapping=None if mapping is None else f"{mapping.src}->{mapping.dst}",
                          eval_settings=_eval_settings(width, eval_at),
                          train_resize=self.train_resize(train))
        write_record(self.cell_path(train, h, ev), rec)
        return rec

    # --- the whole study --------------------------------------------------------------------------

    def run(self) -> CrossResult:
        self.check_names()
        cells: dict[tuple[str, str], float | None] = {}
        missing: dict[tuple[str, str], str] = {}
        trained, reused, evaluated, skipped = [], [], [], []
        checkpoints: dict[str, Path] = {}
        for t in self.cfg.train:
            tcfg_hash = config_hash(self.train_config(t))
            todo = []
            for e in self.cfg.eval:
                rec = self.finished_cell(self.cell_path(t, tcfg_hash, e), tcfg_hash, e)
                if rec is not None:
                    cells[(t, e)] = 100 * rec["metrics"]["miou"]
                    skipped.append((t, e))
                    if rec.get("checkpoint") and Path(rec["checkpoint"]).is_file():
                        checkpoints[t] = Path(rec["checkpoint"])
                else:
                    todo.append(e)
            if not todo:
                self.say(f"[{t}] all {len(self.cfg.eval)} cells finished earlier; skipped")
                continue
            try:
                ckpt, h, was_reused = self.ensure_trained(t)
            except UserError as err:
                for e in todo:
                    missing[(t, e)] = f"training failed: {err}"
                self.say(f"[{t}] training failed: {err}")
                continue
            (reused if was_reused else trained).append(t)
            checkpoints[t] = ckpt
            model_cache: dict = {}
            for e in todo:
                try:
                    rec = self.evaluate_cell(t, h, ckpt, e, model_cache)
                except UserError as err:
                    missing[(t, e)] = str(err)
                    self.say(f"[{t} -> {e}] missing: {err}")
                    continue
                miou = rec["metrics"].get("miou")
                if miou is None:
                    missing[(t, e)] = "evaluation gave no mIoU (no labelled pixels?)"
                    continue
                cells[(t, e)] = 100 * miou
                evaluated.append((t, e))
                self.say(f"[{t} -> {e}] mIoU {100 * miou:.1f}")
        matrix = assemble_matrix(cells, self.cfg.train, self.cfg.eval)
        res = CrossResult(matrix, missing, trained, reused, evaluated, skipped, self.out, checkpoints=checkpoints)
        res.files = self.save(res)
        return res

    def save(self, res: CrossResult) -> list[Path]:
        from ldnbench.report import figures as F
        from ldnbench.report.records import make_record, write_record

        m = res.matrix
        files = [atomic_write_text(self.out / "matrix.csv", m.to_csv(float_format="%.4f", na_rep="")),
                 atomic_write_text(self.out / "matrix.md", m.map(lambda v: "missing" if pd.isna(v) else f"{v:.1f}")
                                   .to_markdown(disable_numparse=True) + "\n")]
        evals = list(self.cfg.eval)
        rec = make_record(
            "cross", model=self.model, dataset=",".join(evals), split=self.cfg.eval_split, device=self.cfg.device,
            metrics={"harmonic_mean": {t: _nan_none(m.loc[t, "harmonic mean"]) for t in m.index},
                     "arithmetic_mean": {t: _nan_none(m.loc[t, "arithmetic mean"]) for t in m.index}},
            matrix={"train": list(m.index), "eval": evals,
                    "miou_pct": [[_nan_none(m.loc[t, e]) for e in evals] for t in m.index]},
            missing={f"{t} -> {e}": why for (t, e), why in res.missing.items()},
            train_options=self.cfg.train_options, eval_limit=self.cfg.eval_limit,
            resize=dict(self.cfg.resize), eval_at=self.cfg.eval_at,
            protocol=describe_protocol(self.cfg.resize, self.cfg.eval_at))
        files.append(write_record(self.out / "result.json", rec))
        files += F.cross_heatmap(m[evals], self.out / "cross_matrix",
                                 title=f"{self.model}: cross-dataset mIoU (%)")
        return files


def _eval_settings(width: int | None, eval_at: str) -> dict[str, Any]:
    """What the default evaluator of a cell runs (single scale, fp32) plus its resolution protocol."""
    from ldnbench.evaluate import EvalSettings

    return EvalSettings(resize=width, eval_at=eval_at).to_dict()


def describe_protocol(resize: dict[str, int], eval_at: str) -> str:
    """One line for records and people: ``full resolution`` or ``vistas width 2048, others full resolution (eval at original)``."""
    if not resize:
        return "full resolution"
    parts = [f"{k} width {w}" for k, w in sorted(resize.items()) if k != "*"]
    if "*" in resize:
        rest = f"every {'other ' if parts else ''}dataset width {resize['*']}"
    else:
        rest = "others full resolution"
    return ", ".join(parts + [rest]) + f" (eval at {eval_at})"


def _nan_none(v: Any) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def run_cross(cfg: CrossConfig, *, train_fn: Callable | None = None, evaluate_fn: EvaluateFn | None = None,
              open_dataset: Callable[[str, str], Any] | None = None,
              progress: Callable[[str], None] = print) -> CrossResult:
    """Run (or resume) the study; ``train_fn``/``evaluate_fn``/``open_dataset`` replace
    ``ldnbench.train.train``, the evaluator and the dataset registry (for tests and custom data)."""
    return _Study(cfg, train_fn, evaluate_fn, open_dataset, progress).run()
