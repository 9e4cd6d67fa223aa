import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldnbench.losses import SegLoss, cross_entropy, soft_cross_entropy, soft_targets, window_counts


def _direct_soft_targets(labels: np.ndarray, num_classes: int, k: int, h: int, w: int):
    """Paper eq. 2 by a plain loop: count each k×k window (pixels past the label border are ignored)."""
    n, height, width = labels.shape
    targets = np.zeros((n, num_classes, h, w))
    valid = np.zeros((n, h, w), bool)
    for b in range(n):
        for r in range(h):
            for c in range(w):
                counts = np.zeros(num_classes)
                ignored = 0
                for dr in range(k):
                    for dc in range(k):
                        y, x = r * k + dr, c * k + dc
                        if y >= height or x >= width or labels[b, y, x] == 255:
                            ignored += 1
                        else:
                            counts[labels[b, y, x]] += 1
                valid[b, r, c] = ignored / (k * k) < 0.5
                if valid[b, r, c]:
                    targets[b, :, r, c] = counts / counts.sum()
    return targets, valid


@pytest.mark.parametrize("k,height,width", [(2, 8, 8), (4, 13, 10), (3, 9, 7), (8, 20, 12)])
def test_soft_targets_match_direct_window_counts(k, height, width):
    rng = np.random.default_rng(k)
    num_classes = 5
    labels = rng.integers(0, num_classes, (2, height, width)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.3] = 255  # scattered ignore
    labels[0, : height // 2, : width // 2] = 255  # and a large ignored region
    h, w = math.ceil(height / k), math.ceil(width / k)
    targets, valid = soft_targets(torch.from_numpy(labels), num_classes, k, (h, w))
    expected_t, expected_v = _direct_soft_targets(labels, num_classes, k, h, w)
    assert targets.shape == (2, num_classes, h, w)
    np.testing.assert_array_equal(valid.numpy(), expected_v)
    np.testing.assert_allclose(targets.numpy(), expected_t, atol=1e-6)
    assert valid.any() and not valid.all()


def test_invalid_window_rule_is_half_ignored():
    # One 2x2 window with 0..4 ignored pixels: valid iff fewer than half (< 2) are ignored.
    for n_ignored in range(5):
        lab = torch.tensor([0, 1, 1, 1], dtype=torch.uint8)
        lab[:n_ignored] = 255
        targets, valid = soft_targets(lab.view(1, 2, 2), 3, 2, (1, 1))
        assert bool(valid) == (n_ignored < 2)
        if n_ignored == 1:  # ignored pixel dropped, the rest renormalised
            torch.testing.assert_close(targets[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
        if n_ignored >= 2:
            assert targets.sum() == 0


def test_window_counts_pad_bottom_right_as_ignore():
    labels = torch.zeros(1, 5, 6, dtype=torch.uint8)
    counts = window_counts(labels, 2, 4, (2, 2))
    assert counts.shape == (1, 3, 2, 2)
    # window (1, 1) covers rows 4..7, cols 4..7: 1x2 label pixels inside, 14 padded
    assert counts[0, :, 1, 1].tolist() == [2, 0, 14]
    assert counts.sum() == 64
    with pytest.raises(ValueError, match="less than"):
        window_counts(labels, 2, 4, (1, 2))


def test_soft_cross_entropy_equals_hard_ce_on_one_hot_targets():
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 3, 3))
    targets = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    hard = labels.clone()
    hard[0, 0, 0] = 255
    torch.testing.assert_close(soft_cross_entropy(logits, targets, valid), cross_entropy(logits, hard))


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = cross_entropy(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_seg_loss_combines_main_and_mean_aux():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[:, :3] = 255
    logits = torch.randn(2, 3, 16, 16)
    aux = [(torch.randn(2, 3, 2, 2), 8), (torch.randn(2, 3, 4, 4), 4)]
    loss = SegLoss(3)
    total, parts = loss((logits, aux), labels)
    per_aux = [soft_cross_entropy(a, *soft_targets(labels, 3, k, a.shape[-2:])) for a, k in aux]
    expected_aux = sum(per_aux) / 2
    torch.testing.assert_close(parts["aux"], expected_aux)
    torch.testing.assert_close(total, 0.6 * cross_entropy(logits, labels) + 0.4 * expected_aux)
    # weights are options; a model without aux heads gets the plain CE
    total2, _ = SegLoss(3, main_weight=0.5, aux_weight=0.5)((logits, aux), labels)
    torch.testing.assert_close(total2, 0.5 * cross_entropy(logits, labels) + 0.5 * expected_aux)
    plain, parts = loss((logits, []), labels)
    torch.testing.assert_close(plain, cross_entropy(logits, labels))
    assert parts["aux"] is None


def test_soft_targets_on_large_crop_are_consistent_across_levels():
    # Coarser windows are sums of finer ones: a cheap vectorisation check on a realistic size.
    labels = torch.randint(0, 19, (2, 256, 320), dtype=torch.uint8)
    labels[:, 100:140] = 255
    c8 = window_counts(labels, 19, 8, (32, 40))
    c32 = window_counts(labels, 19, 32, (8, 10))
    torch.testing.assert_close(c8.view(2, 20, 8, 4, 10, 4).sum((3, 5)), c32)


def test_count_reduce_sets_the_denominators():
    # Data-parallel training divides by the global mean counts; here a stand-in that doubles them.
    torch.manual_seed(1)
    labels = torch.randint(0, 3, (1, 16, 16))
    out = (torch.randn(1, 3, 16, 16), [(torch.randn(1, 3, 2, 2), 8)])
    plain, _ = SegLoss(3)(out, labels)
    halved, _ = SegLoss(3, count_reduce=lambda c: 2 * c)(out, labels)
    torch.testing.assert_close(halved, plain / 2)
