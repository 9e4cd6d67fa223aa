"""VOC 2012 and VOC+SBD (train_aug) adapters on tiny trees in the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from PIL import Image
from scipy.io import savemat

from ldnbench.data.spaces import get_label_space
from ldnbench.data.registry import get_dataset
from ldnbench.data.voc import VOC, VOCAug, train_aug_ids, voc_palette
from ldnbench.errors import UserError

H, W = 20, 24
VOC_TRAIN = ["2007_000001", "2007_000002", "2007_000003"]
VOC_VAL = ["2008_000004", "2008_000005"]
SBD_TRAIN = ["2007_000002", "2008_000004", "2009_000006", "2009_000007"]
SBD_VAL = ["2010_000008", "2008_000005", "2010_000009"]


def _jpg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _palette_png(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label, "P")
    im.putpalette([c for rgb in voc_palette() for c in rgb])
    im.save(path)


def _voc_label(k):
    lab = np.zeros((H, W), np.uint8)
    lab[4:12, 4:12] = k
    lab[3, 3:13] = 255  # void boundary
    return lab


def _sbd_mat(path, seg):
    """A cls/<id>.mat in SBD's layout: struct GTcls with Segmentation, Boundaries (cell of sparse), CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bounds = np.empty((20, 1), object)
    for k in range(20):
        bounds[k, 0] = scipy.sparse.csc_matrix((H, W), dtype=bool)
    cats = np.unique(seg[seg > 0]).astype(np.uint8).reshape(-1, 1)
    savemat(path, {"GTcls": {"Segmentation": seg, "Boundaries": bounds, "CategoriesPresent": cats}})


def _tree(root):
    """VOCdevkit/VOC2012 with 3 train + 2 val ids, and benchmark_RELEASE/dataset with SBD lists."""
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sets / "trainval.txt").write_text("\n".join(VOC_TRAIN + VOC_VAL) + "\n")
    for k, i in enumerate(VOC_TRAIN + VOC_VAL, start=1):
        _jpg(voc / "JPEGImages" / f"{i}.jpg", k)
        _palette_png(voc / "SegmentationClass" / f"{i}.png", _voc_label(k))
    sbd = root / "benchmark_RELEASE" / "dataset"
    sbd.mkdir(parents=True)
    (sbd / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    for k, i in enumerate(SBD_TRAIN + SBD_VAL, start=10):
        _jpg(sbd / "img" / f"{i}.jpg", k)
        _sbd_mat(sbd / "cls" / f"{i}.mat", np.full((H, W), k, np.uint8))
    # SBD images are in VOC2012's JPEGImages too, except (here) one, which must come from SBD img/
    for i in SBD_TRAIN + SBD_VAL:
        if i != "2010_000009" and not (voc / "JPEGImages" / f"{i}.jpg").exists():
            _jpg(voc / "JPEGImages" / f"{i}.jpg", 99)
    return voc, sbd


def test_label_space():
    ls = get_label_space("voc21")
    assert ls.num_classes == 21 and ls.classes[15] == "person"
    assert ls.colors[1] == (128, 0, 0) and ls.colors[20] == (0, 64, 128)
    assert voc_palette()[255] == (224, 224, 192)


def test_train_aug_arithmetic():
    ids = train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
    # VOC val ids (2008_000004 in SBD train, 2008_000005 in SBD val) are removed; duplicates merged
    assert ids == ["2007_000001", "2007_000002", "2007_000003", "2009_000006", "2009_000007",
                   "2010_000008", "2010_000009"]
    assert train_aug_ids(["a"], ["a"], ["a"], []) == []


def test_voc_reads_palette_indices(tmp_path):
    _tree(tmp_path)
    ds = get_dataset("voc", root=tmp_path, split="train")
    assert [f.id for f in ds.files] == VOC_TRAIN
    s = ds[1]
    assert s.image.shape == (H, W, 3) and s.label.shape == (H, W)
    assert s.label[5, 5] == 2 and s.label[0, 0] == 0 and s.label[3, 5] == 255  # indices, not colours
    assert len(VOC(tmp_path / "VOCdevkit", "trainval")) == 5  # .../VOCdevkit works as root too
    assert [f.id for f in VOC(tmp_path, "val").files] == VOC_VAL


def test_voc_aug_train_is_computed_and_voc_png_wins(tmp_path):
    voc, sbd = _tree(tmp_path)
    ds = VOCAug(tmp_path, "train")
    assert [f.id for f in ds.files] == train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
    by_id = {f.id: f for f in ds.files}
    # 2007_000002 is in VOC train and SBD train: the VOC PNG is used, not the .mat
    assert by_id["2007_000002"].label == voc / "SegmentationClass" / "2007_000002.png"
    assert by_id["2009_000006"].label == sbd / "cls" / "2009_000006.mat"
    assert by_id["2010_000009"].image == sbd / "img" / "2010_000009.jpg"
    assert by_id["2009_000006"].image == voc / "JPEGImages" / "2009_000006.jpg"
    k = [f.id for f in ds.files].index("2007_000002")
    assert ds[k].label[5, 5] == 2 and ds[k].label[3, 5] == 255
    k = [f.id for f in ds.files].index("2009_000006")
    assert (ds[k].label == 12).all()  # SBD_TRAIN[2] was written with value 10 + 2
    val = VOCAug(tmp_path, "val")
    assert [f.id for f in val.files] == VOC_VAL and val[0].label[5, 5] == 4
    # SBD elsewhere: the option points at it
    moved = tmp_path / "elsewhere"
    sbd.parent.rename(moved)
    with pytest.raises(UserError, match=r"benchmark_RELEASE/dataset/cls/\*\.mat"):
        VOCAug(tmp_path, "train")
    assert len(VOCAug(tmp_path, "train", sbd_root=moved)) == 7


def test_bad_labels_name_the_file(tmp_path):
    voc, sbd = _tree(tmp_path)
    _palette_png(voc / "SegmentationClass" / "2007_000001.png", np.full((H, W), 21, np.uint8))
    with pytest.raises(UserError, match="2007_000001.png.*21"):
        VOC(tmp_path, "train")[0]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(voc / "SegmentationClass" / "2007_000001.png")
    with pytest.raises(UserError, match="2007_000001.png.*channel"):
        VOC(tmp_path, "train").load_target(0)
    _sbd_mat(sbd / "cls" / "2009_000006.mat", np.full((H, W), 30, np.uint8))
    ds = VOCAug(tmp_path, "train")
    k = [f.id for f in ds.files].index("2009_000006")
    with pytest.raises(UserError, match="2009_000006.mat.*30"):
        ds.load_target(k)
    (sbd / "cls" / "2009_000006.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(UserError, match="cannot read SBD label .*2009_000006.mat"):
        ds.load_target(k)
    savemat(sbd / "cls" / "2009_000006.mat", {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(UserError, match="GTcls"):
        ds.load_target(k)


def test_missing_files_and_wrong_root(tmp_path):
    voc, sbd = _tree(tmp_path)
    (voc / "JPEGImages" / "2007_000003.jpg").unlink()
    with pytest.raises(UserError, match="2007_000003.png"):  # the label left without its image
        VOC(tmp_path, "train")
    lenient = VOC(tmp_path, "train", strict=False)
    assert len(lenient) == 2 and [p.name for p in lenient.unpaired] == ["2007_000003.png"]
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(UserError, match="val.txt is missing"):
        VOC(tmp_path, "val")
    (tmp_path / "x" / "JPEG").mkdir(parents=True)
    with pytest.raises(UserError, match=r"expected .*VOCdevkit/VOC2012/JPEGImages/\*\.jpg, but .* contains JPEG/"):
        VOC(tmp_path / "x", "train")
    with pytest.raises(UserError, match="no split"):
        get_dataset("voc-aug", root=tmp_path, split="trainval")


def test_datasets_check_histogram(tmp_path, cli_runner):
    import json

    from ldnbench.cli import main

    _tree(tmp_path)
    res = cli_runner.invoke(main, ["datasets", "check", "voc-aug", "--root", str(tmp_path), "--split", "train",
                                   "--full", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    hist = doc["splits"]["train"]["histogram"]
    assert doc["label_space"] == "voc21" and doc["splits"]["train"]["pairs"] == 7
    # VOC train ids k=1..3: an 8x8 square of class k and a 10-pixel void line; SBD ids: whole image of 10+i
    assert hist["aeroplane"] == hist["bicycle"] == hist["bird"] == 64 and hist["ignore"] == 30
    # SBD-only ids were written with 10 + their position in SBD_TRAIN + SBD_VAL: dog, horse, motorbike, pottedplant
    assert hist["dog"] == hist["horse"] == hist["motorbike"] == hist["pottedplant"] == H * W
    # 2007_000002's .mat (cat) loses to its VOC PNG; VOC val ids (cow, person) are not in train_aug
    assert hist["cat"] == hist["cow"] == hist["person"] == 0
    assert sum(hist.values()) == 7 * H * W
