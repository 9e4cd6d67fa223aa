import json

import numpy as np
import pytest

from ldnbench.cli import main
from ldnbench.data.registry import DATASETS
from ldnbench.data.synthetic import write_cityscapes


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("synth")
    r = CliRunner().invoke(main, ["synth", "--root", str(root), "--size", "64x32", "--n", "6", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "cityscapes" in r.output and "train 5" in r.output
    return root


def test_datasets_lists_every_adapter(cli_runner):
    r = cli_runner.invoke(main, ["datasets"])
    assert r.exit_code == 0
    for name, cls in DATASETS.items():
        line = next(l for l in r.output.splitlines() if l.startswith(name + " "))
        assert ",".join(cls.splits) in line and f"datasets/{name}/" in line


def test_check_json_full_histogram(cli_runner, synth_root):
    r = cli_runner.invoke(main, ["datasets", "check", "kitti", "--root", str(synth_root / "kitti"),
                                 "--split", "val", "--full", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["dataset"] == "kitti" and doc["label_space"] == "cityscapes19"
    val = doc["splits"]["val"]
    assert val["pairs"] == 2 and val["images"] == 2 and val["problems"] == []
    hist = val["histogram"]
    assert list(hist)[:2] == ["road", "sidewalk"] and list(hist)[-1] == "ignore" and len(hist) == 20
    assert sum(hist.values()) == 2 * 24 * 96 and hist["road"] > 0 and hist["sky"] > 0


def test_check_text_all_splits(cli_runner, synth_root):
    r = cli_runner.invoke(main, ["datasets", "check", "vistas", "--root", str(synth_root / "vistas")])
    assert r.exit_code == 0, r.output
    assert "train" in r.output and "5 image/label pairs" in r.output and "no problems found" in r.output
    assert "test      not found" in r.output


def test_check_wrong_root_says_expected_and_found(cli_runner, tmp_path):
    (tmp_path / "stuff").mkdir()
    r = cli_runner.invoke(main, ["datasets", "check", "cityscapes", "--root", str(tmp_path)])
    assert r.exit_code == 1
    assert "leftImg8bit/train/*/*_leftImg8bit.png" in r.output and "stuff/" in r.output
    assert "Traceback" not in r.output
    r = cli_runner.invoke(main, ["datasets", "check", "nosuch"])
    assert r.exit_code == 2 and "known datasets" in r.output


def test_check_reports_bad_files_by_name(cli_runner, tmp_path):
    ids = np.full((8, 12), 7, np.uint8)
    for k in range(3):
        write_cityscapes(tmp_path, "val", f"lindau_000000_00000{k}", np.zeros((8, 12, 3), np.uint8), ids)
    gt = tmp_path / "gtFine/val/lindau"
    (gt / "lindau_000000_000000_gtFine_labelIds.png").unlink()                      # unpaired image
    (tmp_path / "leftImg8bit/val/lindau/lindau_000000_000001_leftImg8bit.png").write_bytes(b"junk")  # corrupt
    bad = ids.copy()
    bad[0, 0] = 99
    write_cityscapes(tmp_path, "val", "lindau_000000_000002", np.zeros((8, 12, 3), np.uint8), bad)  # out of space
    r = cli_runner.invoke(main, ["datasets", "check", "cityscapes", "--root", str(tmp_path), "--split", "val", "--full"])
    assert r.exit_code == 1
    assert "3 problem(s)" in r.output
    assert "unpaired file" in r.output and "lindau_000000_000000_leftImg8bit.png" in r.output
    assert "cannot decode image" in r.output and "lindau_000000_000001_leftImg8bit.png" in r.output
    assert "lindau_000000_000002_gtFine_labelIds.png has values 99" in r.output


def test_synth_bad_size(cli_runner, tmp_path):
    r = cli_runner.invoke(main, ["synth", "--root", str(tmp_path), "--size", "big"])
    assert r.exit_code == 2 and "--size must look like 160x80" in r.output
