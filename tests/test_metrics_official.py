"""SegMetrics against cityscapesScripts' own evalPixelLevelSemanticLabeling on generated frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ldnbench.data.spaces import get_label_space
from ldnbench.metrics import SegMetrics

H, W = 64, 128


def _labelid_tables():
    from cityscapesscripts.helpers.labels import labels

    space = get_label_space("cityscapes19")
    vehicle = space.categories.index("vehicle")
    to_train = np.full(256, 255, np.uint8)
    extra: list[int] = []
    for l in labels:
        if l.id < 0:
            continue
        if not l.ignoreInEval:
            to_train[l.id] = l.trainId
        elif l.hasInstances:          # caravan, trailer: void, but "vehicle" for category iIoU
            to_train[l.id] = space.num_classes + len(extra)
            extra.append(vehicle)
    from_train = np.zeros(256, np.uint8)
    for l in labels:
        if 0 <= l.trainId < 255 and l.id >= 0:
            from_train[l.trainId] = l.id
    gt_to_train = np.where(to_train < space.num_classes, to_train, 255).astype(np.uint8)
    return to_train, gt_to_train, tuple(extra), from_train


def _frame(rng: np.random.Generator, absent: set[int], H: int = H, W: int = W):  # noqa: N803
    """labelIds, instanceIds (Cityscapes encoding) and a noisy labelId prediction."""
    allowed = np.array([i for i in range(34) if i not in absent])
    gt = rng.choice(allowed, size=(H // 8 + 1, W // 8 + 1)).repeat(8, 0).repeat(8, 1)[:H, :W].astype(np.uint8)
    inst = gt.astype(np.int32).copy()           # stuff and groups keep their label id (< 1000)
    counters: dict[int, int] = {}
    inst_ids = [i for i in (24, 25, 26, 27, 28, 29, 30, 32, 33) if i not in absent]
    for _ in range(int(rng.integers(3, 9))):
        lid = int(rng.choice(inst_ids))
        y, x = int(rng.integers(0, H - 8)), int(rng.integers(0, W - 8))
        h, w = int(rng.integers(2, 30)), int(rng.integers(2, 40))
        k = counters.get(lid, 0)
        counters[lid] = k + 1
        gt[y:y + h, x:x + w] = lid
        inst[y:y + h, x:x + w] = lid * 1000 + k
    if rng.random() < 0.5:                       # a "cargroup" region: car label, no instance
        gt[:6, :10], inst[:6, :10] = 26, 26
    pred = gt.copy()
    noise = rng.random((H, W)) < 0.35
    pred[noise] = rng.choice(allowed, size=int(noise.sum()))
    blob = rng.integers(0, H - 16)
    pred[blob:blob + 16, 40:70] = rng.choice(allowed)  # large structured errors too
    return gt, inst, pred


def _official(tmp_path, frames, monkeypatch):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    # NumPy 2.4 removed np.in1d, which the official evaluator still calls
    monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(np.ravel(a), b, invert=invert), raising=False)
    monkeypatch.setattr(ev.args, "quiet", True)
    monkeypatch.setattr(ev.args, "JSONOutput", False)
    preds, gts = [], []
    for i, (gt, inst, pred) in enumerate(frames):
        g = tmp_path / f"city_{i:06d}_000019_gtFine_labelIds.png"
        Image.fromarray(gt).save(g)
        Image.fromarray(inst.astype(np.uint16)).save(str(g).replace("labelIds", "instanceIds"))
        p = tmp_path / f"pred_city_{i:06d}_000019.png"
        Image.fromarray(pred).save(p)
        preds.append(str(p))
        gts.append(str(g))
    return ev.evaluateImgLists(preds, gts, ev.args)


def _assert_same(ours, official, space):
    def same(a, b, what):
        if b is None or (isinstance(b, float) and math.isnan(b)):
            assert math.isnan(a), f"{what}: ours {a}, official NaN"
        else:
            assert abs(a - b) <= 1e-9, f"{what}: ours {a}, official {b}"

    for name in space.classes:
        same(ours.class_iou[name], official["classScores"][name], f"IoU {name}")
    for name in ours.class_iiou:
        same(ours.class_iiou[name], official["classInstScores"][name], f"iIoU {name}")
    assert set(ours.class_iiou) == {n for n, v in official["classInstScores"].items()
                                    if n in space.classes and space.index(n) in space.instance_classes}
    for name in space.categories:
        same(ours.category_iou[name], official["categoryScores"][name], f"category IoU {name}")
    assert set(ours.category_iiou) == {"human", "vehicle"}
    for name in ours.category_iiou:
        same(ours.category_iiou[name], official["categoryInstScores"][name], f"category iIoU {name}")
    same(ours.miou, official["averageScoreClasses"], "mIoU")
    same(ours.iiou, official["averageScoreInstClasses"], "iIoU")
    same(ours.cat_iou, official["averageScoreCategories"], "category IoU")
    same(ours.cat_iiou, official["averageScoreInstCategories"], "category iIoU")


@pytest.mark.parametrize("seed,width", [(0, W), (1, W), (2, 120), (3, 122)])
def test_labelid_predictions_match_official(tmp_path, monkeypatch, seed, width):
    """Predictions in label ids (incl. void ids such as caravan), GT with ignore pixels and groups.

    Widths 120 and 122 exercise the 8-pixel and whole-row instance segments.
    """
    rng = np.random.default_rng(seed)
    absent = {31}                                # 'train' nowhere: NaN IoU and iIoU
    frames = [_frame(rng, absent, W=width) for _ in range(4)]
    official = _official(tmp_path, frames, monkeypatch)
    to_train, gt_to_train, extra, _ = _labelid_tables()
    space = get_label_space("cityscapes19")
    m = SegMetrics(space, extra_pred_categories=extra)
    for gt, inst, pred in frames:
        m.update(to_train[pred], gt_to_train[gt], np.where(inst >= 1000, inst, 0))
    ours = m.compute()
    # the same with the label-id -> code translation done inside the accumulator's lookup table
    lut = np.where(np.arange(256) <= 33, to_train, -1)
    fused = SegMetrics(space, extra_pred_categories=extra, pred_lut=lut)
    for gt, inst, pred in frames:
        fused.update(pred, gt_to_train[gt], np.where(inst >= 1000, inst, 0))
    _assert_same(fused.compute(), official, space)
    assert math.isnan(ours.class_iou["train"]) and math.isnan(ours.class_iiou["train"])
    assert (ours.confusion[space.num_classes] > 0).any(), "the data must contain ignored ground truth"
    _assert_same(ours, official, space)
    assert ours.num_images == 4


def test_trainid_predictions_match_official(tmp_path, monkeypatch):
    """A model's 19-class output, converted to label ids for the official tool, scores identically."""
    rng = np.random.default_rng(7)
    _, to_train, _, from_train = _labelid_tables()
    space = get_label_space("cityscapes19")
    frames, ours_in = [], []
    for _ in range(3):
        gt, inst, _ = _frame(rng, absent={31, 28})   # no train, no bus in GT ...
        pred_train = rng.integers(0, 19, size=(H, W)).astype(np.uint8)
        pred_train[pred_train == 15] = 0            # ... and no bus predicted: NaN; train predicted: 0
        keep = rng.random((H, W)) < 0.6
        gt_train = to_train[gt]
        pred_train[keep & (gt_train < 19)] = gt_train[keep & (gt_train < 19)]
        frames.append((gt, inst, from_train[pred_train]))
        ours_in.append((pred_train, gt_train, np.where(inst >= 1000, inst, 0)))
    official = _official(tmp_path, frames, monkeypatch)
    m = SegMetrics(space)
    for pred, gt, inst in ours_in:
        m.update(pred, gt, inst)
    ours = m.compute()
    assert math.isnan(ours.class_iou["bus"]) and ours.class_iou["train"] == 0.0
    _assert_same(ours, official, space)
