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

The update is a few vectorised passes (one lookup table over ``gt*256+pred``, two ``bincount``\\ s)
on whatever device the tensors live on; numpy arrays are wrapped without copying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ldnbench.data.labels import LabelSpace
from ldnbench.errors import UserError

#: Instance maps with larger ids are compacted with ``torch.unique`` first (slow but bounded memory).
_MAX_DIRECT_INSTANCE_BINS = 1 << 24


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
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = self.confusion.device
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = torch.cat([self.confusion.flatten(),
                            torch.tensor([self.num_images, self.images_without_instances])]).to(device)
        sums = torch.cat([self.inst_tp, self.inst_fn, self.cat_tp, self.cat_fn]).to(device)
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
        """Tables over ``gt*256+pred``: confusion cell (sentinel for invalid pairs) and instance flag.

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
        flag_dtype = np.uint8 if 3 * len(self._inst_classes) + 1 < 256 else np.int32
        luts = (torch.from_numpy(cell.reshape(-1)).to(device),
                torch.from_numpy(flag.reshape(-1).astype(flag_dtype)).to(device))
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
        n_img = 1 if target.dim() == 2 else target.shape[0]
        k = self.num_classes
        valid_pred = self._pred_desc
        g = self._check_range(target, "ground truth", f"0..{k - 1} and {self._ignore}").reshape(-1)
        p = self._check_range(pred, "prediction", valid_pred).reshape(-1)
        inst, inst_max = None, 0
        if instances is not None and self._inst_classes:
            inst = self._as_tensor(instances, "instances", dev)
            if inst.shape != target.shape:
                raise UserError(f"instance map shape {tuple(inst.shape)} differs from ground truth shape "
                                f"{tuple(target.shape)}")
            inst = inst.reshape(n_img, target.shape[-2], target.shape[-1])
            if inst.numel():
                if inst.dtype.is_signed and inst.min() < 0:
                    raise UserError("instance maps must not hold negative ids (0 = no instance)")
                row_max = inst.amax(dim=2)  # the largest id, and the band of rows that holds objects
                inst_max = int(row_max.max())
        self._to(dev)
        cell_lut, flag_lut = self._build_luts(dev)
        # gt*256+pred for every pixel; its histogram (64K bins, cache-resident) folds into the
        # confusion matrix through the cell table, so no per-pixel gather is needed for it
        code = torch.add(p, g.to(torch.int32), alpha=256)  # out of place: never touch the caller's data
        hist = torch.bincount(code, minlength=1 << 16)
        counts = torch.zeros((k + 1) * self._cols + 1, dtype=torch.int64, device=dev).index_add_(0, cell_lut, hist)
        if counts[-1] > 0:
            self._raise_invalid(g, p, valid_pred)
        self.confusion += counts[:-1].view(k + 1, self._cols)
        self.num_images += n_img
        if self._inst_classes and inst is None:
            self.images_without_instances += n_img
        if inst is not None and inst_max > 0:
            self._update_instances(inst, flag_lut.index_select(0, code).view(inst.shape), row_max, inst_max)

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

    def _update_instances(self, inst: torch.Tensor, flags: torch.Tensor, row_max: torch.Tensor,
                          inst_max: int) -> None:
        """Instance-weighted TP/FN sums of NxHxW ``inst`` given per-pixel flags (see ``_build_luts``)."""
        r_count = len(self._inst_classes)
        f = 1 + 3 * r_count
        dev = inst.device
        for b in range(inst.shape[0]):  # instance ids are per image
            rows = (row_max[b] > 0).nonzero()
            if not rows.numel():
                continue
            # only the band of rows that holds objects (a view: objects cluster mid-image in street scenes)
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            ids, hi = inst[b, r0:r1].reshape(-1), inst_max
            flag_b = flags[b, r0:r1].reshape(-1)
            if (hi + 1) * f > _MAX_DIRECT_INSTANCE_BINS:
                uniq, ids = torch.unique(ids, return_inverse=True)
                if uniq[0] != 0:  # keep index 0 for "no instance"
                    ids = ids + 1
                hi = int(ids.max())
            n = hi + 1
            v = torch.add(flag_b, ids.to(torch.int32), alpha=f)  # (instance, flag) bin of every pixel
            hist = torch.bincount(v, minlength=n * f)
            # few instances among many possible ids: continue with the non-empty bins only
            bins = hist.nonzero().squeeze(1)
            bins = bins[(bins >= f) & (bins % f != 0)]     # drop "no instance" and "not an instance class"
            if not bins.numel():
                continue
            count = hist[bins].to(torch.float64)
            rank, kind = torch.div(bins % f - 1, 3, rounding_mode="floor"), (bins % f - 1) % 3
            # one group per (instance, class): an object is sized by its pixels of one class
            groups, group = torch.unique(torch.div(bins, f, rounding_mode="floor") * r_count + rank,
                                         return_inverse=True)
            zeros = torch.zeros(groups.numel(), dtype=torch.float64, device=dev)
            size = zeros.index_add(0, group, count)
            tp = zeros.index_add(0, group, torch.where(kind == 2, count, 0.0))
            cat_tp = zeros.index_add(0, group, torch.where(kind >= 1, count, 0.0))
            g_rank = groups % r_count
            avg = torch.tensor([self.space.avg_instance_size[c] for c in self._inst_classes],
                               dtype=torch.float64, device=dev)
            w = avg[g_rank] / size
            cls = torch.tensor(self._inst_classes, device=dev)[g_rank]
            self.inst_tp.index_add_(0, cls, tp * w)
            self.inst_fn.index_add_(0, cls, (size - tp) * w)
            if self._inst_cats:
                cat_of = [self.space.class_category[c] for c in self._inst_classes]
                cats = torch.tensor(cat_of, device=dev)[g_rank]
                keep = torch.tensor([c in self._inst_cats for c in cat_of], device=dev)[g_rank]
                self.cat_tp.index_add_(0, cats, torch.where(keep, cat_tp * w, 0.0))
                self.cat_fn.index_add_(0, cats, torch.where(keep, (size - cat_tp) * w, 0.0))

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
