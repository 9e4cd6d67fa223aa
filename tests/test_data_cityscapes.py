import numpy as np
import pytest

from ldnbench.data.registry import DATASETS, get_dataset
from ldnbench.data.synthetic import write_cityscapes
from ldnbench.errors import UserError

H, W = 16, 24


def _sample(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    ids = np.full((H, W), 7, np.uint8)          # road
    ids[:4] = 23                                # sky
    ids[4:8, :6] = 4                            # static (void)
    ids[8:, 10:14] = 26                         # car, two instances
    inst = ids.astype(np.uint16)
    inst[8:, 10:12] = 26000
    inst[8:, 12:14] = 26001
    return image, ids, inst


@pytest.fixture
def cs_root(tmp_path):
    for split, sids in {"train": ["aachen_000000_000019", "bochum_000001_000002"],
                        "val": ["frankfurt_000000_000294"]}.items():
        for k, sid in enumerate(sids):
            write_cityscapes(tmp_path, split, sid, *_sample(k))
    return tmp_path


def test_reads_layout_pairs_and_maps_label_ids(cs_root):
    ds = get_dataset("cityscapes", root=cs_root, split="train")
    assert DATASETS["cityscapes"].name == "cityscapes" and len(ds) == 2
    assert [f.id for f in ds.files] == ["aachen_000000_000019", "bochum_000001_000002"]
    s = ds[0]
    assert s.image.shape == (H, W, 3) and s.image.dtype == np.uint8
    assert s.label.dtype == np.uint8 and s.label.shape == (H, W)
    # road -> 0, sky -> 10, static -> ignore, car -> 13 (train ids of cityscapesscripts)
    assert s.label[10, 0] == 0 and s.label[0, 0] == 10 and s.label[5, 0] == 255 and s.label[10, 11] == 13
    assert s.instances.dtype == np.int32
    assert set(np.unique(s.instances)) == {0, 26000, 26001}
    assert (s.instances[s.label != 13] == 0).all()
    assert len(get_dataset("cityscapes", root=cs_root, split="val")) == 1


def test_label_train_ids_are_preferred(cs_root):
    image, ids, inst = _sample(0)
    train = np.full((H, W), 5, np.uint8)  # pole everywhere: distinguishable from the labelIds file
    write_cityscapes(cs_root, "train", "aachen_000000_000019", image, ids, inst, train_ids=train)
    ds = get_dataset("cityscapes", root=cs_root)
    assert ds.files[0].label.name.endswith("_gtFine_labelTrainIds.png")
    assert (ds[0].label == 5).all()
    assert ds.files[1].label.name.endswith("_gtFine_labelIds.png")


def test_wrong_root_names_expected_glob_and_contents(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError) as e:
        get_dataset("cityscapes", root=tmp_path)
    msg = str(e.value)
    assert "leftImg8bit/train/*/*_leftImg8bit.png" in msg and "images/" in msg
    with pytest.raises(UserError, match="does not exist"):
        get_dataset("cityscapes", root=tmp_path / "nope")


def test_unpaired_corrupt_and_out_of_range(cs_root):
    lab = cs_root / "gtFine/train/bochum/bochum_000001_000002_gtFine_labelIds.png"
    lab.unlink()
    with pytest.raises(UserError, match="bochum_000001_000002_leftImg8bit.png"):
        get_dataset("cityscapes", root=cs_root)
    ds = get_dataset("cityscapes", root=cs_root, strict=False)
    assert len(ds) == 1 and [p.name for p in ds.unpaired] == ["bochum_000001_000002_leftImg8bit.png"]

    image, ids, inst = _sample(0)
    ids[0, 0] = 40  # not a Cityscapes label id
    write_cityscapes(cs_root, "train", "aachen_000000_000019", image, ids, inst)
    with pytest.raises(UserError, match=r"aachen_000000_000019_gtFine_labelIds.png has values 40"):
        ds.load_target(0)
    ds.files[0].image.write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="cannot decode image .*aachen_000000_000019_leftImg8bit.png"):
        ds.load_image(0)
