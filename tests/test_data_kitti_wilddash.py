import numpy as np
import pytest

from ldnbench.data.kitti import VAL_IDS
from ldnbench.data.registry import get_dataset
from ldnbench.data.synthetic import write_kitti, write_wilddash
from ldnbench.errors import UserError

H, W = 10, 16


def _semantic():
    ids = np.full((H, W), 7, np.uint8)   # road
    ids[:3] = 21                         # vegetation
    ids[6:, 2:5] = 24                    # person
    ids[6:, 8:12] = 26                   # car
    return ids


def test_kitti_fixed_val_split_labels_and_instances(tmp_path):
    for n in range(12):
        ids = _semantic()
        inst = ids.astype(np.uint16) * 256
        inst[6:, 2:5] += 1                     # person #1
        inst[6:, 8:10] += 1                    # car #1
        inst[6:, 10:12] += 2                   # car #2
        write_kitti(tmp_path, f"{n:06d}_10", np.zeros((H, W, 3), np.uint8), ids, inst)
    write_kitti(tmp_path, "000000_10", np.zeros((H, W, 3), np.uint8), None, split="testing")
    tr, va, tv = (get_dataset("kitti", root=tmp_path, split=s) for s in ("train", "val", "trainval"))
    assert [f.id for f in va.files] == ["000000_10", "000005_10", "000010_10"]
    assert len(tr) == 9 and len(tv) == 12 and not set(f.id for f in tr.files) & VAL_IDS
    assert len(VAL_IDS) == 40
    s = tr[0]
    cs = tr.label_space
    assert s.label[0, 0] == cs.index("vegetation") and s.label[8, 3] == cs.index("person")
    assert s.label[8, 9] == cs.index("car") and s.label[5, 5] == cs.index("road")
    assert set(np.unique(s.instances)) == {0, 24 * 256 + 1, 26 * 256 + 1, 26 * 256 + 2}
    test = get_dataset("kitti", root=tmp_path, split="test")
    assert len(test) == 1 and test.files[0].label is None
    with pytest.raises(UserError, match=r"training/image_2/\*\.png"):
        get_dataset("kitti", root=tmp_path / "training")


def test_wilddash_v1_recursive_pairs(tmp_path):
    nested = tmp_path / "wd_val_01"
    for name in ["au0000_100000", "cn0001_100000"]:
        ids = _semantic()
        inst = ids.astype(np.uint16)
        inst[6:, 8:12] = 26000
        write_wilddash(nested, name, np.zeros((H, W, 3), np.uint8), ids, inst)  # wd_val_01/wd_val_01/...
    ds = get_dataset("wilddash", root=tmp_path, split="val")
    assert [f.id for f in ds.files] == ["au0000_100000", "cn0001_100000"]
    s = ds[1]
    assert s.label[8, 9] == ds.label_space.index("car") and set(np.unique(s.instances)) == {0, 26000}
    (nested / "wd_val_01" / "cn0001_100000_labelIds.png").unlink()
    with pytest.raises(UserError, match="cn0001_100000.png"):
        get_dataset("wilddash", root=tmp_path, split="val")
    with pytest.raises(UserError, match=r"wd_bench\*"):
        get_dataset("wilddash", root=tmp_path, split="bench")


def test_documented_root_variants(tmp_path):
    # KITTI: a root holding data_semantics/ works like data_semantics/ itself
    write_kitti(tmp_path / "kitti" / "data_semantics", "000001_10", np.zeros((H, W, 3), np.uint8), _semantic())
    assert [f.id for f in get_dataset("kitti", root=tmp_path / "kitti", split="train").files] == ["000001_10"]
    # WildDash: a flat unzip without the wd_val_01 folder is the val split
    write_wilddash(tmp_path / "wd", "au0000_100000", np.zeros((H, W, 3), np.uint8), _semantic(), folder=".")
    ds = get_dataset("wilddash", root=tmp_path / "wd", split="val")
    assert [f.id for f in ds.files] == ["au0000_100000"] and ds.files[0].instances is None
    assert ds[0].instances is None and ds[0].label[0, 0] == ds.label_space.index("vegetation")
