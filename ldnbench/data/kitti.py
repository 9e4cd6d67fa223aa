"""KITTI semantic segmentation 2015 (``data_semantics.zip``) in ``cityscapes19``.

Layout: ``{root}/training/{image_2,semantic,instance}/NNNNNN_10.png`` (200 frames) and
``{root}/testing/image_2`` (200 frames, no labels). ``semantic`` holds Cityscapes label ids;
``instance`` is uint16 ``label_id*256 + k`` with ``k = 0`` for "no instance".

KITTI has no official validation split. Ours is fixed and documented: **val = the 40 frames whose
number is a multiple of 5** (``000000_10, 000005_10, ..., 000195_10``), **train = the other 160**,
``trainval`` = all 200 (see :data:`VAL_IDS`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldnbench.data.base import SegDataset
from ldnbench.data.cityscapes import decode_labelids
from ldnbench.data.io import read_png16
from ldnbench.data.labels import cityscapes19
from ldnbench.data.layout import index, not_found, pair, require_paired

#: The fixed validation frames (every 5th of the 200 training frames).
VAL_IDS = frozenset(f"{i:06d}_10" for i in range(0, 200, 5))


def decode_instances(path: Path) -> np.ndarray:
    """KITTI instance PNG -> instance map (the raw value where ``k > 0``, else 0)."""
    v = read_png16(path)
    return np.where(v % 256 > 0, v, 0).astype(np.int32)


class Kitti(SegDataset):
    """KITTI semantics: ``train`` 160, ``val`` 40 (fixed, see module doc), ``trainval`` 200, ``test`` 200."""

    name = "kitti"
    label_space_name = "cityscapes19"
    splits = ("train", "val", "trainval", "test")
    layout = "training/image_2/*_10.png + training/semantic/*_10.png (+ training/instance/)"
    crop_size = 512

    def __init__(self, root: str | Path, split: str = "train", *, strict: bool = True):
        super().__init__(root, split)
        self.label_space = cityscapes19()
        if not (self.root / "training").is_dir() and (self.root / "data_semantics" / "training").is_dir():
            self.root = self.root / "data_semantics"
        folder = self.root / ("testing" if split == "test" else "training")
        pattern = f"{folder.name}/image_2/*.png"
        images = index(sorted(folder.glob("image_2/*.png")), ".png")
        if split in ("train", "val"):
            images = {k: p for k, p in images.items() if (k in VAL_IDS) == (split == "val")}
        if not images:
            raise not_found(self.name, self.root, pattern, "point --root at the unzipped data_semantics folder")
        if split == "test":
            self.files, self.unpaired = pair(images, None)
        else:
            labels = index(sorted(folder.glob("semantic/*.png")), ".png")
            inst = index(sorted(folder.glob("instance/*.png")), ".png")
            keep = lambda d: {k: p for k, p in d.items() if (split == "trainval" or (k in VAL_IDS) == (split == "val"))}  # noqa: E731
            self.files, self.unpaired = pair(images, keep(labels), keep(inst))
        require_paired(self.name, self.unpaired, strict)

    def load_target(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.labelled_files(i)
        inst = decode_instances(f.instances) if f.instances is not None else None
        return decode_labelids(f.label), inst
