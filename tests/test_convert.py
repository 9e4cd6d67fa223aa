"""`ldnbench convert` and the torchvision peers: source layouts written out here with the real models' shapes
(random weights), the mapping tables key by key, refusals, and `eval` of a converted checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldnbench.checkpoints import load_checkpoint, read_checkpoint
from ldnbench.cli import main
from ldnbench.convert import RULES, map_key
from ldnbench.data.transforms import IMAGENET, Normalization
from ldnbench.errors import UserError

#: The reference code's Cityscapes statistics (RGB, 0-255), as its data reader states them.
LDN_MEAN, LDN_STD = (73.45286, 83.21195, 72.78044), (45.19961, 46.3659, 45.48506)


def ldn_reference_layout(depth: int = 121, classes: int = 19, aux: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference code's ``--pretrained=1`` model (models/ldn_semseg.py, layers.py):
    torchvision DenseNet under ``features.``, pool ``D`` inside block 3, SPP 512, TUs 256/256/128/128."""
    growth, blocks, init = {121: (32, (6, 12, 24, 16), 64), 161: (48, (6, 12, 36, 24), 96),
                            169: (32, (6, 12, 32, 32), 64)}[depth]
    layout: dict[str, tuple[int, ...]] = {}

    def bn(p, c):
        layout.update({f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,),
                       f"{p}.num_batches_tracked": ()})

    def brc(p, cin, cout, k=1, bias=False):  # _BNReluConv: norm, relu, conv
        bn(f"{p}.norm", cin)
        layout[f"{p}.conv.weight"] = (cout, cin, k, k)
        if bias:
            layout[f"{p}.conv.bias"] = (cout,)

    layout["features.conv0.weight"] = (init, 3, 7, 7)
    bn("features.norm0", init)
    c, skips = init, []
    for b, n in enumerate(blocks, 1):
        for i in range(n):
            p = f"features.denseblock{b}.denselayer{i + 1}"
            bn(f"{p}.norm1", c + i * growth)
            layout[f"{p}.conv1.weight"] = (4 * growth, c + i * growth, 1, 1)
            bn(f"{p}.norm2", 4 * growth)
            layout[f"{p}.conv2.weight"] = (growth, 4 * growth, 3, 3)
        if b == 3:  # the split: the concatenation before the pooling is a skip
            skips.append(c + (n // 2) * growth)
        c += n * growth
        if b < 4:
            skips.append(c)
            brc(f"features.transition{b}", c, c // 2)
            c //= 2
    brc("spp.spp.spp_bn", c, 512)
    for i in range(4):
        brc(f"spp.spp.spp{i}", 512, 128)
    brc("spp.spp.spp_fuse", 512 + 4 * 128, 512)
    cin = 512
    for i, width in enumerate((256, 256, 128, 128)):
        p = f"upsample_layers.upsample_{i}"
        brc(f"{p}.bottleneck", skips[-1 - i], cin)
        if cin != width:
            brc(f"{p}.skip_bt", cin, width)
        if aux:
            brc(f"{p}.aux_logits", cin, classes, bias=True)
        if cin > 128:
            brc(f"{p}.blend_bt", cin, 128)
        brc(f"{p}.blend_conv", min(cin, 128), width, k=3)
        cin = width
    brc("logits", cin, classes, bias=True)
    return layout


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("norm.weight", "norm0.weight", "norm1.weight", "norm2.weight")):
            out[k] = torch.rand(shape, generator=g) * 0.5 + 0.75
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            out[k] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5 * (1 if len(shape) > 1 else 0.1)
    return out


#: Source key -> ldnbench key, written out by hand for every kind of key of the reference layout.
EXPECTED_LDN = {
    "features.conv0.weight": "backbone.conv0.weight",
    "features.norm0.running_var": "backbone.norm0.running_var",
    "features.denseblock1.denselayer1.norm1.weight": "backbone.denseblock1.denselayer1.norm1.weight",
    "features.denseblock3.denselayer24.conv2.weight": "backbone.denseblock3.denselayer24.conv2.weight",
    "features.denseblock2.denselayer3.norm.1.weight": "backbone.denseblock2.denselayer3.norm1.weight",
    "features.denseblock4.denselayer16.conv.2.weight": "backbone.denseblock4.denselayer16.conv2.weight",
    "features.transition2.norm.num_batches_tracked": "backbone.transition2.norm.num_batches_tracked",
    "features.transition3.conv.weight": "backbone.transition3.conv.weight",
    "spp.spp.spp_bn.norm.weight": "context.bt.norm.weight",
    "spp.spp.spp_bn.conv.weight": "context.bt.conv.weight",
    "spp.spp.spp0.norm.bias": "context.levels.0.norm.bias",
    "spp.spp.spp3.conv.weight": "context.levels.3.conv.weight",
    "spp.spp.spp_fuse.conv.weight": "context.fuse.conv.weight",
    "upsample_layers.upsample_0.bottleneck.conv.weight": "ups.0.proj.conv.weight",
    "upsample_layers.upsample_1.blend_bt.norm.running_mean": "ups.1.bt.norm.running_mean",
    "upsample_layers.upsample_2.blend_conv.conv.weight": "ups.2.blend.conv.weight",
    "upsample_layers.upsample_0.skip_bt.conv.weight": "ups.0.skip_bt.conv.weight",
    "upsample_layers.upsample_3.aux_logits.conv.bias": "aux_heads.3.conv.bias",
    "upsample_layers.upsample_3.aux_logits.norm.weight": "aux_heads.3.norm.weight",
    "logits.norm.weight": "logits.norm.weight",
    "logits.conv.bias": "logits.conv.bias",
    "module.logits.conv.weight": "logits.conv.weight",
    "classifier.weight": None,
    "features.norm5.weight": "backbone.norm5.weight",  # mapped by name, then reported: the model has no norm5
}

EXPECTED_TV = {
    "backbone.conv1.weight": "backbone.conv1.weight",
    "backbone.layer4.2.bn3.running_var": "backbone.layer4.2.bn3.running_var",
    "classifier.0.convs.0.0.weight": "classifier.0.convs.0.0.weight",
    "classifier.4.bias": "classifier.4.bias",
    "aux_classifier.4.weight": "aux_classifier.4.weight",
    "module.classifier.cbr.0.weight": "classifier.cbr.0.weight",
    "features.0.weight": None,
}


def test_mapping_tables_key_by_key():
    assert set(RULES) == {"ldn", "torchvision"}
    for source, expected in (("ldn", EXPECTED_LDN), ("torchvision", EXPECTED_TV)):
        for key, dst in expected.items():
            assert map_key(source, key) == dst, key


@pytest.mark.parametrize("depth,aux,n_keys", [(121, True, 869), (121, False, 841), (169, True, 1157), (161, True, 1109)])
def test_reference_layout_converts_completely(tmp_path, depth, aux, n_keys):
    from ldnbench.convert import convert

    layout = ldn_reference_layout(depth, aux=aux)
    assert len(layout) == n_keys
    state = random_state(layout)
    torch.save(state, tmp_path / "ref.pt")
    report = convert(tmp_path / "ref.pt", tmp_path / "out.pt", "ldn")
    assert report.fits and len(report.mapped) == n_keys and report.model_name == f"ldn{depth}-64to4"
    assert report.model_options == {"imagenet_compatible": True, "stem_pool": 2, "spp_out": 512, "aux": aux}
    model, meta = load_checkpoint(tmp_path / "out.pt")
    own = model.state_dict()
    for key, value in state.items():  # every tensor landed where the table says, unchanged
        assert torch.equal(own[map_key("ldn", key)], value), key
    assert meta.label_space == "cityscapes19" and meta.normalization == Normalization(LDN_MEAN, LDN_STD, 255.0)
    assert meta.provenance["source"] == "converted-ldn" and len(meta.provenance["sha256"]) == 64
    assert bool(model.aux_heads) == aux and model.backbone.pool0.kernel_size == 2


def test_convert_cli_then_eval_with_no_extra_flag(tmp_path, cli_runner):
    from ldnbench.data.registry import get_dataset
    from ldnbench.data.synthetic import write_cityscapes
    from ldnbench.evaluate import evaluate

    rng = np.random.default_rng(0)
    for sid in ("frankfurt_000000_000294", "lindau_000001_000019"):
        ids = rng.choice([7, 8, 11, 21, 23, 26], size=(8, 16)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        write_cityscapes(tmp_path / "cs", "val", sid, rng.integers(0, 255, (64, 128, 3), dtype=np.uint8), ids)
    torch.save({"state_dict": random_state(ldn_reference_layout())}, tmp_path / "ldn121_weights.pt")
    r = cli_runner.invoke(main, ["convert", str(tmp_path / "ldn121_weights.pt"), str(tmp_path / "conv.pt"),
                                 "--from", "ldn"])
    assert r.exit_code == 0, r.output
    for line in ("keys mapped: 869", "keys unmapped: 0", "keys of the wrong shape: 0", "model keys missing: 0",
                 "model: ldn121-64to4"):
        assert line in r.output
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(tmp_path / "conv.pt"), "--dataset", "cityscapes",
                                 "--root", str(tmp_path / "cs"), "--out", str(tmp_path / "ev.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "ev.json").read_text())
    assert rec["model"] == "ldn121-64to4" and rec["normalization"] == {"mean": list(LDN_MEAN), "std": list(LDN_STD),
                                                                       "max_value": 255.0}
    assert rec["provenance"]["source"] == "converted-ldn" and rec["model_options"]["stem_pool"] == 2
    model, _ = load_checkpoint(tmp_path / "conv.pt")
    ds = get_dataset("cityscapes", tmp_path / "cs", "val")
    ref = evaluate(model, ds, progress=False, normalization=Normalization(LDN_MEAN, LDN_STD, 255.0))
    assert rec["metrics"] == json.loads(json.dumps(ref.metrics.to_dict()))
    r = cli_runner.invoke(main, ["flops", "--checkpoint", str(tmp_path / "conv.pt"), "--height", "64", "--width", "128"])
    assert r.exit_code == 0 and f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M" in r.output


def test_misfit_files_are_refused_in_one_sentence(tmp_path, cli_runner):
    import torchvision

    layout = ldn_reference_layout()
    state = random_state(layout)
    state["spp.spp.spp1.conv.weight"] = torch.zeros(64, 512, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    torch.save(random_state(layout), tmp_path / "ldn.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = [
        (["bad.pt", "--from", "ldn"], "does not fit ldn121-64to4 as a --from ldn checkpoint: 1 keys of the wrong shape "
                                      "(first: spp.spp.spp1.conv.weight"),
        (["ldn.pt", "--from", "ldn", "--model", "ldn169"], "does not fit ldn169-64to4"),
        (["tv.pt", "--from", "ldn"], "not an LDN reference checkpoint"),
        (["ldn.pt", "--from", "torchvision"], "not a torchvision segmentation state dict"),
        (["tv.pt", "--from", "torchvision", "--model", "tv-deeplabv3-mobilenet-v3-large"], "not a "
                                                                                          "tv-deeplabv3-mobilenet"),
        (["ldn.pt", "--from", "ldn", "--label-space", "voc21"], "label space voc21 has 21"),
        (["list.pt", "--from", "ldn"], "does not hold a state dict"),
        (["missing.pt", "--from", "ldn"], "does not exist"),
    ]
    for args, fragment in cases:
        r = cli_runner.invoke(main, ["convert", str(tmp_path / args[0]), str(tmp_path / "out.pt"), *args[1:]])
        assert r.exit_code != 0 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
        assert fragment in r.output, r.output
        assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("builder,name,aux", [("lraspp_mobilenet_v3_large", "tv-lraspp-mobilenet-v3-large", False),
                                              ("deeplabv3_resnet50", "tv-deeplabv3-resnet50", True)])
def test_torchvision_state_dicts_convert_and_give_torchvision_logits(tmp_path, builder, name, aux):
    import torchvision

    from ldnbench.convert import convert

    torch.manual_seed(0)
    kw = {"aux_loss": True} if aux else {}
    net = getattr(torchvision.models.segmentation, builder)(weights=None, weights_backbone=None, num_classes=21,
                                                            **kw).eval()
    torch.save(net.state_dict(), tmp_path / "tv.pt")
    report = convert(tmp_path / "tv.pt", tmp_path / "out.pt", "torchvision")
    assert report.fits and report.model_name == name and len(report.mapped) == len(net.state_dict())
    model, meta = load_checkpoint(tmp_path / "out.pt")
    assert meta.label_space == "voc21" and meta.normalization == IMAGENET and meta.model_name == name
    assert list(model.state_dict()) == list(net.state_dict())  # torchvision's keys, kept
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x)["out"], rtol=0, atol=1e-5)
    assert read_checkpoint(tmp_path / "out.pt").meta.provenance["source"] == "converted-torchvision"


def test_peers_follow_the_model_contract_and_train(tmp_path):
    from ldnbench.data.synthetic import write_cityscapes
    from ldnbench.losses import SegLoss
    from ldnbench.models import PEERS, build_model
    from ldnbench.train import TrainConfig, train

    model = build_model("tv-deeplabv3-mobilenet-v3-large", 5, checkpointing="none")
    assert model.name == "tv-deeplabv3-mobilenet-v3-large" and model.num_classes == 5
    ids = {id(p) for p in model.backbone_parameters()}
    assert ids.isdisjoint(id(p) for p in model.head_parameters())
    assert len(ids) + len(model.head_parameters()) == len(list(model.parameters()))
    x = torch.randn(2, 3, 50, 70)
    model.train()
    logits, aux = model(x)
    assert logits.shape == (2, 5, 50, 70) and [(a.shape, f) for a, f in aux] == [((2, 5, 50, 70), 1)]
    loss, parts = SegLoss(5)((logits, aux), torch.randint(0, 5, (2, 50, 70)))
    assert torch.isfinite(loss) and parts["aux"] is not None
    assert build_model("tv-fcn-resnet50", 3, aux=False).aux_heads == []
    import torchvision

    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), tmp_path / "mnv3.pt")
    peer = build_model("tv-lraspp-mobilenet-v3-large", 3, pretrained=str(tmp_path / "mnv3.pt"))
    r = peer.pretrained_report  # ImageNet-format backbone file: every backbone tensor loads, the classifier is dropped
    assert r.loaded == len(peer.backbone.state_dict()) and not (r.missing or r.unexpected or r.mismatched)
    with pytest.raises(UserError, match="no auxiliary head"):
        build_model("tv-lraspp-mobilenet-v3-large", 3, aux=True)
    assert set(PEERS) == {"tv-deeplabv3-resnet50", "tv-deeplabv3-resnet101", "tv-deeplabv3-mobilenet-v3-large",
                          "tv-fcn-resnet50", "tv-fcn-resnet101", "tv-lraspp-mobilenet-v3-large"}

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            ids_ = rng.choice([7, 23, 26], size=(8, 12)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
            write_cityscapes(tmp_path / "cs", split, f"aachen_{i:06d}_000019",
                             rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), ids_)
    res = train(TrainConfig(model="tv-lraspp-mobilenet-v3-large", dataset="cityscapes", root=str(tmp_path / "cs"),
                            out=str(tmp_path / "run"), epochs=1, batch_size=2, crop=64, pretrained="none", workers=0,
                            progress=False))
    loaded, meta = load_checkpoint(res.last_checkpoint)
    assert meta.model_name == "tv-lraspp-mobilenet-v3-large" and meta.label_space == "cityscapes19"
    assert meta.provenance["source"] == "ldnbench-train" and 0 <= res.final_metrics["miou"] <= 1


def test_peer_eval_records_become_leaderboard_rows(tmp_path):
    from ldnbench.report.records import make_record, write_record
    from ldnbench.report.tables import export

    metrics = {"miou": 0.5, "pixel_accuracy": 0.8, "num_images": 3, "class_iou": {}}
    for model in ("ldn121-64to4", "tv-deeplabv3-resnet50"):
        write_record(tmp_path / "results" / f"{model}.json",
                     make_record("eval", model=model, dataset="cityscapes", split="val", metrics=metrics,
                                 eval_settings={"scales": [1.0], "flip": False, "sliding": None, "precision": "fp32"}))
    res = export(tmp_path / "results", tmp_path / "lb", "csv", with_paper=False, figures=False)
    text = "".join(f.read_text() for f in res.files if str(f).endswith(".csv"))
    assert "tv-deeplabv3-resnet50" in text and "ldn121-64to4" in text
