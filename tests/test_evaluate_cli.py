"""`ldnbench eval` end to end with a real (randomly initialised) zoo model on a Cityscapes-layout tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldnbench.cli import main
from ldnbench.data.registry import get_dataset
from ldnbench.data.synthetic import write_cityscapes
from ldnbench.evaluate import evaluate
from ldnbench.inference import predict

MODEL = "ldn121-64to4"
# a narrow, shallow variant of the same architecture keeps the test fast
TINY = {"growth_rate": 8, "block_config": (1, 1, 2, 1), "num_init_features": 16, "spp_bt": 16, "spp_level": 8,
        "spp_out": 16, "up_widths": (16, 16, 16, 16), "up_bottleneck": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ldnbench.models import build_model

    tmp = tmp_path_factory.mktemp("evalcli")
    rng = np.random.default_rng(0)
    for sid in ("frankfurt_000000_000294", "lindau_000001_000019"):
        ids = rng.choice([7, 8, 11, 21, 23, 26], size=(8, 12)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        inst = np.where(ids == 26, 26000, ids).astype(np.uint16)
        image = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
        write_cityscapes(tmp / "cs", "val", sid, image, ids, inst)
    torch.manual_seed(0)
    model = build_model(MODEL, 19, checkpointing="none", **TINY).eval()
    ck = tmp / "best.pt"
    # the trainer's checkpoint layout: weights + what is needed to rebuild the model
    torch.save({"model": model.state_dict(), "model_name": MODEL, "num_classes": 19, "label_space": "cityscapes19",
                "config": {"model_options": TINY, "pretrained": "none"}, "epoch": 3}, ck)
    bare = tmp / "bare.pt"
    torch.save(model.state_dict(), bare)
    return tmp, model, ck, bare


def test_real_model_predicts_at_input_resolution(setup):
    _, model, _, _ = setup
    x = torch.randn(1, 3, 50, 70)
    assert predict(model, x).shape == (1, 50, 70)
    assert predict(model, x, scales=(0.75, 1.25), flip=True).shape == (1, 50, 70)


def test_cli_eval_prints_table_and_writes_record(setup, cli_runner):
    tmp, model, ck, _ = setup
    out = tmp / "results" / "eval.json"
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root",
                                 str(tmp / "cs"), "--split", "val", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "road" in r.output and "mean" in r.output and "vehicle" in r.output
    rec = json.loads(out.read_text())
    assert rec["kind"] == "eval" and rec["model"] == MODEL and rec["dataset"] == "cityscapes"
    assert rec["model_options"]["growth_rate"] == 8 and rec["checkpoint"] == str(ck)
    assert rec["metrics"]["num_images"] == 2 and rec["eval_settings"]["scales"] == [1.0]
    ref = evaluate(model, get_dataset("cityscapes", tmp / "cs", "val"), progress=False)
    assert rec["metrics"] == json.loads(json.dumps(ref.metrics.to_dict()))
    # the printed table shows percent with one decimal
    road = ref.metrics.class_iou["road"]
    assert f"{100 * road:.1f}" in r.output

    # multi-scale + flip, output into a folder
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(ck), "--dataset", "cityscapes",
                                 "--root", str(tmp / "cs"), "--scales", "0.75,1", "--flip", "--out",
                                 str(tmp / "results" / "dir"), "--quiet"])
    assert r.exit_code == 0, r.output
    [written] = list((tmp / "results" / "dir").glob("*.json"))
    assert json.loads(written.read_text())["eval_settings"] == {"scales": [0.75, 1.0], "flip": True,
                                                                "sliding": None, "precision": "fp32"}


def test_cli_eval_errors_are_one_line(setup, cli_runner):
    tmp, _, ck, bare = setup
    base = ["eval", "--dataset", "cityscapes", "--root", str(tmp / "cs")]
    cases = [
        (base + ["--checkpoint", str(tmp / "missing.pt")], "does not exist"),
        (base + ["--checkpoint", str(bare)], "--model"),
        (base + ["--checkpoint", str(bare), "--model", MODEL], "does not fit model ldn121-64to4"),
        (base + ["--checkpoint", str(ck), "--model", "ldn121-32to4"], "ldn121-64to4"),
        (base + ["--checkpoint", str(ck), "--scales", "1,x"], "comma-separated"),
        (base + ["--checkpoint", str(ck), "--device", "cuda"], "CUDA is not available"),
    ]
    if torch.cuda.is_available():
        cases.pop()
    for args, fragment in cases:
        r = cli_runner.invoke(main, args)
        assert r.exit_code != 0 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
        assert fragment in r.output, r.output


def test_bare_state_dict_of_an_imagenet_finetuned_model_loads(tmp_path):
    """The paper's layout is tried first; the ImageNet-compatible layout is the fallback."""
    from ldnbench.checkpoints import load_checkpoint
    from ldnbench.models import build_model

    for compat in (True,):
        model = build_model(MODEL, 19, imagenet_compatible=compat, checkpointing="none")
        torch.save(model.state_dict(), tmp_path / "bare.pt")
        loaded, meta = load_checkpoint(tmp_path / "bare.pt", MODEL, "cityscapes19")
        space, options = meta.label_space, meta.model_options
        assert space == "cityscapes19" and not loaded.training and options == {"imagenet_compatible": True}
        key = next(iter(model.state_dict()))
        assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
