"""Finding and pairing dataset files, and the errors users see when a root is wrong.

Shared by the adapters: each one globs its images and labels, pairs them by id with :func:`pair`
and raises :func:`not_found` (naming the glob it expected and what the root holds) when nothing
matches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldnbench.data.base import SampleFiles
from ldnbench.errors import UserError


def describe(root: Path, limit: int = 8) -> str:
    """What a user actually has at ``root``: missing, empty, or its first few entries."""
    if not root.exists():
        return f"{root} does not exist"
    if not root.is_dir():
        return f"{root} is a file, not a folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not entries:
        return f"{root} is empty"
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"{root} contains {', '.join(entries[:limit])}{more}"


def not_found(dataset: str, root: Path, pattern: str, hint: str = "") -> UserError:
    """The error for a root without the expected files: the glob expected and what was found."""
    msg = f"no {dataset} files found: expected {root / pattern}, but {describe(root)}"
    return UserError(msg + (f"; {hint}" if hint else ""))


def index(paths: list[Path], suffix: str) -> dict[str, Path]:
    """``{basename without suffix: path}`` for paths whose name ends with ``suffix``."""
    return {p.name[: -len(suffix)]: p for p in paths if p.name.endswith(suffix)}


def pair(
    images: dict[str, Path],
    labels: dict[str, Path] | None,
    instances: dict[str, Path] | None = None,
) -> tuple[list[SampleFiles], list[Path]]:
    """Pair images and labels by id (sorted by id).

    Returns the pairs and the unpaired files (images without a label, labels without an image).
    With ``labels=None`` (a split without ground truth) every image is a sample with ``label=None``.
    """
    if labels is None:
        return [SampleFiles(k, images[k], None, None) for k in sorted(images)], []
    instances = instances or {}
    files = [SampleFiles(k, images[k], labels[k], instances.get(k)) for k in sorted(images) if k in labels]
    unpaired = [images[k] for k in sorted(images) if k not in labels]
    unpaired += [labels[k] for k in sorted(labels) if k not in images]
    return files, unpaired


def require_paired(dataset: str, unpaired: list[Path], strict: bool) -> None:
    """With ``strict``, refuse a split with unpaired files (``datasets check`` lists them all)."""
    if strict and unpaired:
        names = ", ".join(str(p) for p in unpaired[:3])
        more = f" and {len(unpaired) - 3} more" if len(unpaired) > 3 else ""
        raise UserError(f"{len(unpaired)} {dataset} file(s) have no partner image/label: {names}{more}; "
                        f"restore or remove them (`ldnbench datasets check {dataset}` lists all)")


def lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A remap table: ``table[raw] = class index`` (255 = ignore); -1 marks raw values that must not occur."""
    table = np.full(size, -1, np.int16)
    for raw, out in mapping.items():
        table[raw] = out
    return table


def remap(raw: np.ndarray, table: np.ndarray, path: Path | str, encoding: str) -> np.ndarray:
    """``table[raw]`` as uint8; raw values the encoding does not define raise a UserError naming the file."""
    bad_values = np.flatnonzero(table < 0)
    # usual case: every undefined value lies above the defined ones, so one max() validates the
    # file and the lookup stays in uint8 (a quarter of the memory traffic of the int16 table)
    if raw.size and raw.dtype == np.uint8 and table.size >= 256 and (
            not bad_values.size or bad_values[0] > raw.max()):
        return np.take(table[:256].astype(np.uint8), raw)
    out = table[raw]
    if (out < 0).any():
        bad = np.unique(raw[out < 0])
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise UserError(f"label file {path} has values {shown} outside the {encoding}; "
                        "is it the right kind of label file for this dataset?")
    return out.astype(np.uint8)
