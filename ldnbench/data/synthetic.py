"""Procedural street scenes written in the exact on-disk formats of Cityscapes, Vistas v1.2 and KITTI.

The ``write_*`` functions write one sample (arrays already in the dataset's native encoding) and are
also what the tests use to build fixture trees. :func:`generate` draws scenes and writes all three
datasets with a visible domain shift between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldnbench.errors import UserError


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


# ---------------------------------------------------------------------------------------------
# Procedural street scenes
# ---------------------------------------------------------------------------------------------

# Cityscapes label ids used by the scenes, plus two extra ids for sub-classes that only Vistas labels
# separately (Cityscapes/KITTI fold them into road and sidewalk).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 7, 8, 11, 12, 13, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, CAR, TRUCK, EGO, STATIC = 21, 22, 23, 24, 26, 27, 1, 4
MARKING, CURB = 100, 101
INSTANCE_IDS = (PERSON, CAR, TRUCK)

#: Scene id -> Vistas v1.2 label name.
VISTAS_NAMES = {
    ROAD: "construction--flat--road", SIDEWALK: "construction--flat--sidewalk",
    BUILDING: "construction--structure--building", WALL: "construction--barrier--wall",
    FENCE: "construction--barrier--fence", POLE: "object--support--pole", LIGHT: "object--traffic-light",
    SIGN: "object--traffic-sign--front", VEGETATION: "nature--vegetation", TERRAIN: "nature--terrain",
    SKY: "nature--sky", PERSON: "human--person", CAR: "object--vehicle--car", TRUCK: "object--vehicle--truck",
    EGO: "void--ego-vehicle", STATIC: "object--bench", MARKING: "marking--general",
    CURB: "construction--barrier--curb", 0: "void--unlabeled",
}


@dataclass(frozen=True)
class Domain:
    """What makes one synthetic dataset look different from the others."""

    name: str
    colors: dict[int, tuple[int, int, int]]
    size: tuple[float, float]          # (width, height) relative to the requested size
    horizon: tuple[float, float]       # fraction of the height
    counts: dict[int, tuple[int, int]]  # object class -> (min, max) per image
    gain: tuple[float, float] = (1.0, 1.0)  # random per-image brightness/colour gain
    buildings: float = 0.8             # probability of a building per skyline block
    ego: bool = False                  # ego-vehicle hood at the bottom (void)
    markings: bool = False             # lane markings drawn (visible in every domain when True)
    noise: float = 5.0


_BASE = {ROAD: (95, 92, 100), SIDEWALK: (175, 160, 150), BUILDING: (150, 118, 95), WALL: (140, 138, 125),
         FENCE: (125, 100, 75), POLE: (70, 70, 75), LIGHT: (35, 35, 30), SIGN: (225, 200, 40),
         VEGETATION: (60, 125, 45), TERRAIN: (150, 165, 85), SKY: (125, 170, 235), PERSON: (180, 40, 60),
         CAR: (40, 50, 150), TRUCK: (200, 200, 190), EGO: (20, 20, 25), STATIC: (110, 80, 60),
         MARKING: (235, 235, 230), CURB: (200, 200, 200), 0: (0, 0, 0)}

DOMAINS = {
    "cityscapes": Domain("cityscapes", _BASE, (1.0, 1.0), (0.38, 0.5),
                         {CAR: (2, 5), PERSON: (1, 4), POLE: (2, 4), TRUCK: (0, 1), STATIC: (0, 1)},
                         ego=True, markings=True),
    "vistas": Domain("vistas", {**_BASE, ROAD: (110, 100, 115), SIDEWALK: (190, 150, 160), BUILDING: (175, 140, 120),
                                VEGETATION: (50, 150, 60), SKY: (150, 185, 245), CAR: (150, 40, 40)},
                     (1.0, 0.75), (0.3, 0.55), {CAR: (1, 4), PERSON: (2, 6), POLE: (3, 6), TRUCK: (0, 1), STATIC: (0, 2)},
                     gain=(0.8, 1.2), buildings=0.9, markings=True, noise=7.0),
    "kitti": Domain("kitti", {**_BASE, ROAD: (105, 104, 106), SIDEWALK: (160, 155, 145), BUILDING: (135, 115, 100),
                              VEGETATION: (50, 105, 40), SKY: (160, 185, 215), TERRAIN: (130, 145, 75)},
                    (1.5, 0.75), (0.42, 0.55), {CAR: (2, 6), PERSON: (0, 2), POLE: (1, 3), TRUCK: (0, 1), STATIC: (0, 0)},
                    gain=(0.8, 0.95), buildings=0.45, noise=4.0),
}


def _box(mask: np.ndarray, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """Pixels of the axis-aligned box (float corners, at least one pixel wide)."""
    h, w = mask.shape
    ya, yb = int(np.clip(round(y0), 0, h)), int(np.clip(max(round(y1), round(y0) + 1), 0, h))
    xa, xb = int(np.clip(round(x0), 0, w)), int(np.clip(max(round(x1), round(x0) + 1), 0, w))
    m = np.zeros((h, w), bool)
    m[ya:yb, xa:xb] = True
    return m


def render_scene(rng: np.random.Generator, width: int, height: int, domain: Domain
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One street scene: (RGB uint8 HxWx3, scene ids HxW uint8, instance numbers HxW int32, 0 = none)."""
    H, W = height, width
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    lab = np.full((H, W), SKY, np.uint8)
    inst = np.zeros((H, W), np.int32)
    tint = np.zeros((H, W, 3), np.float32)  # per-object colour changes (car paint, clothes)

    hz = H * rng.uniform(*domain.horizon)
    xv = W * rng.uniform(0.4, 0.6)
    # Skyline: blocks of buildings (with window texture) and gaps of sky; trees in front of them.
    x = 0.0
    while x < W:
        bw = W * rng.uniform(0.08, 0.22)
        if rng.random() < domain.buildings:
            top = hz - H * rng.uniform(0.08, 0.35)
            lab[_box(lab, top, hz + 1, x, x + bw)] = BUILDING
        x += bw
    for _ in range(rng.integers(1, 4) + (2 if domain.name == "kitti" else 0)):
        r = H * rng.uniform(0.06, 0.16)
        cx, cy = W * rng.uniform(0, 1), hz - r * rng.uniform(0.2, 0.9)
        crown = ((xx - cx) / (1.3 * r)) ** 2 + ((yy - cy) / r) ** 2 < 1
        lab[crown] = VEGETATION
    if rng.random() < 0.5:
        x0 = W * rng.uniform(0, 0.6)
        lab[_box(lab, hz - H * 0.07, hz + 1, x0, x0 + W * rng.uniform(0.15, 0.4))] = rng.choice([WALL, FENCE])

    # Ground: road widening towards the camera, curbs, sidewalks, terrain beyond.
    t = np.clip((yy - hz) / (H - hz), 0, None)
    half = W * rng.uniform(0.3, 0.45) * t
    d = np.abs(xx - xv)
    ground = yy >= hz
    lab[ground] = TERRAIN
    lab[ground & (d < half * rng.uniform(1.7, 2.3))] = SIDEWALK
    lab[ground & (d < half * 1.08)] = CURB
    lab[ground & (d < half)] = ROAD
    if domain.markings:
        dash = ((yy - hz) / max(H - hz, 1) * 8 % 1.0 < 0.5) & (d < np.maximum(0.6, 0.03 * half)) & ground
        lab[dash & (lab == ROAD)] = MARKING

    # Objects, far to near (nearer ones occlude).
    objects = []
    for cls, (lo, hi) in domain.counts.items():
        objects += [(cls, hz + (H - hz) * rng.uniform(0.12, 1.0)) for _ in range(rng.integers(lo, hi + 1))]
    objects.sort(key=lambda o: o[1])
    k = 0
    for cls, yg in objects:
        s = (yg - hz) / (H - hz)  # perspective scale at the object's ground line
        half_g = W * 0.375 * s
        if cls in (CAR, TRUCK):
            cw = H * s * (rng.uniform(0.45, 0.6) if cls == CAR else rng.uniform(0.55, 0.7))
            ch = cw * (0.5 if cls == CAR else 0.85)
            cx = xv + rng.uniform(-0.8, 0.8) * half_g
            body = _box(lab, yg - ch, yg, cx - cw / 2, cx + cw / 2)
            k += 1
            lab[body], inst[body] = cls, k
            tint[body] = rng.uniform(-60, 60, 3)
            if cls == CAR:  # dark windows on the upper part
                tint[_box(lab, yg - ch, yg - ch * 0.6, cx - cw * 0.35, cx + cw * 0.35) & body] -= 80
        elif cls == PERSON:
            ph = H * 0.5 * s
            side = rng.choice([-1, 1])
            px = xv + side * half_g * rng.uniform(1.15, 1.8)
            body = _box(lab, yg - ph * 0.8, yg, px - ph * 0.13, px + ph * 0.13)
            head = ((xx - px) / max(ph * 0.1, 0.5)) ** 2 + ((yy - (yg - ph * 0.88)) / max(ph * 0.1, 0.5)) ** 2 < 1
            k += 1
            lab[body | head], inst[body | head] = PERSON, k
            tint[body] = rng.uniform(-70, 70, 3)
            tint[head] = np.array(_BASE[SIDEWALK]) - np.array(domain.colors[PERSON]) + 20
        elif cls == POLE:
            side = rng.choice([-1, 1])
            px = xv + side * half_g * rng.uniform(1.2, 1.6)
            ph = H * 1.1 * s + 3
            pw = max(1.0, W * 0.012 * s)
            lab[_box(lab, yg - ph, yg, px - pw / 2, px + pw / 2)] = POLE
            top = yg - ph
            if rng.random() < 0.6:
                ss = max(2.0, pw * 3)
                lab[_box(lab, top - ss * 0.2, top + ss, px - ss / 2, px + ss / 2)] = SIGN if rng.random() < 0.7 else LIGHT
        elif cls == STATIC:
            sx = xv + rng.choice([-1, 1]) * half_g * rng.uniform(1.2, 1.6)
            sw = W * 0.06 * s + 1
            lab[_box(lab, yg - sw * 0.6, yg, sx - sw, sx + sw)] = STATIC
    if domain.ego:
        hood = yy > H * (0.9 + 0.04 * ((xx - W / 2) / (W / 2)) ** 2)
        lab[hood] = EGO
    inst[~np.isin(lab, INSTANCE_IDS)] = 0  # objects partly covered by poles, signs, the hood

    # Appearance: class colour, class texture, object tints, shading, gain and sensor noise.
    palette = np.zeros((256, 3), np.float32)
    for c, col in domain.colors.items():
        palette[c] = col
    img = palette[lab] + tint
    noise = rng.normal(0, 1, (H, W)).astype(np.float32)
    tex = {BUILDING: 30 * (((xx % 6) < 3) & ((yy % 7) < 3)),            # windows
           VEGETATION: 28 * noise, TERRAIN: 14 * noise,                  # foliage / grass
           SIDEWALK: -25 * (((xx + 2 * yy) % 9) < 1),                     # paving joints
           FENCE: 35 * ((xx % 3) < 1), SKY: 40 * (yy / H) ** 2}           # slats / haze near horizon
    for c, pattern in tex.items():
        m = lab == c
        img[m] += np.asarray(pattern, np.float32)[m][:, None]
    img *= rng.uniform(*domain.gain, 3).astype(np.float32)
    img += rng.normal(0, domain.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), lab, inst


def _lut(mapping: dict[int, int]) -> np.ndarray:
    table = np.zeros(256, np.uint8)
    for k, v in mapping.items():
        table[k] = v
    return table


#: Scene ids -> Cityscapes label ids (markings are road, curbs sidewalk) and -> Vistas v1.2 indices.
TO_LABELID = _lut({**{c: c for c in range(34)}, MARKING: ROAD, CURB: SIDEWALK})


def _vistas_tables() -> tuple[np.ndarray, np.ndarray]:
    from ldnbench.data.vistas import VISTAS_V12_LABELS

    names = [n for n, *_ in VISTAS_V12_LABELS]
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(names)] = [c for _, _, c, _, _ in VISTAS_V12_LABELS]
    return _lut({c: names.index(n) for c, n in VISTAS_NAMES.items()}), palette


def _instance_values(ids: np.ndarray, inst: np.ndarray, base: int, first: int) -> np.ndarray:
    """A dataset's 16-bit instance encoding: ``id*base + k`` on objects (k counted per class from
    ``first``); elsewhere ``id`` (Cityscapes, ``base=1000``) or ``id*base`` (KITTI/Vistas, ``base=256``)."""
    out = ids.astype(np.int64) * (1 if base == 1000 else base)
    per_class: dict[int, int] = {}
    for n in np.unique(inst[inst > 0]):
        m = inst == n
        c = int(ids[m][0])
        k = per_class.get(c, first)
        per_class[c] = k + 1
        out[m] = c * base + k
    return out.astype(np.uint16)


def _random_key(rng: np.random.Generator) -> str:
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"))
    return "".join(rng.choice(alphabet, 22))


MARKER = "SYNTHETIC_BY_LDNBENCH"
CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}


def generate(root: str | Path = "datasets/synthetic", size: tuple[int, int] = (160, 80), n: int = 150,
             seed: int = 0, val_fraction: float = 0.2) -> dict[str, dict[str, int]]:
    """Write synthetic Cityscapes, Vistas v1.2 and KITTI trees below ``root`` (``n`` images each).

    Deterministic for ``seed``. ``size`` is (width, height) of the Cityscapes images; Vistas images
    are 4:3 with jittered size and KITTI images wide (1.5W x 0.75H), as in the real datasets.
    A folder is only overwritten when an earlier ``generate`` wrote it. Returns image counts.
    """
    import shutil

    root = Path(root)
    w0, h0 = size
    if w0 < 32 or h0 < 16 or n < 1:
        raise UserError(f"synthetic scenes need --size of at least 32x16 and --n >= 1 (got {w0}x{h0}, n={n})", 2)
    for name in DOMAINS:
        d = root / name
        if d.exists() and any(d.iterdir()) and not (d / MARKER).exists():
            raise UserError(f"{d} exists and was not written by `ldnbench synth`; choose another --root")
        shutil.rmtree(d, ignore_errors=True)
    n_val = max(1, round(n * val_fraction)) if n > 1 else 0
    counts: dict[str, dict[str, int]] = {}
    vistas_lut, vistas_palette = _vistas_tables()

    for di, (name, dom) in enumerate(DOMAINS.items()):
        out = root / name
        counts[name] = {}
        for i in range(n):
            rng = np.random.default_rng([seed, di, i])
            split = "val" if i >= n - n_val else "train"
            if name == "vistas":
                j = rng.uniform(0.85, 1.15)
                w, h = round(w0 * dom.size[0] * j), round(h0 * 2 * dom.size[1] * j)
            else:
                w, h = round(w0 * dom.size[0]), round(h0 * dom.size[1])
            image, scene, inst = render_scene(rng, w, h, dom)
            ids = TO_LABELID[scene]
            if name == "cityscapes":
                city = CITIES[split][i % 3]
                write_cityscapes(out, split, f"{city}_{i // 3:06d}_{19 + i % 7:06d}", image, ids,
                                 _instance_values(ids, inst, 1000, 0))
            elif name == "kitti":
                # KITTI has one pool of 200 training frames; its val split is every 5th frame (kitti.VAL_IDS).
                split = "val" if i % 5 == 0 else "train"
                write_kitti(out, f"{i:06d}_10", image, ids, _instance_values(ids, inst, 256, 1))
            else:
                v = vistas_lut[scene]
                write_vistas(out, {"train": "training", "val": "validation"}[split], _random_key(rng), image,
                             v, _instance_values(v, inst, 256, 0), vistas_palette)
            counts[name][split] = counts[name].get(split, 0) + 1
        if name == "vistas":
            from ldnbench.data.vistas import VISTAS_V12_LABELS

            write_vistas_config(out, VISTAS_V12_LABELS, "v1.2")
        (out / MARKER).write_text(json.dumps({"seed": seed, "size": [w0, h0], "n": n}))
    return counts
