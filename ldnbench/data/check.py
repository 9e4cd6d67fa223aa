"""``ldnbench datasets check``: verify a dataset folder and count its classes.

:func:`check_dataset` instantiates the adapter per split (without refusing unpaired files), reads a
sample of its labels and images (all of them with ``full=True``) and collects, per file, what is
wrong: unpaired files, undecodable images/labels, label values outside the label space, image and
label of different sizes. With ``full=True`` it also returns the per-class pixel histogram in the
adapter's label space (after remapping).
"""

from __future__ import annotations

import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ldnbench.data.registry import DATASETS, default_root, get_dataset
from ldnbench.errors import UserError


@dataclass
class SplitCheck:
    """What ``datasets check`` found for one split."""

    split: str
    pairs: int = 0
    images: int = 0
    #: Class names (and "ignore") present in the labels that were read.
    labels_seen: list[str] = field(default_factory=list)
    files_read: int = 0
    histogram: dict[str, int] | None = None
    problems: list[str] = field(default_factory=list)
    #: Why the split could not be opened (e.g. not downloaded), None when it was found.
    missing: str | None = None


@dataclass
class CheckReport:
    dataset: str
    label_space: str
    root: str
    splits: dict[str, SplitCheck]

    @property
    def problems(self) -> list[str]:
        return [p for s in self.splits.values() for p in s.problems]

    def to_dict(self) -> dict:
        """The ``--json`` document: dataset, label_space, splits -> pairs (+ histogram with --full)."""
        out = {"dataset": self.dataset, "label_space": self.label_space, "root": self.root, "splits": {}}
        for name, s in self.splits.items():
            d: dict = {"pairs": s.pairs, "images": s.images}
            if s.missing:
                d["missing"] = s.missing
            else:
                d["labels_seen"] = s.labels_seen
            if s.histogram is not None:
                d["histogram"] = s.histogram
            d["problems"] = s.problems
            out["splits"][name] = d
        return out


def _open(name: str, root: Path, split: str):
    cls = DATASETS[name]
    opts = {"strict": False} if "strict" in inspect.signature(cls.__init__).parameters else {}
    return get_dataset(name, root=root, split=split, **opts)


def _read(ds, i: int) -> tuple[np.ndarray | None, list[str]]:
    """Label histogram (256 bins) of sample ``i`` and the problems found in its files."""
    problems = []
    f = ds.files[i]
    if f.label is None:  # a split without ground truth: only the image can be checked
        try:
            ds.load_image(i)
        except UserError as e:
            problems.append(str(e))
        return None, problems
    try:
        label, _ = ds.load_target(i)
    except UserError as e:
        return None, [str(e)]
    space = ds.label_space
    bad = np.unique(label[(label >= space.num_classes) & (label != space.ignore_index)])
    if len(bad):
        problems.append(f"label file {f.label} has values {', '.join(map(str, bad[:8]))} outside "
                        f"{space.name} (0..{space.num_classes - 1}, {space.ignore_index} = ignore)")
    try:
        image = ds.load_image(i)
        if image.shape[:2] != label.shape:
            problems.append(f"image {f.image} is {image.shape[1]}x{image.shape[0]} but its label {f.label} "
                            f"is {label.shape[1]}x{label.shape[0]}")
    except UserError as e:
        problems.append(str(e))
    return np.bincount(label.ravel(), minlength=256), problems


def check_dataset(name: str, root: str | Path | None = None, split: str | None = None, full: bool = False,
                  sample: int = 5, progress: bool = False) -> CheckReport:
    """Check dataset ``name`` at ``root`` (default ``./datasets/<name>``), all splits or one.

    Raises UserError (what was expected, what was found) when no split can be opened, or when the
    requested ``split`` cannot.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}", 2)
    cls = DATASETS[name]
    root = Path(root) if root is not None else default_root(name)
    if split is not None and split not in cls.splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; choose one of: {', '.join(cls.splits)}", 2)
    report = CheckReport(name, getattr(cls, "label_space_name", "?"), str(root), {})
    first_error = None
    for s in [split] if split else cls.splits:
        chk = report.splits.setdefault(s, SplitCheck(s))
        try:
            ds = _open(name, root, s)
        except UserError as e:
            if split:
                raise
            first_error = first_error or e
            chk.missing = str(e)
            continue
        report.label_space = ds.label_space.name
        chk.pairs = sum(f.label is not None for f in ds.files)
        chk.images = len(ds.files)
        chk.problems += [f"unpaired file (no matching image/label): {p}" for p in getattr(ds, "unpaired", [])]
        n = len(ds)
        idx = range(n) if full else sorted({int(round(x)) for x in np.linspace(0, n - 1, min(sample, n))})
        hist = np.zeros(256, np.int64)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            results = pool.map(lambda i: _read(ds, i), idx)
            for h, probs in tqdm(results, total=len(idx), desc=f"{name} {s}", disable=not progress, leave=False):
                chk.problems += probs
                if h is not None:
                    hist += h
                    chk.files_read += 1
        space = ds.label_space
        names = list(space.classes) + ["ignore"]
        counts = np.append(hist[: space.num_classes], hist[space.ignore_index])
        chk.labels_seen = [names[i] for i in np.nonzero(counts)[0]]
        if full:
            chk.histogram = {c: int(v) for c, v in zip(names, counts)}
    if all(c.missing for c in report.splits.values()):
        raise first_error
    return report


def format_report(report: CheckReport) -> str:
    """The human-readable ``datasets check`` output."""
    lines = [f"{report.dataset} (label space {report.label_space}) at {report.root}"]
    for s in report.splits.values():
        if s.missing:
            lines.append(f"  {s.split:<9} not found: {s.missing}")
            continue
        if s.pairs == 0 and s.images:
            lines.append(f"  {s.split:<9} {s.images:>6} images without labels")
            continue
        seen = ", ".join(s.labels_seen) or "-"
        lines.append(f"  {s.split:<9} {s.pairs:>6} image/label pairs; classes in {s.files_read} label file(s) read: {seen}")
    for s in report.splits.values():
        if s.histogram:
            total = sum(s.histogram.values()) or 1
            lines.append(f"  pixel histogram ({s.split}):")
            lines += [f"    {c:<20} {v:>14,d} {100 * v / total:6.2f}%" for c, v in s.histogram.items()]
    problems = report.problems
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def list_datasets() -> str:
    """The ``ldnbench datasets`` table: adapter, label space, splits, default folder and layout."""
    rows = [("dataset", "label space", "splits", "default root", "expected layout below the root")]
    for name, cls in DATASETS.items():
        rows.append((name, getattr(cls, "label_space_name", "?"), ",".join(cls.splits),
                     f"{default_root(name)}/", cls.layout))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
    return (table + "\n\nNo dataset at hand: `ldnbench synth` writes synthetic cityscapes, vistas and kitti trees to "
            "datasets/synthetic/<name> (use --root datasets/synthetic/<name>).")
