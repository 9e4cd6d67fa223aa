"""Result records: the JSON files every measuring command writes under ``results/``.

A record is a plain dict with the keys of :func:`make_record`. Metrics are fractions in 0–1;
NaN (e.g. the IoU of a class absent from ground truth and predictions) is stored as ``null``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ldnbench import __version__
from ldnbench.fileio import atomic_write_json

RECORD_SCHEMA = 1


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of ``cwd`` (default: this package's checkout), or None."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str | None = None) -> dict[str, Any]:
    import torch

    return {
        "ldnbench": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": device,
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


def jsonable(obj: Any) -> Any:
    """Turn numpy/torch scalars and arrays into JSON types; NaN and inf become None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def make_record(kind: str, *, model: str | None = None, model_options: dict | None = None,
                dataset: str | None = None, root: str | Path | None = None, split: str | None = None,
                metrics: dict | None = None, device: str | None = None, run_id: str | None = None,
                command: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """Build a result record with the fields every record carries (see DESIGN conventions)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    rec = {
        "schema": RECORD_SCHEMA,
        "kind": kind,
        "run_id": run_id or f"{kind}-{now.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "timestamp": now.isoformat(timespec="seconds"),
        "environment": environment(device),
        "model": model,
        "model_options": model_options or {},
        "dataset": dataset,
        "root": str(root) if root is not None else None,
        "split": split,
        "metrics": metrics or {},
        "command": command if command is not None else list(sys.argv),
    }
    rec.update(extra)
    return jsonable(rec)


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` atomically as JSON to ``path``."""
    return atomic_write_json(path, jsonable(record))


@dataclass
class BadRecord:
    path: Path
    reason: str


def read_records(root: str | Path = "results") -> Iterator[dict[str, Any] | BadRecord]:
    """Yield every record (``*.json`` carrying ``kind`` and ``run_id``) below ``root``.

    Files that are not valid JSON or not ldnbench records are yielded as :class:`BadRecord` so
    the caller can report and skip them.
    """
    for path in sorted(Path(root).rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            yield BadRecord(path, f"not valid JSON ({e})")
            continue
        if not isinstance(rec, dict) or "kind" not in rec or "run_id" not in rec:
            yield BadRecord(path, "not an ldnbench result record (no 'kind'/'run_id')")
            continue
        rec["_path"] = str(path)
        yield rec
