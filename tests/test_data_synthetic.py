import hashlib

import numpy as np
import pytest

from ldnbench.data.registry import get_dataset
from ldnbench.data.synthetic import generate
from ldnbench.errors import UserError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_synthetic_trees_are_read_by_the_real_adapters_and_deterministic(tmp_path):
    counts = generate(tmp_path / "a", size=(64, 32), n=10, seed=3)
    assert counts["cityscapes"] == {"train": 8, "val": 2} and counts["vistas"] == {"train": 8, "val": 2}
    assert counts["kitti"] == {"train": 8, "val": 2}
    generate(tmp_path / "b", size=(64, 32), n=10, seed=3)
    generate(tmp_path / "c", size=(64, 32), n=10, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")

    seen = {}
    for name in ("cityscapes", "vistas", "kitti"):
        ds = get_dataset(name, root=tmp_path / "a" / name, split="train")
        assert len(ds) == 8 and len(get_dataset(name, root=tmp_path / "a" / name, split="val")) == 2
        labels = [ds[i] for i in range(len(ds))]
        values = np.unique(np.concatenate([s.label.ravel() for s in labels]))
        cs = ds.label_space
        assert {cs.index(c) for c in ("road", "sidewalk", "sky", "car", "pole")} <= set(values.tolist())
        assert set(values.tolist()) <= set(range(19)) | {255}
        for s in labels:  # every instance lies on one thing class
            for v in np.unique(s.instances[s.instances > 0]):
                classes = np.unique(s.label[s.instances == v])
                assert len(classes) == 1 and classes[0] in cs.instance_classes
        seen[name] = (labels[0].image.shape, np.mean([s.image.mean(axis=(0, 1)) for s in labels], 0))
    # domain shift: different image shapes and mean colours
    assert seen["cityscapes"][0] == (32, 64, 3) and seen["kitti"][0] == (24, 96, 3)
    assert seen["vistas"][0][0] > 32
    assert np.abs(seen["kitti"][1] - seen["cityscapes"][1]).max() > 5


def test_refuses_to_overwrite_foreign_folders(tmp_path):
    (tmp_path / "cityscapes").mkdir()
    (tmp_path / "cityscapes" / "mine.txt").write_text("real data")
    with pytest.raises(UserError, match="was not written by `ldnbench synth`"):
        generate(tmp_path, size=(64, 32), n=2)
    assert (tmp_path / "cityscapes" / "mine.txt").exists()
