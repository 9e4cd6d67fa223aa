"""ScanNet adapter on tiny scene trees: 8-bit NYU40 labels (frames_25k) and 16-bit raw ScanNet ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldnbench.data.spaces import get_label_space
from ldnbench.data.registry import get_dataset
from ldnbench.data.scannet import ScanNet, png_bit_depth
from ldnbench.errors import UserError

H, W = 24, 32  # colour frames; labels are written at half size to exercise the resize
# NYU40 id -> scannet20: wall 1 -> 0, blinds 13 -> ignore, desk 14 -> 12, otherfurniture 39 -> 19, 0 -> ignore
NYU = [1, 13, 14, 39, 0, 24, 40, 2]
EXPECT = [0, 255, 12, 19, 255, 14, 255, 1]


def _frame(scene_dir: Path, frame: str, label: np.ndarray | None, seed: int = 0) -> None:
    (scene_dir / "color").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(scene_dir / "color" / f"{frame}.jpg")
    if label is not None:
        d = scene_dir / ("label-filt" if label.dtype == np.uint16 else "label")
        d.mkdir(exist_ok=True)
        Image.fromarray(label).save(d / f"{frame}.png")


def _nyu_label(values=NYU) -> np.ndarray:
    lab = np.zeros((H // 2, W // 2), np.uint8)
    for i, v in enumerate(values):
        lab[:, i * 2:(i + 1) * 2] = v
    return lab


def _tree(root: Path) -> Path:
    base = root / "scannet_frames_25k"
    for s, scene in enumerate(["scene0000_00", "scene0000_01", "scene0707_00"]):
        for k in range(2):
            _frame(base / scene, f"{k * 100:06d}", _nyu_label(), seed=s * 10 + k)
    (root / "scannetv2_train.txt").write_text("scene0000_00\nscene0000_01\n")
    (root / "scannetv2_val.txt").write_text("scene0707_00\n")
    return base


def test_label_space():
    ls = get_label_space("scannet20")
    assert ls.num_classes == 20 and ls.classes[14] == "refridgerator" and ls.classes[19] == "otherfurniture"
    assert ls.colors[0] == (174, 199, 232)


def test_frames_25k_nyu40_labels(tmp_path):
    _tree(tmp_path)
    ds = get_dataset("scannet", root=tmp_path, split="train")
    assert [f.id for f in ds.files] == ["scene0000_00_000000", "scene0000_00_000100",
                                        "scene0000_01_000000", "scene0000_01_000100"]
    assert all(f.image.stem == f.label.stem and f.image.parent.parent == f.label.parent.parent for f in ds.files)
    assert len(ScanNet(tmp_path, "val")) == 2 and len(ScanNet(tmp_path, "all")) == 6
    # default: both resized to the evaluator's 640x480
    s = ds[0]
    assert s.image.shape == (480, 640, 3) and s.label.shape == (480, 640) and s.instances is None
    assert s.label[0, ::80].tolist() == EXPECT
    # native: the label is brought to the colour frame's size with nearest
    native = ScanNet(tmp_path, "train", size=None)[0]
    assert native.image.shape == (H, W, 3) and native.label.shape == (H, W)
    assert native.label[5, ::4].tolist() == EXPECT


def test_raw_scannet_ids_via_tsv(tmp_path):
    scene = tmp_path / "scene0001_00"
    raw = np.zeros((H, W), np.uint16)
    raw[:, :8] = 1      # wall -> nyu40 1
    raw[:, 8:16] = 1163  # ScanNet id beyond 8 bits -> nyu40 39
    raw[:, 16:24] = 22   # -> nyu40 13 (blinds: not in scannet20)
    _frame(scene, "000000", raw)
    assert png_bit_depth(scene / "label-filt" / "000000.png") == 16
    with pytest.raises(UserError, match="scannetv2-labels.combined.tsv"):
        ScanNet(tmp_path, "all").load_target(0)
    tsv = tmp_path / "scannetv2-labels.combined.tsv"
    tsv.write_text("id\traw_category\tcategory\tcount\tnyu40id\tnyu40class\n"
                   "1\twall\twall\t8277\t1\twall\n1163\tstand\tstand\t1\t39\totherfurniture\n22\tblinds\tblinds\t1\t13\tblinds\n")
    label, inst = ScanNet(tmp_path, "all", size=None).load_target(0)
    assert inst is None and label[0, ::8].tolist() == [0, 19, 255, 255]  # 0 = unannotated -> ignore
    raw[0, 0] = 5000  # an id the table does not know
    Image.fromarray(raw).save(scene / "label-filt" / "000000.png")
    with pytest.raises(UserError, match="000000.png.*5000"):
        ScanNet(tmp_path, "all").load_target(0)


def test_bad_values_missing_scenes_and_wrong_root(tmp_path):
    base = _tree(tmp_path)
    Image.fromarray(np.full((4, 4), 41, np.uint8)).save(base / "scene0707_00" / "label" / "000000.png")
    with pytest.raises(UserError, match="000000.png.*41"):
        ScanNet(tmp_path, "val").load_target(0)
    (base / "scene0707_00" / "label" / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(UserError, match="000000.png"):
        ScanNet(tmp_path, "val").load_target(0)
    (base / "scene0707_00" / "label" / "000100.png").unlink()
    with pytest.raises(UserError, match="1 scannet file.*000100.jpg"):
        ScanNet(tmp_path, "val")
    (tmp_path / "scannetv2_train.txt").write_text("scene0000_00\nscene0999_00\n")
    with pytest.raises(UserError, match="scene0999_00"):
        ScanNet(tmp_path, "train")
    assert len(ScanNet(tmp_path, "train", strict=False)) == 2
    (tmp_path / "scannetv2_val.txt").unlink()
    with pytest.raises(UserError, match="scannetv2_val.txt"):
        ScanNet(tmp_path, "val")
    with pytest.raises(UserError, match=r"expected .*scene\*_\*/color/\*\.jpg.*does not exist"):
        ScanNet(tmp_path / "nothing", "all")
