import numpy as np
import pytest

from ldnbench.data.registry import get_dataset
from ldnbench.data.synthetic import write_vistas, write_vistas_config
from ldnbench.data.vistas import VISTAS_V12_LABELS
from ldnbench.errors import UserError

H, W = 12, 20
V12 = [n for n, *_ in VISTAS_V12_LABELS]
PALETTE = np.array([c for _, _, c, _, _ in VISTAS_V12_LABELS] + [(0, 0, 0)] * (256 - 66), np.uint8)


def _target():
    lab = np.full((H, W), V12.index("construction--flat--road"), np.uint8)
    lab[:3] = V12.index("nature--sky")
    lab[3:5] = V12.index("object--banner")               # not in cityscapes19 -> ignore
    lab[5:7, :4] = V12.index("construction--barrier--curb")  # -> sidewalk
    lab[8:, 2:6] = V12.index("human--rider--motorcyclist")   # -> rider
    lab[8:, 10:14] = V12.index("object--vehicle--car")
    inst = lab.astype(np.uint16) * 256
    inst[8:, 2:6] += 0                                       # first rider: k = 0
    inst[8:, 12:14] += 1                                     # two cars k = 0 and k = 1
    return lab, inst


def _tree(root, version="v1.2", splits=("train", "val")):
    write_vistas_config(root, VISTAS_V12_LABELS, version)
    keys = {"train": ["a" * 22, "b" * 22], "val": ["c" * 22]}
    folder = {"train": "training", "val": "validation"}
    for split in splits:
        for k in keys[split]:
            write_vistas(root, folder[split], k, np.full((H, W, 3), 90, np.uint8), *_target(), PALETTE, version)
    return root


@pytest.mark.parametrize("version", ["v1.2", None])  # 2021 layout and the old v1.0/1.1 layout
def test_reads_both_layouts_and_remaps_by_name(tmp_path, version):
    ds = get_dataset("vistas", root=_tree(tmp_path, version), split="train")
    assert len(ds) == 2 and ds.files[0].id == "a" * 22 and ds.version == "v1.2"
    s = ds[0]
    assert s.image.shape == (H, W, 3)
    cs = ds.label_space
    assert s.label[10, 0] == cs.index("road") and s.label[0, 0] == cs.index("sky")
    assert s.label[4, 0] == 255 and s.label[6, 0] == cs.index("sidewalk")
    assert s.label[9, 3] == cs.index("rider") and s.label[9, 11] == cs.index("car")
    ids = np.unique(s.instances)
    assert len(ids) == 4 and ids[0] == 0  # rider + 2 cars, none of them 0 even though k = 0
    assert (s.instances[s.label == cs.index("road")] == 0).all()
    assert len(set(np.unique(s.instances[:, 10:14])) - {0}) == 2
    assert len(get_dataset("vistas", root=tmp_path, split="val")) == 1


def test_v20_config_maps_subclasses(tmp_path):
    labels = [("human--person--individual", "Person", (220, 20, 60), True, True),
              ("marking--continuous--solid", "Solid", (255, 255, 255), False, True),
              ("marking--discrete--ambiguous", "Ambiguous", (1, 1, 1), False, False),
              ("object--traffic-light--cyclists", "TL", (250, 170, 30), True, True)]
    write_vistas_config(tmp_path, labels, "v2.0")
    lab = np.array([[0, 1, 2, 3]], np.uint8).repeat(4, 0)
    write_vistas(tmp_path, "training", "k" * 22, np.zeros((4, 4, 3), np.uint8), lab, None, PALETTE, "v2.0")
    ds = get_dataset("vistas", root=tmp_path, version="v2.0")
    cs = ds.label_space
    assert ds[0].label[0].tolist() == [cs.index("person"), cs.index("road"), 255, cs.index("traffic light")]
    lab[0, 0] = 9  # outside the 4-label config
    write_vistas(tmp_path, "training", "k" * 22, np.zeros((4, 4, 3), np.uint8), lab, None, PALETTE, "v2.0")
    with pytest.raises(UserError, match="kkkk.png has values 9 outside the 4 Vistas v2.0 labels"):
        ds.load_target(0)


def test_bad_roots(tmp_path):
    with pytest.raises(UserError, match=r"training/images/\*\.jpg.*does not exist"):
        get_dataset("vistas", root=tmp_path / "missing")
    _tree(tmp_path)
    (tmp_path / "config_v1.2.json").unlink()
    with pytest.raises(UserError, match="no Vistas config found: expected .*config_v1.2.json"):
        get_dataset("vistas", root=tmp_path)
    (tmp_path / "config_v1.2.json").write_text("{broken")
    with pytest.raises(UserError, match="cannot read Vistas config"):
        get_dataset("vistas", root=tmp_path)


def test_auto_version_follows_the_unpacked_labels(tmp_path):
    write_vistas_config(tmp_path, VISTAS_V12_LABELS, "v1.2")   # both configs ship in the 2021 zip ...
    write_vistas_config(tmp_path, VISTAS_V12_LABELS, "v2.0")
    lab, inst = _target()                                      # ... but only v2.0 labels are unpacked
    write_vistas(tmp_path, "training", "z" * 22, np.zeros((H, W, 3), np.uint8), lab, inst, PALETTE, "v2.0")
    ds = get_dataset("vistas", root=tmp_path)
    assert ds.version == "v2.0" and len(ds) == 1
    with pytest.raises(UserError, match=r"training/v1.2/labels/\*\.png"):
        get_dataset("vistas", root=tmp_path, version="v1.2")
