"""Same numbers on every machine: fp32 by default on any device, one checkpoint -> one confusion matrix,
and the device/dtype paths that CUDA and DDP runs take, checked on CPU."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import ldnbench.runtime as runtime
from ldnbench.errors import UserError
from ldnbench.evaluate import evaluate
from ldnbench.models.batchnorm import convert_sync_batchnorm
from ldnbench.train import TrainConfig, train
from test_train import MODEL, TINY, TINY_CLI, _config, cs_root  # noqa: F401  (cs_root is a fixture)


@pytest.fixture
def bf16_native(monkeypatch):
    """Make this CPU (and any CUDA query) look bf16-native, as AVX512-BF16/AMX machines and Ampere GPUs are."""
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def _toy_dataset(n=2, h=24, w=32):
    from ldnbench.data.base import Sample
    from ldnbench.data.labels import LabelSpace

    space = LabelSpace("toy4", ("sky", "road", "car", "person"), ((0, 0, 0),) * 4)
    rng = np.random.default_rng(0)

    class Toy(torch.utils.data.Dataset):
        label_space = space

        def __len__(self):
            return n

        def __getitem__(self, i):
            return Sample(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), rng.integers(0, 4, (h, w)).astype(np.uint8),
                          f"s{i}")

    return Toy()


def test_defaults_stay_fp32_on_a_bf16_native_device(bf16_native, autocast_probe):
    from ldnbench.bench import SpeedConfig
    from ldnbench.evaluate import EvalSettings

    model = autocast_probe()
    res = evaluate(model, _toy_dataset(), progress=False, fast=False)
    assert res.settings.precision == "fp32" and model.seen == [False, False]
    assert res.to_record()["eval_settings"]["precision"] == "fp32"
    model.seen.clear()
    assert evaluate(model, _toy_dataset(), progress=False, fast=False, precision="bf16").settings.precision == "bf16"
    assert model.seen == [True, True]
    assert EvalSettings().precision == SpeedConfig().precision == "fp32"
    assert TrainConfig(model="ldn121", dataset="cityscapes").amp == "none"
    # "auto" depends on the device type, never on what the chip supports
    assert runtime.resolve_amp("auto", "cpu") == "bf16" and runtime.resolve_amp("auto", "cuda") == "fp16"
    with pytest.raises(UserError, match="fp16 inference needs CUDA"):
        runtime.check_precision("fp16", "cpu")


def test_trainer_validates_in_fp32_whatever_it_trains_in(cs_root, tmp_path, monkeypatch, bf16_native):
    import ldnbench.evaluate as E

    calls = []
    real = E.evaluate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("precision", "fp32"))
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "evaluate", spy)
    res = train(_config(cs_root, tmp_path / "bf16", epochs=1, amp="bf16", val_split="val", recompute_bn=False))
    rec = json.loads(res.record_path.read_text())
    assert calls == ["fp32"] and rec["train_precision"] == "bf16" and rec["eval_settings"]["precision"] == "fp32"


def test_one_checkpoint_one_number(cs_root, tmp_path, bf16_native, cli_runner):
    """Trainer validation, `eval` with default flags, evaluate(), a cross cell and prune at fraction 0
    give the same confusion matrix for one checkpoint, even where bf16 would be native."""
    from ldnbench.cli import main
    from ldnbench.data.registry import get_dataset
    from ldnbench.checkpoints import load_checkpoint
    from ldnbench.studies.cross import CrossConfig, run_cross
    from ldnbench.studies.prune import PruneConfig, run_prune

    res = train(_config(cs_root, tmp_path / "run", epochs=1, val_split="val"))
    trainer = res.final_metrics["confusion"]
    ck = res.last_checkpoint

    ds = get_dataset("cityscapes", cs_root, "val")
    model, meta = load_checkpoint(ck)
    direct = evaluate(model, ds, progress=False, normalization=meta.normalization).metrics.to_dict()["confusion"]

    record = tmp_path / "eval.json"
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root", str(cs_root),
                                 "--out", str(record), "--quiet"])
    assert r.exit_code == 0, r.output
    cli = json.loads(record.read_text())["metrics"]["confusion"]

    cross = run_cross(CrossConfig(train=["cityscapes"], eval=["cityscapes"], model=MODEL,
                                  roots={"cityscapes": str(cs_root)}, results=tmp_path / "results"),
                      train_fn=lambda cfg, train_set: res)
    cell = next(json.loads(p.read_text()) for p in (tmp_path / "results").rglob("cells/*/*.json"))
    assert cross.matrix.loc["cityscapes", "cityscapes"] == pytest.approx(100 * res.final_metrics["miou"])

    pruned = run_prune(PruneConfig(model=MODEL, checkpoint=ck, dataset="cityscapes", root=cs_root, fractions=(0.0,),
                                   out=tmp_path / "prune"))
    prune0 = pruned.curve[0]["confusion"]

    assert np.asarray(trainer).sum() > 0
    assert trainer == direct == cli == cell["metrics"]["confusion"] == prune0
    assert cell["eval_settings"]["precision"] == "fp32"
    assert json.loads(pruned.record.read_text())["eval_settings"]["precision"] == "fp32"


def test_sync_batchnorm_keeps_the_modules_device_and_dtype():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4))).double()
    with torch.no_grad():
        model[1].running_mean.uniform_()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    convert_sync_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 and all(type(m).__name__ == "SyncBatchNorm2d" for m in bns)
    assert all(p.dtype == torch.float64 for m in bns for p in (*m.parameters(), m.running_mean, m.running_var))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    meta = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, device="meta")))
    assert meta[0].weight.device.type == "meta"


def test_metrics_all_reduce_keeps_the_states_placement(tmp_path):
    """The all-reduce packs state of several dtypes into one tensor per kind and unpacks it in place."""
    import torch.distributed as dist

    from ldnbench.data.labels import LabelSpace
    from ldnbench.metrics import SegMetrics

    m = SegMetrics(LabelSpace("toy3", ("a", "b", "c"), ((0, 0, 0),) * 3))
    rng = np.random.default_rng(0)
    m.update(torch.as_tensor(rng.integers(0, 3, (16, 16)), dtype=torch.uint8),
             torch.as_tensor(rng.integers(0, 3, (16, 16)), dtype=torch.uint8))
    m.inst_tp, m.cat_tp = m.inst_tp.float(), m.cat_tp.float()  # state of another dtype than the defaults
    before = m.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m.all_reduce()
    finally:
        dist.destroy_process_group()
    after = m.compute()
    assert np.array_equal(after.confusion, before.confusion) and after.num_images == before.num_images == 1
    assert m.confusion.dtype == torch.int64 and m.confusion.device.type == "cpu"


@pytest.mark.slow
def test_ddp_with_aux_weight_zero_builds_no_aux_heads(cs_root, tmp_path):
    out = tmp_path / "noaux"
    cmd = [sys.executable, "-m", "ldnbench", "train", "--model", MODEL, "--dataset", "cityscapes", "--root",
           str(cs_root), "--crop", "64", "--pretrained", "none", "--workers", "0", "--no-progress", *TINY_CLI,
           "--epochs", "2", "--batch-size", "4", "--val-split", "none", "--aux-weight", "0", "--nproc", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["iteration"] == 4 and ck["config"]["model_options"]["aux"] is False
    assert not any("aux" in k for k in ck["model"])


def test_result_files_get_the_users_umask(tmp_path):
    from ldnbench.report.records import make_record, write_record

    old = os.umask(0o022)
    try:
        p = write_record(tmp_path / "a.json", make_record("eval"))
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        q = write_record(tmp_path / "b.json", make_record("eval"))
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_workers_default_to_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert runtime.default_workers() == 4
    assert TrainConfig(model="ldn121", dataset="cityscapes").workers is None


def test_a_crop_far_beyond_the_images_stops_before_the_first_batch(cs_root, tmp_path):
    with pytest.raises(UserError, match=r"crop 4096 .*images are 96x72 WxH, 192 px .* use --crop 192"):
        train(_config(cs_root, tmp_path / "huge", crop=4096))
    assert not (tmp_path / "huge" / "last.pt").exists()


def test_cuda_device_rules(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: {0: (7, 5), 1: (8, 0)}[i])
    assert not runtime.native_bf16("cuda:0") and runtime.native_bf16("cuda:1")  # capability of the device asked
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="under torchrun would put every process on one GPU"):
        runtime.resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        runtime.resolve_device("cuda")
