"""The one checkpoint module: (model, meta) round trip, old and bare files, normalisation, one reader for all."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ldnbench
from ldnbench.checkpoints import CheckpointMeta, load_checkpoint, read_checkpoint, save_checkpoint
from ldnbench.data.transforms import IMAGENET, Normalization, normalize, to_input
from ldnbench.errors import UserError
from ldnbench.models import build_model

MODEL = "ldn121-64to4"
TINY = {"growth_rate": 8, "block_config": (1, 1, 2, 1), "num_init_features": 16, "spp_bt": 16, "spp_level": 8,
        "spp_out": 16, "up_widths": (16, 16, 16, 16), "up_bottleneck": 8}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_keeps_meta_weights_and_extra_state(tmp_path):
    torch.manual_seed(0)
    opts = {**TINY, "stem_pool": 2, "imagenet_compatible": True}
    model = build_model(MODEL, 19, checkpointing="none", **opts)
    norm = Normalization((10.0, 20.0, 30.0), (2.0, 3.0, 4.0), 255.0)
    meta = CheckpointMeta(MODEL, 19, "cityscapes19", opts, norm, {"dataset": "cityscapes", "lr": 1e-3},
                          {"source": "converted-ldn", "sha256": "ab" * 32})
    path = save_checkpoint(tmp_path / "ck.pt", model.state_dict(), meta, epoch=3, history=[{"loss": 1.0}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # atomic: no temporary file left

    loaded, meta2 = load_checkpoint(path)
    assert not loaded.training and _same_weights(loaded, model)
    assert loaded.backbone.pool0.kernel_size == 2 and hasattr(loaded.backbone, "norm0")
    assert meta2.model_name == MODEL and meta2.num_classes == 19 and meta2.label_space == "cityscapes19"
    assert meta2.normalization == norm and meta2.provenance == meta.provenance and meta2.trained_on == "cityscapes"
    assert meta2.model_options["stem_pool"] == 2 and meta2.model_options["imagenet_compatible"] is True
    ck = read_checkpoint(path)
    assert ck.extra == {"epoch": 3, "history": [{"loss": 1.0}]} and ck.meta.to_dict() == meta2.to_dict()
    assert not hasattr(loaded, "label_space_name") and not hasattr(loaded, "trained_on")
    with pytest.raises(ValueError, match="own keys"):
        save_checkpoint(tmp_path / "x.pt", model.state_dict(), meta, label_space="voc21")
    with pytest.raises(UserError, match="holds a ldn121-64to4 model, not ldn121-32to4"):
        load_checkpoint(path, "ldn121-32to4")


def test_old_trainer_checkpoints_describe_themselves(tmp_path):
    """Checkpoints written before the module: the layout follows from the training config."""
    torch.manual_seed(0)
    for pretrained, compat in (("none", False), ("imagenet", True)):
        model = build_model(MODEL, 19, checkpointing="none", imagenet_compatible=compat, **TINY)
        path = tmp_path / f"{pretrained}.pt"
        torch.save({"model": model.state_dict(), "model_name": MODEL, "num_classes": 19, "label_space": "cityscapes19",
                    "config": {"model_options": TINY, "pretrained": pretrained, "dataset": "cityscapes"},
                    "epoch": 3}, path)
        loaded, meta = load_checkpoint(path)
        assert _same_weights(loaded, model) and meta.model_options == {**TINY, "imagenet_compatible": compat}
        assert meta.normalization == IMAGENET and meta.provenance == {"source": "ldnbench-train"}
        assert read_checkpoint(path).extra == {"epoch": 3}


def test_bare_state_dicts_need_a_name_and_classes_and_try_both_layouts(tmp_path):
    torch.manual_seed(0)
    for compat in (False, True):
        model = build_model(MODEL, 19, checkpointing="none", imagenet_compatible=compat, **TINY)
        torch.save(model.state_dict(), tmp_path / "bare.pt")
        with pytest.raises(UserError, match="does not say which model"):
            load_checkpoint(tmp_path / "bare.pt")
        with pytest.raises(UserError, match="--label-space"):
            load_checkpoint(tmp_path / "bare.pt", MODEL)
    # the TINY widths are not the zoo's: a bare file of them fits neither zoo layout
    with pytest.raises(UserError, match="does not fit model ldn121-64to4 with 19 classes"):
        load_checkpoint(tmp_path / "bare.pt", MODEL, "cityscapes19")
    model = build_model("lrn18-32to4", 3, checkpointing="none")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    loaded, meta = load_checkpoint(tmp_path / "wrapped.pt", "lrn18-32to4", num_classes=3)
    assert _same_weights(loaded, model) and meta.label_space is None and meta.provenance["source"] == "state-dict"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


def test_normalization_on_either_scale():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ref = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET.mean).view(3, 1, 1)) \
        / torch.tensor(IMAGENET.std).view(3, 1, 1)
    assert torch.equal(to_input(img)[0], ref)
    raw = Normalization((73.45286, 83.21195, 72.78044), (45.19961, 46.3659, 45.48506), 255.0)
    ref255 = (img.astype(np.float32) - np.array(raw.mean, np.float32)) / np.array(raw.std, np.float32)
    assert np.allclose(to_input(img, raw)[0].permute(1, 2, 0).numpy(), ref255, rtol=0, atol=1e-5)
    assert Normalization.from_dict(raw.to_dict()) == raw and Normalization.from_dict(None) == IMAGENET
    assert torch.equal(normalize(torch.from_numpy(img).permute(2, 0, 1)), ref)


def test_only_the_checkpoint_module_reads_checkpoints():
    """torch.load appears only where files are read: checkpoints (ldnbench's own), convert (foreign files) and
    the ImageNet backbone loader; nothing hangs checkpoint facts on models any more."""
    root = Path(ldnbench.__file__).parent
    readers, hung = set(), set()
    for f in root.rglob("*.py"):
        text = f.read_text()
        if "torch.load(" in text:
            readers.add(f.relative_to(root).as_posix())
        if re.search(r"\.(label_space_name|trained_on)\s*=", text) and "data" not in f.parts:
            hung.add(f.name)
    assert readers == {"checkpoints.py", "convert.py", "models/weights.py"}
    assert not hung


def test_commands_load_through_the_module(tmp_path, cli_runner, monkeypatch):
    """eval, flops and prune read a checkpoint once, through ldnbench.checkpoints."""
    import ldnbench.checkpoints as C
    from ldnbench.cli import main
    from ldnbench.data.synthetic import write_cityscapes

    rng = np.random.default_rng(0)
    for sid in ("frankfurt_000000_000294", "lindau_000001_000019"):
        ids = rng.choice([7, 8, 11, 21, 23, 26], size=(8, 12)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        write_cityscapes(tmp_path / "cs", "val", sid, rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), ids)
    torch.manual_seed(0)
    model = build_model(MODEL, 19, checkpointing="none", **TINY)
    ck = save_checkpoint(tmp_path / "ck.pt", model.state_dict(),
                         CheckpointMeta(MODEL, 19, "cityscapes19", dict(TINY), config={"dataset": "cityscapes"}))
    calls = []
    real = torch.load

    def spy(path, *a, **kw):
        import inspect

        calls.append((Path(path).name, inspect.stack()[1].frame.f_globals["__name__"], kw.get("weights_only")))
        return real(path, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root",
                                 str(tmp_path / "cs"), "--out", str(tmp_path / "ev.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert calls == [("ck.pt", "ldnbench.checkpoints", True)]
    rec = json.loads((tmp_path / "ev.json").read_text())
    assert rec["normalization"] == IMAGENET.to_dict() and rec["model_options"] == json.loads(json.dumps(TINY))

    calls.clear()
    r = cli_runner.invoke(main, ["flops", "--checkpoint", str(ck), "--height", "64", "--width", "64"])
    assert r.exit_code == 0 and "model: ldn121-64to4" in r.output and calls == [("ck.pt", "ldnbench.checkpoints", True)]
    c = ldnbench.models.model_complexity(MODEL, 64, 64, **TINY)
    assert f"params: {c.params_m:.3f} M" in r.output

    calls.clear()
    from ldnbench.studies.prune import PruneConfig, run_prune

    res = run_prune(PruneConfig(model=MODEL, checkpoint=str(ck), dataset="cityscapes", root=str(tmp_path / "cs"),
                                fractions=(0.0,), out=str(tmp_path / "prune")))
    assert calls == [("ck.pt", "ldnbench.checkpoints", True)]
    assert json.loads(res.record.read_text())["train_dataset"] == "cityscapes"
    assert C.load_checkpoint is load_checkpoint


def test_bench_speed_times_a_checkpoints_model(tmp_path, cli_runner):
    from ldnbench.cli import main

    torch.manual_seed(0)
    opts = {**TINY, "stem_pool": 2, "imagenet_compatible": True}
    model = build_model(MODEL, 7, checkpointing="none", **opts)
    ck = save_checkpoint(tmp_path / "ck.pt", model.state_dict(), CheckpointMeta(MODEL, 7, None, opts))
    r = cli_runner.invoke(main, ["bench", "speed", "--checkpoint", str(ck), "--size", "64x64", "--runs", "1",
                                 "--threads", "1", "--out", str(tmp_path / "rec.json")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["model"] == MODEL and rec["model_options"]["stem_pool"] == 2 and rec["config"]["num_classes"] == 7
    assert rec["config"]["checkpoint"] == str(ck)
    c = ldnbench.models.model_complexity(MODEL, 64, 64, num_classes=7, **opts)
    assert rec["rows"][0]["gmac"] == pytest.approx(c.gmac, abs=1e-3)
