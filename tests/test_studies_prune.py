"""Pruning hooks zero exactly the intended units and leave the model and its checkpoint untouched."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from ldnbench.data.labels import LabelSpace
from ldnbench.errors import UserError
from ldnbench.metrics import SegMetrics
from ldnbench.models import build_model
from ldnbench.checkpoints import load_checkpoint
from ldnbench.studies.prune import (PruneConfig, UnitPruner, backbone_blocks, parse_fractions, run_prune,
                                    select_blocks, units_to_prune)

SMALL_DN = dict(block_config=(2, 2, 4, 4), growth_rate=8, num_init_features=16)


def _tiny_ldn(num_classes=3):
    torch.manual_seed(0)
    return build_model("ldn121-64to4", num_classes, **SMALL_DN).eval()


def _run_recording(model, x, units):
    """Forward pass recording each unit's (post-hook) output."""
    outs, handles = {}, []
    for u in units:
        handles.append(u.output.register_forward_hook(lambda m, i, o, n=u.name: outs.__setitem__(n, o.clone())))
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    return y, outs


@pytest.mark.parametrize("name,kw", [("ldn121-64to4", SMALL_DN), ("lrn18-32to4", {})])
def test_fraction_0_is_unpruned_and_1_zeroes_every_tail_unit(name, kw):
    torch.manual_seed(0)
    model = build_model(name, 3, **kw).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    all_units = [u for _, us in backbone_blocks(model) for u in us]
    ref, ref_outs = _run_recording(model, x, all_units)
    sel = select_blocks(model, "last2")
    assert [b for b, _ in sel] == [b for b, _ in backbone_blocks(model)][-2:]

    with UnitPruner(units_to_prune(sel, 0.0)):
        y0, _ = _run_recording(model, x, all_units)
    assert torch.equal(y0, ref)

    pruned = units_to_prune(sel, 1.0)
    assert len(pruned) == sum(len(u) for _, u in sel)
    with UnitPruner(pruned):
        y1, outs = _run_recording(model, x, all_units)
    assert not torch.equal(y1, ref)
    pruned_names = {u.name for u in pruned}
    for u in all_units:
        if u.name in pruned_names:
            assert torch.count_nonzero(outs[u.name]) == 0, u.name
        else:  # units before the pruned blocks see the same input and must be untouched
            assert torch.equal(outs[u.name], ref_outs[u.name]), u.name
    # transition-down / projection modules are not hooked and still carry signal
    bb = model.backbone
    keep = [m for n, m in bb.named_modules() if n.startswith("transition") or n.endswith("downsample")]
    assert keep and all(not m._forward_hooks for m in keep)

    # hooks removed: model is back to the unpruned function, weights never changed
    y_after, _ = _run_recording(model, x, all_units)
    assert torch.equal(y_after, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_half_fraction_prunes_the_tail_of_each_block():
    model = _tiny_ldn()
    sel = select_blocks(model, "last2")  # denseblock3, denseblock4: 4 units each
    x = torch.randn(1, 3, 64, 64)
    units = [u for _, us in sel for u in us]
    ref, ref_outs = _run_recording(model, x, units)
    pruned = units_to_prune(sel, 0.5)
    assert [(u.block, u.index) for u in pruned] == [("denseblock3", 2), ("denseblock3", 3),
                                                    ("denseblock4", 2), ("denseblock4", 3)]
    with UnitPruner(pruned):
        _, outs = _run_recording(model, x, units)
    for u in units:
        if u in pruned:
            assert torch.count_nonzero(outs[u.name]) == 0
        elif u.block == "denseblock3":  # head of the first pruned block: identical inputs, identical output
            assert torch.equal(outs[u.name], ref_outs[u.name])
        else:
            assert torch.count_nonzero(outs[u.name]) > 0


def test_block_and_fraction_parsing():
    model = _tiny_ldn()
    assert [b for b, _ in select_blocks(model, "last1")] == ["denseblock4"]
    assert [b for b, _ in select_blocks(model, "denseblock2,denseblock4")] == ["denseblock2", "denseblock4"]
    with pytest.raises(UserError):
        select_blocks(model, "last9")
    with pytest.raises(UserError):
        select_blocks(model, "layer3")
    assert parse_fractions("0,0.1,...,1") == pytest.approx([i / 10 for i in range(11)])
    assert parse_fractions("1,0.5") == [0.5, 1.0]
    with pytest.raises(UserError):
        parse_fractions("0,2")


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, n, space, size=64, seed=0):
        rng = np.random.default_rng(seed)
        self.label_space = space
        self.items = []
        for i in range(n):
            label = np.zeros((size, size), np.uint8)
            label[size // 2:] = 1
            label[:, : size // 4] = 2
            img = np.stack([label * 80 + rng.integers(0, 30, label.shape)] * 3, -1).astype(np.uint8)
            self.items.append((img, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _evaluate(model, dataset, mapping=None):
    from ldnbench.data.transforms import to_input

    m = SegMetrics(dataset.label_space)
    with torch.no_grad():
        for img, label in dataset:
            pred = model(to_input(img)).argmax(1)[0]
            m.update(pred, torch.from_numpy(label))
    return m.compute().to_dict()


def test_run_prune_writes_csv_record_figures_and_keeps_checkpoint(tmp_path):
    space = LabelSpace("toy3", ("sky", "road", "pole"), ((0, 0, 255), (128, 64, 128), (153, 153, 153)))
    model = _tiny_ldn(3)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    calls = []

    def evaluate_fn(m, ds, mapping):
        assert mapping is None
        calls.append(1)
        return _evaluate(m, ds)

    cfg = PruneConfig(model="ldn121-64to4", checkpoint=ckpt, dataset="toy", fractions=(0.0, 0.5, 1.0),
                      out=tmp_path / "results")
    res = run_prune(cfg, evaluate_fn=evaluate_fn, model=model, dataset=_ListDataset(2, space))
    assert len(calls) == 3
    df = pd.read_csv(res.csv)
    assert list(df["fraction"]) == [0.0, 0.5, 1.0]
    assert list(df["units_pruned"]) == [0, 4, 8]
    assert {"miou", "iou_sky", "iou_road", "iou_pole"} <= set(df.columns)
    assert df.loc[0, "miou"] == pytest.approx(_evaluate(model, _ListDataset(2, space))["miou"])
    assert {p.suffix for p in res.figures} == {".png", ".pdf"} and all(p.exists() for p in res.figures)
    import json

    rec = json.loads(res.record.read_text())
    assert rec["kind"] == "prune" and len(rec["curve"]) == 3 and rec["units_per_block"] == {"denseblock3": 4,
                                                                                          "denseblock4": 4}
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", "lrn18-32to4", num_classes=3)
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"foo": torch.zeros(1)}}, bad)
    with pytest.raises(UserError, match="does not fit"):
        load_checkpoint(bad, "lrn18-32to4", num_classes=3)
    good = tmp_path / "good.pt"
    torch.manual_seed(1)
    m = build_model("lrn18-32to4", 3)
    torch.save({"model": m.state_dict()}, good)
    m2, _ = load_checkpoint(good, "lrn18-32to4", num_classes=3)
    with pytest.raises(UserError, match="does not say which model"):
        load_checkpoint(good)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
