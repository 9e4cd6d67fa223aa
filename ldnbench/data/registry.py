"""The dataset registry: a plain dict from adapter name to adapter class."""

from __future__ import annotations

from pathlib import Path

from ldnbench.data.base import SegDataset
from ldnbench.data.camvid import CamVid
from ldnbench.data.cityscapes import Cityscapes
from ldnbench.data.kitti import Kitti
from ldnbench.data.rob2018 import Rob2018
from ldnbench.data.scannet import ScanNet
from ldnbench.data.voc import VOC, VOCAug
from ldnbench.data.vistas import Vistas
from ldnbench.data.wilddash import WildDash
from ldnbench.errors import UserError

# One line per adapter module (imports are light: adapters find files only when instantiated).
DATASETS: dict[str, type[SegDataset]] = {
    "cityscapes": Cityscapes,
    "vistas": Vistas,
    "kitti": Kitti,
    "wilddash": WildDash,
    "camvid": CamVid,
    "voc": VOC,
    "voc-aug": VOCAug,
    "scannet": ScanNet,
    "rob2018": Rob2018,
}


def default_root(name: str) -> Path:
    """``./datasets/<name>``: where a dataset is looked for when no ``--root`` is given."""
    return Path("datasets") / name


def get_dataset(name: str, root: str | Path | None = None, split: str = "train", **options) -> SegDataset:
    """Instantiate adapter ``name`` on ``root`` (default ``./datasets/<name>``) for ``split``."""
    try:
        cls = DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}", 2) from None
    if split not in cls.splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; choose one of: {', '.join(cls.splits)}", 2)
    return cls(root if root is not None else default_root(name), split, **options)
