"""ScanNet 2D frames with NYU40 labels, evaluated in the 20 ScanNet benchmark classes (``scannet20``).

Reads the per-scene frame folders of ``scannet_frames_25k.zip`` (and of ROB 2018's ``scenes_all.zip``,
same structure)::

    <root>/[scannet_frames_25k/]scene0000_00/color/000000.jpg
    <root>/[scannet_frames_25k/]scene0000_00/label/000000.png      8-bit NYU40 ids (0 = unannotated)
    <root>/scannetv2_{train,val}.txt                                scene lists (ScanNet Tasks/Benchmark/)

Frames exported from the raw per-scan zips (``label-filt/*.png``: 16-bit *ScanNet* ids) are read too,
recognised by their 16-bit depth, and converted ScanNet id → NYU40 with ``scannetv2-labels.combined.tsv``
(looked for in ``<root>``; the ``label_map`` option points elsewhere), as ScanNet's
``convert_scannet_label_image.py`` does. NYU40 → scannet20 uses the benchmark's VALID_CLASS_IDS
(DATASETS.md §7.2); the other 20 NYU40 classes and 0 become ignore.

Like ScanNet's 2D evaluator, which scores at 640×480 after NEAREST-resizing the ground truth, images and
labels are resized to ``size=(640, 480)`` by default (image bilinear, label nearest); ``size=None``
keeps the colour image's resolution (labels of another size are resized to it with nearest).
No instances are returned: the ScanNet 2D benchmark has no instance-level IoU.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ldnbench.data.base import SampleFiles, SegDataset
from ldnbench.data.io import read_png16, read_rgb
from ldnbench.data.labels import IGNORE, LabelSpace
from ldnbench.data.layout import describe, lut, remap, require_paired
from ldnbench.errors import UserError

SCANNET20_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "desk", "curtain", "refridgerator", "shower curtain", "toilet", "sink", "bathtub", "otherfurniture",
)
#: NYU40 id of each scannet20 class (ScanNet BenchmarkScripts VALID_CLASS_IDS).
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
#: ScanNet's NYU40 colours (BenchmarkScripts/util.py create_color_palette) of the 20 classes.
SCANNET20_COLORS = (
    (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34), (140, 86, 75),
    (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189), (196, 156, 148), (23, 190, 207),
    (247, 182, 210), (219, 219, 141), (255, 127, 14), (158, 218, 229), (44, 160, 44), (112, 128, 144),
    (227, 119, 194), (82, 84, 163),
)
NUM_NYU40 = 40


def scannet20() -> LabelSpace:
    """The 20 classes of the ScanNet benchmark, in its order (no categories, no instances)."""
    return LabelSpace(name="scannet20", classes=SCANNET20_CLASSES, colors=SCANNET20_COLORS)


def nyu40_to_scannet20() -> dict[int, int]:
    """{NYU40 id 0..40: scannet20 index or 255}."""
    return {n: (SCANNET20_NYU40_IDS.index(n) if n in SCANNET20_NYU40_IDS else IGNORE) for n in range(NUM_NYU40 + 1)}


def read_label_tsv(path: Path) -> dict[int, int]:
    """{ScanNet raw label id: NYU40 id} from ``scannetv2-labels.combined.tsv`` (columns ``id``, ``nyu40id``)."""
    if not path.is_file():
        raise UserError(f"16-bit ScanNet label images hold raw ScanNet ids and need {path} "
                        "(scannetv2-labels.combined.tsv from the ScanNet download) to map them to NYU40; "
                        "put it there or pass the label_map option")
    try:
        with open(path, newline="") as f:
            return {int(row["id"]): int(row["nyu40id"]) for row in csv.DictReader(f, delimiter="\t")}
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not ScanNet's label table (needs integer columns 'id' and 'nyu40id'): {e}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file, from its header."""
    with Image.open(path) as im:
        return im.size


def png_bit_depth(path: Path) -> int:
    """Bit depth from a PNG's IHDR chunk (0 if the file is not a PNG)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else 0


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 resized to ``size`` = (W, H), bilinear (no-op when already that size)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize(tuple(size), Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW label resized to ``size`` = (W, H) with nearest, as ScanNet's evaluator does."""
    if (label.shape[1], label.shape[0]) == tuple(size):
        return label
    return np.array(Image.fromarray(label).resize(tuple(size), Image.NEAREST))


def _scene_dirs(root: Path) -> list[Path]:
    found = {p.parent for pat in ("scene*_*/color", "*/scene*_*/color") for p in root.glob(pat) if p.is_dir()}
    return sorted(found, key=lambda p: p.name)


class ScanNet(SegDataset):
    name = "scannet"
    label_space_name = "scannet20"
    splits = ("train", "val", "all")
    layout = ("[scannet_frames_25k/]scene*/{color/*.jpg, label/*.png (or label-filt/*.png)} + "
              "scannetv2_{train,val}.txt scene lists; split 'all' = every scene found")
    crop_size = 448  # our choice for 640x480 frames (the paper gives no ScanNet crop; 448 is its low-resolution size)

    def __init__(self, root: str | Path, split: str = "train", *, size: tuple[int, int] | None = (640, 480),
                 label_map: str | Path | None = None, strict: bool = True):
        super().__init__(root, split)
        if split not in self.splits:
            raise UserError(f"{self.name} has no split {split!r}; choose one of: {', '.join(self.splits)}", 2)
        self.label_space = scannet20()
        self.size = tuple(size) if size is not None else None
        self.label_map = Path(label_map) if label_map is not None else self.root / "scannetv2-labels.combined.tsv"
        self._nyu40_lut = lut(nyu40_to_scannet20())
        self._raw_lut: np.ndarray | None = None
        scenes = _scene_dirs(self.root)
        if not scenes:
            raise UserError(f"no ScanNet files found: expected {self.root}/scene*_*/color/*.jpg or "
                            f"{self.root}/scannet_frames_25k/scene*_*/color/*.jpg, but {describe(self.root)}; "
                            "point --root at the folder holding the scene folders")
        self.unpaired: list[Path] = []
        if split != "all":
            wanted = self._scene_list(split)
            by_name = {s.name: s for s in scenes}
            self.unpaired += [scenes[0].parent / w for w in wanted if w not in by_name]
            scenes = [by_name[w] for w in wanted if w in by_name]
        self.files = []
        for scene in scenes:
            label_dir = scene / "label" if (scene / "label").is_dir() else scene / "label-filt"
            images = {p.stem: p for p in (scene / "color").glob("*.jpg")}
            labels = {p.stem: p for p in label_dir.glob("*.png")}
            self.files += [SampleFiles(f"{scene.name}_{k}", images[k], labels[k]) for k in sorted(images) if k in labels]
            self.unpaired += [images[k] for k in sorted(images) if k not in labels]
            self.unpaired += [labels[k] for k in sorted(labels) if k not in images]
        require_paired(self.name, self.unpaired, strict)

    def _scene_list(self, split: str) -> list[str]:
        path = self.root / f"scannetv2_{split}.txt"
        if not path.is_file():
            raise UserError(f"ScanNet split {split!r} needs the scene list {path} (copy scannetv2_{split}.txt from "
                            "ScanNet's Tasks/Benchmark/ folder), or use split 'all' for every scene found")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def _raw_table(self) -> np.ndarray:
        if self._raw_lut is None:
            to_nyu = read_label_tsv(self.label_map)
            to_20 = nyu40_to_scannet20()
            table = {0: IGNORE}
            for raw, nyu in to_nyu.items():
                if 0 <= raw < 65536:
                    table[raw] = to_20.get(nyu, IGNORE)
            self._raw_lut = lut(table, 65536)
        return self._raw_lut

    def load_image(self, i: int) -> np.ndarray:
        image = read_rgb(self.files[i].image)
        return resize_image(image, self.size) if self.size is not None else image

    def load_target(self, i: int) -> tuple[np.ndarray, None]:
        f = self.files[i]
        raw = read_png16(f.label)
        if png_bit_depth(f.label) == 16:
            label = remap(raw, self._raw_table(), f.label, f"ScanNet ids of {self.label_map.name}")
        else:
            label = remap(raw, self._nyu40_lut, f.label, "NYU40 ids 0..40")
        return resize_label(label, self.size or image_size(f.image)), None
