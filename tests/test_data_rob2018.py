"""ROB 2018 composite: four tiny part trees in their real formats, remapped into rob39."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldnbench.data.spaces import get_label_space, get_mapping
from ldnbench.data.registry import get_dataset
from ldnbench.data.rob2018 import PART_SPLITS, Rob2018
from ldnbench.data.synthetic import write_cityscapes, write_kitti, write_wilddash
from ldnbench.errors import UserError

H, W = 16, 24
# Cityscapes label ids: road 7 -> 0, sky 23 -> 10, car 26 -> 13, unlabeled 0 -> 255
CS_IDS, CS_RESULT = [7, 23, 26, 0], [0, 10, 13, 255]
# NYU40: wall 1 -> scannet 0 -> rob 19, otherfurniture 39 -> 19 -> 38, blinds 13 -> 255
NYU, NYU_RESULT = [1, 39, 13, 0], [19, 38, 255, 255]


def _stripes(values, dtype=np.uint8):
    lab = np.zeros((H, W), dtype)
    for i, v in enumerate(values):
        lab[:, i * (W // len(values)):(i + 1) * (W // len(values))] = v
    return lab


def _image(seed):
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _tree(root: Path) -> Path:
    lab = _stripes(CS_IDS)
    inst = lab.astype(np.uint16)
    inst[:, 12:18] = 26 * 1000 + 1  # one car instance
    for split, n in (("train", 2), ("val", 1)):
        for k in range(n):
            write_cityscapes(root / "cityscapes", split, f"aachen_{k:06d}_{split == 'val':06d}", _image(k), lab, inst)
    for k in (0, 1, 5):  # 000000_10 and 000005_10 are in ldnbench's fixed KITTI val (every 5th frame)
        kinst = (lab.astype(np.uint16) * 256)
        kinst[:, 12:18] += 1
        write_kitti(root / "kitti", f"{k:06d}_10", _image(k), lab, kinst)
    write_wilddash(root / "wilddash", "au0000_100000", _image(7), lab, inst)
    for s, scene in enumerate(("scene0000_00", "scene0707_00")):
        d = root / "scannet" / "scannet_frames_25k" / scene
        (d / "color").mkdir(parents=True)
        (d / "label").mkdir()
        Image.fromarray(_image(s)).save(d / "color" / "000000.jpg")
        Image.fromarray(_stripes(NYU)).save(d / "label" / "000000.png")
    (root / "scannet" / "scannetv2_train.txt").write_text("scene0000_00\n")
    (root / "scannet" / "scannetv2_val.txt").write_text("scene0707_00\n")
    return root


def test_label_space_and_mappings():
    rob = get_label_space("rob39")
    cs, sn = get_label_space("cityscapes19"), get_label_space("scannet20")
    assert rob.num_classes == 39 and rob.classes[0] == "cs:road" and rob.classes[19] == "scannet:wall"
    assert rob.colors[:19] == cs.colors and rob.colors[19:] == sn.colors
    assert rob.instance_classes == cs.instance_classes
    # a rob39 model can be evaluated on either side through the label-space mapping
    assert get_mapping("rob39", "cityscapes19").index == tuple(range(19))
    assert get_mapping("rob39", "scannet20").index == tuple(range(19, 39))


def test_composite_counts_ids_and_remapped_labels(tmp_path):
    root = _tree(tmp_path)
    ds = get_dataset("rob2018", root=root, split="trainval")
    ids = [f.id for f in ds.files]
    # cityscapes train 2 + val 1, kitti all 3, wilddash 1, scannet train 1 + val 1
    assert len(ds) == 9
    assert ids[0].startswith("cityscapes_aachen_") and "kitti_000005_10" in ids
    assert "wilddash_au0000_100000" in ids and ids[-1] == "scannet_scene0707_00_000000"
    assert [ds.source(i) for i in range(len(ds))] == ["cityscapes"] * 3 + ["kitti"] * 3 + ["wilddash"] + ["scannet"] * 2
    for i in range(len(ds)):
        s = ds[i]
        assert s.id == ids[i] and s.label.dtype == np.uint8
        if ds.source(i) == "scannet":
            assert s.label.shape == (480, 640) and s.instances is None  # ScanNet is read at 640x480
            assert s.label[0, ::160].tolist() == NYU_RESULT
        else:
            assert s.label.shape == (H, W) and s.label[0, ::6].tolist() == CS_RESULT
            assert s.instances is not None and len(np.unique(s.instances[s.instances > 0])) == 1
            assert (s.label[s.instances > 0] == 13).all()  # the instance is a car (class 13 in rob39 too)


def test_splits_follow_the_part_table(tmp_path):
    root = _tree(tmp_path)
    train, val = Rob2018(root, "train"), Rob2018(root, "val")
    assert {f.id for f in train.files}.isdisjoint(f.id for f in val.files)
    assert sorted({val.source(i) for i in range(len(val))}) == ["cityscapes", "kitti", "scannet"]
    assert "kitti_000005_10" in {f.id for f in val.files}
    assert len(train) + len(val) == len(Rob2018(root, "trainval"))
    assert "wilddash" not in PART_SPLITS["val"]


def test_parts_and_root_overrides(tmp_path):
    root = _tree(tmp_path)
    only_sn = Rob2018(root, "val", parts="scannet")
    assert [f.id for f in only_sn.files] == ["scannet_scene0707_00_000000"]
    moved = tmp_path / "elsewhere_kitti"
    (root / "kitti").rename(moved)
    with pytest.raises(UserError, match=r"rob2018 part 'kitti'.*training/image_2.*kitti_root"):
        Rob2018(root, "train")
    assert len(Rob2018(root, "train", kitti_root=moved)) == 2 + 1 + 1 + 1  # cityscapes, kitti, wilddash, scannet
    with pytest.raises(UserError, match="unknown rob2018 part"):
        Rob2018(root, "train", parts=("cityscapes", "camvid"))


def test_bad_label_in_a_part_names_the_file(tmp_path):
    root = _tree(tmp_path)
    bad = root / "scannet" / "scannet_frames_25k" / "scene0707_00" / "label" / "000000.png"
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(bad)
    ds = Rob2018(root, "val", parts=("scannet",))
    with pytest.raises(UserError, match="000000.png.*77"):
        ds[0]


def _devkit_tree(root: Path, scannet_shifted: bool) -> Path:
    """The ROB devkit's KITTI-format training folder with one frame per benchmark."""
    training = root / "datasets_kitti2015" / "training"
    cs_lab = _stripes(CS_IDS)
    cs_inst = cs_lab.astype(np.uint16) * 256
    cs_inst[:, 12:18] += 3  # car instance 3
    for bench, name in (("Cityscapes", "aachen_000000_000019"), ("Kitti2015", "000000_10"),
                        ("WildDash", "au0000_100000")):
        write_kitti(training.parent, f"{bench}_{name}", _image(1), cs_lab, cs_inst)
    sn = _stripes(NYU)
    if scannet_shifted:
        sn = np.where(sn > 0, sn + 33, 0).astype(np.uint8)
    (training / "image_2").mkdir(exist_ok=True)
    Image.fromarray(_image(2)).save(training / "image_2" / "ScanNet_scene0000_00_000000.jpg")
    Image.fromarray(sn).save(training / "semantic" / "ScanNet_scene0000_00_000000.png")
    return training


@pytest.mark.parametrize("shifted", [False, True])
def test_rob_devkit_layout(tmp_path, shifted):
    training = _devkit_tree(tmp_path, shifted)
    ds = get_dataset("rob2018", root=tmp_path, split="trainval")
    assert [f.id for f in ds.files] == ["cityscapes_aachen_000000_000019", "kitti_000000_10",
                                        "wilddash_au0000_100000", "scannet_scene0000_00_000000"]
    assert [ds.source(i) for i in range(4)] == ["cityscapes", "kitti", "wilddash", "scannet"]
    for i in range(3):
        s = ds[i]
        assert s.label[0, ::6].tolist() == CS_RESULT
        assert (s.label[s.instances > 0] == 13).all() and len(np.unique(s.instances[s.instances > 0])) == 1
    s = ds[3]  # raw NYU40 or already-shifted joint ids give the same rob39 labels
    assert s.image.shape == (480, 640, 3) and s.label[0, ::160].tolist() == NYU_RESULT and s.instances is None
    assert len(Rob2018(training.parent, "trainval", parts="scannet")) == 1  # datasets_kitti2015/ as root
    assert len(Rob2018(training, "trainval", parts=("cityscapes", "kitti"))) == 2  # training/ as root
    with pytest.raises(UserError, match="trainval"):
        Rob2018(tmp_path, "train")


def test_rob_devkit_bad_ids_name_the_file(tmp_path):
    training = _devkit_tree(tmp_path, True)
    Image.fromarray(np.full((H, W), 40, np.uint8)).save(training / "semantic" / "Kitti2015_000000_10.png")
    ds = Rob2018(tmp_path, "trainval", parts="kitti")
    with pytest.raises(UserError, match="Kitti2015_000000_10.png.*40"):
        ds.load_target(0)
    Image.fromarray(np.full((H, W), 80, np.uint8)).save(training / "semantic" / "ScanNet_scene0000_00_000000.png")
    with pytest.raises(UserError, match="ScanNet_scene0000_00_000000.png.*80"):
        Rob2018(tmp_path, "trainval", parts="scannet").load_target(0)
