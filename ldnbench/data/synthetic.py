"""Procedural street scenes written in the exact on-disk formats of Cityscapes, Vistas v1.2 and KITTI.

The ``write_*`` functions write one sample (arrays already in the dataset's native encoding) and are
also what the tests use to build fixture trees. :func:`generate` draws scenes and writes all three
datasets with a visible domain shift between them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _save(path: Path, array: np.ndarray, palette: np.ndarray | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img = Image.fromarray(array, "P")
        img.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    img.save(path, **kw)


def write_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """uint8 HxW (grey, or palette indices when ``palette`` is given), uint16 HxW, or uint8 HxWx3 RGB."""
    _save(Path(path), np.ascontiguousarray(array), palette)


def write_cityscapes(root: str | Path, split: str, sid: str, image: np.ndarray, label_ids: np.ndarray,
                     instance_ids: np.ndarray | None = None, train_ids: np.ndarray | None = None) -> None:
    """One Cityscapes sample ``sid = city_seq_frame``: leftImg8bit + gtFine labelIds (+ instanceIds, labelTrainIds)."""
    root, city = Path(root), sid.split("_")[0]
    write_png(root / "leftImg8bit" / split / city / f"{sid}_leftImg8bit.png", image)
    gt = root / "gtFine" / split / city
    write_png(gt / f"{sid}_gtFine_labelIds.png", label_ids.astype(np.uint8))
    if instance_ids is not None:
        write_png(gt / f"{sid}_gtFine_instanceIds.png", instance_ids.astype(np.uint16))
    if train_ids is not None:
        write_png(gt / f"{sid}_gtFine_labelTrainIds.png", train_ids.astype(np.uint8))


def write_kitti(root: str | Path, name: str, image: np.ndarray, semantic: np.ndarray | None,
                instance: np.ndarray | None = None, split: str = "training") -> None:
    """One KITTI data_semantics sample ``name = NNNNNN_10``: image_2, semantic (label ids), instance (uint16)."""
    root = Path(root) / split
    write_png(root / "image_2" / f"{name}.png", image)
    if semantic is not None:
        write_png(root / "semantic" / f"{name}.png", semantic.astype(np.uint8))
    if instance is not None:
        write_png(root / "instance" / f"{name}.png", instance.astype(np.uint16))


def write_vistas_config(root: str | Path, labels: list[tuple], version: str = "v1.2") -> Path:
    """``config_<version>.json`` (or ``config.json`` for ``version=None``) with the given label tuples."""
    path = Path(root) / (f"config_{version}.json" if version else "config.json")
    cfg = {
        "labels": [{"name": n, "readable": r, "color": list(c), "instances": i, "evaluate": e}
                   for n, r, c, i, e in labels],
        "version": version or "1.1",
        "mapping": "public",
        "folder_structure": "{split}/{content}/{key:.{22}}.{ext}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def write_vistas(root: str | Path, split: str, key: str, image: np.ndarray, labels: np.ndarray | None,
                 instances: np.ndarray | None, palette: np.ndarray, version: str | None = "v1.2") -> None:
    """One Vistas sample: ``{split}/images/{key}.jpg`` + palette labels + 16-bit instances.

    ``version`` "v1.2"/"v2.0" writes the 2021 layout ``{split}/{version}/labels``; ``None`` the old
    v1.0/1.1 layout ``{split}/labels``.
    """
    root = Path(root) / split
    _save(root / "images" / f"{key}.jpg", image, quality=92)
    gt = root / version if version else root
    if labels is not None:
        write_png(gt / "labels" / f"{key}.png", labels.astype(np.uint8), palette)
    if instances is not None:
        write_png(gt / "instances" / f"{key}.png", instances.astype(np.uint16))


def write_wilddash(root: str | Path, name: str, image: np.ndarray, label_ids: np.ndarray | None,
                   instance_ids: np.ndarray | None = None, folder: str = "wd_val_01") -> None:
    """One WildDash v1 frame ``name = ccNNNN_100000``: image + ``_labelIds`` (+ ``_instanceIds``)."""
    root = Path(root) / folder
    write_png(root / f"{name}.png", image)
    if label_ids is not None:
        write_png(root / f"{name}_labelIds.png", label_ids.astype(np.uint8))
    if instance_ids is not None:
        write_png(root / f"{name}_instanceIds.png", instance_ids.astype(np.uint16))
