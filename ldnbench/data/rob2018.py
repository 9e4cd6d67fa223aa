"""ROB 2018 (Robust Vision Challenge): Cityscapes + KITTI + WildDash v1 + ScanNet in one 39-class space.

``rob39`` = the 19 Cityscapes train classes (``cs:road`` ... indices 0..18) followed by the 20 ScanNet
benchmark classes (``scannet:wall`` ... indices 19..38), the compact form of the ROB devkit's joint
label-id space (DATASETS.md §7.3) and the paper's "at least 39 classes: 19 from Cityscapes and 20 from
ScanNet". The adapter composes the four dataset adapters and shifts ScanNet's classes by 19;
sample ids are prefixed by the source (``cityscapes_aachen_000000_000019``, ``scannet_scene0000_00_000000``).

Root layout (each part as its own adapter expects it; every part root can be overridden with the
``cityscapes_root``/``kitti_root``/``wilddash_root``/``scannet_root`` options)::

    <root>/cityscapes/   leftImg8bit/ + gtFine/
    <root>/kitti/        training/{image_2,semantic,instance}/
    <root>/wilddash/     wd_val_01/
    <root>/scannet/      [scannet_frames_25k/]scene*/ + scannetv2_{train,val}.txt

The folder made by the ROB 2018 devkit is read too: ``<root>/[datasets_kitti2015/]training/``
``{image_2,semantic,instance}/<Benchmark>_<name>.png`` with benchmarks ``Cityscapes``, ``Kitti2015``,
``WildDash`` and ``ScanNet``, ``semantic`` in the devkit's joint label ids (0..33 Cityscapes label ids,
34..73 = NYU40 + 33) and ``instance`` = ``label*256 + k``. The devkit does not shift ScanNet's labels
(DATASETS.md §7.3), so a ScanNet label holding any id in 1..33 is read as NYU40 (+33), otherwise as
joint ids. That folder mixes the official splits, so it only offers ``trainval``.

Splits (the part splits in :data:`PART_SPLITS`): ``trainval`` is the paper's ROB_LDN training set
(Cityscapes train+val, all 200 KITTI frames, WildDash val, ScanNet train+val); ``train``/``val`` hold
out Cityscapes val, ldnbench's fixed KITTI val and ScanNet val. WildDash v1 has only 70 labelled frames,
all used for training, so ``val`` has no WildDash part.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ldnbench.data.base import SampleFiles, SegDataset
from ldnbench.data.cityscapes import Cityscapes
from ldnbench.data.io import read_label, read_png16
from ldnbench.data.kitti import Kitti
from ldnbench.data.labels import IGNORE, LabelSpace, cityscapes19
from ldnbench.data.layout import index, pair, remap, require_paired
from ldnbench.data.scannet import ScanNet, scannet20
from ldnbench.data.wilddash import WildDash
from ldnbench.errors import UserError

PARTS = ("cityscapes", "kitti", "wilddash", "scannet")

#: rob2018 split -> {part: the part's split(s)}.
PART_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"cityscapes": ("train",), "kitti": ("train",), "wilddash": ("val",), "scannet": ("train",)},
    "val": {"cityscapes": ("val",), "kitti": ("val",), "scannet": ("val",)},
    "trainval": {"cityscapes": ("train", "val"), "kitti": ("trainval",), "wilddash": ("val",),
                 "scannet": ("train", "val")},
}

#: The adapter of each part.
PART_ADAPTERS = {"cityscapes": Cityscapes, "kitti": Kitti, "wilddash": WildDash, "scannet": ScanNet}

#: Label space of each part's adapter.
PART_SPACE = {"cityscapes": "cityscapes19", "kitti": "cityscapes19", "wilddash": "cityscapes19", "scannet": "scannet20"}


def rob39() -> LabelSpace:
    """19 Cityscapes classes (``cs:`` prefix) then 20 ScanNet classes (``scannet:`` prefix)."""
    cs, sn = cityscapes19(), scannet20()
    return LabelSpace(
        name="rob39",
        classes=tuple(f"cs:{c}" for c in cs.classes) + tuple(f"scannet:{c}" for c in sn.classes),
        colors=cs.colors + sn.colors,
        instance_classes=cs.instance_classes,
        avg_instance_size=tuple(cs.avg_instance_size or (math.nan,) * cs.num_classes) + (math.nan,) * sn.num_classes,
    )


def offset_of(space: str) -> int:
    """rob39 index of class 0 of ``space`` (cityscapes19 or scannet20)."""
    return {"cityscapes19": 0, "scannet20": cityscapes19().num_classes}[space]


def to_rob39_table(space: str) -> np.ndarray:
    """uint8 lookup table: label in ``space`` -> rob39 index (255 stays 255)."""
    n = {"cityscapes19": cityscapes19, "scannet20": scannet20}[space]().num_classes
    table = np.full(256, IGNORE, np.uint8)
    table[:n] = np.arange(n) + offset_of(space)
    return table


#: Benchmark prefix of the devkit's file names -> part name.
DEVKIT_PREFIXES = {"Cityscapes": "cityscapes", "Kitti2015": "kitti", "WildDash": "wilddash", "ScanNet": "scannet"}
_NUM_CS_IDS = 34  # Cityscapes label ids 0..33 = joint ids 0..33; ScanNet NYU40 id n = joint id n + 33


def joint_to_rob39_table() -> np.ndarray:
    """int16 lookup: devkit joint id (0..73) -> rob39 index or 255; -1 for values that are not joint ids."""
    from ldnbench.data.cityscapes import labelid_to_trainid
    from ldnbench.data.scannet import nyu40_to_scannet20

    table = np.full(256, -1, np.int16)
    table[:_NUM_CS_IDS] = labelid_to_trainid()[:_NUM_CS_IDS]
    sn_offset = offset_of("scannet20")
    for nyu, idx in nyu40_to_scannet20().items():
        if nyu > 0:
            table[nyu + _NUM_CS_IDS - 1] = idx + sn_offset if idx != IGNORE else IGNORE
    return table


def find_devkit(root: Path) -> Path | None:
    """The devkit's ``training`` folder (``root/datasets_kitti2015/training``, ``root/training`` or ``root``), if any."""
    for cand in (root / "datasets_kitti2015" / "training", root / "training", root):
        if (cand / "semantic").is_dir() and any((cand / "semantic").glob("*_*.png")):
            return cand
    return None


class DevkitPart(SegDataset):
    """The frames of one benchmark in the devkit's ``training`` folder, labels already in rob39."""

    name = "rob2018"
    label_space_name = "rob39"
    splits = ("trainval",)

    def __init__(self, training: Path, benchmark: str, *, scannet_size: tuple[int, int] | None = (640, 480),
                 strict: bool = True):
        super().__init__(training, "trainval")
        self.label_space = rob39()
        self.benchmark = benchmark
        self.size = tuple(scannet_size) if benchmark == "ScanNet" and scannet_size is not None else None
        pre = f"{benchmark}_"
        images = {**index(sorted(training.glob(f"image_2/{pre}*.jpg")), ".jpg"),
                  **index(sorted(training.glob(f"image_2/{pre}*.png")), ".png")}
        labels = index(sorted(training.glob(f"semantic/{pre}*.png")), ".png")
        inst = index(sorted(training.glob(f"instance/{pre}*.png")), ".png") if benchmark != "ScanNet" else {}
        files, self.unpaired = pair(images, labels, inst)
        self.files = [SampleFiles(f.id[len(pre):], f.image, f.label, f.instances) for f in files]
        require_paired("rob2018", self.unpaired, strict)
        joint = joint_to_rob39_table()
        if benchmark == "ScanNet":
            self._table = np.full(512, -1, np.int16)  # room for shifted ids above 255 (which are errors)
            self._table[:256] = joint
            self._table[1:_NUM_CS_IDS] = -1  # no Cityscapes ids in a ScanNet frame
        else:
            self._table = joint
            self._table[_NUM_CS_IDS:] = -1  # no ScanNet ids in a road-driving frame

    def load_image(self, i: int) -> np.ndarray:
        from ldnbench.data.scannet import resize_image

        image = super().load_image(i)
        return resize_image(image, self.size) if self.size is not None else image

    def load_target(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        from ldnbench.data.scannet import image_size, resize_label

        f = self.files[i]
        raw = read_label(f.label)
        if self.benchmark == "ScanNet":
            if ((raw > 0) & (raw < _NUM_CS_IDS)).any():  # unshifted NYU40 ids
                raw = np.where(raw > 0, raw.astype(np.int16) + _NUM_CS_IDS - 1, 0)
            label = remap(raw, self._table, f.label, "ROB joint ids of ScanNet (0, 34..73) or NYU40 ids (0..40)")
            return resize_label(label, self.size or image_size(f.image)), None
        label = remap(raw, self._table, f.label, "Cityscapes label ids 0..33")
        instances = None
        if f.instances is not None:
            v = read_png16(f.instances)
            instances = np.where(v % 256 > 0, v, 0).astype(np.int32)
        return label, instances


class Rob2018(SegDataset):
    name = "rob2018"
    label_space_name = "rob39"
    splits = ("train", "val", "trainval")
    layout = ("cityscapes/ + kitti/ + wilddash/ + scannet/ (each laid out as its own adapter expects)  |  "
              "ROB devkit: [datasets_kitti2015/]training/{image_2,semantic,instance}/<Benchmark>_*.png (trainval)")
    crop_size = 768  # road-driving frames dominate; the paper's Cityscapes/WildDash crop

    def __init__(self, root: str | Path, split: str = "trainval", *, parts: tuple[str, ...] | str = PARTS,
                 cityscapes_root: str | Path | None = None, kitti_root: str | Path | None = None,
                 wilddash_root: str | Path | None = None, scannet_root: str | Path | None = None,
                 strict: bool = True):
        super().__init__(root, split)
        if split not in self.splits:
            raise UserError(f"{self.name} has no split {split!r}; choose one of: {', '.join(self.splits)}", 2)
        parts = tuple(p.strip() for p in parts.split(",")) if isinstance(parts, str) else tuple(parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise UserError(f"unknown rob2018 part(s) {unknown}; choose among: {', '.join(PARTS)}", 2)
        self.label_space = rob39()
        roots = {"cityscapes": cityscapes_root, "kitti": kitti_root, "wilddash": wilddash_root,
                 "scannet": scannet_root}
        self.parts: list[tuple[str, SegDataset, np.ndarray]] = []
        self.files, self.unpaired = [], []
        self._where: list[tuple[int, int]] = []  # sample i -> (part number, index in the part)
        devkit = find_devkit(self.root)
        if devkit is not None:
            if split != "trainval":
                raise UserError(f"{devkit} is the ROB devkit's training folder, which mixes the official train and "
                                "val frames; use split 'trainval', or the cityscapes/ kitti/ wilddash/ scannet/ "
                                "layout for train/val", 2)
            for benchmark, part in DEVKIT_PREFIXES.items():
                if part in parts:
                    self._add(part, DevkitPart(devkit, benchmark, strict=strict), np.arange(256, dtype=np.uint8))
            if not self.files:
                raise UserError(f"no frames of {', '.join(parts)} in the ROB devkit folder {devkit} "
                                f"(expected image_2/<Benchmark>_*.png with benchmarks {', '.join(DEVKIT_PREFIXES)})")
            return
        for part in PARTS:
            if part not in parts:
                continue
            part_root = Path(roots[part]) if roots[part] is not None else self.root / part
            table = to_rob39_table(PART_SPACE[part])
            for part_split in PART_SPLITS[split].get(part, ()):
                try:
                    ds = PART_ADAPTERS[part](part_root, part_split, strict=strict)
                except UserError as e:
                    raise UserError(f"rob2018 part {part!r} ({part_split}): {e} (use the {part}_root option for "
                                    f"another location, or parts=... to leave it out)", e.exit_code) from None
                self._add(part, ds, table)

    def _add(self, part: str, ds: SegDataset, table: np.ndarray) -> None:
        k = len(self.parts)
        self.parts.append((part, ds, table))
        self.files += [SampleFiles(f"{part}_{f.id}", f.image, f.label, f.instances) for f in ds.files]
        self._where += [(k, j) for j in range(len(ds))]
        self.unpaired += getattr(ds, "unpaired", [])

    def source(self, i: int) -> str:
        """The dataset sample ``i`` comes from (``cityscapes``, ``kitti``, ``wilddash`` or ``scannet``)."""
        return self.parts[self._where[i][0]][0]

    def load_image(self, i: int) -> np.ndarray:
        k, j = self._where[i]
        return self.parts[k][1].load_image(j)

    def load_target(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        k, j = self._where[i]
        _, ds, table = self.parts[k]
        label, instances = ds.load_target(j)
        return table[label], instances
