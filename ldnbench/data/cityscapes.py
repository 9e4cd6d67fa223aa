"""Cityscapes (fine annotations), as unzipped from ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``.

Labels are ``*_gtFine_labelIds.png`` (label ids 0..33) mapped to the 19 train ids with a table built
from cityscapesscripts' ``labels``; ``*_gtFine_labelTrainIds.png`` (made by
``csCreateTrainIdLabelImgs``) is used instead when present. Instances come from the 16-bit
``*_gtFine_instanceIds.png`` (``id*1000+k`` for objects; values below 1000 are groups/stuff -> 0).

The label ids follow exactly from the instanceIds (a value below 1000 is the label id, else
``value // 1000``), so :meth:`Cityscapes.load_target_fast` (what ``score`` uses) decodes only the
16-bit instanceIds PNG: one decode instead of two, identical labels for Cityscapes' own ground truth;
:meth:`Cityscapes.load_target_combined` hands that map over undivided, for a single pass of the metrics.
:meth:`Cityscapes.load_target` (training, ``eval``, ``datasets check``) still reads the labelIds file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numba
import numpy as np

from ldnbench.data.layout import index, lut, not_found, pair, remap, require_paired
from ldnbench.data.base import CombinedTarget, SegDataset
from ldnbench.data.io import read_label, read_png16
from ldnbench.data.labels import IGNORE, cityscapes19
from ldnbench.errors import UserError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
TRAINID_SUFFIX = "_gtFine_labelTrainIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


@cache
def labelid_to_trainid() -> np.ndarray:
    """Remap table Cityscapes label id (0..33) -> train id (255 = ignore), from cityscapesscripts."""
    from cityscapesscripts.helpers.labels import labels

    return lut({l.id: (l.trainId if 0 <= l.trainId < IGNORE else IGNORE) for l in labels if l.id >= 0})


@cache
def trainid_identity() -> np.ndarray:
    n = cityscapes19().num_classes
    return lut({**{i: i for i in range(n)}, IGNORE: IGNORE})


def decode_labelids(path: Path) -> np.ndarray:
    """A Cityscapes-labelIds PNG (Cityscapes, KITTI ``semantic/``, WildDash v1) as train ids."""
    return remap(read_label(path), labelid_to_trainid(), path, "Cityscapes label ids 0..33")


def decode_label(path: Path) -> np.ndarray:
    """``*_labelTrainIds.png`` is already in train ids; anything else is label ids."""
    if path.name.endswith("TrainIds.png"):
        return remap(read_label(path), trainid_identity(), path, "Cityscapes train ids 0..18/255")
    return decode_labelids(path)


def decode_instanceids(path: Path) -> np.ndarray:
    """Cityscapes instanceIds (16-bit PNG) -> instance map with 0 = no instance (values < 1000)."""
    v = read_png16(path)  # a fresh int32 array: threshold it in place
    v[v < 1000] = 0
    return v


@cache
def instanceid_to_trainid() -> np.ndarray:
    """Table over every 16-bit instanceIds value -> train id (-1 where the label id is undefined)."""
    ids = np.arange(1 << 16)
    ids = np.where(ids < 1000, ids, ids // 1000)
    table = labelid_to_trainid()
    out = np.full(ids.shape, -1, np.int16)
    ok = ids < table.size
    out[ok] = table[ids[ok]]
    return out


def decode_instanceids_with_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train ids uint8, instances int32 with 0 = none) from one Cityscapes instanceIds PNG."""
    v = read_png16(path, np.uint16)
    table = instanceid_to_trainid()
    train, inst, bad = _split_instanceids(v, table)
    if bad >= 0:
        bad = np.unique(v[table[v] < 0])[:8]
        raise UserError(f"instance file {path} has values {', '.join(map(str, bad))} whose label id (value, or "
                        "value // 1000 from 1000 on) is not a Cityscapes label id 0..33; is it an instanceIds file?")
    return train, inst


@numba.njit(nogil=True, cache=True)
def _split_instanceids(v, table):  # pragma: no cover - compiled
    """One pass over a 16-bit instanceIds map: train ids, instance ids (0 below 1000) and an invalid
    value (-1 if none); the GIL is released, so decoding threads run it in parallel."""
    train = np.empty(v.shape, np.uint8)
    inst = np.empty(v.shape, np.int32)
    bad = np.int64(-1)
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            x = v[i, j]
            t = table[x]
            bad = max(bad, np.int64(x) if t < 0 else np.int64(-1))
            train[i, j] = t
            inst[i, j] = x if x >= 1000 else 0
    return train, inst, bad


class Cityscapes(SegDataset):
    """Cityscapes fine: ``train`` 2975, ``val`` 500, ``test`` 1525 (test labels are dummies)."""

    name = "cityscapes"
    label_space_name = "cityscapes19"
    splits = ("train", "val", "test")
    layout = "leftImg8bit/{split}/*/*_leftImg8bit.png + gtFine/{split}/*/*_gtFine_labelIds.png"
    crop_size = 768

    def __init__(self, root: str | Path, split: str = "train", *, strict: bool = True):
        super().__init__(root, split)
        self.label_space = cityscapes19()
        pattern = f"leftImg8bit/{split}/*/*{IMAGE_SUFFIX}"
        images = index(sorted(self.root.glob(pattern)), IMAGE_SUFFIX)
        if not images:
            raise not_found(self.name, self.root, pattern,
                                   "point --root at the folder holding leftImg8bit/ and gtFine/")
        gt = sorted(self.root.glob(f"gtFine/{split}/*/*_gtFine_*.png"))
        labels = index(gt, LABEL_SUFFIX)
        labels.update(index(gt, TRAINID_SUFFIX))  # prefer train ids when both exist
        self.files, self.unpaired = pair(images, labels, index(gt, INSTANCE_SUFFIX))
        require_paired(self.name, self.unpaired, strict)

    def load_target(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.labelled_files(i)
        inst = decode_instanceids(f.instances) if f.instances is not None else None
        return decode_label(f.label), inst

    def load_target_combined(self, i: int) -> CombinedTarget | None:
        """The instanceIds PNG as decoded, with the table from its values to train ids, when the labels are
        labelIds (what :meth:`load_target_fast` derives, without splitting the map into two)."""
        f = self.labelled_files(i)
        if f.instances is None or not f.label.name.endswith(LABEL_SUFFIX):
            return None
        return CombinedTarget(read_png16(f.instances, np.uint16), instanceid_to_trainid(), 1000,
                              f"instance file {f.instances} (label id = value below 1000, else value // 1000)")

    def load_target_fast(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`load_target` from the instanceIds PNG alone when the labels are labelIds (the labelIds file
        is then neither decoded nor checked: it must agree with the instanceIds, as Cityscapes' own does)."""
        f = self.labelled_files(i)
        if f.instances is not None and f.label.name.endswith(LABEL_SUFFIX):
            return decode_instanceids_with_labels(f.instances)
        return self.load_target(i)
