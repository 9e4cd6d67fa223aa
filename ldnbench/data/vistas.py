"""Mapillary Vistas v1.2 (66 labels) and v2.0 (124 labels), remapped to ``cityscapes19``.

Layouts (``split``: train -> ``training``, val -> ``validation``, test -> ``testing``):

* 2021 release: ``{root}/{training,...}/images/{key}.jpg``, ``{root}/{training,...}/v1.2/{labels,instances}/{key}.png``,
  ``{root}/config_v1.2.json`` (and the same with ``v2.0``);
* v1.0/1.1 zips: ``{root}/{training,...}/{labels,instances}/{key}.png`` and ``{root}/config.json``.

The label index of a pixel is the position in the config's ``labels`` list; it is mapped to a
Cityscapes class **by name** (so a config with other label orders still maps correctly) using the
UniZg convention (``Ivan1248/vidlu`` ``Vistas.cityscapes_mapping``): every name not listed is
ignored. v2.0 uses the same table plus its sub-classes of the listed v1.2 parents (a derived
mapping, see :data:`V20_EXTRA`). Instances come from the 16-bit ``instances`` PNGs
(``class*256 + k``); pixels of instance classes get ``value + 1`` (0 stays "no instance").
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from ldnbench.data.base import SegDataset
from ldnbench.data.io import read_label, read_png16
from ldnbench.data.labels import IGNORE, cityscapes19
from ldnbench.data.layout import describe, index, lut, not_found, pair, remap, require_paired
from ldnbench.errors import UserError

SPLIT_FOLDERS = {"train": "training", "val": "validation", "test": "testing"}

#: Vistas v1.2 ``config_v1.2.json`` labels: (name, readable, color, instances, evaluate). Used to
#: write synthetic/fixture trees; the adapter itself reads the labels from the dataset's config.
VISTAS_V12_LABELS = [
    ('animal--bird', 'Bird', (165, 42, 42), True, True),
    ('animal--ground-animal', 'Ground Animal', (0, 192, 0), True, True),
    ('construction--barrier--curb', 'Curb', (196, 196, 196), False, True),
    ('construction--barrier--fence', 'Fence', (190, 153, 153), False, True),
    ('construction--barrier--guard-rail', 'Guard Rail', (180, 165, 180), False, True),
    ('construction--barrier--other-barrier', 'Barrier', (90, 120, 150), False, True),
    ('construction--barrier--wall', 'Wall', (102, 102, 156), False, True),
    ('construction--flat--bike-lane', 'Bike Lane', (128, 64, 255), False, True),
    ('construction--flat--crosswalk-plain', 'Crosswalk - Plain', (140, 140, 200), True, True),
    ('construction--flat--curb-cut', 'Curb Cut', (170, 170, 170), False, True),
    ('construction--flat--parking', 'Parking', (250, 170, 160), False, True),
    ('construction--flat--pedestrian-area', 'Pedestrian Area', (96, 96, 96), False, True),
    ('construction--flat--rail-track', 'Rail Track', (230, 150, 140), False, True),
    ('construction--flat--road', 'Road', (128, 64, 128), False, True),
    ('construction--flat--service-lane', 'Service Lane', (110, 110, 110), False, True),
    ('construction--flat--sidewalk', 'Sidewalk', (244, 35, 232), False, True),
    ('construction--structure--bridge', 'Bridge', (150, 100, 100), False, True),
    ('construction--structure--building', 'Building', (70, 70, 70), False, True),
    ('construction--structure--tunnel', 'Tunnel', (150, 120, 90), False, True),
    ('human--person', 'Person', (220, 20, 60), True, True),
    ('human--rider--bicyclist', 'Bicyclist', (255, 0, 0), True, True),
    ('human--rider--motorcyclist', 'Motorcyclist', (255, 0, 100), True, True),
    ('human--rider--other-rider', 'Other Rider', (255, 0, 200), True, True),
    ('marking--crosswalk-zebra', 'Lane Marking - Crosswalk', (200, 128, 128), True, True),
    ('marking--general', 'Lane Marking - General', (255, 255, 255), False, True),
    ('nature--mountain', 'Mountain', (64, 170, 64), False, True),
    ('nature--sand', 'Sand', (230, 160, 50), False, True),
    ('nature--sky', 'Sky', (70, 130, 180), False, True),
    ('nature--snow', 'Snow', (190, 255, 255), False, True),
    ('nature--terrain', 'Terrain', (152, 251, 152), False, True),
    ('nature--vegetation', 'Vegetation', (107, 142, 35), False, True),
    ('nature--water', 'Water', (0, 170, 30), False, True),
    ('object--banner', 'Banner', (255, 255, 128), True, True),
    ('object--bench', 'Bench', (250, 0, 30), True, True),
    ('object--bike-rack', 'Bike Rack', (100, 140, 180), True, True),
    ('object--billboard', 'Billboard', (220, 220, 220), True, True),
    ('object--catch-basin', 'Catch Basin', (220, 128, 128), True, True),
    ('object--cctv-camera', 'CCTV Camera', (222, 40, 40), True, True),
    ('object--fire-hydrant', 'Fire Hydrant', (100, 170, 30), True, True),
    ('object--junction-box', 'Junction Box', (40, 40, 40), True, True),
    ('object--mailbox', 'Mailbox', (33, 33, 33), True, True),
    ('object--manhole', 'Manhole', (100, 128, 160), True, True),
    ('object--phone-booth', 'Phone Booth', (142, 0, 0), True, True),
    ('object--pothole', 'Pothole', (70, 100, 150), False, True),
    ('object--street-light', 'Street Light', (210, 170, 100), True, True),
    ('object--support--pole', 'Pole', (153, 153, 153), True, True),
    ('object--support--traffic-sign-frame', 'Traffic Sign Frame', (128, 128, 128), True, True),
    ('object--support--utility-pole', 'Utility Pole', (0, 0, 80), True, True),
    ('object--traffic-light', 'Traffic Light', (250, 170, 30), True, True),
    ('object--traffic-sign--back', 'Traffic Sign (Back)', (192, 192, 192), True, True),
    ('object--traffic-sign--front', 'Traffic Sign (Front)', (220, 220, 0), True, True),
    ('object--trash-can', 'Trash Can', (140, 140, 20), True, True),
    ('object--vehicle--bicycle', 'Bicycle', (119, 11, 32), True, True),
    ('object--vehicle--boat', 'Boat', (150, 0, 255), True, True),
    ('object--vehicle--bus', 'Bus', (0, 60, 100), True, True),
    ('object--vehicle--car', 'Car', (0, 0, 142), True, True),
    ('object--vehicle--caravan', 'Caravan', (0, 0, 90), True, True),
    ('object--vehicle--motorcycle', 'Motorcycle', (0, 0, 230), True, True),
    ('object--vehicle--on-rails', 'On Rails', (0, 80, 100), False, True),
    ('object--vehicle--other-vehicle', 'Other Vehicle', (128, 64, 64), True, True),
    ('object--vehicle--trailer', 'Trailer', (0, 0, 110), True, True),
    ('object--vehicle--truck', 'Truck', (0, 0, 70), True, True),
    ('object--vehicle--wheeled-slow', 'Wheeled Slow', (0, 0, 192), True, True),
    ('void--car-mount', 'Car Mount', (32, 32, 32), False, True),
    ('void--ego-vehicle', 'Ego Vehicle', (120, 10, 10), False, True),
    ('void--unlabeled', 'Unlabeled', (0, 0, 0), False, False),
]

#: Vistas name -> Cityscapes-19 class name (vidlu ``Vistas.cityscapes_mapping``); others -> ignore.
TO_CITYSCAPES = {
    "construction--barrier--curb": "sidewalk", "construction--barrier--fence": "fence",
    "construction--barrier--guard-rail": "fence", "construction--barrier--wall": "wall",
    "construction--flat--bike-lane": "road", "construction--flat--crosswalk-plain": "road",
    "construction--flat--curb-cut": "sidewalk", "construction--flat--parking": "road",
    "construction--flat--pedestrian-area": "sidewalk", "construction--flat--rail-track": "road",
    "construction--flat--road": "road", "construction--flat--service-lane": "road",
    "construction--flat--sidewalk": "sidewalk", "construction--structure--bridge": "building",
    "construction--structure--building": "building", "construction--structure--tunnel": "building",
    "human--person": "person", "human--rider--bicyclist": "rider",
    "human--rider--motorcyclist": "rider", "human--rider--other-rider": "rider",
    "marking--crosswalk-zebra": "road", "marking--general": "road", "nature--sand": "terrain",
    "nature--sky": "sky", "nature--snow": "terrain", "nature--terrain": "terrain",
    "nature--vegetation": "vegetation", "object--support--pole": "pole",
    "object--support--traffic-sign-frame": "traffic sign", "object--support--utility-pole": "pole",
    "object--traffic-light": "traffic light", "object--traffic-sign--front": "traffic sign",
    "object--vehicle--bicycle": "bicycle", "object--vehicle--bus": "bus",
    "object--vehicle--car": "car", "object--vehicle--motorcycle": "motorcycle",
    "object--vehicle--on-rails": "train", "object--vehicle--truck": "truck",
}
#: v2.0 sub-classes of the v1.2 parents above (derived; v2.0 ``marking--*`` are all road and
#: ``object--traffic-light--*`` all traffic light, see :func:`cityscapes_name`). Left ignored as
#: judgement calls: driveway, parking-aisle, road-shoulder, traffic-island, ``marking-only--*``.
V20_EXTRA = {
    "human--person--individual": "person",
    "object--traffic-sign--direction-front": "traffic sign",
    "object--traffic-sign--information-parking": "traffic sign",
    "object--traffic-sign--temporary-front": "traffic sign",
}
V20_PREFIXES = {"marking--": "road", "object--traffic-light--": "traffic light"}


def cityscapes_name(vistas_name: str) -> str | None:
    """The Cityscapes-19 class a Vistas (v1.2 or v2.0) label name maps to, None = ignore."""
    if vistas_name in TO_CITYSCAPES:
        return TO_CITYSCAPES[vistas_name]
    if vistas_name in V20_EXTRA:
        return V20_EXTRA[vistas_name]
    if vistas_name.endswith("--ambiguous"):  # v2.0 "ambiguous" groups are not evaluated
        return None
    return next((cs for p, cs in V20_PREFIXES.items() if vistas_name.startswith(p)), None)


def label_table(names: list[str]) -> np.ndarray:
    """Remap table Vistas label index -> cityscapes19 index (255 ignore, -1 = not in the config)."""
    space = cityscapes19()
    out = {}
    for i, n in enumerate(names):
        cs = cityscapes_name(n)
        out[i] = space.index(cs) if cs else IGNORE
    return lut(out)


@cache
def _instance_mask() -> np.ndarray:
    """``mask[c]`` for cityscapes19 class c (and 255): does the class have instances?"""
    space = cityscapes19()
    m = np.zeros(256, bool)
    m[list(space.instance_classes)] = True
    return m


class Vistas(SegDataset):
    """Mapillary Vistas: ``train`` 18000, ``val`` 2000, ``test`` 5000 (no labels)."""

    name = "vistas"
    label_space_name = "cityscapes19"
    splits = ("train", "val", "test")
    layout = "{training,validation,testing}/images/*.jpg + {training,validation}/v1.2/labels/*.png + config_v1.2.json"
    crop_size = 768
    versions = ("v1.2", "v2.0")

    def __init__(self, root: str | Path, split: str = "train", *, version: str | None = None, strict: bool = True):
        super().__init__(root, split)
        self.label_space = cityscapes19()
        sf = self.root / SPLIT_FOLDERS[split]
        img_pattern = f"{SPLIT_FOLDERS[split]}/images/*.jpg"
        images = index(sorted(sf.glob("images/*.jpg")), ".jpg")
        if not images:
            raise not_found(self.name, self.root, img_pattern,
                            "point --root at the folder holding training/, validation/ and config_v1.2.json")
        self.version, config, gt = self._find_version(sf, version)
        self.label_names = self._read_config(config)
        self.table = label_table(self.label_names)
        if split == "test":
            self.files, self.unpaired = pair(images, None)
        else:
            labels = index(sorted(gt.glob("labels/*.png")), ".png")
            if not labels:
                raise not_found(self.name, self.root, str((gt / "labels/*.png").relative_to(self.root)))
            inst = index(sorted(gt.glob("instances/*.png")), ".png")
            self.files, self.unpaired = pair(images, labels, inst)
        require_paired(self.name, self.unpaired, strict)

    def _find_version(self, sf: Path, version: str | None) -> tuple[str, Path, Path]:
        """(version, config file, folder holding labels/ and instances/) of the layout present."""
        candidates = [(v, self.root / f"config_{v}.json", sf / v) for v in self.versions]
        candidates.append(("v1.2", self.root / "config.json", sf))  # v1.0/1.1 zips: same 66 labels
        if version is not None:
            if version not in self.versions:
                raise UserError(f"unknown Vistas version {version!r}; choose one of: {', '.join(self.versions)}", 2)
            candidates = [c for c in candidates if c[0] == version]
        present = [c for c in candidates if c[1].is_file()]
        for c in present:
            if (c[2] / "labels").is_dir():  # e.g. only the v2.0 labels were unpacked
                return c
        if present:
            return present[0]
        expected = " or ".join(str(c[1]) for c in candidates)
        raise UserError(f"no Vistas config found: expected {expected}, but {describe(self.root)}")

    @staticmethod
    def _read_config(path: Path) -> list[str]:
        try:
            return [label["name"] for label in json.loads(path.read_text())["labels"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read Vistas config {path}: {e!r}; restore it from the dataset zip") from None

    def load_target(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.labelled_files(i)
        label = remap(read_label(f.label), self.table, f.label, f"{len(self.label_names)} Vistas {self.version} labels")
        inst = None
        if f.instances is not None:
            v = read_png16(f.instances)
            cls = np.clip(self.table[np.clip(v >> 8, 0, 255)], 0, 255)
            inst = np.where(_instance_mask()[cls], v + 1, 0).astype(np.int32)
        return label, inst
