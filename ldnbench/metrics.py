"""Streaming segmentation metrics with the exact semantics of cityscapesScripts.

:class:`SegMetrics` accumulates an int64 confusion matrix plus instance-weighted true-positive and
false-negative sums (for iIoU) over any number of images, and :meth:`SegMetrics.compute` turns the
state into a :class:`MetricResult`. The definitions are those of cityscapesScripts'
``evalPixelLevelSemanticLabeling`` transcribed to a label space with an ignore index:

* A pixel whose ground truth is ignore (255) never counts, neither as false positive nor negative.
* False negatives of class ``c`` are all its ground-truth pixels predicted as anything else,
  including ignore/void predictions; false positives are pixels of *other valid* classes predicted
  as ``c``.
* A class with no ground-truth pixel and no false positive has IoU NaN (``None`` in JSON), and
  every mean averages over the non-NaN entries only.
* iIoU weights each ground-truth instance's TP and FN pixels by ``avg_instance_size[c] / size``
  (FP stay unweighted); category iIoU does the same per category with "TP = predicted as any class
  of the same category".

The official evaluator works on the 34 Cityscapes label ids with ``ignoreInEval`` flags; mapping
the ignored ids to 255 gives the same numbers because ignored ground-truth rows are dropped there
too and an ignored prediction id is just "not this class" (tests compare both to <=1e-9). The one
place where an ignored *prediction* id matters is category iIoU: predicting ``caravan`` or
``trailer`` on a car still counts as "vehicle" there. ``extra_pred_categories`` reproduces that:
prediction codes ``K, K+1, ...`` (after the K classes) are void predictions that belong to the
given categories (``ldnbench score`` uses them for Cityscapes label-id PNGs).

On the CPU the update is two compiled loops over the pixels (numba, GIL released). On other
devices it is a few vectorised passes: a histogram of ``lane*65536 + gt*256 + pred`` (four
interleaved lanes, so that runs of one label do not serialise on one counter) folded into the
confusion matrix by a lookup table, and, for iIoU, a histogram of ``flag*n + instance`` over the
row segments that hold objects. Numpy arrays are wrapped without
copying; per-pixel scratch buffers are reused across updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import torch
import torch.distributed as dist

from ldnbench.data.labels import LabelSpace
from ldnbench.errors import UserError

#: Instance maps with larger ids are compacted with ``torch.unique`` first (slow but bounded memory).
_MAX_DIRECT_INSTANCE_BINS = 1 << 24
#: Pixels count into this many interleaved histograms (see ``SegMetrics.update``).
_LANES = 4


def _nan_mean(values: list[float]) -> float:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else float("nan")


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


@dataclass
class MetricResult:
    """All metrics of one evaluation, fractions in 0..1 (NaN where undefined)."""

    label_space: str
    miou: float
    iiou: float
    cat_iou: float
    cat_iiou: float
    class_iou: dict[str, float]
    class_iiou: dict[str, float]
    category_iou: dict[str, float]
    category_iiou: dict[str, float]
    pixel_acc: float
    mean_acc: float
    fwiou: float
    num_images: int
    #: (K+1) x (K+1) int64 matrix, rows = ground truth, cols = prediction; index K = ignore/void.
    confusion: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.int64))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics: fractions, ``None`` for NaN."""
        scalar = lambda v: _none_if_nan(v)  # noqa: E731
        table = lambda d: {k: _none_if_nan(v) for k, v in d.items()}  # noqa: E731
        return {
            "miou": scalar(self.miou), "iiou": scalar(self.iiou),
            "cat_iou": scalar(self.cat_iou), "cat_iiou": scalar(self.cat_iiou),
            "class_iou": table(self.class_iou), "class_iiou": table(self.class_iiou),
            "category_iou": table(self.category_iou), "category_iiou": table(self.category_iiou),
            "pixel_acc": scalar(self.pixel_acc), "mean_acc": scalar(self.mean_acc),
            "fwiou": scalar(self.fwiou), "num_images": int(self.num_images),
            # rows: ground truth classes (+ void), columns: predictions; the counts every number above comes from
            "confusion": self.confusion.tolist(),
        }

    def format_table(self) -> str:
        """Per-class and per-category IoU/iIoU in percent with one decimal, plus the means."""
        pct = lambda v: "    -" if v is None or math.isnan(v) else f"{100 * v:5.1f}"  # noqa: E731
        width = max([len(n) for n in self.class_iou] + [len(n) for n in self.category_iou] + [8])
        lines = [f"{'class':<{width}}   IoU   iIoU", "-" * (width + 14)]
        for name, v in self.class_iou.items():
            lines.append(f"{name:<{width}} {pct(v)}  {pct(self.class_iiou.get(name))}")
        lines += ["-" * (width + 14), f"{'mean':<{width}} {pct(self.miou)}  {pct(self.iiou)}"]
        if self.category_iou:
            lines += ["", f"{'category':<{width}}   IoU   iIoU", "-" * (width + 14)]
            for name, v in self.category_iou.items():
                lines.append(f"{name:<{width}} {pct(v)}  {pct(self.category_iiou.get(name))}")
            lines += ["-" * (width + 14), f"{'mean':<{width}} {pct(self.cat_iou)}  {pct(self.cat_iiou)}"]
        lines += ["", f"pixel acc {pct(self.pixel_acc).strip()}  mean acc {pct(self.mean_acc).strip()}  "
                  f"fwIoU {pct(self.fwiou).strip()}  images {self.num_images}"]
        return "\n".join(lines)


class SegMetrics:
    """Streaming accumulator: ``reset()`` / ``update(pred, target, instances=None)`` / ``compute()``.

    ``pred`` and ``target`` are HxW or NxHxW integer label maps (torch tensors on any device or
    numpy arrays) holding class indices ``0..K-1`` or ``label_space.ignore_index``; predictions
    may also hold the codes ``K..K+E-1`` declared by ``extra_pred_categories``; ``pred_lut`` (256
    entries, -1 = invalid) lets predictions arrive in another uint8 encoding (e.g. Cityscapes label
    ids) that is translated inside the same lookup, at no extra cost. ``instances``
    (same shape, 0 = no instance) enables iIoU; its class is the ground truth at its pixels.
    States of several accumulators add up (:meth:`merge`, :meth:`all_reduce`).
    """

    def __init__(self, label_space: LabelSpace, *, extra_pred_categories: tuple[int, ...] = (),
                 pred_lut: np.ndarray | None = None, pred_desc: str | None = None):
        self.space = label_space
        k = label_space.num_classes
        self.num_classes = k
        self.extra_pred_categories = tuple(extra_pred_categories)
        if pred_lut is not None:
            pred_lut = np.asarray(pred_lut, np.int64)
            if pred_lut.shape != (256,):
                raise ValueError("pred_lut must map the 256 raw prediction values to codes (-1 = invalid)")
        self.pred_lut = pred_lut
        self._pred_desc = pred_desc or (f"0..{k + len(self.extra_pred_categories) - 1} and {label_space.ignore_index}"
                                        if pred_lut is None else "the prediction encoding")
        self._ignore = label_space.ignore_index
        self._cols = k + len(self.extra_pred_categories) + 1  # classes, extra void codes, ignore
        self._void_col = self._cols - 1
        if label_space.has_instances:
            for c in label_space.instance_classes:
                if not label_space.avg_instance_size or not label_space.avg_instance_size[c] > 0:
                    raise ValueError(f"{label_space.name}: instance class {label_space.classes[c]} "
                                     "needs a positive avg_instance_size")
        self._inst_classes = tuple(label_space.instance_classes)
        self._inst_cats = tuple(label_space.instance_categories)
        self._luts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ranks: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._np_tables: tuple[np.ndarray, ...] | None = None  # the CPU loops' tables
        self._by_value: np.ndarray | None = None  # update_combined's per-value instance counts
        self.reset()

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        k, ncat = self.num_classes, len(self.space.categories)
        self.confusion = torch.zeros(k + 1, self._cols, dtype=torch.int64)
        self.inst_tp = torch.zeros(k, dtype=torch.float64)   # weighted, per class
        self.inst_fn = torch.zeros(k, dtype=torch.float64)
        self.cat_tp = torch.zeros(ncat, dtype=torch.float64)  # weighted, per category
        self.cat_fn = torch.zeros(ncat, dtype=torch.float64)
        self.num_images = 0
        self.images_without_instances = 0

    def _state(self) -> list[torch.Tensor]:
        return [self.confusion, self.inst_tp, self.inst_fn, self.cat_tp, self.cat_fn]

    def _to(self, device: torch.device) -> None:
        if self.confusion.device != device:
            self.confusion, self.inst_tp, self.inst_fn, self.cat_tp, self.cat_fn = (
                t.to(device) for t in self._state())

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        """Add ``other``'s state to this one (same label space); returns self."""
        if other.space != self.space or other.extra_pred_categories != self.extra_pred_categories:
            raise ValueError("cannot merge metrics of different label spaces")
        dev = self.confusion.device
        for mine, theirs in zip(self._state(), other._state()):
            mine += theirs.to(dev)
        self.num_images += other.num_images
        self.images_without_instances += other.images_without_instances
        return self

    def all_reduce(self, group=None) -> "SegMetrics":
        """Sum the state over all processes of the default (or given) torch.distributed group.

        A no-op without an initialised process group. Every rank must call it.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = self.confusion.device
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        # every piece moved first: the state may live on another device than the new tensors
        counts = torch.cat([self.confusion.flatten().to(device, torch.int64),
                            torch.tensor([self.num_images, self.images_without_instances], dtype=torch.int64,
                                         device=device)])
        sums = torch.cat([t.to(device, torch.float64) for t in (self.inst_tp, self.inst_fn, self.cat_tp, self.cat_fn)])
        dist.all_reduce(counts, group=group)
        dist.all_reduce(sums, group=group)
        n = self.confusion.numel()
        self.confusion = counts[:n].view_as(self.confusion).to(self.confusion.device)
        self.num_images, self.images_without_instances = (int(v) for v in counts[n:].tolist())
        k, ncat = self.num_classes, len(self.space.categories)
        sums = sums.to(self.inst_tp.device)
        self.inst_tp, self.inst_fn = sums[:k].clone(), sums[k:2 * k].clone()
        self.cat_tp, self.cat_fn = sums[2 * k:2 * k + ncat].clone(), sums[2 * k + ncat:].clone()
        return self

    # ---------------------------------------------------------------- update
    def _build_luts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables over ``gt*256+pred``: confusion cell (sentinel for invalid pairs), and over
        ``lane*65536 + gt*256+pred`` the instance flag.

        Instance flag: 0 = ground truth is not an instance class; for instance class of rank r,
        ``3r+1`` wrong category, ``3r+2`` right category only, ``3r+3`` right class.
        """
        if device in self._luts:
            return self._luts[device]
        k, cols = self.num_classes, self._cols
        sentinel = (k + 1) * cols
        gt_row = np.full(256, -1, np.int64)
        gt_row[:k], gt_row[self._ignore] = np.arange(k), k
        col_of_code = np.full(256, -1, np.int64)
        col_of_code[: cols - 1], col_of_code[self._ignore] = np.arange(cols - 1), self._void_col
        cat_of_code = np.full(256, -1, np.int64)
        if self.space.has_categories:
            cat_of_code[:k] = self.space.class_category
            cat_of_code[k:k + len(self.extra_pred_categories)] = self.extra_pred_categories
        # raw prediction value -> code (identity unless a pred_lut translates an encoding)
        code = np.arange(256) if self.pred_lut is None else self.pred_lut
        pred_col = np.where(code >= 0, col_of_code[code.clip(0, 255)], -1)
        cat_of_pred = np.where(pred_col >= 0, cat_of_code[code.clip(0, 255)], -1)
        cell = gt_row[:, None] * cols + pred_col[None, :]
        cell[(gt_row[:, None] < 0) | (pred_col[None, :] < 0)] = sentinel
        flag = np.zeros((256, 256), np.int64)
        for r, c in enumerate(self._inst_classes):
            flag[c, :] = 3 * r + 1
            if self.space.has_categories:
                flag[c, cat_of_pred == self.space.class_category[c]] = 3 * r + 2
            flag[c, (code == c) & (pred_col >= 0)] = 3 * r + 3
        self._invalid_pred = torch.from_numpy(pred_col < 0)
        flag = np.tile(flag.reshape(-1), _LANES)  # whatever the lane of the code
        luts = (torch.from_numpy(cell.reshape(-1)).to(device), torch.from_numpy(flag.astype(np.int32)).to(device))
        self._luts[device] = luts
        return luts

    @staticmethod
    def _as_tensor(x, name: str, device: torch.device | None = None) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            if x.dtype == np.uint16:
                x = x.astype(np.int32)
            t = torch.from_numpy(np.ascontiguousarray(x))
        elif isinstance(x, torch.Tensor):
            t = x.detach()
        else:
            raise TypeError(f"{name} must be a torch tensor or numpy array, not {type(x).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise UserError(f"{name} must hold integer class indices, not {t.dtype}")
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few ops support these (16-bit PNGs)
            t = t.to(torch.int64)
        return t.to(device) if device is not None else t

    def _check_range(self, t: torch.Tensor, name: str, allowed: str) -> torch.Tensor:
        """Values outside 0..255 would alias other cells of the lookup table: refuse them first."""
        if t.dtype == torch.uint8:
            return t
        if t.numel():
            lo, hi = torch.aminmax(t)
            if lo < 0 or hi > 255:
                bad = torch.unique(t[(t < 0) | (t > 255)])[:8].tolist()
                raise UserError(f"{name} has values {', '.join(map(str, bad))} outside {allowed}; "
                                f"map labels into label space {self.space.name} first")
        return t.to(torch.int32)

    def _work(self, dev: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two int32 per-pixel scratch buffers and the pixel lane offsets, reused across updates.

        Fresh multi-megabyte tensors per frame cost more in page faults than the arithmetic itself.
        """
        bufs = self._bufs.get(dev)
        if bufs is None or bufs[0].numel() < n:
            lanes = torch.arange(_LANES, dtype=torch.int32, device=dev).mul_(1 << 16).repeat(-(-n // _LANES))
            bufs = (torch.empty(n, dtype=torch.int32, device=dev), torch.empty(n, dtype=torch.int32, device=dev),
                    lanes[:n])
            self._bufs[dev] = bufs
        return bufs[0][:n], bufs[1][:n], bufs[2][:n]

    def update(self, pred, target, instances=None) -> None:
        """Add one image (HxW) or a batch (NxHxW) of predictions, ground truth and optional instances."""
        target = self._as_tensor(target, "target")
        dev = target.device
        pred = self._as_tensor(pred, "prediction", dev)
        if pred.shape != target.shape:
            raise UserError(f"prediction shape {tuple(pred.shape)} differs from ground truth shape "
                            f"{tuple(target.shape)}; predict at the ground-truth resolution")
        if target.dim() not in (2, 3):
            raise UserError(f"label maps must be HxW or NxHxW, got shape {tuple(target.shape)}")
        n_img, h, w = (1, *target.shape) if target.dim() == 2 else target.shape
        k = self.num_classes
        valid_pred = self._pred_desc
        g = self._check_range(target, "ground truth", f"0..{k - 1} and {self._ignore}").reshape(-1)
        p = self._check_range(pred, "prediction", valid_pred).reshape(-1)
        inst = None
        if instances is not None and self._inst_classes:
            inst = self._as_tensor(instances, "instances", dev)
            if inst.shape != target.shape:
                raise UserError(f"instance map shape {tuple(inst.shape)} differs from ground truth shape "
                                f"{tuple(target.shape)}")
            inst = inst.reshape(n_img, h, w)
        self._to(dev)
        if dev.type == "cpu":
            counts, sums = self._count_cpu(g, p, inst, valid_pred)
        else:
            counts, sums = self._count_torch(g, p, inst, valid_pred)
        # only now: a refused update leaves the state untouched
        self.confusion += counts[:-1].view(k + 1, self._cols)
        self.num_images += n_img
        if self._inst_classes and inst is None:
            self.images_without_instances += n_img
        for delta in sums:
            for mine, d in zip((self.inst_tp, self.inst_fn, self.cat_tp, self.cat_fn), delta):
                mine += d

    def update_combined(self, pred, combined, class_of: np.ndarray, instance_from: int, *,
                        what: str = "ground truth") -> None:
        """Add one image whose ground truth is a single combined map (e.g. Cityscapes instanceIds).

        ``combined`` is HxW uint16; a value ``v`` has class ``class_of[v]`` (65536 entries: class index,
        ignore index, or -1 = invalid) and is instance ``v`` if ``v >= instance_from`` (else none).
        The state becomes bit for bit what ``update(pred, class_of[v], where(v >= instance_from, v, 0))``
        gives, but on the CPU in one compiled pass over runs of equal (value, prediction) pairs,
        without the two per-pixel maps. ``what`` names the map in errors.
        """
        class_of = np.asarray(class_of)
        if class_of.shape != (1 << 16,) or class_of.dtype.kind != "i" or class_of.min() < -1 or class_of.max() > 255:
            raise ValueError("class_of must map the 65536 uint16 values to class codes 0..255 (-1 = invalid)")
        if not 1 <= instance_from <= 1 << 16:  # 0 means "no instance" in update's instance maps
            raise ValueError("instance_from must be in 1..65536")
        if isinstance(combined, torch.Tensor):
            if combined.device.type != "cpu":
                return self._update_split(pred, combined, class_of, instance_from, what)
            combined = combined.numpy()
        if not isinstance(combined, np.ndarray) or combined.dtype != np.uint16 or combined.ndim != 2:
            raise TypeError("combined must be an HxW uint16 map")
        pred = self._as_tensor(pred, "prediction")
        if tuple(pred.shape) != combined.shape:
            raise UserError(f"prediction shape {tuple(pred.shape)} differs from ground truth shape "
                            f"{combined.shape}; predict at the ground-truth resolution")
        if pred.device.type != "cpu":
            return self._update_split(pred, torch.from_numpy(combined.astype(np.int32)), class_of, instance_from, what)
        p = self._check_range(pred, "prediction", self._pred_desc).reshape(-1).numpy()
        v = np.ascontiguousarray(combined).reshape(-1)
        cell, flag, avg, cls_of, cat_of, keep_of = self._cpu_tables()
        n_cells = (self.num_classes + 1) * self._cols + 1
        if self._by_value is None:  # reused and cleared after use: fresh pages cost more than the loop
            self._by_value = np.zeros((1 << 16 if self._inst_classes else 0, 3), np.int64)
        by_value = self._by_value
        counts, bad = _combined_counts(p, v, class_of, cell, flag, n_cells, instance_from, by_value)
        # (numpy's any(axis=1) over 3 columns is 20x slower than a flat scan)
        values = np.unique(np.flatnonzero(by_value[instance_from:].reshape(-1)) // 3) + instance_from
        hits = by_value[values]
        by_value[values] = 0
        if bad >= 0:
            bad = np.unique(v[class_of[v] < 0])[:8]
            raise UserError(f"{what} has values {', '.join(map(str, bad))} that map to no class")
        if counts[-1] > 0:
            self._raise_invalid(torch.from_numpy(class_of[v]), torch.from_numpy(p), self._pred_desc)
        sums = []
        if self._inst_classes:
            if len(values):  # one column per instance, in id order: the rank loop then sums like update's
                r_count = len(self._inst_classes)
                rank_of = np.full(256, -1, np.int64)
                rank_of[list(self._inst_classes)] = np.arange(r_count)
                hist = np.zeros((r_count, 3, values.size), np.int64)
                hist[rank_of[class_of[values]], :, np.arange(values.size)] = hits
                sums.append(tuple(torch.from_numpy(a) for a in _instance_sums_np(
                    hist, avg, cls_of, cat_of, keep_of, self.num_classes, len(self.space.categories))))
        self._to(torch.device("cpu"))
        self.confusion += torch.from_numpy(counts[:-1]).view(self.num_classes + 1, self._cols)
        self.num_images += 1
        for delta in sums:
            for mine, d in zip((self.inst_tp, self.inst_fn, self.cat_tp, self.cat_fn), delta):
                mine += d

    def _update_split(self, pred, combined: torch.Tensor, class_of: np.ndarray, instance_from: int,
                      what: str) -> None:
        """:meth:`update_combined` on an accelerator: split the map with tensor ops, then :meth:`update`."""
        v = combined.to(torch.int64)
        table = torch.from_numpy(class_of.astype(np.int64)).to(v.device)
        g = table[v]
        if (g < 0).any():
            bad = torch.unique(v[g < 0])[:8].tolist()
            raise UserError(f"{what} has values {', '.join(map(str, bad))} that map to no class")
        self.update(pred, g, torch.where(v >= instance_from, v, 0))

    def _count_cpu(self, g: torch.Tensor, p: torch.Tensor, inst: torch.Tensor | None,
                   valid_pred: str) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """:meth:`_count_torch` for CPU tensors in compiled loops: one pass over the pixels for the
        confusion matrix, one per image for the instances, the GIL released throughout (``score``
        runs it in parallel threads). Same counts and, summed in the same order, the same floats."""
        cell, flag, avg, cls_of, cat_of, keep_of = self._cpu_tables()
        g_np, p_np = g.numpy(), p.numpy()
        counts = torch.from_numpy(_pixel_counts(g_np, p_np, cell, (self.num_classes + 1) * self._cols + 1))
        if counts[-1] > 0:
            self._raise_invalid(g, p, valid_pred)
        sums = []
        r_count, ncat = len(self._inst_classes), len(self.space.categories)
        for b, ids in enumerate(inst if inst is not None else ()):
            ids = ids.reshape(-1).numpy()
            img = slice(b * ids.size, (b + 1) * ids.size)
            lo, hi = _id_range(ids)
            if lo < 0:
                raise UserError("instance maps must not hold negative ids (0 = no instance)")
            if hi <= 0:
                continue
            if (hi - lo + 1) * 3 * r_count > _MAX_DIRECT_INSTANCE_BINS:
                uniq, ids = np.unique(ids, return_inverse=True)  # slow, but bounded memory
                ids = ids.astype(np.int64) + (uniq[0] != 0)    # keep 0 for "no instance"
                lo, hi = _id_range(ids)
            hist = _instance_counts(g_np[img], p_np[img], ids, flag, 3 * r_count, lo, hi - lo + 1)
            sums.append(tuple(torch.from_numpy(a) for a in _instance_sums_np(
                hist.reshape(r_count, 3, -1), avg, cls_of, cat_of, keep_of, self.num_classes, ncat)))
        return counts, sums

    def _cpu_tables(self) -> tuple[np.ndarray, ...]:
        """:meth:`_build_luts` and :meth:`_rank_tables` as compact numpy arrays for the compiled loops."""
        if self._np_tables is None:
            cell, flag = self._build_luts(torch.device("cpu"))
            avg, cls_of, cat_of, keep_of = self._rank_tables(torch.device("cpu"))
            self._np_tables = (cell.numpy().astype(np.int32), flag[: 1 << 16].numpy().astype(np.int8),
                               avg.numpy(), cls_of.numpy().astype(np.int64), cat_of.numpy().astype(np.int64),
                               keep_of.numpy())
        return self._np_tables

    def _count_torch(self, g: torch.Tensor, p: torch.Tensor, inst: torch.Tensor | None,
                     valid_pred: str) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """Confusion counts (cells + sentinel) and per-image instance sums, in vectorised torch ops
        on the tensors' device (the path for accelerators)."""
        dev, k = g.device, self.num_classes
        cell_lut, row_lut = self._build_luts(dev)
        # lane*65536 + gt*256 + pred for every pixel. Label maps come in long runs of one value, and
        # a serial histogram of runs stalls on its own counter; four lanes (summed afterwards) make
        # neighbouring pixels count into different counters. The histogram folds into the confusion
        # matrix through the cell table, so no per-pixel gather is needed for it.
        code, scratch, lanes = self._work(dev, g.numel())
        code.copy_(g)  # same-dtype operands below: mixed uint8/int32 ops would allocate temporaries
        torch.add(lanes, code, alpha=256, out=code)
        code.add_(scratch.copy_(p))
        hist = torch.bincount(code, minlength=_LANES << 16).view(_LANES, 1 << 16).sum(0)
        counts = torch.zeros((k + 1) * self._cols + 1, dtype=torch.int64, device=dev).index_add_(0, cell_lut, hist)
        if counts[-1] > 0:
            self._raise_invalid(g, p, valid_pred)
        sums = []
        n_img, h, w = inst.shape if inst is not None else (0, 0, 0)
        for b in range(n_img):  # instance ids are per image
            img = slice(b * h * w, (b + 1) * h * w)
            hist2, n, none = self._instance_hist(inst[b], code[img], scratch[img], row_lut)
            if hist2 is not None:
                sums.append(self._instance_sums(hist2, n, none))
        return counts, sums

    def _instance_hist(self, ids: torch.Tensor, code: torch.Tensor, scratch: torch.Tensor,
                       row_lut: torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
        """Histogram of ``flag * n + instance`` (flags: see ``_build_luts``) over the pixels of one HxW
        image with instance ``ids`` and pixel codes ``code``, with ``n`` and the instance index that
        means "no instance"; ``code`` and ``scratch`` are overwritten.

        Only row segments that hold an object are counted (objects cover a fifth of a street
        scene): a gather of whole segments, no per-pixel compaction. Their ids are shifted so that
        the smallest becomes 1 (Cityscapes ids start at 24000): a 4x smaller histogram.
        """
        h, w = ids.shape
        if not ids.numel():
            return None, 0, 0
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0:
            raise UserError("instance maps must not hold negative ids (0 = no instance)")
        if hi <= 0:
            return None, 0, 0
        f = 1 + 3 * len(self._inst_classes)
        if (hi + 1) * f > _MAX_DIRECT_INSTANCE_BINS:
            uniq, ids = torch.unique(ids, return_inverse=True)  # slow, but bounded memory
            if uniq[0] != 0:  # keep index 0 for "no instance"
                ids = ids + 1
            hi = int(ids.max())
        seg = next((s for s in (32, 16, 8) if w % s == 0), w)
        keep = (ids.reshape(-1, seg).amax(1) > 0).nonzero().squeeze(1)
        m = keep.numel() * seg
        picked_code = torch.index_select(code.view(-1, seg), 0, keep, out=scratch[:m].view(-1, seg)).view(-1)
        # ``code`` is free now: the picked ids go there (int32, ours to change in place)
        x = code[:m].view(-1, seg)
        if ids.dtype == torch.int32:
            torch.index_select(ids.reshape(-1, seg), 0, keep, out=x)
        else:
            x.copy_(ids.reshape(-1, seg).index_select(0, keep))
        x = x.view(-1)
        n, none = hi + 1, 0
        lowest = int(x.sub_(1).bitwise_and_(0x7FFFFFFF).min()) + 1  # id 0 -> -1 -> INT_MAX: ignored by min
        if lowest >= 2:
            top = hi - lowest + 1           # ids lowest..hi -> 1..top; "no instance" (INT_MAX) -> top + 1
            x.sub_(lowest - 2).clamp_(max=top + 1)
            n, none = top + 2, top + 1
        else:
            x.add_(1).clamp_(min=0)         # back to the ids, 0 = no instance
        bins = scratch[m:2 * m] if 2 * m <= scratch.numel() else torch.empty_like(x)
        torch.index_select(row_lut * n, 0, picked_code, out=bins)
        return torch.bincount(bins.add_(x), minlength=f * n), n, none

    def _raise_invalid(self, g: torch.Tensor, p: torch.Tensor, valid_pred: str) -> None:
        k = self.num_classes
        bad_g = torch.unique(g[(g >= k) & (g != self._ignore)])
        if bad_g.numel():
            raise UserError(f"ground truth has values {', '.join(map(str, bad_g[:8].tolist()))} outside "
                            f"0..{k - 1} and {self._ignore} (label space {self.space.name}); "
                            "map labels into the label space first")
        bad_p = torch.unique(p[self._invalid_pred.to(p.device)[p.long()]])
        raise UserError(f"prediction has values {', '.join(map(str, bad_p[:8].tolist()))} outside {valid_pred} "
                        f"(label space {self.space.name}); map predictions into the label space first")

    def _rank_tables(self, dev: torch.device) -> tuple[torch.Tensor, ...]:
        """Per instance-class rank: average size, class index, category index, counts-for-category."""
        if dev not in self._ranks:
            cat_of = [self.space.class_category[c] if self.space.has_categories else 0 for c in self._inst_classes]
            self._ranks[dev] = (
                torch.tensor([self.space.avg_instance_size[c] for c in self._inst_classes], dtype=torch.float64,
                             device=dev),
                torch.tensor(self._inst_classes, device=dev), torch.tensor(cat_of, device=dev),
                torch.tensor([c in self._inst_cats for c in cat_of], device=dev))
        return self._ranks[dev]

    def _instance_sums(self, hist: torch.Tensor, n: int, none: int = 0) -> tuple[torch.Tensor, ...]:
        """Instance-weighted (TP, FN) per class and per category from one image's instance histogram
        (``n`` instance indices, ``none`` the one of pixels without instance)."""
        r_count = len(self._inst_classes)
        inst_tp, inst_fn = torch.zeros_like(self.inst_tp), torch.zeros_like(self.inst_fn)
        cat_tp_sum, cat_fn_sum = torch.zeros_like(self.cat_tp), torch.zeros_like(self.cat_fn)
        # drop flag 0 (ground truth not of an instance class): (rank, kind, instance)
        per_kind = hist.view(-1, n)[1:].view(r_count, 3, n)
        size_all = per_kind.sum(1)
        size_all[:, none] = 0
        sel = size_all.view(-1).nonzero().squeeze(1)  # one group per (class rank, instance) with pixels
        if not sel.numel():
            return inst_tp, inst_fn, cat_tp_sum, cat_fn_sum
        rank = torch.div(sel, n, rounding_mode="floor")
        kinds = per_kind[rank, :, sel % n].to(torch.float64)  # (groups, 3)
        size = kinds.sum(1)
        tp, cat_tp = kinds[:, 2], kinds[:, 1] + kinds[:, 2]
        avg, cls_of, cat_of, keep_of = self._rank_tables(hist.device)
        w = avg[rank] / size
        cls = cls_of[rank]
        inst_tp.index_add_(0, cls, tp * w)
        inst_fn.index_add_(0, cls, (size - tp) * w)
        if self._inst_cats:
            cats, keep = cat_of[rank], keep_of[rank]
            cat_tp_sum.index_add_(0, cats, torch.where(keep, cat_tp * w, 0.0))
            cat_fn_sum.index_add_(0, cats, torch.where(keep, (size - cat_tp) * w, 0.0))
        return inst_tp, inst_fn, cat_tp_sum, cat_fn_sum

    # ---------------------------------------------------------------- results
    def compute(self) -> MetricResult:
        """The metrics of everything accumulated since the last :meth:`reset`."""
        space, k = self.space, self.num_classes
        cm = self.confusion.cpu().numpy().astype(np.int64)
        m = cm[:k]                                   # rows of valid ground truth
        tp = np.diag(m[:, :k]).astype(np.float64)
        gt_total = m.sum(1).astype(np.float64)
        fn = gt_total - tp
        fp = m[:, :k].sum(0) - tp
        iou = [self._ratio(tp[c], tp[c] + fp[c] + fn[c]) for c in range(k)]
        class_iou = dict(zip(space.classes, iou))

        use_inst = bool(self._inst_classes) and self.images_without_instances == 0 and self.num_images > 0
        inst_tp, inst_fn = self.inst_tp.cpu().numpy(), self.inst_fn.cpu().numpy()
        class_iiou = {space.classes[c]: (self._ratio(inst_tp[c], inst_tp[c] + fp[c] + inst_fn[c]) if use_inst
                                         else float("nan")) for c in self._inst_classes}

        category_iou: dict[str, float] = {}
        category_iiou: dict[str, float] = {}
        if space.has_categories:
            cat_of = np.asarray(space.class_category)
            cat_tp_w, cat_fn_w = self.cat_tp.cpu().numpy(), self.cat_fn.cpu().numpy()
            extra = np.asarray(self.extra_pred_categories, dtype=np.int64)
            for j, name in enumerate(space.categories):
                members = np.flatnonzero(cat_of == j)
                if not members.size:
                    category_iou[name] = float("nan")
                    continue
                others = np.flatnonzero(cat_of != j)
                c_tp = m[np.ix_(members, members)].sum()
                c_fn = m[members].sum() - c_tp
                c_fp = m[np.ix_(others, members)].sum()
                category_iou[name] = self._ratio(c_tp, c_tp + c_fp + c_fn)
                if j in self._inst_cats:
                    # the official tool counts void predictions of this category (caravan) as its FP too
                    pred_cols = np.concatenate([members, k + np.flatnonzero(extra == j)])
                    i_fp = m[np.ix_(others, pred_cols)].sum()
                    category_iiou[name] = (self._ratio(cat_tp_w[j], cat_tp_w[j] + i_fp + cat_fn_w[j]) if use_inst
                                           else float("nan"))

        total = gt_total.sum()
        present = gt_total > 0
        freq = gt_total / total if total else gt_total
        iou_arr = np.asarray(iou)
        fw_valid = present & ~np.isnan(iou_arr)
        return MetricResult(
            label_space=space.name,
            miou=_nan_mean(iou),
            iiou=_nan_mean(list(class_iiou.values())),
            cat_iou=_nan_mean(list(category_iou.values())),
            cat_iiou=_nan_mean(list(category_iiou.values())),
            class_iou=class_iou, class_iiou=class_iiou,
            category_iou=category_iou, category_iiou=category_iiou,
            pixel_acc=float(tp.sum() / total) if total else float("nan"),
            mean_acc=float(np.mean(tp[present] / gt_total[present])) if present.any() else float("nan"),
            fwiou=float((freq[fw_valid] * iou_arr[fw_valid]).sum()) if total else float("nan"),
            num_images=self.num_images,
            confusion=cm,
        )

    @staticmethod
    def _ratio(num: float, den: float) -> float:
        return float(num) / float(den) if den > 0 else float("nan")


# ---------------------------------------------------------------- compiled CPU loops
# Label maps come in long runs of one value: a histogram that counts neighbouring pixels into one
# counter stalls on that counter, so pixels count into _LANES interleaved histograms, summed at the end.

@numba.njit(nogil=True, cache=True)
def _pixel_counts(g, p, cell, n_cells):  # pragma: no cover - compiled
    hist = np.zeros((_LANES, n_cells), np.int64)
    for i in range(g.size):
        hist[i & (_LANES - 1), cell[(np.int64(g[i]) << 8) | np.int64(p[i])]] += 1
    return hist.sum(0)


@numba.njit(nogil=True, cache=True)
def _id_range(ids):  # pragma: no cover - compiled
    """(smallest id > 0, largest id); (-1, 0) if any id is negative."""
    big = np.iinfo(np.int64).max
    lo, hi, low = big, np.int64(0), np.int64(0)
    for i in range(ids.size):  # branch-free, so that it vectorises
        v = np.int64(ids[i])
        hi = max(hi, v)
        low = min(low, v)
        lo = min(lo, v if v > 0 else big)
    if low < 0:
        return np.int64(-1), np.int64(0)
    return lo, hi


@numba.njit(nogil=True, cache=True)
def _instance_counts(g, p, ids, flag, n_flags, lo, n_ids):  # pragma: no cover - compiled
    """Pixels per (flag - 1, id - lo) over the pixels with an instance of an instance class."""
    hist = np.zeros((n_flags, n_ids), np.int64)
    for i in range(ids.size):
        v = np.int64(ids[i])
        if v > 0:
            f = flag[(np.int64(g[i]) << 8) | np.int64(p[i])]
            if f > 0:
                hist[f - 1, v - lo] += 1
    return hist


@numba.njit(nogil=True, cache=True)
def _instance_sums_np(hist, avg, cls_of, cat_of, keep_of, k, ncat):  # pragma: no cover - compiled
    """``SegMetrics._instance_sums`` with the same operations in the same order (rank, then instance)."""
    inst_tp, inst_fn = np.zeros(k), np.zeros(k)
    cat_tp, cat_fn = np.zeros(ncat), np.zeros(ncat)
    for r in range(hist.shape[0]):
        for j in range(hist.shape[2]):
            wrong, cat_only, right = float(hist[r, 0, j]), float(hist[r, 1, j]), float(hist[r, 2, j])
            size = wrong + cat_only + right
            if size == 0:
                continue
            w = avg[r] / size
            inst_tp[cls_of[r]] += right * w
            inst_fn[cls_of[r]] += (size - right) * w
            if keep_of[r]:
                cat_tp[cat_of[r]] += (cat_only + right) * w
                cat_fn[cat_of[r]] += (size - (cat_only + right)) * w
    return inst_tp, inst_fn, cat_tp, cat_fn


@numba.njit(nogil=True, cache=True)
def _combined_run(v, q, run, class_of, cell, flag, first, counts, by_value, bad):  # pragma: no cover - compiled
    """The last run of :func:`_combined_counts` (its loop body, written out there: a call per run costs 2x)."""
    t = class_of[v]
    if t < 0:
        bad = max(bad, np.int64(v))
    key = (np.uint64(t & 255) << np.uint64(8)) | np.uint64(q)
    counts[np.uint64(cell[key])] += run
    if v >= first and by_value.shape[0] > 0:
        f = flag[key]
        if f > 0:
            by_value[np.uint64(v), np.uint64((f - 1) % 3)] += run
    return bad


@numba.njit(nogil=True, cache=True)
def _combined_counts(p, v, class_of, cell, flag, n_cells, first, by_value):  # pragma: no cover - compiled
    """Confusion cells and per-value instance counts (wrong, category only, right) of a combined map.

    Label maps are runs of one value and predictions mostly agree with them: the loop only compares
    neighbours and does its lookups once per run of equal (value, prediction) pairs."""
    counts = np.zeros(n_cells, np.int64)
    bad = np.int64(-1)
    n = v.size
    if n == 0:
        return counts, bad
    start = 0
    cv = v[0]
    cp = p[0]
    for i in range(1, n):
        if v[i] != cv or p[i] != cp:
            t = class_of[cv]
            if t < 0:
                bad = max(bad, np.int64(cv))
            key = (np.uint64(t & 255) << np.uint64(8)) | np.uint64(cp)
            counts[np.uint64(cell[key])] += i - start
            if cv >= first and by_value.shape[0] > 0:
                f = flag[key]
                if f > 0:
                    by_value[np.uint64(cv), np.uint64((f - 1) % 3)] += i - start
            cv = v[i]  # separate assignments: a tuple assignment here makes the loop 25 % slower
            cp = p[i]
            start = i
    bad = _combined_run(cv, cp, n - start, class_of, cell, flag, first, counts, by_value, bad)
    return counts, bad
