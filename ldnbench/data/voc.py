"""PASCAL VOC 2012 (``voc``) and VOC 2012 + SBD "train_aug" (``voc-aug``), 21 classes.

``voc`` reads ``VOCdevkit/VOC2012``: ``JPEGImages/{id}.jpg`` with the palette PNGs
``SegmentationClass/{id}.png`` (the palette *index* is the class; 255 = void boundary → ignore) for the
ids in ``ImageSets/Segmentation/{train,val,trainval}.txt`` (1464 / 1449 / 2913).

``voc-aug`` adds SBD (``benchmark_RELEASE/dataset/``: ``cls/{id}.mat`` with ``GTcls.Segmentation``,
lists ``train.txt``/``val.txt``). Its ``train`` split is train_aug, computed from the four list files
exactly as mmsegmentation's ``voc_aug.py`` does (DATASETS.md §3.3)::

    train_aug = sorted(set(voc_train + sbd_train + sbd_val) - set(voc_val))     # 10582 ids

The label of an id in VOC train is the VOC PNG (finer, with void boundaries); every other train_aug
id is not in VOC trainval and takes SBD's ``.mat``. Images come from ``JPEGImages`` (which holds the
SBD images too), falling back to SBD's ``img/``. ``val`` is VOC val (1449), as everyone evaluates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldnbench.data.base import SampleFiles, SegDataset
from ldnbench.data.io import read_label
from ldnbench.data.labels import IGNORE, LabelSpace
from ldnbench.data.layout import lut, not_found, remap, require_paired
from ldnbench.errors import UserError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOCdevkit colour map (bit-interleaving of the index), as stored in the SegmentationClass PNGs."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.append((r, g, b))
    return pal


def voc21() -> LabelSpace:
    """The 20 VOC object classes plus background, in VOC index order, with VOC's colours."""
    return LabelSpace(name="voc21", classes=VOC_CLASSES, colors=tuple(voc_palette(len(VOC_CLASSES))))


_VOC_LUT = lut({**{i: i for i in range(len(VOC_CLASSES))}, IGNORE: IGNORE})
_ENCODING = "VOC class indices 0..20 (255 = void)"


def find_voc(root: Path) -> Path:
    """The ``VOC2012`` folder at or below ``root`` (``root``, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``)."""
    for cand in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise not_found("VOC 2012", root, "VOCdevkit/VOC2012/JPEGImages/*.jpg",
                    "unpack VOCtrainval_11-May-2012.tar there or point --root at the folder holding VOCdevkit/")


def find_sbd(root: Path) -> Path:
    """SBD's ``dataset`` folder at or below ``root`` (``root``, ``root/dataset`` or ``root/benchmark_RELEASE/dataset``)."""
    for cand in (root / "benchmark_RELEASE" / "dataset", root / "dataset", root):
        if (cand / "cls").is_dir():
            return cand
    raise not_found("SBD", root, "benchmark_RELEASE/dataset/cls/*.mat",
                    "unpack SBD's benchmark.tgz there or pass the sbd_root option")


def read_list(path: Path) -> list[str]:
    """Ids of a list file, one per line."""
    if not path.is_file():
        raise UserError(f"split list {path} is missing; it ships with the dataset archive, restore it")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def train_aug_ids(voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]) -> list[str]:
    """train_aug = VOC train ∪ SBD train ∪ SBD val − VOC val (10582 ids for the real lists)."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """HxW uint8 class indices of an SBD ``cls/{id}.mat`` (``GTcls.Segmentation``)."""
    from scipy.io import loadmat

    try:
        seg = np.asarray(loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation)
    except Exception as e:  # scipy raises many types (MatReadError, ValueError, KeyError, ...) for bad files
        raise UserError(f"cannot read SBD label {path} (expected a .mat file with struct GTcls.Segmentation): "
                        f"{type(e).__name__}: {e}; replace the corrupt file") from None
    if seg.ndim != 2 or not (np.issubdtype(seg.dtype, np.integer) or np.issubdtype(seg.dtype, np.floating)):
        raise UserError(f"SBD label {path}: GTcls.Segmentation is not an HxW array of class indices")
    if seg.size and (seg.min() < 0 or seg.max() > 255):
        raise UserError(f"SBD label {path} has values outside 0..255; is it the right kind of label file?")
    return seg.astype(np.uint8)


class VOC(SegDataset):
    name = "voc"
    label_space_name = "voc21"
    splits = ("train", "val", "trainval")
    layout = "VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{split}.txt}"
    crop_size = 512  # paper §5.5

    def __init__(self, root: str | Path, split: str = "train", *, strict: bool = True):
        super().__init__(root, split)
        if split not in self.splits:
            raise UserError(f"{self.name} has no split {split!r}; choose one of: {', '.join(self.splits)}", 2)
        self.label_space = voc21()
        self.voc = find_voc(self.root)
        ids = read_list(self.voc / "ImageSets" / "Segmentation" / f"{split}.txt")
        self.files, self.unpaired = self._pair(ids, set(ids), None)
        require_paired(self.name, self.unpaired, strict)

    def _pair(self, ids: list[str], voc_label_ids: set[str], sbd: Path | None) -> tuple[list[SampleFiles], list[Path]]:
        """Files of ``ids`` (VOC PNG label for ``voc_label_ids``, SBD .mat for the others) and the unpaired ones."""
        files, missing = [], []
        for i in ids:
            image = self.voc / "JPEGImages" / f"{i}.jpg"
            if not image.is_file() and sbd is not None and (sbd / "img" / f"{i}.jpg").is_file():
                image = sbd / "img" / f"{i}.jpg"
            label = (self.voc / "SegmentationClass" / f"{i}.png" if i in voc_label_ids
                     else sbd / "cls" / f"{i}.mat")
            has_image, has_label = image.is_file(), label.is_file()
            if has_image and has_label:
                files.append(SampleFiles(i, image, label))
            else:  # report the file left without a partner (the image path when both are missing)
                missing.append(image if has_image or not has_label else label)
        return files, missing

    def load_target(self, i: int) -> tuple[np.ndarray, None]:
        path = self.files[i].label
        raw = read_sbd_mat(path) if path.suffix == ".mat" else read_label(path)
        return remap(raw, _VOC_LUT, path, _ENCODING), None


class VOCAug(VOC):
    name = "voc-aug"
    splits = ("train", "val")
    layout = ("VOCdevkit/VOC2012/... (as voc) + benchmark_RELEASE/dataset/{cls/*.mat, img/*.jpg, train.txt, val.txt}; "
              "train = train_aug (10582), val = VOC val")

    def __init__(self, root: str | Path, split: str = "train", *, sbd_root: str | Path | None = None,
                 strict: bool = True):
        SegDataset.__init__(self, root, split)
        if split not in self.splits:
            raise UserError(f"{self.name} has no split {split!r}; choose one of: {', '.join(self.splits)}", 2)
        self.label_space = voc21()
        self.voc = find_voc(self.root)
        lists = self.voc / "ImageSets" / "Segmentation"
        voc_train, voc_val = read_list(lists / "train.txt"), read_list(lists / "val.txt")
        if split == "val":
            self.sbd = None
            self.files, self.unpaired = self._pair(voc_val, set(voc_val), None)
        else:
            self.sbd = find_sbd(Path(sbd_root) if sbd_root is not None else self.root)
            ids = train_aug_ids(voc_train, voc_val, read_list(self.sbd / "train.txt"), read_list(self.sbd / "val.txt"))
            # VOC's PNG wins for VOC train ids; the rest of train_aug is outside VOC trainval -> SBD .mat
            self.files, self.unpaired = self._pair(ids, set(voc_train), self.sbd)
        require_paired(self.name, self.unpaired, strict)


__all__ = ["VOC", "VOCAug", "VOC_CLASSES", "read_sbd_mat", "train_aug_ids", "voc21", "voc_palette"]
