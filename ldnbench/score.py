"""Score a folder of prediction PNGs against a dataset's ground truth (``ldnbench score``).

Predictions are found the way cityscapesScripts finds them: anywhere below the prediction folder,
a ``*.png`` whose name starts with the sample id (Cityscapes: ``city_seq_frame``) belongs to that
sample. Works for any adapter: it needs only ``dataset.files`` (ids) and ``dataset.load_target``
(or, faster, ``load_target_combined``: Cityscapes' instanceIds map, scored in one pass).
Sizes are checked from the PNG headers before any decoding, so a wrong file fails in seconds.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ldnbench.data.base import SegDataset
from ldnbench.data.labels import IGNORE, LabelSpace
from ldnbench.errors import UserError
from ldnbench.metrics import MetricResult, SegMetrics

PRED_FORMATS = ("labelIds", "trainIds")


@dataclass(frozen=True)
class PredFormat:
    """How prediction pixel values become codes of :class:`SegMetrics` (LUT over 0..255, -1 = invalid)."""

    name: str
    lut: np.ndarray
    extra_pred_categories: tuple[int, ...] = ()
    describe: str = ""


def get_pred_format(name: str, space: LabelSpace) -> PredFormat:
    """``trainIds``: class indices of the dataset's label space (255 = void); ``labelIds``: the
    34 Cityscapes label ids (only for datasets in the cityscapes19 space)."""
    lut = np.full(256, -1, np.int64)
    if name == "trainIds":
        lut[: space.num_classes] = np.arange(space.num_classes)
        lut[IGNORE] = IGNORE
        return PredFormat(name, lut, (), f"class indices 0..{space.num_classes - 1} of {space.name} or 255")
    if name == "labelIds":
        if space.name != "cityscapes19":
            raise UserError(f"--pred-format labelIds is the Cityscapes label-id encoding, but this dataset's "
                            f"label space is {space.name}; use --pred-format trainIds", 2)
        from cityscapesscripts.helpers.labels import labels

        extra: list[int] = []
        inst_cats = {space.categories[c] for c in space.instance_categories}
        for lab in labels:
            if lab.id < 0:
                continue
            if not lab.ignoreInEval:
                lut[lab.id] = space.index(lab.name)
            elif lab.category in inst_cats:
                # void for classes, but counted by the official tool for its category's iIoU (caravan)
                lut[lab.id] = space.num_classes + len(extra)
                extra.append(space.categories.index(lab.category))
            else:
                lut[lab.id] = IGNORE
        return PredFormat(name, lut, tuple(extra), "Cityscapes label ids 0..33")
    raise UserError(f"unknown prediction format {name!r}; choose one of: {', '.join(PRED_FORMATS)}", 2)


def default_pred_format(space: LabelSpace) -> str:
    """What users submit to the official tool: label ids for Cityscapes, class indices otherwise."""
    return "labelIds" if space.name == "cityscapes19" else "trainIds"


@dataclass
class Matching:
    files: dict[str, Path]                    #: sample id -> prediction file
    missing: list[str] = field(default_factory=list)
    duplicates: dict[str, list[Path]] = field(default_factory=dict)
    extra: list[Path] = field(default_factory=list)  #: PNGs that belong to no sample


def match_predictions(ids: list[str], pred_dir: str | Path) -> Matching:
    """Pair sample ids with ``{id}*.png`` files found anywhere below ``pred_dir`` (official rule)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {pred_dir} does not exist or is not a folder")
    wanted = set(ids)
    lengths = sorted({len(i) for i in wanted})
    found: dict[str, list[Path]] = {}
    extra: list[Path] = []
    for root, _, names in os.walk(pred_dir):
        for name in sorted(names):
            if not name.endswith(".png"):
                continue
            hits = [name[:n] for n in lengths if n <= len(name) - 4 and name[:n] in wanted]
            for sid in hits:
                found.setdefault(sid, []).append(Path(root) / name)
            if not hits:
                extra.append(Path(root) / name)
    m = Matching({k: v[0] for k, v in found.items() if len(v) == 1})
    m.duplicates = {k: v for k, v in found.items() if len(v) > 1}
    m.missing = [i for i in ids if i not in found]
    m.extra = extra
    return m


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, without decoding it."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise UserError(f"{path} is not a PNG file; predictions must be single-channel PNGs")
    w, h, depth, ctype = struct.unpack(">IIBB", head[16:26])
    return w, h, depth, ctype


def _decode_pred(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_png

    try:
        t = decode_png(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), ImageReadMode.UNCHANGED)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot decode prediction {path}: {e}") from None
    return t[0]


#: SegMetrics' float64 (instance-weighted) state, summed per image in a fixed order.
_FLOAT_STATE = ("inst_tp", "inst_fn", "cat_tp", "cat_fn")


def _image_update(acc: SegMetrics, update) -> list[torch.Tensor]:
    """Run ``update()`` (one image into ``acc``); ``acc``'s float state is left as it was and the image's
    share returned."""
    saved = [getattr(acc, n) for n in _FLOAT_STATE]
    for n, t in zip(_FLOAT_STATE, saved):
        setattr(acc, n, torch.zeros_like(t))
    try:
        update()
        return [getattr(acc, n) for n in _FLOAT_STATE]
    finally:
        for n, t in zip(_FLOAT_STATE, saved):
            setattr(acc, n, t)


@dataclass
class ScoreResult:
    metrics: MetricResult
    dataset: str
    root: str
    split: str
    pred_dir: str
    pred_format: str
    extra: list[Path]
    seconds: float
    resize: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` content: metric keys at top level (fractions, null for NaN) + provenance."""
        return {**self.metrics.to_dict(), "dataset": self.dataset, "root": self.root, "split": self.split,
                "pred_dir": self.pred_dir, "pred_format": self.pred_format,
                "extra_predictions": [str(p) for p in self.extra], "seconds": round(self.seconds, 3),
                **({"resize": self.resize, "eval_at": "resized"} if self.resize is not None else {})}


def _check_matching(m: Matching, ds: SegDataset, pred_dir: Path) -> None:
    def some(items) -> str:
        items = [str(i) for i in items]
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    if m.duplicates:
        sid, paths = next(iter(m.duplicates.items()))
        raise UserError(f"{len(m.duplicates)} sample(s) have several predictions in {pred_dir}, e.g. {sid}: "
                        f"{some(paths)}; keep one PNG per sample")
    if m.missing:
        raise UserError(f"{len(m.missing)} of {len(ds.files)} {ds.name} {ds.split} samples have no prediction in "
                        f"{pred_dir} (e.g. {some(m.missing)}); predictions are matched by file names starting "
                        f"with the sample id, like {m.missing[0]}*.png")


def _check_headers(ds: SegDataset, m: Matching) -> None:
    from ldnbench.data.resize import protocol, resized_size

    width, eval_at = protocol(ds)
    problems = []
    for f in ds.files:
        pred = m.files[f.id]
        w, h, depth, ctype = png_header(pred)
        if ctype not in (0, 3) or depth > 16:
            problems.append(f"{pred.name} has {'several channels' if ctype not in (0, 3) else f'{depth}-bit pixels'}"
                            " (must be one 8- or 16-bit channel of class ids)")
        elif f.label is not None and f.label.suffix == ".png":
            gw, gh, _, _ = png_header(f.label)
            if width is not None and eval_at == "resized":
                gh, gw = resized_size(gh, gw, width)
            if (gw, gh) != (w, h):
                problems.append(f"{pred.name} is {w}x{h} but its ground truth is {gw}x{gh}"
                                + (f" (resized to width {width})" if width is not None else ""))
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UserError(f"{len(problems)} prediction(s) cannot be scored: {'; '.join(problems[:3])}{more}; "
                        "write predictions at the ground-truth resolution as single-channel PNGs")


def score_predictions(dataset: SegDataset, pred_dir: str | Path, *, pred_format: str | None = None,
                      workers: int = 2, progress: bool = True) -> ScoreResult:
    """Score every sample of ``dataset`` against its prediction PNG in ``pred_dir``.

    ``workers`` threads decode and accumulate in parallel (each with its own accumulator, merged
    at the end). Raises :class:`UserError` for missing, duplicate, mis-sized or out-of-range
    predictions; PNGs that match no sample are reported in ``ScoreResult.extra``.
    """
    t0 = time.perf_counter()
    pred_dir = Path(pred_dir)
    space = dataset.label_space
    fmt = get_pred_format(pred_format or default_pred_format(space), space)
    match = match_predictions([f.id for f in dataset.files], pred_dir)
    if not dataset.files:
        raise UserError(f"{dataset.name} {dataset.split} has no samples to score")
    _check_matching(match, dataset, pred_dir)
    _check_headers(dataset, match)

    n_workers = max(1, min(workers, len(dataset.files)))
    # Cityscapes: labels derived from the instanceIds PNG, one ground-truth decode instead of two
    load_target = getattr(dataset, "load_target_fast", dataset.load_target)
    load_combined = getattr(dataset, "load_target_combined", lambda i: None)  # SegDataset: None by default
    accs = [SegMetrics(space, extra_pred_categories=fmt.extra_pred_categories, pred_lut=fmt.lut,
                       pred_desc=fmt.describe) for _ in range(n_workers)]
    errors: list[BaseException] = []
    stop = threading.Event()
    deltas: dict[int, list[torch.Tensor]] = {}

    bar = tqdm(total=len(dataset.files), desc="score", unit="img", disable=not progress)

    def work(k: int, acc: SegMetrics) -> None:
        # worker k takes frames k, k + n, ...: a fixed share in a fixed order, so the float sums (iIoU
        # weights) and hence the result do not depend on thread timing
        for i in range(k, len(dataset.files), n_workers):
            if stop.is_set():
                return
            try:
                f = dataset.files[i]
                path = match.files[f.id]
                pred = _decode_pred(path)
                if pred.dtype != torch.uint8:  # 16-bit PNG: fine as long as the values are ids
                    pred = pred.to(torch.int32)
                    if pred.max() > 255:
                        bad = torch.unique(pred[pred > 255])[:8].tolist()
                        raise UserError(f"prediction {path} has values {', '.join(map(str, bad))} outside "
                                        f"{fmt.describe}; check --pred-format")
                    pred = pred.to(torch.uint8)
                combined = load_combined(i)
                if combined is not None:  # one pass over the undivided ground-truth map
                    update = lambda: acc.update_combined(pred, combined.values, combined.class_of,  # noqa: E731
                                                         combined.instance_from, what=combined.source)
                else:
                    target = load_target(i)
                    update = lambda: acc.update(pred, *target)  # noqa: E731
                try:
                    deltas[i] = _image_update(acc, update)  # translates the format in its lookup table
                except UserError as e:
                    if combined is not None and str(e).startswith(combined.source):
                        raise  # the ground truth's fault, not the prediction's
                    raise UserError(f"{path}: {e}; check --pred-format") from None
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                stop.set()
                return
            bar.update(1)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over images instead of inside each op
    try:
        threads = [threading.Thread(target=work, args=(k, acc), daemon=True) for k, acc in enumerate(accs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
    if errors:
        raise errors[0]
    total = accs[0]
    for acc in accs[1:]:
        total.merge(acc)
    # Instance-weighted sums are floats: add them in dataset order, as `eval` does, so that the same
    # predictions give bit-identical numbers whatever the number of threads (counts are exact anyway).
    for name in _FLOAT_STATE:
        setattr(total, name, torch.zeros_like(getattr(total, name)))
    for i in sorted(deltas):
        for name, d in zip(_FLOAT_STATE, deltas[i]):
            getattr(total, name).add_(d.to(getattr(total, name).device))
    from ldnbench.data.resize import protocol

    return ScoreResult(total.compute(), dataset.name, str(dataset.root), dataset.split, str(pred_dir),
                       fmt.name, match.extra, time.perf_counter() - t0, protocol(dataset)[0])
