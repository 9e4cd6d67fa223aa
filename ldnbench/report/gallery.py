"""The gallery: the N worst and N best images of an ``eval --per-image`` record, beside their predictions.

One row per image: image | ground truth | prediction, both label maps in the label space's palette
(void black), the per-image mIoU in the title. Drawn by ``ldnbench predict --gallery RECORD`` from
the record's rows and the prediction PNGs just written (see docs/evaluation.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write


def pick(rows: Sequence[dict[str, Any]], n: int) -> list[tuple[str, dict[str, Any]]]:
    """[("worst k", row) ..., ("best k", row) ...]: the ``n`` lowest then the ``n`` highest per-image mIoU
    (images without an mIoU are left out; an image is shown once when the set is small)."""
    scored = sorted((r for r in rows if r.get("miou") is not None), key=lambda r: (r["miou"], r["id"]))
    worst = scored[:n]
    best = [r for r in reversed(scored[-n:]) if r not in worst] if n else []
    return [(f"worst {k + 1}", r) for k, r in enumerate(worst)] + [(f"best {k + 1}", r) for k, r in enumerate(best)]


def read_per_image(record: str | Path | dict) -> dict[str, Any]:
    rec = record if isinstance(record, dict) else json.loads(Path(record).read_text())
    if not isinstance(rec.get("per_image"), list) or not rec["per_image"]:
        raise UserError(f"record {record if not isinstance(record, dict) else rec.get('run_id')} has no per-image "
                        "rows; write one with `ldnbench eval --per-image`")
    return rec


def _decode_prediction(path: Path, fmt: str, space) -> np.ndarray:
    """HxWx3 palette colours of a prediction PNG in ``fmt`` (labelIds/trainIds decoded, color as is)."""
    from ldnbench.data.io import read_label, read_rgb

    if fmt == "color":
        return read_rgb(path)
    if fmt == "overlay":
        raise UserError("a gallery needs labelIds, trainIds or color predictions, not overlays", 2)
    from ldnbench.score import get_pred_format

    lut = get_pred_format(fmt, space).lut.copy()
    lut[(lut < 0) | (lut >= space.num_classes)] = 255  # void, unknown and extra void codes draw black
    return space.palette()[lut[read_label(path)]]


def draw_gallery(record: str | Path | dict, dataset, pred_dir: str | Path, out: str | Path, *, n: int = 4,
                 pred_format: str = "trainIds") -> Path:
    """Write the gallery PNG ``out`` for ``record``'s per-image rows; ``dataset`` gives images and labels,
    ``pred_dir`` holds ``<sample id>.png`` predictions in ``pred_format``. Returns ``out``."""
    from matplotlib.figure import Figure

    rec = read_per_image(record)
    chosen = pick(rec["per_image"], n)
    if not chosen:
        raise UserError("no per-image row has an mIoU (no labelled pixels?); nothing to draw")
    index = {f.id: i for i, f in enumerate(dataset.files)}
    space = dataset.label_space
    pal = space.palette()
    pred_dir = Path(pred_dir)
    missing = [r["id"] for _, r in chosen if r["id"] not in index]
    if missing:
        raise UserError(f"per-image row {missing[0]} is not a sample of {dataset.name} {dataset.split}; draw the "
                        "gallery with the dataset and split the record was evaluated on")
    h, w = dataset.load_image(index[chosen[0][1]["id"]]).shape[:2]
    fig = Figure(figsize=(9, len(chosen) * (3 * h / w + 0.35) + 0.5))
    axes = fig.subplots(len(chosen), 3, squeeze=False)
    for row, (tag, r) in zip(axes, chosen):
        i = index[r["id"]]
        pred_path = pred_dir / f"{r['id']}.png"
        if not pred_path.is_file():
            raise UserError(f"no prediction {pred_path}; run `ldnbench predict` on the same dataset and split first")
        label, _ = dataset.load_target(i)
        panels = (dataset.load_image(i), pal[label], _decode_prediction(pred_path, pred_format, space))
        titles = (f"{tag}: {r['id']}", "ground truth", f"prediction — mIoU {100 * r['miou']:.1f}%")
        for ax, img, title in zip(row, panels, titles):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    proto = (rec.get("eval_settings") or {})
    sub = f"{rec.get('model')} on {rec.get('dataset')} {rec.get('split')}"
    if proto.get("resize"):
        sub += f", resize {proto['resize']} (eval at {proto.get('eval_at')})"
    fig.suptitle(f"{n} worst and {n} best images by per-image mIoU — {sub}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    return atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=120))

