"""`ldnbench score` on a fixture tree in the real Cityscapes layout, checked against the official tool."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ldnbench.cli import main
from ldnbench.data.registry import get_dataset
from ldnbench.data.synthetic import write_cityscapes
from ldnbench.errors import UserError
from ldnbench.score import match_predictions, score_predictions

H, W = 64, 96
SIDS = ["frankfurt_000000_000294", "frankfurt_000001_000019", "lindau_000002_000019", "munster_000003_000019"]


def _frame(rng):
    gt = rng.choice([0, 4, 7, 8, 11, 17, 21, 23, 26], size=(H // 8, W // 8)).repeat(8, 0).repeat(8, 1)
    gt = gt.astype(np.uint8)
    inst = gt.astype(np.int32)
    for k in range(5):
        lid = int(rng.choice([24, 25, 26, 27, 29, 33]))
        y, x = rng.integers(0, H - 10), rng.integers(0, W - 10)
        gt[y:y + 10, x:x + 12], inst[y:y + 10, x:x + 12] = lid, lid * 1000 + k
    pred = gt.copy()
    noise = rng.random((H, W)) < 0.3
    pred[noise] = rng.choice([0, 7, 8, 11, 24, 26, 28, 29, 30], size=int(noise.sum()))
    return gt, inst, pred


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    root, pred = tmp_path / "cityscapes", tmp_path / "results"
    frames = {}
    for sid in SIDS:
        gt, inst, p = _frame(rng)
        write_cityscapes(root, "val", sid, np.zeros((H, W, 3), np.uint8), gt, inst)
        city = sid.split("_")[0]
        (pred / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(pred / city / f"{sid}_leftImg8bit.png")  # a typical submission name
        frames[sid] = (gt, inst, p)
    return root, pred, frames


def _official(root, pred_dir, monkeypatch):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(np.ravel(a), b, invert=invert), raising=False)
    monkeypatch.setattr(ev.args, "quiet", True)
    monkeypatch.setattr(ev.args, "JSONOutput", False)
    monkeypatch.setattr(ev.args, "predictionPath", str(pred_dir))
    monkeypatch.setattr(ev.args, "predictionWalk", None)
    gts = sorted(str(p) for p in root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    preds = [ev.getPrediction(ev.args, g) for g in gts]  # the official file matching
    return ev.evaluateImgLists(preds, gts, ev.args)


def test_score_equals_official_evaluator(tree, monkeypatch):
    root, pred_dir, _ = tree
    official = _official(root, pred_dir, monkeypatch)
    res = score_predictions(get_dataset("cityscapes", root, "val"), pred_dir, progress=False)
    m = res.metrics
    assert res.pred_format == "labelIds" and m.num_images == len(SIDS) and res.extra == []
    pairs = [(m.miou, official["averageScoreClasses"]), (m.iiou, official["averageScoreInstClasses"]),
             (m.cat_iou, official["averageScoreCategories"]), (m.cat_iiou, official["averageScoreInstCategories"])]
    pairs += [(v, official["classScores"][k]) for k, v in m.class_iou.items()]
    pairs += [(v, official["classInstScores"][k]) for k, v in m.class_iiou.items()]
    pairs += [(v, official["categoryScores"][k]) for k, v in m.category_iou.items()]
    pairs += [(v, official["categoryInstScores"][k]) for k, v in m.category_iiou.items()]
    for ours, theirs in pairs:
        assert (math.isnan(ours) and math.isnan(theirs)) or abs(ours - theirs) <= 1e-9
    assert any(math.isnan(v) for v in m.class_iou.values())  # absent classes are part of the check


def test_train_id_predictions_and_one_worker(tree):
    root, pred_dir, frames = tree
    from ldnbench.data.cityscapes import labelid_to_trainid

    to_train = labelid_to_trainid()
    train_dir = pred_dir.parent / "train_ids"
    train_dir.mkdir()
    for sid, (_, _, p) in frames.items():
        Image.fromarray(to_train[p].astype(np.uint8)).save(train_dir / f"{sid}.png")
    ds = get_dataset("cityscapes", root, "val")
    a = score_predictions(ds, train_dir, pred_format="trainIds", workers=1, progress=False).metrics
    b = score_predictions(ds, pred_dir, pred_format="labelIds", workers=2, progress=False).metrics
    # identical except where the official rule counts caravan/trailer predictions as "vehicle"
    assert a.class_iou == pytest.approx(b.class_iou, nan_ok=True)
    assert a.class_iiou == pytest.approx(b.class_iiou, nan_ok=True)
    assert a.category_iou == pytest.approx(b.category_iou, nan_ok=True)
    assert a.category_iiou["vehicle"] != pytest.approx(b.category_iiou["vehicle"])


def test_matching_follows_the_official_prefix_rule(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/x_1_2_pred.png", "a/b/x_1_3.png", "a/b/x_1_3_again.png", "notes.txt", "y_9_9.png"]:
        (tmp_path / name).write_bytes(b"")
    m = match_predictions(["x_1_2", "x_1_3", "x_1_4"], tmp_path)
    assert m.files == {"x_1_2": tmp_path / "a/x_1_2_pred.png"}
    assert set(m.duplicates) == {"x_1_3"} and m.missing == ["x_1_4"]
    assert m.extra == [tmp_path / "y_9_9.png"]


def test_bad_prediction_folders_are_reported(tree):
    root, pred_dir, frames = tree
    ds = get_dataset("cityscapes", root, "val")
    extra = pred_dir / "berlin_000000_000019_pred.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(extra)
    assert score_predictions(ds, pred_dir, progress=False).extra == [extra]

    lone = pred_dir / "lindau" / f"{SIDS[2]}_leftImg8bit.png"
    lone.rename(pred_dir / "moved.png")
    with pytest.raises(UserError, match=rf"1 of 4 cityscapes val samples have no prediction .*{SIDS[2]}\*\.png"):
        score_predictions(ds, pred_dir, progress=False)
    (pred_dir / "moved.png").rename(lone)

    Image.fromarray(np.zeros((H, W + 2), np.uint8)).save(lone)
    with pytest.raises(UserError, match=rf"{lone.name} is {W + 2}x{H} but its ground truth is {W}x{H}"):
        score_predictions(ds, pred_dir, progress=False)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(lone)
    with pytest.raises(UserError, match="several channels"):
        score_predictions(ds, pred_dir, progress=False)
    bad = frames[SIDS[2]][2].copy()
    bad[0, 0] = 40
    Image.fromarray(bad).save(lone)
    with pytest.raises(UserError, match=r"values 40 outside Cityscapes label ids 0\.\.33"):
        score_predictions(ds, pred_dir, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        score_predictions(ds, pred_dir / "nope", progress=False)


def test_cli_score_writes_json(tree, cli_runner, tmp_path):
    root, pred_dir, _ = tree
    out = tmp_path / "out" / "score.json"
    r = cli_runner.invoke(main, ["score", "--dataset", "cityscapes", "--root", str(root), "--split", "val",
                                 "--pred", str(pred_dir), "--json", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "mean" in r.output and "vehicle" in r.output
    data = json.loads(out.read_text())
    for key in ("miou", "iiou", "cat_iou", "cat_iiou"):
        assert 0 <= data[key] <= 1
    assert data["num_images"] == 4 and data["class_iou"]["train"] is None
    assert set(data["category_iiou"]) == {"human", "vehicle"} and len(data["class_iou"]) == 19

    r = cli_runner.invoke(main, ["score", "--dataset", "cityscapes", "--root", str(root), "--pred",
                                 str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error: ")


def test_palette_and_16bit_prediction_pngs_are_read_as_ids(tree):
    root, pred_dir, frames = tree
    ds = get_dataset("cityscapes", root, "val")
    ref = score_predictions(ds, pred_dir, progress=False).metrics
    p0 = pred_dir / "frankfurt" / f"{SIDS[0]}_leftImg8bit.png"
    img = Image.fromarray(frames[SIDS[0]][2], "P")
    img.putpalette(list(np.random.default_rng(1).integers(0, 255, 768)))  # colours must not matter
    img.save(p0)
    p1 = pred_dir / "frankfurt" / f"{SIDS[1]}_leftImg8bit.png"
    Image.fromarray(frames[SIDS[1]][2].astype(np.uint16)).save(p1)
    again = score_predictions(ds, pred_dir, progress=False).metrics
    assert np.array_equal(again.confusion, ref.confusion) and again.iiou == ref.iiou
    Image.fromarray(np.full((H, W), 700, np.uint16)).save(p1)
    with pytest.raises(UserError, match="values 700 outside"):
        score_predictions(ds, pred_dir, progress=False)


def test_labels_derived_from_instance_ids_equal_the_label_ids_file(tree, monkeypatch):
    """score reads only the instanceIds PNG (id < 1000: the label id, else id // 1000): same targets, same metrics."""
    import ldnbench.data.cityscapes as cs

    root, pred_dir, _ = tree
    ds = get_dataset("cityscapes", root, "val")
    for i in range(len(ds)):
        (a, ia), (b, ib) = ds.load_target(i), ds.load_target_fast(i)
        assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b) and np.array_equal(ia, ib)
    fast = score_predictions(ds, pred_dir, progress=False).metrics
    # the same scoring with both ground-truth PNGs decoded
    monkeypatch.setattr(cs.Cityscapes, "load_target_fast", cs.Cityscapes.load_target)
    slow = score_predictions(ds, pred_dir, progress=False).metrics
    assert np.array_equal(fast.confusion, slow.confusion) and fast.to_dict() == slow.to_dict()
    monkeypatch.undo()
    # and one decode fewer: the labelIds file is not read at all
    decoded = []
    real = cs.read_label
    monkeypatch.setattr(cs, "read_label", lambda p: decoded.append(p) or real(p))
    ds.load_target_fast(0)
    assert decoded == []
    ds.load_target(0)
    assert len(decoded) == 1


def test_instance_ids_with_an_undefined_label_id_are_refused(tmp_path):
    from ldnbench.data.cityscapes import decode_instanceids_with_labels

    inst = np.full((8, 8), 7, np.uint16)
    inst[0, 0], inst[1, 1] = 26001, 40  # a car instance; 40 is no Cityscapes label id
    write_cityscapes(tmp_path, "val", "frankfurt_000000_000294", np.zeros((8, 8, 3), np.uint8),
                     np.full((8, 8), 7, np.uint8), inst)
    path = next(tmp_path.glob("gtFine/val/*/*_instanceIds.png"))
    with pytest.raises(UserError, match="values 40 whose label id"):
        decode_instanceids_with_labels(path)
    inst[1, 1] = 7
    path.unlink()
    write_cityscapes(tmp_path, "val", "frankfurt_000000_000294", np.zeros((8, 8, 3), np.uint8),
                     np.full((8, 8), 7, np.uint8), inst)
    train, instances = decode_instanceids_with_labels(path)
    assert train[0, 0] == 13 and train[2, 2] == 0 and instances[0, 0] == 26001 and instances[2, 2] == 0


def test_score_scores_the_undivided_instance_ids_map(tree, monkeypatch):
    """score hands Cityscapes' instanceIds map to the metrics in one piece: same numbers as the split maps."""
    import ldnbench.data.cityscapes as cs
    from ldnbench.metrics import SegMetrics

    root, pred_dir, _ = tree
    ds = get_dataset("cityscapes", root, "val")
    calls = []
    real = SegMetrics.update_combined
    monkeypatch.setattr(SegMetrics, "update_combined", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    combined = score_predictions(ds, pred_dir, workers=2, progress=False).metrics
    assert len(calls) == len(SIDS)
    monkeypatch.setattr(cs.Cityscapes, "load_target_combined", lambda self, i: None)
    split = score_predictions(ds, pred_dir, workers=2, progress=False).metrics
    assert len(calls) == len(SIDS)  # the second run took the split route
    assert np.array_equal(combined.confusion, split.confusion) and combined.to_dict() == split.to_dict()


def test_a_bad_instance_ids_file_is_blamed_not_the_prediction(tree):
    root, pred_dir, frames = tree
    sid = SIDS[1]
    gt, inst, _ = frames[sid]
    inst = inst.copy()
    inst[3, 3] = 40  # no Cityscapes label id
    path = next(root.glob(f"gtFine/val/*/{sid}_gtFine_instanceIds.png"))
    Image.fromarray(inst.astype(np.uint16)).save(path)
    ds = get_dataset("cityscapes", root, "val")
    with pytest.raises(UserError) as e:
        score_predictions(ds, pred_dir, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"instance file {path}") and "values 40" in msg and "--pred-format" not in msg


def test_resized_combined_target_is_the_resized_split_target(tree):
    from ldnbench.data.cityscapes import instanceid_to_trainid
    from ldnbench.data.resize import Resized

    root, _, _ = tree
    ds = get_dataset("cityscapes", root, "val")
    for eval_at, width in (("resized", 48), ("original", 48)):
        r = Resized(ds, width, eval_at)
        c = r.load_target_combined(0)
        label, inst = r.load_target(0)
        assert c.values.dtype == np.uint16 and c.values.shape == label.shape
        assert np.array_equal(c.class_of[c.values], label)
        assert np.array_equal(np.where(c.values >= c.instance_from, c.values, 0), inst)
        assert np.array_equal(c.class_of, instanceid_to_trainid())
