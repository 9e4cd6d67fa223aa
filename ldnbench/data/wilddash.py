"""WildDash v1 (``wd_val_01.zip``, ROB 2018) in ``cityscapes19``.

Frames ``{cc}{NNNN}_100000.png`` with ``_labelIds.png`` (Cityscapes label ids) and
``_instanceIds.png`` (Cityscapes instanceIds encoding) beside them. Unzips differ in nesting, so
files are found recursively: ``val`` = frames below a ``wd_val*`` folder (or all frames when there
is no such folder), ``bench`` = frames below ``wd_bench*`` (no labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldnbench.data.base import SegDataset
from ldnbench.data.cityscapes import decode_instanceids, decode_labelids
from ldnbench.data.labels import cityscapes19
from ldnbench.data.layout import index, not_found, pair, require_paired

IMAGE_GLOB = "**/*_100000.png"


class WildDash(SegDataset):
    """WildDash v1: ``val`` 70 frames with labels, ``bench`` 156 frames without."""

    name = "wilddash"
    label_space_name = "cityscapes19"
    splits = ("val", "bench")
    layout = "wd_val_01/*_100000.png + *_100000_labelIds.png (+ _instanceIds.png), found recursively"
    crop_size = 768

    def __init__(self, root: str | Path, split: str = "val", *, strict: bool = True):
        super().__init__(root, split)
        self.label_space = cityscapes19()
        found = sorted(self.root.glob(IMAGE_GLOB))
        prefix = "wd_val" if split == "val" else "wd_bench"

        def in_split(p: Path) -> bool:
            return any(d.startswith(prefix) for d in p.relative_to(self.root).parts[:-1])

        images = [p for p in found if in_split(p)]
        if split == "val" and not images and not any("wd_bench" in p.as_posix() for p in found):
            images = found  # a flat unzip without the wd_val_01 folder
        if not images:
            raise not_found(self.name, self.root, f"{prefix}*/{IMAGE_GLOB}", "point --root at the unzipped WildDash folder")
        images_by_id = index(images, ".png")
        if split == "bench":
            self.files, self.unpaired = pair(images_by_id, None)
        else:
            folders = {p.parent for p in images}
            gt = [q for d in folders for q in d.glob("*_100000_*.png")]
            self.files, self.unpaired = pair(images_by_id, index(gt, "_labelIds.png"), index(gt, "_instanceIds.png"))
        require_paired(self.name, self.unpaired, strict)

    def load_target(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.labelled_files(i)
        inst = decode_instanceids(f.instances) if f.instances is not None else None
        return decode_labelids(f.label), inst
