"""`--resize`/`--eval-at`, `ldnbench predict` (formats, resume, round trip with `score`), per-image rows, gallery."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ldnbench.cli import main
from ldnbench.data.io import read_label, read_rgb
from ldnbench.data.registry import get_dataset
from ldnbench.data.resize import Resized, parse_resize, resize_image, resize_map, resized_size, width_for
from ldnbench.data.synthetic import write_cityscapes
from ldnbench.evaluate import PerImageMetrics, evaluate
from ldnbench.inference import predict, prepare_model
from ldnbench.metrics import SegMetrics
from ldnbench.data.transforms import to_input

MODEL = "ldn121-64to4"
TINY = {"growth_rate": 8, "block_config": (1, 1, 2, 1), "num_init_features": 16, "spp_bt": 16, "spp_level": 8,
        "spp_out": 16, "up_widths": (16, 16, 16, 16), "up_bottleneck": 8}
SIDS = ("frankfurt_000000_000294", "lindau_000001_000019", "munster_000002_000019")
H, W = 64, 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ldnbench.models import build_model

    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for sid in SIDS:
        ids = rng.choice([7, 8, 11, 21, 23, 26], size=(8, 12)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        inst = np.where(ids == 26, 26000 + (np.arange(W)[None] // 24), ids).astype(np.uint16)
        # a smooth image: the model's prediction is not noise, so the classes vary per image
        base = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [107, 142, 35], [70, 130, 180], [0, 0, 142]])
        image = base[np.searchsorted([7, 8, 11, 21, 23, 26], ids)].astype(np.uint8)
        write_cityscapes(tmp / "cs", "val", sid, image, ids, inst)
    torch.manual_seed(0)
    model = build_model(MODEL, 19, checkpointing="none", **TINY).eval()
    ck = tmp / "best.pt"
    torch.save({"model": model.state_dict(), "model_name": MODEL, "num_classes": 19, "label_space": "cityscapes19",
                "config": {"model_options": TINY, "pretrained": "none"}, "epoch": 3}, ck)
    return tmp, model, ck


def _ds(tmp):
    return get_dataset("cityscapes", tmp / "cs", "val")


# ------------------------------------------------------------------ the resize protocol
def test_resize_keeps_aspect_images_bilinear_labels_nearest(setup):
    tmp, _, _ = setup
    ds = _ds(tmp)
    s = ds[0]
    r = Resized(ds, 48)[0]
    assert resized_size(H, W, 48) == (32, 48) and r.image.shape == (32, 48, 3) and r.label.shape == (32, 48)
    # nearest: 8x8 blocks become exact 4x4 blocks, every value is an original one
    assert np.array_equal(r.label, s.label[::2, ::2]) and np.array_equal(r.instances, s.instances[::2, ::2])
    # antialiased bilinear averages each 2x2 cell (exact for the block image away from block borders)
    assert np.array_equal(r.image[1, 1], s.image[2:4, 2:4].mean((0, 1)).round().astype(np.uint8))
    # eval at original: image resized, labels untouched; load_target follows the same rule
    o = Resized(ds, 48, "original")[0]
    assert o.image.shape == (32, 48, 3) and np.array_equal(o.label, s.label)
    assert np.array_equal(Resized(ds, 48).load_target(0)[0], r.label)
    assert Resized(ds, 48).label_space is ds.label_space and Resized(ds, 48).files == ds.files


def test_parse_resize_per_dataset_and_bare():
    assert parse_resize(["1024"]) == {"*": 1024}
    spec = parse_resize(["vistas=2048", "cityscapes=1024"])
    assert spec == {"vistas": 2048, "cityscapes": 1024}
    assert width_for(spec, "vistas") == 2048 and width_for(spec, "kitti") is None
    assert width_for(parse_resize(["512", "vistas=2048"]), "kitti") == 512 and width_for(None, "x") is None
    from ldnbench.errors import UserError

    for bad in ("vistas=wide", "=12", "3"):
        with pytest.raises(UserError):
            parse_resize([bad])


def _manual(model, ds, width, eval_at):
    """The protocol written out: resized image; resized labels, or logits upsampled before the argmax."""
    net = prepare_model(model)
    m = SegMetrics(ds.label_space)
    for i in range(len(ds)):
        s = ds[i]
        x = to_input(resize_image(s.image, width))
        if eval_at == "resized":
            m.update(predict(net, x[0]), resize_map(s.label, width), resize_map(s.instances, width))
        else:
            with torch.inference_mode():  # channels-last input, as predict() feeds it: the same kernels
                logits = net(x.contiguous(memory_format=torch.channels_last))
            up = torch.nn.functional.interpolate(logits, size=s.label.shape, mode="bilinear", align_corners=False)
            m.update(up.argmax(1)[0].to(torch.uint8), s.label, s.instances)
    return m.compute()


@pytest.mark.parametrize("eval_at", ["resized", "original"])
def test_evaluate_resize_in_both_eval_at_modes(setup, eval_at):
    tmp, model, _ = setup
    ds = _ds(tmp)
    res = evaluate(model, ds, resize=48, eval_at=eval_at, progress=False)
    ref = _manual(model, ds, 48, eval_at)
    assert np.array_equal(res.metrics.confusion, ref.confusion) and res.metrics.iiou == pytest.approx(ref.iiou, nan_ok=True)
    assert res.settings.to_dict() == {"scales": (1.0,), "flip": False, "sliding": None, "precision": "fp32",
                                      "resize": 48, "eval_at": eval_at}
    px = res.metrics.confusion.sum()
    assert px == len(SIDS) * (32 * 48 if eval_at == "resized" else H * W)


def test_eval_at_resized_needs_resize(setup, cli_runner):
    tmp, _, ck = setup
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root", str(tmp / "cs"),
                                 "--eval-at", "resized", "--quiet", "--out", str(tmp / "x.json")])
    assert r.exit_code == 2 and "--eval-at resized needs --resize" in r.output


# ------------------------------------------------------------------ predict
def test_predict_every_format(setup, tmp_path):
    from ldnbench.predict import encode, run_predict, trainid_to_labelid

    tmp, model, ck = setup
    ds = _ds(tmp)
    space = ds.label_space
    net = prepare_model(model)
    expect = {s.id: predict(net, to_input(s.image)[0]).numpy() for s in (ds[i] for i in range(len(ds)))}
    for fmt in ("labelIds", "trainIds", "color", "overlay"):
        res = run_predict(ck, tmp_path / fmt, dataset="cityscapes", root=tmp / "cs", fmt=fmt, progress=False)
        assert sorted(p.name for p in res.written) == sorted(f"{sid}.png" for sid in SIDS) and not res.skipped
        for i, sid in enumerate(SIDS):
            path = tmp_path / fmt / f"{sid}.png"
            arr = np.asarray(Image.open(path))
            assert arr.shape[:2] == (H, W)  # the original resolution
            p = expect[sid]
            if fmt == "trainIds":
                assert np.array_equal(arr, p)
            elif fmt == "labelIds":
                assert np.array_equal(arr, trainid_to_labelid()[p])
                assert set(np.unique(arr)) <= {l for l in trainid_to_labelid()[:19]}
            elif fmt == "color":
                assert np.array_equal(arr, space.palette()[p])
            else:
                image = read_rgb(ds.files[[f.id for f in ds.files].index(sid)].image)
                assert np.array_equal(arr, ((image.astype(np.uint16) + space.palette()[p]) // 2).astype(np.uint8))
    # the label-id table inverts what `score` reads: road is 7, car 26
    assert trainid_to_labelid()[space.index("road")] == 7 and trainid_to_labelid()[space.index("car")] == 26
    assert np.array_equal(encode(np.array([[0, 255]]), space, "labelIds"), [[7, 0]])


@pytest.mark.parametrize("flags", [[], ["--resize", "48"], ["--resize", "40", "--flip", "--scales", "0.75,1"]])
def test_predict_then_score_equals_eval_exactly(setup, tmp_path, cli_runner, flags):
    tmp, _, ck = setup
    common = ["--checkpoint", str(ck), "--dataset", "cityscapes", "--root", str(tmp / "cs"), "--split", "val"]
    r = cli_runner.invoke(main, ["eval", *common, *flags, "--eval-at", "original", "--quiet",
                                 "--out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    r = cli_runner.invoke(main, ["predict", *common, *flags, "--format", "labelIds", "--quiet",
                                 "--out", str(tmp_path / "pred")])
    assert r.exit_code == 0, r.output
    r = cli_runner.invoke(main, ["score", "--dataset", "cityscapes", "--root", str(tmp / "cs"), "--pred",
                                 str(tmp_path / "pred"), "--json", str(tmp_path / "score.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "eval.json").read_text())
    sc = json.loads((tmp_path / "score.json").read_text())
    assert sc["pred_format"] == "labelIds"
    # every number, exactly; the confusion matrices differ only in layout (label-id predictions get
    # their own columns, e.g. caravan and trailer for the vehicle category), so compare them reduced
    numbers = [k for k in ev["metrics"] if k != "confusion"]
    assert {k: sc[k] for k in numbers} == {k: ev["metrics"][k] for k in numbers}
    k = len(np.asarray(ev["metrics"]["confusion"])) - 1
    assert np.array_equal(np.asarray(sc["confusion"])[:k, :k], np.asarray(ev["metrics"]["confusion"])[:k, :k])
    if flags:
        assert ev["eval_settings"]["resize"] == int(flags[1]) and ev["eval_settings"]["eval_at"] == "original"


def test_score_resize_scores_against_resized_labels(setup, tmp_path, cli_runner):
    tmp, model, _ = setup
    ds = _ds(tmp)
    res = evaluate(model, ds, resize=48, eval_at="resized", progress=False)
    net = prepare_model(model)
    for s in (ds[i] for i in range(len(ds))):  # predictions at the reduced resolution, as other tools write them
        Image.fromarray(predict(net, to_input(resize_image(s.image, 48))[0]).numpy()).save(tmp_path / f"{s.id}.png")
    args = ["score", "--dataset", "cityscapes", "--root", str(tmp / "cs"), "--pred", str(tmp_path), "--pred-format",
            "trainIds", "--quiet", "--json", str(tmp_path / "s.json")]
    r = cli_runner.invoke(main, args)
    assert r.exit_code == 1 and "resized" not in r.output and "ground truth is 96x64" in r.output
    r = cli_runner.invoke(main, [*args, "--resize", "48"])
    assert r.exit_code == 0, r.output
    sc = json.loads((tmp_path / "s.json").read_text())
    assert sc["miou"] == res.metrics.to_dict()["miou"] and sc["resize"] == 48


def test_predict_is_resumable_and_overwrite_redoes(setup, tmp_path, cli_runner):
    tmp, _, ck = setup
    args = ["predict", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root", str(tmp / "cs"),
            "--out", str(tmp_path / "p"), "--format", "trainIds", "--quiet"]
    r = cli_runner.invoke(main, args)
    assert r.exit_code == 0 and "3 prediction(s) written, 0 already there" in r.output, r.output
    victim = tmp_path / "p" / f"{SIDS[1]}.png"
    victim.unlink()
    keep = tmp_path / "p" / f"{SIDS[0]}.png"
    os.utime(keep, (1, 1))
    r = cli_runner.invoke(main, args)
    assert "1 prediction(s) written, 2 already there" in r.output and victim.is_file()
    assert keep.stat().st_mtime == 1  # an existing output is not touched
    r = cli_runner.invoke(main, [*args, "--overwrite"])
    assert "3 prediction(s) written, 0 already there" in r.output and keep.stat().st_mtime > 1
    assert not list((tmp_path / "p").glob(".*.tmp"))  # atomic writes leave no temp files


def test_predict_images_folder_keeps_relative_paths(setup, tmp_path, cli_runner):
    tmp, model, ck = setup
    src = tmp_path / "imgs"
    (src / "a" / "b").mkdir(parents=True)
    img = read_rgb(_ds(tmp).files[0].image)
    Image.fromarray(img).save(src / "top.png")
    Image.fromarray(img[:40, :70]).save(src / "a" / "b" / "x.jpg", quality=95)
    r = cli_runner.invoke(main, ["predict", "--checkpoint", str(ck), "--images", str(src), "--out",
                                 str(tmp_path / "o"), "--format", "color", "--quiet"])
    assert r.exit_code == 0, r.output
    assert read_rgb(tmp_path / "o" / "top.png").shape == (H, W, 3)
    assert read_rgb(tmp_path / "o" / "a" / "b" / "x.png").shape == (40, 70, 3)
    # labelIds for a dataset without Cityscapes label ids is refused in one line
    r = cli_runner.invoke(main, ["predict", "--checkpoint", str(ck), "--dataset", "vistas", "--out", str(tmp_path / "v"),
                                 "--format", "labelIds"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "trainIds" in r.output
    r = cli_runner.invoke(main, ["predict", "--checkpoint", str(ck), "--out", str(tmp_path / "v")])
    assert r.exit_code == 2 and "exactly one source" in r.output


# ------------------------------------------------------------------ per-image rows and the gallery
def test_eval_per_image_rows_csv_and_gallery(setup, tmp_path, cli_runner):
    tmp, model, ck = setup
    rec_path = tmp_path / "rec.json"
    common = ["--checkpoint", str(ck), "--dataset", "cityscapes", "--root", str(tmp / "cs")]
    r = cli_runner.invoke(main, ["eval", *common, "--per-image", "--quiet", "--out", str(rec_path)])
    assert r.exit_code == 0, r.output
    rec = json.loads(rec_path.read_text())
    rows = rec["per_image"]
    assert [row["id"] for row in rows] == sorted(SIDS)
    ds = _ds(tmp)
    for i, row in enumerate(rows):  # each row is the metric of that image alone
        one = evaluate(model, torch.utils.data.Subset(ds, [i]), progress=False).metrics
        assert row["miou"] == pytest.approx(one.miou, abs=0) and row["pixel_acc"] == one.pixel_acc
        assert row["class_iou"] == {c: v for c, v in one.class_iou.items() if not np.isnan(v)}
    csv = pd.read_csv(tmp_path / "rec.per_image.csv")
    assert list(csv["id"]) == sorted(SIDS) and list(csv.columns[:3]) == ["id", "miou", "pixel_acc"]
    assert "iou_road" in csv.columns and csv["miou"].tolist() == pytest.approx([row["miou"] for row in rows])

    r = cli_runner.invoke(main, ["predict", *common, "--format", "trainIds", "--out", str(tmp_path / "p"),
                                 "--gallery", str(rec_path), "--gallery-n", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    g = np.asarray(Image.open(tmp_path / "p" / "gallery.png"))
    assert g.ndim == 3 and g.shape[0] > 100 and g.shape[1] > 300
    # a record without rows is refused in one line
    plain = tmp_path / "plain.json"
    cli_runner.invoke(main, ["eval", *common, "--quiet", "--out", str(plain)])
    r = cli_runner.invoke(main, ["predict", *common, "--out", str(tmp_path / "p"), "--gallery", str(plain), "--quiet"])
    assert r.exit_code == 1 and "--per-image" in r.output


def test_gallery_picks_worst_then_best_once():
    from ldnbench.report.gallery import pick

    rows = [{"id": k, "miou": v} for k, v in (("a", 0.5), ("b", 0.1), ("c", None), ("d", 0.9), ("e", 0.3))]
    assert [(t, r["id"]) for t, r in pick(rows, 2)] == [("worst 1", "b"), ("worst 2", "e"), ("best 1", "d"),
                                                         ("best 2", "a")]
    assert [r["id"] for _, r in pick(rows[:2], 2)] == ["b", "a"]


def test_per_image_accumulator_plugs_into_the_loop(setup):
    tmp, model, _ = setup
    ds = _ds(tmp)
    acc = PerImageMetrics(ds.label_space)
    res = evaluate(model, ds, resize=48, eval_at="resized", accumulators=[acc], progress=False)
    rows = res.extra["per_image"]
    assert len(rows) == len(SIDS) and res.to_record()["per_image"] == json.loads(json.dumps(rows))
    # pixel accuracy over all images = pixel-weighted mean of the rows (same pixel count per image here)
    assert np.mean([r["pixel_acc"] for r in rows]) == pytest.approx(res.metrics.pixel_acc)


def test_prune_at_a_resize_protocol_is_the_resized_evaluation(setup, tmp_path):
    from ldnbench.studies.prune import PruneConfig, run_prune

    tmp, model, ck = setup
    res = run_prune(PruneConfig(model=MODEL, checkpoint=ck, dataset="cityscapes", root=tmp / "cs", fractions=(0.0, 1.0),
                                resize=48, eval_at="resized", out=tmp_path))
    rec = json.loads(res.record.read_text())
    assert rec["eval_settings"]["resize"] == 48 and rec["eval_settings"]["eval_at"] == "resized"
    ref = evaluate(model, _ds(tmp), resize=48, eval_at="resized", progress=False)
    assert res.curve[0]["miou"] == ref.metrics.miou


PREDICT_WORKER = """
import json, sys
from ldnbench.predict import run_predict
from ldnbench.runtime import get_rank
root, ck, out, log = sys.argv[1:5]
res = run_predict(ck, out, dataset="cityscapes", root=root, fmt="trainIds", progress=False)
open(f"{log}/rank{res.rank}.json", "w").write(json.dumps([p.name for p in res.written]))
"""


@pytest.mark.slow
def test_predict_under_torchrun_writes_each_image_once(setup, tmp_path):
    import subprocess
    import sys

    tmp, _, ck = setup
    script = tmp_path / "worker.py"
    script.write_text(PREDICT_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp / "cs"), str(ck), str(tmp_path / "out"), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    parts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(f"{s}.png" for s in SIDS) and parts[0] and parts[1]
    ds = _ds(tmp)
    net = prepare_model(setup[1])
    for i, f in enumerate(ds.files):  # the same pixels as a single process
        assert np.array_equal(read_label(tmp_path / "out" / f"{f.id}.png"), predict(net, to_input(ds[i].image)[0]).numpy())
