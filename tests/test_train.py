"""The trainer on a tiny Cityscapes-format tree with a small DenseNet ladder and 64 px crops."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from ldnbench.models.batchnorm import recompute_bn_stats
from ldnbench.train import EpochBatchSampler, TrainConfig, TrainingDiverged, train

TINY = dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2, spp_bt=32, spp_level=8,
            spp_out=32, up_widths=(16, 16, 16), up_bottleneck=16)
TINY_CLI = [arg for k, v in TINY.items()
            for arg in ("--model-option", f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}")]
MODEL = "ldn121-32to4"


def _scene(rng, h=72, w=96):
    """Sky over road with a car; Cityscapes labelIds (sky 23, road 7, car 26, unlabeled 0)."""
    ids = np.full((h, w), 23, np.uint8)
    horizon = rng.integers(h // 3, 2 * h // 3)
    ids[horizon:] = 7
    y, x = rng.integers(horizon - 6, h - 12), rng.integers(0, w - 24)
    ids[y:y + 12, x:x + 24] = 26
    ids[:2] = 0
    colour = {23: (70, 130, 180), 7: (128, 64, 128), 26: (0, 0, 142), 0: (0, 0, 0)}
    img = np.zeros((h, w, 3), np.float32)
    for k, c in colour.items():
        img[ids == k] = c
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), ids



@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    from ldnbench.data.synthetic import write_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for i in range(n):
            image, ids = _scene(rng)
            write_cityscapes(root, split, f"aachen_{i:06d}_000019", image, ids)
    return root


def _config(root, out, **kw):
    base = dict(model=MODEL, dataset="cityscapes", root=str(root), out=str(out), epochs=4, batch_size=4, crop=64,
                pretrained="none", workers=0, val_split=None, model_options=TINY, progress=False, save_every=100)
    base.update(kw)
    return TrainConfig(**base)


def _cli(*args, cwd=None, **popen):
    cmd = [sys.executable, "-m", "ldnbench", "train", "--model", MODEL, "--dataset", "cityscapes", "--crop", "64",
           "--pretrained", "none", "--workers", "0", "--no-progress", *TINY_CLI, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_loss_decreases_and_run_files_are_complete(cs_root, tmp_path):
    res = train(_config(cs_root, tmp_path / "run", epochs=8, save_every=3, lr=3e-3, val_split="val", val_every=4))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 8 and res.iterations == 16
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2])
    assert all(h["loss_aux"] is not None for h in res.history)
    # lr follows the cosine schedule per epoch
    lrs = [h["lr"] for h in res.history]
    assert lrs[0] == pytest.approx(3e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))

    ck = torch.load(res.last_checkpoint, weights_only=True)
    assert ck["model_name"] == MODEL and ck["num_classes"] == 19 and ck["label_space"] == "cityscapes19"
    assert ck["iteration"] == 16 and ck["epoch"] == 8 and ck["step"] == 0
    assert {"optimizer", "scheduler", "rng", "config"} <= set(ck)
    assert ck["optimizer"]["param_groups"][0]["amsgrad"] is True
    # BN statistics were recomputed: the stored model differs from the training-time statistics
    changed = [k for k, v in ck["train_bn"].items() if k.endswith("running_mean") and not torch.equal(v, ck["model"][k])]
    assert changed

    # validation at epoch 4 and at the end (after the BN recomputation); best.pt holds the better one
    assert [h["val"] is not None for h in res.history] == [False] * 3 + [True] + [False] * 4
    assert res.final_metrics["num_images"] == 2 and 0 <= res.final_metrics["miou"] <= 1
    best = torch.load(res.best_checkpoint, weights_only=True)
    assert best["metrics"]["miou"] == res.best_miou == max(res.final_metrics["miou"], res.history[3]["val"]["miou"])
    # the evaluator reads the trainer's checkpoints as they are
    from ldnbench.checkpoints import load_checkpoint
    from ldnbench.evaluate import evaluate
    from ldnbench.data.registry import get_dataset

    model, meta = load_checkpoint(res.last_checkpoint)
    space = meta.label_space
    assert space == "cityscapes19"
    again = evaluate(model, get_dataset("cityscapes", cs_root, "val"), progress=False).metrics.to_dict()
    assert again["miou"] == pytest.approx(res.final_metrics["miou"])

    rec = json.loads(res.record_path.read_text())
    assert rec["kind"] == "train" and rec["status"] == "finished" and rec["seed"] == 0
    assert rec["model"] == MODEL and rec["dataset"] == "cityscapes" and rec["config"]["batch_size"] == 4
    assert rec["metrics"]["miou"] == pytest.approx(res.final_metrics["miou"])
    assert [h["loss"] for h in rec["history"]] == pytest.approx(losses)
    assert rec["complexity"]["params"] == sum(v.numel() for k, v in ck["model"].items() if "running" not in k
                                              and "num_batches" not in k)


def test_backbone_gets_lr_div_only_when_pretrained(cs_root, tmp_path):
    from ldnbench.train import _param_groups
    from ldnbench.models import build_model

    model = build_model(MODEL, 19, **TINY)
    groups = _param_groups(model, _config(cs_root, tmp_path, pretrained="imagenet"))
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4), pytest.approx(4e-4)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["lr"] for g in _param_groups(model, _config(cs_root, tmp_path))] == [pytest.approx(4e-4)]


def test_presets():
    assert TrainConfig.preset("ldn121", "cityscapes").epochs == 300
    assert TrainConfig.preset("ldn121", "camvid").epochs == 400
    assert TrainConfig.preset("ldn121", "camvid", pretrained="none").epochs == 800
    voc = TrainConfig.preset("ldn121", "voc-aug", epochs=None, lr=1e-3)
    assert (voc.epochs, voc.backbone_lr_div, voc.lr) == (100, 8.0, 1e-3)
    assert TrainConfig.preset("ldn121", "cityscapes", epochs=2).epochs == 2


def test_sampler_slices_union_is_the_single_process_batch():
    one = list(EpochBatchSampler(10, 4, seed=3))
    two = [EpochBatchSampler(10, 4, seed=3, rank=r, world=2) for r in range(2)]
    assert len(one) == 3  # 10 samples -> 3 batches, the last filled by wrapping around
    for b, (a, c) in enumerate(zip(*two)):
        assert a + c == one[b]
    assert {i for batch in one for _, i in batch} == set(range(10))
    resumed = EpochBatchSampler(10, 4, seed=3)
    resumed.set_epoch(0, start=2)
    assert list(resumed) == one[2:]
    other_epoch = EpochBatchSampler(10, 4, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != one


def test_bn_recompute_sets_exact_statistics_over_all_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    batches = [torch.randn(n, 3, 8, 8) * 3 + 1 for n in (4, 4, 1)]  # uneven: a per-batch average would be off
    recompute_bn_stats(model, batches, torch.device("cpu"))
    pixels = torch.cat([b.permute(1, 0, 2, 3).reshape(3, -1) for b in batches], 1).double()
    torch.testing.assert_close(model[0].running_mean, pixels.mean(1).float())
    torch.testing.assert_close(model[0].running_var, pixels.var(1).float())
    # the second BN sees the train-mode (batch-normalised) activations of each batch
    with torch.no_grad():
        mid = []
        for b in batches:
            x = (b - b.mean((0, 2, 3), keepdim=True)) / (b.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
            mid.append(model[2](model[1](x)).permute(1, 0, 2, 3).reshape(4, -1))
    mid = torch.cat(mid, 1).double()
    torch.testing.assert_close(model[3].running_mean, mid.mean(1).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[3].running_var, mid.var(1).float(), rtol=1e-4, atol=1e-5)
    assert model.training


def test_nan_loss_stops_naming_the_iteration_and_keeps_last_good_checkpoint(cs_root, tmp_path):
    cfg = _config(cs_root, tmp_path / "nan", lr=1e30, save_every=1, recompute_bn=False)
    with pytest.raises(TrainingDiverged, match=r"at iteration (\d+)") as err:
        train(cfg)
    it = int(re.search(r"at iteration (\d+)", str(err.value)).group(1))
    assert it >= 2
    ck = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert ck["iteration"] == it - 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "nan" / "result.json").read_text())["status"] == "diverged"


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_identical_weights(cs_root, tmp_path):
    common = ["--root", cs_root, "--epochs", 2, "--batch-size", 2, "--save-every", 2]
    full = _cli(*common, "--out", tmp_path / "full")
    killed = _cli(*common, "--out", tmp_path / "cut")
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at = torch.load(last, weights_only=True)
    assert 0 < at["iteration"] < 8  # killed mid-run (8 iterations in total)
    # resume in this process (same single-thread numerics as the CLI runs, one interpreter start less)
    train(_config(cs_root, tmp_path / "cut", epochs=2, batch_size=2, save_every=2, val_split="val", resume=True))
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(last)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "full" / "result.json").read_text())
    rb = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    assert ra["metrics"]["num_images"] == 2 and ra["metrics"] == rb["metrics"]


@pytest.mark.slow
def test_ddp_two_gloo_processes_follow_the_single_process_loss_curve(cs_root, tmp_path):
    # 8 images, global batch 8: one iteration per epoch, so the per-epoch losses are the loss curve.
    common = ["--root", cs_root, "--epochs", 4, "--batch-size", 8, "--val-split", "none", "--device", "cpu",
              "--lr", 3e-3]
    double = _cli(*common, "--out", tmp_path / "two", "--nproc", 2)
    train(_config(cs_root, tmp_path / "one", epochs=4, batch_size=8, device="cpu", lr=3e-3))
    _, err = double.communicate(timeout=300)
    assert double.returncode == 0, err
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    la, lb = [h["loss"] for h in one["history"]], [h["loss"] for h in two["history"]]
    assert len(la) == len(lb) == 4
    # Same samples and crops per global batch and synchronised BatchNorm: the same curve up to float rounding.
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    assert la[-1] < 0.95 * la[0]  # the curve moves: a real comparison
    # ... and the same final weights, BatchNorm statistics recomputed across both processes included
    a, b = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-4, atol=1e-4)
    # the moving averages of training (checkpointed segments recomputed, each BN updated once per step)
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True)["train_bn"] for run in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args,code,message", [
    (["--dataset", "nosuchset"], 2, "unknown dataset 'nosuchset'"),
    (["--root", "/nonexistent/cs"], 1, "does not exist"),
    (["--no-pad", "--crop", "512"], 2, "larger than the training images"),
    (["--model", "ldn999"], 2, "unknown model 'ldn999'"),
    (["--amp", "fp16", "--device", "cpu"], 2, "fp16 mixed precision needs CUDA"),
    (["--resume"], 1, "no checkpoint"),
    (["--batch-size", "0"], 2, "--batch-size must be at least 1"),
    (["--nproc", "3"], 2, "batch size 16 is not divisible by the 3 processes"),
])
def test_bad_options_give_one_line_errors(cs_root, tmp_path, cli_runner, args, code, message):
    from ldnbench.cli import main

    base = ["train", "--model", MODEL, "--dataset", "cityscapes", "--root", str(cs_root), "--pretrained", "none",
            "--out", str(tmp_path / "bad"), "--workers", "0", *TINY_CLI]
    result = cli_runner.invoke(main, base + args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_existing_run_is_not_overwritten_without_resume(cs_root, tmp_path, cli_runner):
    from ldnbench.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"precious")
    args = ["train", "--model", MODEL, "--dataset", "cityscapes", "--root", str(cs_root), "--pretrained", "none",
            "--out", str(tmp_path / "run"), *TINY_CLI]
    result = cli_runner.invoke(main, args)
    assert result.exit_code == 2 and "pass --resume" in result.output
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"precious"


def test_sample_order_and_crops_do_not_depend_on_the_number_of_workers(cs_root, tmp_path):
    runs = [train(_config(cs_root, tmp_path / f"w{w}", epochs=1, batch_size=2, workers=w, recompute_bn=False))
            for w in (0, 2)]
    a, b = (_weights(r.last_checkpoint) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].history[0]["loss"] == runs[1].history[0]["loss"]


def test_bf16_autocast_on_cpu_trains(cs_root, tmp_path):
    res = train(_config(cs_root, tmp_path / "amp", epochs=1, amp="auto", recompute_bn=False))
    ck = torch.load(res.last_checkpoint, weights_only=True)
    assert ck["config"]["amp"] == "auto" and np.isfinite(res.history[0]["loss"])
    assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())  # weights stay fp32
    fp32 = train(_config(cs_root, tmp_path / "fp32", epochs=1, recompute_bn=False))
    # bf16 really ran (the loss differs in low bits) and is close to fp32
    assert res.history[0]["loss"] != fp32.history[0]["loss"]
    assert res.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=0.05)


def test_history_csv_and_curves_png_follow_the_run(cs_root, tmp_path):
    import pandas as pd

    out = tmp_path / "run"
    # 8 images / batch 4 = 2 iterations per epoch: max_iters=2 stops after epoch 1
    train(_config(cs_root, out, epochs=3, max_iters=2, val_split="val", val_every=1, recompute_bn=False))
    first = pd.read_csv(out / "history.csv")
    assert list(first["epoch"]) == [1] and (out / "curves.png").stat().st_size > 0
    res = train(_config(cs_root, out, epochs=3, val_split="val", val_every=1, recompute_bn=False, resume=True))
    h = pd.read_csv(out / "history.csv")
    assert list(h.columns) == ["epoch", "iterations", "loss", "loss_main", "loss_aux", "lr", "time_s", "images_per_s",
                               "val_miou"]
    assert list(h["epoch"]) == [1, 2, 3] and h["loss"].tolist() == pytest.approx([e["loss"] for e in res.history])
    assert h["lr"].tolist() == pytest.approx([e["lr"] for e in res.history])
    # epoch 1 ended the first (max_iters) run, so its number was the final one; epoch 2 validated during
    # training; the last epoch's number is the final validation
    assert h["val_miou"].notna().tolist() == [False, True, False]
    assert h["val_miou"][1] == pytest.approx(res.history[1]["val"]["miou"])
    from PIL import Image

    assert Image.open(out / "curves.png").size[0] > 500
    assert not list(out.glob(".*.tmp"))


def test_resize_trains_and_validates_on_resized_images(cs_root, tmp_path):
    from ldnbench.data.registry import get_dataset
    from ldnbench.checkpoints import load_checkpoint
    from ldnbench.evaluate import evaluate

    res = train(_config(cs_root, tmp_path / "r", epochs=1, resize=48, eval_at="resized", val_split="val"))
    rec = json.loads(res.record_path.read_text())
    assert rec["config"]["resize"] == 48 and rec["eval_settings"]["resize"] == 48
    assert rec["eval_settings"]["eval_at"] == "resized"
    # the final validation is `eval --resize 48 --eval-at resized` of the checkpoint, pixel for pixel
    model, _ = load_checkpoint(res.last_checkpoint)
    again = evaluate(model, get_dataset("cityscapes", cs_root, "val"), resize=48, eval_at="resized", progress=False)
    assert again.metrics.to_dict() == res.final_metrics
    assert int(again.metrics.confusion.sum()) == 2 * 36 * 48  # 96x72 -> 48x36 labels


def test_tensorboard_missing_is_one_sentence(cs_root, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tb(name, *a, **kw):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(UserError_, match=r"--tensorboard needs the tensorboard package: pip install"):
        train(_config(cs_root, tmp_path / "tb", epochs=1, tensorboard=True))
    assert not (tmp_path / "tb").exists()  # refused before anything was written


def test_tensorboard_writes_event_files(cs_root, tmp_path):
    pytest.importorskip("tensorboard")
    train(_config(cs_root, tmp_path / "tb", epochs=2, val_split="val", val_every=1, tensorboard=True))
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


from ldnbench.errors import UserError as UserError_  # noqa: E402
