import pytest
import torch

from ldnbench.data.labels import LabelSpace
from ldnbench.data.spaces import get_label_space, get_mapping
from ldnbench.errors import UserError


def _joint():
    cs = get_label_space("cityscapes19")
    extra = ("scannet:wall", "scannet:floor")  # "wall" also exists in cityscapes19: must not be picked
    return cs, LabelSpace("joint", tuple("cs:" + c for c in cs.classes) + extra, cs.colors + ((1, 1, 1), (2, 2, 2)))


def test_identity_for_equal_spaces():
    m = get_mapping("cityscapes19", "cityscapes19")
    t = torch.randn(1, 19, 3, 5)
    assert m.logits(t) is t


def test_subset_of_logits_by_name_within_one_namespace():
    cs, joint = _joint()
    m = get_mapping(joint, cs)
    t = torch.randn(2, joint.num_classes, 4, 6)
    out = m.logits(t)
    assert out.shape == (2, 19, 4, 6)
    assert torch.equal(out, t[:, :19])
    assert torch.equal(m.logits(t[0]), t[0, :19])  # CxHxW works too
    # a permuted source still maps each class to its own logit
    perm = LabelSpace("perm", tuple(reversed(cs.classes)), tuple(reversed(cs.colors)))
    mp = get_mapping(perm, cs)
    x = torch.arange(19.0).view(1, 19, 1, 1)
    assert mp.logits(x).flatten().tolist() == list(reversed(range(19)))


def test_no_mapping_names_both_spaces():
    cs, joint = _joint()
    with pytest.raises(UserError, match="no label mapping from cityscapes19 .* to joint"):
        get_mapping(cs, joint)


def test_table_mapping_sums_probabilities_of_grouped_classes():
    cs, camvid = get_label_space("cityscapes19"), get_label_space("camvid11")
    m = get_mapping(cs, camvid)
    logits = torch.randn(2, cs.num_classes, 3, 5)
    out = m.logits(logits)
    assert out.shape == (2, camvid.num_classes, 3, 5)
    p = logits.softmax(1)
    car = sum(p[:, cs.index(n)] for n in ("car", "truck", "bus", "train"))
    # softmax over dst logits = renormalised sums of the grouped src probabilities
    kept = sum(p[:, cs.index(n)] for g in (("sky",), ("building",), ("pole", "traffic light"), ("road",),
               ("sidewalk",), ("vegetation", "terrain"), ("traffic sign",), ("fence", "wall"),
               ("car", "truck", "bus", "train"), ("person",), ("rider", "bicycle", "motorcycle")) for n in g)
    torch.testing.assert_close(out.softmax(1)[:, camvid.index("Car")], car / kept)
    # no table the other way round: a clear error
    with pytest.raises(UserError, match="no label mapping"):
        get_mapping(camvid, cs)
