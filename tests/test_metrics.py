from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldnbench.data.labels import LabelSpace
from ldnbench.data.spaces import get_label_space
from ldnbench.errors import UserError
from ldnbench.metrics import SegMetrics

TINY = LabelSpace("tiny3", ("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))


def _random(seed: int, n: int = 3, h: int = 32, w: int = 48):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 19, size=(n, h, w)).astype(np.uint8)
    gt[rng.random((n, h, w)) < 0.1] = 255
    pred = np.where(rng.random((n, h, w)) < 0.5, gt, rng.integers(0, 19, size=(n, h, w))).astype(np.uint8)
    pred[pred == 255] = 3
    inst = np.zeros((n, h, w), np.int32)
    for i in range(n):
        for k in range(6):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            inst[i, y:y + 6, x:x + 5] = 1 + k
            gt[i, y:y + 6, x:x + 5] = rng.choice([11, 12, 13, 18])
    return pred, gt, inst


def test_hand_computed_values():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 255, 2, 0]], np.uint8)
    m = SegMetrics(TINY)
    m.update(pred, gt)
    r = m.compute()
    # a: tp 1, fn 1 (pred b), fp 1 (gt c predicted a; the ignored pixel predicted a does not count)
    assert r.class_iou == {"a": 1 / 3, "b": 2 / 3, "c": 0.0}
    assert r.miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert r.pixel_acc == pytest.approx(3 / 6)
    assert r.mean_acc == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert r.fwiou == pytest.approx(2 / 6 * 1 / 3 + 2 / 6 * 2 / 3)
    d = r.to_dict()
    assert set(d) == {"miou", "iiou", "cat_iou", "cat_iiou", "class_iou", "class_iiou", "category_iou",
                      "category_iiou", "pixel_acc", "mean_acc", "fwiou", "num_images", "confusion"}
    assert d["confusion"] == r.confusion.tolist()
    assert d["iiou"] is None and d["class_iiou"] == {} and d["num_images"] == 1


def test_absent_class_is_nan_and_excluded_from_mean():
    m = SegMetrics(TINY)
    m.update(np.array([[0, 1]]), np.array([[0, 1]]))
    r = m.compute()
    assert math.isnan(r.class_iou["c"]) and r.miou == 1.0
    assert r.to_dict()["class_iou"]["c"] is None
    # predicted but absent from the ground truth: IoU 0, which does lower the mean
    m.update(np.array([[2, 1]]), np.array([[0, 1]]))
    r = m.compute()
    assert r.class_iou["c"] == 0.0 and r.miou == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_numpy_torch_batched_and_merged_are_identical():
    pred, gt, inst = _random(0)
    space = get_label_space("cityscapes19")
    a = SegMetrics(space)
    a.update(pred, gt, inst)
    b = SegMetrics(space)
    for i in range(len(gt)):
        b.update(torch.from_numpy(pred[i]).long(), torch.from_numpy(gt[i]), torch.from_numpy(inst[i]))
    c, d = SegMetrics(space), SegMetrics(space)
    c.update(pred[:1], gt[:1], inst[:1])
    d.update(pred[1:], gt[1:], inst[1:])
    c.merge(d)
    ra, rb, rc = a.compute(), b.compute(), c.compute()
    assert ra.num_images == rb.num_images == rc.num_images == 3
    assert np.array_equal(ra.confusion, rb.confusion) and np.array_equal(ra.confusion, rc.confusion)
    for r in (rb, rc):
        assert r.class_iiou == pytest.approx(ra.class_iiou, abs=1e-12, nan_ok=True)
        assert r.category_iiou == pytest.approx(ra.category_iiou, abs=1e-12, nan_ok=True)
    assert not math.isnan(ra.iiou)
    m = SegMetrics(space)
    m.update(pred, gt, inst)
    m.reset()
    assert m.compute().num_images == 0 and math.isnan(m.compute().miou)


def test_instance_ids_are_arbitrary_labels_per_image():
    """Huge ids (compacted internally) and relabelled ids give the same iIoU."""
    pred, gt, inst = _random(1)
    space = get_label_space("cityscapes19")
    a, b = SegMetrics(space), SegMetrics(space)
    a.update(pred, gt, inst)
    big = np.where(inst > 0, inst * 7_000_003 + 1_000_000_000, 0).astype(np.int64)
    b.update(pred, gt, big)
    assert b.compute().class_iiou == pytest.approx(a.compute().class_iiou, abs=1e-12, nan_ok=True)


def test_iiou_weighting_by_average_size():
    space = get_label_space("cityscapes19")
    car = space.index("car")
    gt = np.zeros((10, 10), np.uint8)
    gt[:2, :5] = car                        # instance 1: 10 px, 6 right
    gt[5:, 5:] = car                        # instance 2: 25 px, all wrong (predicted truck)
    inst = np.zeros((10, 10), np.int32)
    inst[:2, :5], inst[5:, 5:] = 1, 2
    pred = np.zeros_like(gt)
    pred[:2, :3] = car
    pred[0, 3:5] = car
    pred[5:, 5:] = space.index("truck")
    m = SegMetrics(space)
    m.update(pred, gt, inst)
    r = m.compute()
    s = space.avg_instance_size[car]
    tp_w, fn_w = 8 * s / 10, 2 * s / 10 + 25 * s / 25
    assert r.class_iiou["car"] == pytest.approx(tp_w / (tp_w + fn_w))
    assert r.class_iou["car"] == pytest.approx(8 / 35)
    # the truck prediction is still a vehicle: only the 2 road pixels of instance 1 are category misses
    assert r.category_iiou["vehicle"] == pytest.approx((8 * s / 10 + s) / (s + s))


def test_missing_instances_make_iiou_undefined():
    pred, gt, inst = _random(2)
    m = SegMetrics(get_label_space("cityscapes19"))
    m.update(pred[0], gt[0], inst[0])
    m.update(pred[1], gt[1])
    r = m.compute()
    assert math.isnan(r.iiou) and r.to_dict()["class_iiou"]["car"] is None
    assert not math.isnan(r.miou)


@pytest.mark.parametrize("bad_gt, bad_pred, fragment", [
    ([[0, 7]], [[0, 1]], "ground truth has values 7"),
    ([[0, 1]], [[0, 3]], "prediction has values 3"),
    ([[0, 1]], [[0, -4]], "prediction has values -4"),
    ([[0, 300]], [[0, 1]], "ground truth has values 300"),
])
def test_values_outside_the_space_are_named(bad_gt, bad_pred, fragment):
    m = SegMetrics(TINY)
    with pytest.raises(UserError, match=fragment):
        m.update(np.array(bad_pred), np.array(bad_gt))
    assert m.compute().num_images == 0  # nothing was half-added


def test_shape_and_dtype_errors():
    m = SegMetrics(TINY)
    with pytest.raises(UserError, match="shape"):
        m.update(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8))
    with pytest.raises(UserError, match="integer"):
        m.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))


def test_format_table_percent_one_decimal():
    pred, gt, inst = _random(3)
    m = SegMetrics(get_label_space("cityscapes19"))
    m.update(pred, gt, inst)
    r = m.compute()
    text = r.format_table()
    assert f"{100 * r.class_iou['road']:.1f}" in text and "vehicle" in text


def test_bad_instances_leave_the_state_untouched():
    space = get_label_space("cityscapes19")
    m = SegMetrics(space)
    gt = np.full((4, 4), space.index("car"), np.uint8)
    with pytest.raises(UserError, match="negative"):
        m.update(gt, gt, np.full((4, 4), -1, np.int32))
    with pytest.raises(UserError, match="instance map shape"):
        m.update(gt, gt, np.zeros((4, 5), np.int32))
    assert m.compute().num_images == 0 and m.compute().confusion.sum() == 0


def test_unsigned_16bit_tensors_are_accepted():
    """torchvision decodes 16-bit PNGs (Cityscapes instanceIds) to uint16 tensors."""
    pred, gt, inst = _random(4, n=1)
    a, b = SegMetrics(get_label_space("cityscapes19")), SegMetrics(get_label_space("cityscapes19"))
    a.update(pred, gt, inst)
    b.update(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(inst.astype(np.uint16)))
    assert b.compute().class_iiou == pytest.approx(a.compute().class_iiou, nan_ok=True)


def _state(m: SegMetrics) -> list[np.ndarray]:
    return [t.numpy().copy() for t in (m.confusion, m.inst_tp, m.inst_fn, m.cat_tp, m.cat_fn)]


@pytest.mark.parametrize("with_instances", [True, False])
def test_two_thread_update_of_a_large_frame_equals_one_thread(with_instances):
    """A full-size frame (intra-op parallel passes, interleaved histogram lanes) counts exactly."""
    pred, gt, inst = _random(5, n=1, h=32, w=32)
    pred, gt, inst = (np.kron(a[0], np.ones((32, 64), a.dtype)) for a in (pred, gt, inst))  # 1024x2048
    inst[:100] = 0  # a band of rows without objects
    args = (pred, gt, inst) if with_instances else (pred, gt)
    space = get_label_space("cityscapes19")
    one, two = SegMetrics(space), SegMetrics(space)
    one.update(*args)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two.update(*args)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(_state(one), _state(two)):
        np.testing.assert_array_equal(a, b)
    if with_instances:
        assert one.compute().iiou > 0


def test_refused_large_update_leaves_the_state_untouched():
    pred, gt, inst = _random(6, n=1, h=32, w=32)
    pred, gt, inst = (np.kron(a[0], np.ones((32, 64), a.dtype)) for a in (pred, gt, inst))
    m = SegMetrics(get_label_space("cityscapes19"))
    m.update(pred, gt, inst)
    state = _state(m)
    pred[5, 7] = 40
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(UserError, match="prediction has values 40"):
            m.update(pred, gt, inst)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(state, _state(m)):
        np.testing.assert_array_equal(a, b)
    assert m.num_images == 1


def _street_like(rng, n, h, w, k, ids_hi):
    """Runs of labels (as label maps have), ignore pixels, instances with ids up to ``ids_hi``."""
    blocks = rng.integers(0, k, size=(n, h // 4, w // 4)).repeat(4, 1).repeat(4, 2)
    gt = np.where(rng.random(blocks.shape) < 0.05, 255, blocks).astype(np.uint8)
    pred = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, k, gt.shape), gt).astype(np.uint8)
    inst = np.where(rng.random(gt.shape) < 0.5, rng.integers(1, ids_hi, gt.shape), 0).astype(np.int64)
    return pred, gt, inst


@pytest.mark.parametrize("ids_hi", [40, 34000, 1 << 40])  # small, Cityscapes-like, beyond the direct histogram
def test_compiled_cpu_loops_equal_the_torch_ops_bit_for_bit(ids_hi):
    space = get_label_space("cityscapes19")
    rng = np.random.default_rng(ids_hi % 1000)
    pred, gt, inst = _street_like(rng, 2, 32, 48, space.num_classes, ids_hi)
    lut = np.full(256, -1, np.int64)
    lut[: space.num_classes], lut[255], lut[200] = np.arange(space.num_classes), 255, space.num_classes  # one extra code
    pred[0, :2] = 200
    results = []
    for path in ("_count_cpu", "_count_torch"):
        m = SegMetrics(space, extra_pred_categories=(space.categories.index("vehicle"),), pred_lut=lut)
        m._count_cpu = getattr(m, path)  # the CPU dispatch, pointed at one path or the other
        for b in range(2):
            m.update(pred[b], gt[b], inst[b])
        m.update(pred, gt, inst)  # a batch
        results.append(m)
    cpu, ref = results
    assert cpu.confusion.sum() == 4 * gt[0].size
    assert (cpu.inst_tp > 0).any() and (cpu.cat_tp > 0).any()
    for a, b in zip(cpu._state(), ref._state()):
        assert torch.equal(a, b)


def test_compiled_cpu_loops_refuse_what_the_torch_ops_refuse():
    space = get_label_space("cityscapes19")
    m = SegMetrics(space)
    gt = np.zeros((4, 4), np.uint8)
    with pytest.raises(UserError, match="negative"):
        m.update(gt, gt, np.full((4, 4), -3))
    with pytest.raises(UserError, match="prediction has values 77"):
        m.update(np.full((4, 4), 77, np.uint8), gt)
    assert m.num_images == 0 and m.confusion.sum() == 0


# ------------------------------------------------------------------ one combined ground-truth map


def _combined_frames(rng, n, h, w, noisy):
    """Cityscapes-encoded instanceIds maps (label id below 1000, else label id * 1000 + k) and label-id
    predictions: street-like runs, or per-pixel noise (runs of length one)."""
    from ldnbench.data.cityscapes import labelid_to_trainid

    ids = np.flatnonzero(labelid_to_trainid() >= 0)  # every label id with a train id or ignore
    things = [24, 25, 26, 27, 28, 31, 32, 33]
    frames = []
    for b in range(n):
        v = rng.choice(ids, size=(h // 4, w // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint16)
        if b < n - 1:  # the last frame has no instance at all
            for k in range(8):
                y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
                v[y:y + 5, x:x + 4] = rng.choice(things) * 1000 + k
            v[:2, :3] = 26  # a car pixel outside any instance (instance id below 1000)
        gt_ids = np.where(v < 1000, v, v // 1000)
        wrong = rng.choice(ids, size=v.shape)
        p = np.where(rng.random(v.shape) < (0.6 if noisy else 0.1), wrong, gt_ids).astype(np.uint8)
        frames.append((v, p))
    return frames


@pytest.mark.parametrize("noisy", [False, True])
def test_update_combined_equals_the_split_maps_bit_for_bit(noisy):
    from ldnbench.data.cityscapes import instanceid_to_trainid, labelid_to_trainid

    space = get_label_space("cityscapes19")
    class_of = instanceid_to_trainid()
    lut = np.full(256, -1, np.int64)  # label-id predictions, as score reads them
    ids = labelid_to_trainid()
    lut[: ids.size] = np.where(ids < 0, 255, ids)
    rng = np.random.default_rng(int(noisy))
    frames = _combined_frames(rng, 4, 40, 64, noisy)
    results = []
    for combined in (True, False):
        m = SegMetrics(space, pred_lut=lut)
        for v, p in frames:
            if combined:
                m.update_combined(p, v, class_of, 1000)
            else:
                m.update(p, class_of[v].astype(np.uint8), np.where(v >= 1000, v, 0).astype(np.int32))
        results.append(m)
    fast, ref = results
    assert fast.num_images == ref.num_images == 4 and (fast.inst_tp > 0).any() and (fast.cat_tp > 0).any()
    for a, b in zip(fast._state(), ref._state()):
        assert torch.equal(a, b)
    # the tensor route (what accelerators take) gives the same state as well
    split = SegMetrics(space, pred_lut=lut)
    for v, p in frames:
        split._update_split(torch.from_numpy(p), torch.from_numpy(v.astype(np.int32)), class_of, 1000, "gt")
    for a, b in zip(split._state(), ref._state()):
        assert torch.equal(a, b)


def test_update_combined_with_an_extra_prediction_category():
    space = get_label_space("cityscapes19")
    k = space.num_classes
    lut = np.full(256, -1, np.int64)
    lut[:k], lut[200] = np.arange(k), k  # code 200: an extra predicted category (vehicle)
    class_of = np.full(1 << 16, -1, np.int64)
    class_of[:k], class_of[255] = np.arange(k), 255
    class_of[13000:13100] = 13  # car instances 13000..13099
    rng = np.random.default_rng(3)
    v = rng.integers(0, k, size=(24, 32)).astype(np.uint16)
    v[4:12, 4:12], v[14:20, 10:30] = 13007, 13050
    p = np.where(rng.random(v.shape) < 0.3, 200, class_of[v] % 256).astype(np.uint8)
    p[p == 255] = 0
    kw = dict(extra_pred_categories=(space.categories.index("vehicle"),), pred_lut=lut)
    a, b = SegMetrics(space, **kw), SegMetrics(space, **kw)
    a.update_combined(p, v, class_of, 1000)
    b.update(p, class_of[v].astype(np.uint8), np.where(v >= 1000, v, 0))
    for x, y in zip(a._state(), b._state()):
        assert torch.equal(x, y)
    assert (a.cat_tp > 0).any()


def test_update_combined_refuses_bad_maps_and_leaves_the_state_untouched():
    space = get_label_space("cityscapes19")
    class_of = np.full(1 << 16, -1, np.int64)
    class_of[:19], class_of[26000:27000] = np.arange(19), 13
    m = SegMetrics(space)
    v = np.zeros((6, 8), np.uint16)
    v[2, 3], v[1, 1] = 26001, 40  # 40 maps to no class
    p = np.zeros((6, 8), np.uint8)
    with pytest.raises(UserError, match=r"^instance file x has values 40 that map to no class"):
        m.update_combined(p, v, class_of, 1000, what="instance file x")
    v[1, 1] = 0
    p[0, 0] = 77
    with pytest.raises(UserError, match="prediction has values 77"):
        m.update_combined(p, v, class_of, 1000)
    assert m.num_images == 0 and m.confusion.sum() == 0 and m.inst_tp.sum() == 0
    with pytest.raises(UserError, match="differs from ground truth shape"):
        m.update_combined(np.zeros((6, 7), np.uint8), v, class_of, 1000)
    with pytest.raises(ValueError, match="65536"):
        m.update_combined(p, v, class_of[:1000], 1000)
    with pytest.raises(ValueError, match="instance_from"):
        m.update_combined(p, v, class_of, 0)
    with pytest.raises(TypeError, match="uint16"):
        m.update_combined(p, v.astype(np.int32), class_of, 1000)
    # after the refusals, a valid image still counts exactly once
    p[0, 0] = 0
    m.update_combined(p, v, class_of, 1000)
    assert m.num_images == 1 and m.confusion.sum() == v.size
