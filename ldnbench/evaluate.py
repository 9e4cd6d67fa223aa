"""The evaluation loop: dataset -> inference -> metric accumulator, single process or under torchrun.

With an initialised ``torch.distributed`` process group (torchrun), rank ``r`` of ``w`` evaluates
samples ``r, r+w, r+2w, ...`` — every sample exactly once, no padding duplicates — and the
accumulators are summed with ``all_reduce``, so every rank returns the single-process result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ldnbench.data.labels import LabelSpace
from ldnbench.data.transforms import IMAGENET, Normalization, to_input
from ldnbench.errors import UserError
from ldnbench.inference import predict, prepare_model
from ldnbench.runtime import check_precision, get_rank, get_world_size, synchronize
from ldnbench.metrics import MetricResult, SegMetrics


@dataclass
class EvalSettings:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    sliding: tuple[int, float] | None = None
    precision: str = "fp32"


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

    @property
    def num_images(self) -> int:
        return self.metrics.num_images

    def class_table(self):
        """pandas DataFrame: one row per class (IoU, iIoU as fractions; NaN where undefined)."""
        import pandas as pd

        m = self.metrics
        return pd.DataFrame({"class": list(m.class_iou), "iou": list(m.class_iou.values()),
                             "iiou": [m.class_iiou.get(c, float("nan")) for c in m.class_iou]})

    def category_table(self):
        import pandas as pd

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

        s = asdict(self.settings)
        return make_record("eval", metrics=self.metrics.to_dict(), device=self.device,
                           label_space=self.label_space, eval_settings=s, timings=self.timings,
                           world_size=self.world_size, **fields)


def _label_space(dataset: Any) -> LabelSpace:
    d = dataset
    while not hasattr(d, "label_space") and hasattr(d, "dataset"):  # torch Subset
        d = d.dataset
    if not hasattr(d, "label_space"):
        raise TypeError("the dataset must have a label_space (a SegDataset adapter or a Subset of one)")
    return d.label_space


def _identity(x):
    return x


def _unpack(sample) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if hasattr(sample, "image"):
        return sample.image, sample.label, getattr(sample, "instances", None)
    image, label, *rest = sample
    return image, label, rest[0] if rest else None


def evaluate(model: nn.Module, dataset, *, mapping=None, scales: Sequence[float] = (1.0,), flip: bool = False,
             sliding: int | tuple[int, float] | None = None, device: str | torch.device = "cpu",
             precision: str = "fp32", progress: bool = True, num_workers: int = 0,
             max_images: int | None = None, fast: bool = True,
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
    """
    space = _label_space(dataset)
    n_model = getattr(model, "num_classes", None)
    if mapping is None and n_model is not None and n_model != space.num_classes:
        raise UserError(f"the model predicts {n_model} classes but the dataset's label space {space.name} has "
                        f"{space.num_classes}; evaluate with a label mapping (get_mapping) or a matching model")
    if isinstance(sliding, int):
        sliding = (sliding, 1 / 3)
    device = torch.device(device)
    settings = EvalSettings(tuple(float(s) for s in scales), bool(flip), sliding, check_precision(precision, device))
    rank, world = get_rank(), get_world_size()
    total = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(rank, total, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=None,
                                         num_workers=num_workers, collate_fn=_identity)
    metrics = SegMetrics(space)
    net = prepare_model(model, device, channels_last=fast, fold_bn=fast)
    times = {"load": 0.0, "inference": 0.0, "metrics": 0.0}
    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(indices), desc="eval" if world == 1 else f"eval rank {rank}", unit="img",
               disable=not progress or (rank != 0))
    try:
        t = time.perf_counter()
        for sample in loader:
            image, label, instances = _unpack(sample)
            x = to_input(image, normalization).to(device)
            t1 = time.perf_counter()
            pred = predict(net, x[0], settings.scales, settings.flip, settings.sliding, mapping=mapping,
                           channels_last=fast, precision=settings.precision)
            synchronize(device)
            t2 = time.perf_counter()
            target = torch.as_tensor(np.asarray(label)).to(device)
            inst = torch.as_tensor(np.asarray(instances)).to(device) if instances is not None else None
            metrics.update(pred, target, inst)
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
    times["total"] = time.perf_counter() - start
    times["per_image"] = times["total"] * world / max(1, result.num_images)
    return EvalResult(result, space.name, settings, str(device), world, {k: round(v, 4) for k, v in times.items()})
