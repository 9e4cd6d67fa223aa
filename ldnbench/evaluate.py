"""The evaluation loop: dataset -> inference -> metric accumulator, single process or under torchrun.

With an initialised ``torch.distributed`` process group (torchrun), rank ``r`` of ``w`` evaluates
samples ``r, r+w, r+2w, ...`` — every sample exactly once, no padding duplicates — and the
accumulators are summed with ``all_reduce``, so every rank returns the single-process result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ldnbench.data.base import dataset_label_space
from ldnbench.data.labels import LabelSpace
from ldnbench.data.transforms import IMAGENET, Normalization, to_input
from ldnbench.errors import UserError
from ldnbench.inference import predict, prepare_model
from ldnbench.metrics import MetricResult, SegMetrics
from ldnbench.runtime import check_precision, get_rank, get_world_size, synchronize


@dataclass
class EvalSettings:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    sliding: tuple[int, float] | None = None
    precision: str = "fp32"
    #: image width after resizing (None: full resolution) and what the labels were (ldnbench.data.resize)
    resize: int | None = None
    eval_at: str = "original"

    def to_dict(self) -> dict[str, Any]:
        """Record form; ``resize``/``eval_at`` only for a resized protocol (absent = full resolution)."""
        d = asdict(self)
        if self.resize is None:
            del d["resize"], d["eval_at"]
        return d


class Accumulator(Protocol):
    """What :func:`evaluate` feeds besides its :class:`SegMetrics` (detectron2's evaluator shape).

    ``process`` sees every sample this process evaluates, ``evaluate`` runs on every rank after the
    loop (gather there under torchrun) and returns what lands in ``EvalResult.extra[name]``.
    """

    name: str

    def reset(self) -> None: ...

    def process(self, index: int, sample_id: str, pred: torch.Tensor, target: torch.Tensor,
                instances: torch.Tensor | None) -> None: ...

    def evaluate(self) -> Any: ...


class PerImageMetrics:
    """Per-image rows: id, mIoU over the classes present (IoU defined: in the ground truth or
    predicted on labelled pixels), pixel accuracy, per-class IoU where present.

    Same definitions as the dataset metrics (one :class:`SegMetrics` reset per image).
    """

    name = "per_image"

    def __init__(self, label_space: LabelSpace):
        self.space = label_space
        self._metrics = SegMetrics(label_space)
        self.reset()

    def reset(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []

    def process(self, index, sample_id, pred, target, instances=None) -> None:
        m = self._metrics
        m.reset()
        m.update(pred, target)
        r = m.compute()
        self.rows.append((index, {"id": sample_id, "miou": _finite(r.miou), "pixel_acc": _finite(r.pixel_acc),
                                  "class_iou": {c: v for c, v in r.class_iou.items() if not math.isnan(v)}}))

    def evaluate(self) -> list[dict[str, Any]]:
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, rows)
            rows = [r for p in parts for r in p]
        return [r for _, r in sorted(rows, key=lambda t: t[0])]


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def per_image_frame(rows: list[dict[str, Any]], classes: Sequence[str] | None = None):
    """pandas DataFrame of per-image rows: id, miou, pixel_acc, iou_<class> (empty where absent)."""
    classes = list(classes) if classes is not None else list(dict.fromkeys(c for r in rows for c in r["class_iou"]))
    return pd.DataFrame([{"id": r["id"], "miou": r["miou"], "pixel_acc": r["pixel_acc"],
                          **{f"iou_{c}": r["class_iou"].get(c) for c in classes}} for r in rows],
                        columns=["id", "miou", "pixel_acc", *(f"iou_{c}" for c in classes)])


@dataclass
class EvalResult:
    """Metrics of one evaluation plus how it was run and how long it took."""

    metrics: MetricResult
    label_space: str
    settings: EvalSettings
    device: str
    world_size: int
    #: seconds: ``total`` wall time, this rank's ``load`` / ``inference`` / ``metrics`` time, and
    #: ``per_image`` = total / images (all ranks together).
    timings: dict[str, float] = field(default_factory=dict)
    #: results of the extra accumulators, by their name (e.g. ``per_image`` rows)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return self.metrics.num_images

    def class_table(self):
        """pandas DataFrame: one row per class (IoU, iIoU as fractions; NaN where undefined)."""
        m = self.metrics
        return pd.DataFrame({"class": list(m.class_iou), "iou": list(m.class_iou.values()),
                             "iiou": [m.class_iiou.get(c, float("nan")) for c in m.class_iou]})

    def category_table(self):
        m = self.metrics
        return pd.DataFrame({"category": list(m.category_iou), "iou": list(m.category_iou.values()),
                             "iiou": [m.category_iiou.get(c, float("nan")) for c in m.category_iou]})

    def format_table(self) -> str:
        """Per-class table in percent (one decimal) and a timing line, for people."""
        t = self.timings
        return (self.metrics.format_table() + f"\n{self.num_images} images in {t.get('total', 0):.1f} s "
                f"({1000 * t.get('per_image', 0):.0f} ms/image, {self.world_size} process(es), {self.device})")

    def to_record(self, **fields: Any) -> dict[str, Any]:
        """A result record of kind ``eval``; ``fields`` are :func:`make_record` arguments (model, dataset, ...)."""
        from ldnbench.report.records import make_record

        return make_record("eval", metrics=self.metrics.to_dict(), device=self.device,
                           label_space=self.label_space, eval_settings=self.settings.to_dict(), timings=self.timings,
                           world_size=self.world_size, **self.extra, **fields)


def _identity(x):
    return x


def _unpack(sample, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    if hasattr(sample, "image"):
        return sample.image, sample.label, getattr(sample, "instances", None), str(getattr(sample, "id", index))
    image, label, *rest = sample
    return image, label, rest[0] if rest else None, str(index)


def evaluate(model: nn.Module, dataset, *, mapping=None, scales: Sequence[float] = (1.0,), flip: bool = False,
             sliding: int | tuple[int, float] | None = None, device: str | torch.device = "cpu",
             precision: str = "fp32", progress: bool = True, num_workers: int = 0,
             max_images: int | None = None, fast: bool = True, resize: int | None = None,
             eval_at: str = "original", accumulators: Sequence[Accumulator] = (),
             normalization: Normalization = IMAGENET) -> EvalResult:
    """Evaluate ``model`` on every sample of ``dataset`` (or its first ``max_images``).

    ``mapping`` (:func:`ldnbench.data.spaces.get_mapping`) turns the model's logits into the
    dataset's label space; without it the model must predict exactly the dataset's classes.
    ``scales``/``flip``/``sliding``/``precision`` go to :func:`ldnbench.inference.predict`
    (``precision``: ``fp32`` unless ``bf16``/``fp16`` is asked for). ``fast``: run an eval-only copy with BatchNorms
    folded and channels-last weights and inputs (:func:`ldnbench.inference.prepare_model`); ``fast=False``
    runs the model's own layout, operation for operation as ``model(x)``. ``model`` itself is never
    modified. ``normalization``: how the model wants its input pixels (a checkpoint's
    ``meta.normalization``; ImageNet statistics for every ldnbench-trained and torchvision model).

    ``resize``/``eval_at``: the resolution protocol (:class:`ldnbench.data.resize.Resized`; a dataset
    that is already wrapped brings its own). With ``eval_at="original"`` the logits of the resized
    image are upsampled to the label's resolution before the argmax. ``accumulators`` get every
    prediction as well (:class:`Accumulator`, e.g. :class:`PerImageMetrics`).
    """
    from ldnbench.data.resize import (
        apply_resize,
        check_eval_at,
        check_width,
        find_resized,
        protocol,
    )

    if resize is not None and find_resized(dataset) is not None:
        raise ValueError("the dataset is already Resized; do not pass resize= as well")
    if resize is None and eval_at == "resized" and find_resized(dataset) is None:
        raise UserError("--eval-at resized needs --resize W (the width the images and labels are resized to)", 2)
    dataset = apply_resize(dataset, check_width(resize), check_eval_at(eval_at))
    width, eval_at = protocol(dataset)
    space = dataset_label_space(dataset)
    n_model = getattr(model, "num_classes", None)
    if mapping is None and n_model is not None and n_model != space.num_classes:
        raise UserError(f"the model predicts {n_model} classes but the dataset's label space {space.name} has "
                        f"{space.num_classes}; evaluate with a label mapping (get_mapping) or a matching model")
    if isinstance(sliding, int):
        sliding = (sliding, 1 / 3)
    device = torch.device(device)
    settings = EvalSettings(tuple(float(s) for s in scales), bool(flip), sliding, check_precision(precision, device),
                            width, eval_at)
    rank, world = get_rank(), get_world_size()
    total = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(rank, total, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=None,
                                         num_workers=num_workers, collate_fn=_identity)
    metrics = SegMetrics(space)
    for acc in accumulators:
        acc.reset()
    net = prepare_model(model, device, channels_last=fast, fold_bn=fast)
    times = {"load": 0.0, "inference": 0.0, "metrics": 0.0}
    start = time.perf_counter()
    bar = tqdm(total=len(indices), desc="eval" if world == 1 else f"eval rank {rank}", unit="img",
               disable=not progress or (rank != 0))
    try:
        t = time.perf_counter()
        for index, sample in zip(indices, loader):
            image, label, instances, sid = _unpack(sample, index)
            x = to_input(image, normalization).to(device)
            # eval at original resolution: the logits of the resized image go up to the label's size
            out_size = tuple(np.shape(label)[-2:]) if width is not None and eval_at == "original" else None
            t1 = time.perf_counter()
            pred = predict(net, x[0], settings.scales, settings.flip, settings.sliding, mapping=mapping,
                           channels_last=fast, precision=settings.precision, out_size=out_size)
            synchronize(device)
            t2 = time.perf_counter()
            target = torch.as_tensor(np.asarray(label)).to(device)
            inst = torch.as_tensor(np.asarray(instances)).to(device) if instances is not None else None
            metrics.update(pred, target, inst)
            for acc in accumulators:
                acc.process(index, sid, pred, target, inst)
            t3 = time.perf_counter()
            times["load"] += t1 - t
            times["inference"] += t2 - t1
            times["metrics"] += t3 - t2
            bar.update(1)
            t = time.perf_counter()
    finally:
        bar.close()
    metrics.all_reduce()
    result = metrics.compute()
    extra = {acc.name: acc.evaluate() for acc in accumulators}
    times["total"] = time.perf_counter() - start
    times["per_image"] = times["total"] * world / max(1, result.num_images)
    return EvalResult(result, space.name, settings, str(device), world, {k: round(v, 4) for k, v in times.items()},
                      extra)
