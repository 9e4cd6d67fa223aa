"""``ldnbench predict``: one prediction PNG per image, at the image's own resolution.

Sources are a dataset split (files named ``<sample id>.png``, what ``ldnbench score`` and the
Cityscapes server match) or a folder of JPEG/PNG images (relative paths kept, suffix ``.png``).
Formats (:data:`FORMATS`): ``labelIds`` (Cityscapes label ids 0..33, what the official server takes;
Cityscapes-format label spaces only), ``trainIds`` (class indices, 255 = void), ``color`` (the label
space's palette) and ``overlay`` (the image blended half and half with the colours).

Inference is exactly :func:`ldnbench.evaluate.evaluate`'s (same prepared model, same
:func:`~ldnbench.inference.predict` call, same resize), so ``predict --format labelIds`` followed by
``score`` reproduces ``eval``'s numbers. Existing outputs are skipped (resumable) unless
``overwrite``; every file is written atomically; under torchrun rank ``r`` of ``w`` takes images
``r, r+w, ...``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ldnbench.checkpoints import CheckpointMeta
from ldnbench.data.labels import IGNORE, LabelSpace
from ldnbench.data.transforms import IMAGENET, Normalization
from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write

FORMATS = ("labelIds", "trainIds", "color", "overlay")
#: Datasets whose label files hold Cityscapes label ids (so labelIds predictions are their encoding).
LABEL_ID_DATASETS = ("cityscapes", "kitti", "wilddash")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@cache
def trainid_to_labelid() -> np.ndarray:
    """256-entry table: cityscapes19 class index -> Cityscapes label id (void 255 -> 0 'unlabeled')."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.zeros(256, np.uint8)
    for lab in labels:
        if 0 <= lab.trainId < IGNORE and not lab.ignoreInEval:
            lut[lab.trainId] = lab.id
    return lut


def check_format(fmt: str, space: LabelSpace, dataset: str | None = None) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown prediction format {fmt!r}; choose one of: {', '.join(FORMATS)}", 2)
    if fmt == "labelIds" and (space.name != "cityscapes19" or (dataset is not None and dataset not in LABEL_ID_DATASETS)):
        where = f"dataset {dataset}" if dataset else f"label space {space.name}"
        raise UserError(f"--format labelIds is the Cityscapes label-id encoding ({', '.join(LABEL_ID_DATASETS)}), "
                        f"not that of {where}; use --format trainIds", 2)
    return fmt


def encode(pred: np.ndarray, space: LabelSpace, fmt: str, image: np.ndarray | None = None) -> np.ndarray:
    """HxW class indices -> the PNG array of ``fmt`` (HxW uint8, or HxWx3 for color/overlay)."""
    pred = np.asarray(pred, np.uint8)
    if fmt == "trainIds":
        return pred
    if fmt == "labelIds":
        return trainid_to_labelid()[pred]
    color = space.palette()[pred]
    if fmt == "color":
        return color
    if image is None:
        raise ValueError("overlay needs the image")
    return ((image.astype(np.uint16) + color) // 2).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    """Atomic PNG write (a killed run never leaves a truncated file that a resume would skip)."""
    return atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


@dataclass(frozen=True)
class Item:
    """One image to predict: where its PNG goes (relative to the output folder) and how to load it."""

    out: str
    load: Callable[[], np.ndarray] = field(compare=False, repr=False)


def dataset_items(dataset) -> list[Item]:
    """``<sample id>.png`` for every sample of an adapter (images only: test splits without labels work)."""
    return [Item(f"{f.id}.png", lambda i=i: dataset.load_image(i)) for i, f in enumerate(dataset.files)]


def folder_items(images: str | Path) -> list[Item]:
    """Every JPEG/PNG below ``images`` (recursively), output at its relative path with ``.png``."""
    from ldnbench.data.io import read_rgb

    root = Path(images)
    if not root.is_dir():
        raise UserError(f"--images {root} is not a folder of JPEG/PNG images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"--images {root} holds no .png/.jpg/.jpeg file")
    items, seen = [], {}
    for p in paths:
        rel = p.relative_to(root).with_suffix(".png").as_posix()
        if rel in seen:
            raise UserError(f"{seen[rel]} and {p} would both be written as {rel}; rename one of them")
        seen[rel] = p
        items.append(Item(rel, lambda p=p: read_rgb(p)))
    return items


def load_model(checkpoint: str | Path, model_name: str | None = None,
               label_space: str | None = None) -> tuple[nn.Module, LabelSpace, CheckpointMeta]:
    """(model, its label space, its checkpoint meta): the one place predict reads checkpoints."""
    from ldnbench.checkpoints import load_checkpoint
    from ldnbench.data.spaces import get_label_space

    model, meta = load_checkpoint(checkpoint, model_name, label_space)
    if meta.label_space is None:
        raise UserError(f"checkpoint {checkpoint} does not say which label space it predicts; pass --label-space", 2)
    return model, get_label_space(meta.label_space), meta


@dataclass
class PredictResult:
    out: Path
    format: str
    label_space: str
    written: list[Path]
    skipped: list[Path]
    seconds: float
    settings: dict[str, Any]
    rank: int = 0  #: this process's rank under torchrun (each rank wrote its share)


def predict_images(model: nn.Module, items: Sequence[Item], out: str | Path, *, space: LabelSpace, fmt: str,
                   mapping=None, scales: Sequence[float] = (1.0,), flip: bool = False,
                   sliding: int | tuple[int, float] | None = None, resize: int | None = None,
                   device: str | torch.device = "cpu", precision: str = "fp32", overwrite: bool = False,
                   progress: bool = True, fast: bool = True,
                   normalization: Normalization = IMAGENET) -> PredictResult:
    """Write one ``fmt`` PNG per item below ``out``, at the item image's own resolution.

    ``space`` is the label space of the written classes (the model's, or the mapping's
    destination). ``resize``: the image is resized to that width (as ``Resized`` does) and the
    logits are upsampled to the original size before the argmax.
    """
    from ldnbench.data.resize import check_width, resize_image
    from ldnbench.data.transforms import to_input
    from ldnbench.inference import predict, prepare_model
    from ldnbench.runtime import check_precision, get_rank, get_world_size

    t0 = time.perf_counter()
    out = Path(out)
    width = check_width(resize)
    device = torch.device(device)
    precision = check_precision(precision, device)
    rank, world = get_rank(), get_world_size()
    mine = [it for k, it in enumerate(items) if k % world == rank]
    done = [not overwrite and (out / it.out).is_file() for it in mine]
    todo = [it for it, d in zip(mine, done) if not d]
    skipped = [out / it.out for it, d in zip(mine, done) if d]
    written: list[Path] = []
    net = prepare_model(model, device, channels_last=fast, fold_bn=fast) if todo else None
    bar = tqdm(total=len(mine), initial=len(skipped), desc="predict" if world == 1 else f"predict rank {rank}",
               unit="img", disable=not progress or rank != 0)
    try:
        for it in todo:
            image = it.load()
            h, w = image.shape[:2]
            small = resize_image(image, width) if width else image
            x = to_input(small, normalization).to(device)
            pred = predict(net, x[0], scales, flip, sliding, mapping=mapping, precision=precision,
                           out_size=(h, w) if small.shape[:2] != (h, w) else None)
            written.append(write_png(out / it.out, encode(pred.cpu().numpy(), space, fmt, image)))
            bar.update(1)
    finally:
        bar.close()
    settings = {"scales": [float(s) for s in scales], "flip": bool(flip), "sliding": sliding, "precision": precision}
    if width is not None:
        settings.update(resize=width, eval_at="original")
    return PredictResult(out, fmt, space.name, written, skipped, time.perf_counter() - t0, settings, rank)


def run_predict(checkpoint: str | Path, out: str | Path, *, dataset: str | None = None, root: str | Path | None = None,
                split: str = "val", images: str | Path | None = None, fmt: str | None = None,
                model_name: str | None = None, label_space: str | None = None, scales: Sequence[float] = (1.0,),
                flip: bool = False, sliding: int | None = None, resize: int | None = None, device: str = "cpu",
                precision: str = "fp32", overwrite: bool = False, progress: bool = True,
                backend: str = "torch") -> PredictResult:
    """``ldnbench predict``: load the checkpoint, pick the source, write the PNGs.

    ``backend``: ``torch``, or an ONNX runtime that runs the exported graph (:mod:`ldnbench.deploy`).

    With ``dataset`` the predictions are in the dataset's label space (through ``get_mapping``
    when the model's differs); with ``images`` in the model's. ``fmt`` defaults to labelIds
    where the dataset's labels are Cityscapes label ids, trainIds otherwise.
    """
    from ldnbench.data.registry import get_dataset
    from ldnbench.data.spaces import get_label_space, get_mapping
    from ldnbench.deploy import check_backend, deployed_model
    from ldnbench.runtime import Distributed, resolve_device

    if (dataset is None) == (images is None):
        raise UserError("predict needs exactly one source: --dataset NAME or --images DIR", 2)
    if fmt == "labelIds" and dataset is not None and dataset not in LABEL_ID_DATASETS:
        check_format(fmt, get_label_space("cityscapes19"), dataset)  # before any file is read
    dev = resolve_device(device)
    check_backend(backend, dev, precision)  # a missing extra or an fp16 graph fails before anything is read
    ds = get_dataset(dataset, root, split) if dataset is not None else None
    # a bare state dict predicts the dataset's classes unless told otherwise (as `eval` assumes)
    model, model_space, meta = load_model(checkpoint, model_name, label_space or (ds.label_space.name if ds else None))
    mapping = None
    if ds is not None:
        space = ds.label_space
        if space.name != model_space.name:
            mapping = get_mapping(model_space, space)
        items = dataset_items(ds)
    else:
        space = model_space
        items = folder_items(images)
    if fmt is None:
        fmt = "labelIds" if space.name == "cityscapes19" and dataset in LABEL_ID_DATASETS else "trainIds"
    check_format(fmt, space, dataset)
    net = deployed_model(model, backend, device=str(dev), normalization=meta.normalization)  # model itself for torch
    with Distributed(dev) as d:
        res = predict_images(net, items, out, space=space, fmt=fmt, mapping=mapping, scales=scales, flip=flip,
                             sliding=sliding, resize=resize, device=dev, precision=precision, overwrite=overwrite,
                             progress=progress, normalization=meta.normalization,
                             fast=backend == "torch")  # an exported graph is already BN-folded
        d.barrier()  # every rank's files are there before rank 0 reports (or draws a gallery)
    return res
