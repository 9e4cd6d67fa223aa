"""The evaluation loop: dataset -> inference -> metric accumulator, single process or under torchrun.

With an initialised ``torch.distributed`` process group (torchrun), rank ``r`` of ``w`` evaluates
samples ``r, r+w, r+2w, ...`` — every sample exactly once, no padding duplicates — and the
accumulators are summed with ``all_reduce``, so every rank returns the single-process result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldnbench.data.labels import LabelSpace
from ldnbench.errors import UserError
from ldnbench.inference import predict
from ldnbench.metrics import MetricResult, SegMetrics


@dataclass
class EvalSettings:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    sliding: tuple[int, float] | None = None
    amp: bool = False


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


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(model: nn.Module, dataset, *, mapping=None, scales: Sequence[float] = (1.0,), flip: bool = False,
             sliding: int | tuple[int, float] | None = None, device: str | torch.device = "cpu",
             amp: bool = False, progress: bool = True, num_workers: int = 0,
             max_images: int | None = None) -> EvalResult:
    """Evaluate ``model`` on every sample of ``dataset`` (or its first ``max_images``).

    ``mapping`` (:func:`ldnbench.data.labels.get_mapping`) turns the model's logits into the
    dataset's label space; without it the model must predict exactly the dataset's classes.
    ``scales``/``flip``/``sliding``/``amp`` go to :func:`ldnbench.inference.predict`. The model is
    put in eval mode for the run and its previous mode is restored afterwards.
    """
    space = _label_space(dataset)
    n_model = getattr(model, "num_classes", None)
    if mapping is None and n_model is not None and n_model != space.num_classes:
        raise UserError(f"the model predicts {n_model} classes but the dataset's label space {space.name} has "
                        f"{space.num_classes}; evaluate with a label mapping (get_mapping) or a matching model")
    if isinstance(sliding, int):
        sliding = (sliding, 1 / 3)
    settings = EvalSettings(tuple(float(s) for s in scales), bool(flip), sliding, bool(amp))
    device = torch.device(device)
    rank, world = _dist()
    total = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(rank, total, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=None,
                                         num_workers=num_workers, collate_fn=_identity)
    metrics = SegMetrics(space)
    was_training = model.training
    model.to(device).eval()
    times = {"load": 0.0, "inference": 0.0, "metrics": 0.0}
    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(indices), desc="eval" if world == 1 else f"eval rank {rank}", unit="img",
               disable=not progress or (rank != 0))
    try:
        t = time.perf_counter()
        for sample in loader:
            image, label, instances = _unpack(sample)
            from ldnbench.data.transforms import to_input

            x = to_input(image).to(device)
            t1 = time.perf_counter()
            pred = predict(model, x[0], settings.scales, settings.flip, settings.sliding, mapping=mapping,
                           amp=settings.amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
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
        model.train(was_training)
    metrics.all_reduce()
    result = metrics.compute()
    times["total"] = time.perf_counter() - start
    times["per_image"] = times["total"] * world / max(1, result.num_images)
    return EvalResult(result, space.name, settings, str(device), world, {k: round(v, 4) for k, v in times.items()})


# ------------------------------------------------------------------ checkpoints -> models
def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a trainer checkpoint dict or a bare state_dict, loaded with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}; "
                        "is it a PyTorch state dict saved by ldnbench train?") from None
    if isinstance(ck, dict) and isinstance(ck.get("model"), dict):
        return ck["model"], {k: v for k, v in ck.items() if k != "model"}
    if isinstance(ck, dict) and ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        return ck, {}
    raise UserError(f"checkpoint {path} holds neither a state dict nor a dict with a 'model' state dict")


def model_from_checkpoint(path: str | Path, model_name: str | None = None, num_classes: int | None = None,
                          label_space: str | None = None) -> tuple[nn.Module, str]:
    """Build the model a checkpoint was trained as and load its weights.

    Returns (model, label space name). Name, classes and space come from the checkpoint when it
    stores them; arguments override / fill in for bare state dicts.
    """
    from ldnbench.data.labels import get_label_space
    from ldnbench.models import build_model, resolve_model_name

    state, meta = load_checkpoint(path)
    name = model_name or meta.get("model_name")
    if not name:
        raise UserError(f"checkpoint {path} does not say which model it is; pass --model")
    name = resolve_model_name(name)
    if meta.get("model_name") and resolve_model_name(meta["model_name"]) != name:
        raise UserError(f"checkpoint {path} is a {meta['model_name']}, not a {name}; drop --model or fix it", 2)
    space = label_space or meta.get("label_space")
    if num_classes is None:
        num_classes = meta.get("num_classes") or (get_label_space(space).num_classes if space else None)
    if num_classes is None:
        raise UserError(f"checkpoint {path} does not say how many classes it predicts; pass --label-space")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    stored = meta.get("model_options") or config.get("model_options") or {}
    options = {k: v for k, v in stored.items() if k not in ("pretrained", "checkpointing")}
    errors = []
    # a model fine-tuned from ImageNet weights uses torchvision's full layout: try both layouts
    for compat in ([options.pop("imagenet_compatible")] if "imagenet_compatible" in options else [False, True]):
        model = build_model(name, int(num_classes), imagenet_compatible=compat, **options)
        try:
            model.load_state_dict(state)
            return model, space
        except RuntimeError as e:
            errors.append(str(e).splitlines()[0])
    raise UserError(f"checkpoint {path} does not fit model {name} with {num_classes} classes ({errors[-1]}); "
                    "check --model and --label-space")
