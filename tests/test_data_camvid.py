"""CamVid adapter on tiny trees in the SegNet, full-resolution and Kaggle layouts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldnbench.data.camvid import CAMVID32_COLORS, CamVid
from ldnbench.data.spaces import get_label_space
from ldnbench.data.registry import get_dataset
from ldnbench.errors import UserError

H, W = 24, 32


def _img(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _segnet_tree(root, counts={"train": 3, "val": 2, "test": 1}):
    for split, n in counts.items():
        for k in range(n):
            name = f"0001TP_{split}{k:03d}"
            _img(root / split / f"{name}.png", k)
            lab = np.full((H, W), k % 11, np.uint8)
            lab[0, :] = 11  # Unlabelled
            lab[1, :W // 2] = 10
            (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
            Image.fromarray(lab, "L").save(root / f"{split}annot" / f"{name}.png")
    return root


def _rgb_label(names):
    lab = np.zeros((H, W, 3), np.uint8)
    for i, n in enumerate(names):
        lab[:, i * 4:(i + 1) * 4] = CAMVID32_COLORS[n] if n in CAMVID32_COLORS else n
    return lab


RGB_NAMES = ["Sky", "LaneMkgsDriv", "Column_Pole", "Child", "Void", (1, 2, 3), "Sidewalk", "Wall"]
# grouped: Sky 0, LaneMkgsDriv -> Road 3, Column_Pole -> Pole 2, Child -> Pedestrian 9, Void and an
# unknown colour -> 255, Sidewalk -> Pavement 4, Wall -> Building 1
GROUPED = [0, 3, 2, 9, 255, 255, 4, 1]
STRICT = [0, 255, 2, 255, 255, 255, 4, 255]


def test_label_space():
    ls = get_label_space("camvid11")
    assert ls.num_classes == 11 and ls.classes[0] == "Sky" and ls.classes[10] == "Bicyclist"
    assert ls.colors[3] == (128, 64, 128)  # Road
    assert not ls.has_instances


def test_segnet_layout_counts_pairing_and_values(tmp_path):
    root = _segnet_tree(tmp_path / "CamVid")
    ds = get_dataset("camvid", root=tmp_path, split="train")  # the parent of CamVid/ works too
    assert ds.layout_kind == "segnet"
    assert len(ds) == 5  # train + val by default, as in the paper
    assert {f.id for f in ds.files} == {f"0001TP_train{k:03d}" for k in range(3)} | {f"0001TP_val{k:03d}" for k in range(2)}
    for f in ds.files:
        assert f.image.stem == f.label.stem and f.label.parent.name.endswith("annot")
    assert len(CamVid(root, "train", trainval=False)) == 3
    assert len(CamVid(root, "val")) == 2
    test = CamVid(root, "test")
    s = test[0]
    assert s.image.shape == (H, W, 3) and s.image.dtype == np.uint8
    assert s.label.dtype == np.uint8 and s.label.shape == (H, W)
    assert (s.label[0] == 255).all()  # 11 = Unlabelled -> ignore
    assert (s.label[1, :W // 2] == 10).all() and (s.label[2:] == 0).all()
    assert s.instances is None and s.id == "0001TP_test000"


def test_segnet_out_of_range_value_names_file(tmp_path):
    root = _segnet_tree(tmp_path)
    bad = root / "testannot" / "0001TP_test000.png"
    Image.fromarray(np.full((H, W), 12, np.uint8), "L").save(bad)
    with pytest.raises(UserError, match="0001TP_test000.png.*12"):
        CamVid(root, "test")[0]


def test_segnet_corrupt_and_unpaired_files(tmp_path):
    root = _segnet_tree(tmp_path)
    (root / "testannot" / "0001TP_test000.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match="0001TP_test000.png"):
        CamVid(root, "test").load_target(0)
    _img(root / "val" / "extra.png", 9)
    with pytest.raises(UserError, match="1 camvid file.*extra.png"):
        CamVid(root, "val")
    lenient = CamVid(root, "val", strict=False)  # what `datasets check` uses to list them
    assert len(lenient) == 2 and [p.name for p in lenient.unpaired] == ["extra.png"]


def test_full_resolution_layout_uses_segnet_lists(tmp_path):
    root = tmp_path
    names = {"train": ["0001TP_006690", "0006R0_f00930"], "val": ["0016E5_07959"], "test": ["Seq05VD_f00000"]}
    for split, ns in names.items():
        lines = []
        for n in ns:
            _img(root / "701_StillsRaw_full" / f"{n}.png", 1)
            (root / "LabeledApproved_full").mkdir(exist_ok=True)
            Image.fromarray(_rgb_label(RGB_NAMES)).save(root / "LabeledApproved_full" / f"{n}_L.png")
            lines.append(f"/SegNet/CamVid/{split}/{n}.png /SegNet/CamVid/{split}annot/{n}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    # a frame that is in no list is not used
    _img(root / "701_StillsRaw_full" / "unlisted.png", 2)
    ds = CamVid(root, "train")
    assert ds.layout_kind == "full"
    assert [f.id for f in ds.files] == ["0001TP_006690", "0006R0_f00930", "0016E5_07959"]
    label, _ = ds.load_target(0)
    assert label[0, ::4].tolist() == GROUPED
    strict, _ = CamVid(root, "test", mapping="strict").load_target(0)
    assert strict[0, ::4].tolist() == STRICT
    with pytest.raises(UserError, match="mapping"):
        CamVid(root, "test", mapping="nope")

    (root / "val.txt").write_text("/SegNet/CamVid/val/missing_frame.png /x.png\n")
    with pytest.raises(UserError, match="missing_frame"):
        CamVid(root, "val")
    (root / "test.txt").unlink()
    with pytest.raises(UserError, match="test.txt"):
        CamVid(root, "test")


def test_kaggle_layout(tmp_path):
    for split in ("train", "val", "test"):
        _img(tmp_path / split / f"{split}_a.png", 0)
        (tmp_path / f"{split}_labels").mkdir()
        Image.fromarray(_rgb_label(RGB_NAMES)).save(tmp_path / f"{split}_labels" / f"{split}_a_L.png")
    ds = CamVid(tmp_path, "train", trainval=False)
    assert ds.layout_kind == "kaggle" and [f.id for f in ds.files] == ["train_a"]
    assert ds[0].label[5, ::4].tolist() == GROUPED


def test_wrong_root_says_what_was_expected(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(UserError, match=r"annot/\*\.png.*contains stuff/"):
        CamVid(tmp_path, "train")
    with pytest.raises(UserError, match="does not exist"):
        CamVid(tmp_path / "nope", "train")
