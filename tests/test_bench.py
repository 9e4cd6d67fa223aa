"""ldnbench bench memory / bench speed: tiny sizes only; no timed assertions (see benchmarks/)."""

import json
import os

import pytest
import torch

from ldnbench import bench as B
from ldnbench.cli import main
from ldnbench.errors import UserError



def test_help(cli_runner):
    for args in (["bench", "--help"], ["bench", "memory", "--help"], ["bench", "speed", "--help"]):
        r = cli_runner.invoke(main, args)
        assert r.exit_code == 0, r.output
    r = cli_runner.invoke(main, ["bench", "memory", "--help"])
    for opt in ("--crop", "--batch-size", "--policies", "--find-max-batch", "--json", "--device"):
        assert opt in r.output
    r = cli_runner.invoke(main, ["bench", "speed", "--help"])
    for opt in ("--size", "--compare", "--precision", "--channels-last", "--runs", "--warmup"):
        assert opt in r.output


def test_unknown_compare_model_is_one_clear_line_before_any_work(cli_runner, tmp_path):
    with cli_runner.isolated_filesystem(temp_dir=tmp_path):
        r = cli_runner.invoke(main, ["bench", "speed", "--compare", "deeplabv3_resnet50,deeplab_v9", "--runs", "1"])
        assert r.exit_code == 2
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: unknown --compare model 'deeplab_v9'")
        for name in B.COMPARE_MODELS:
            assert name in lines[0]
        assert not os.path.exists("results")  # nothing ran, nothing written
    assert "Traceback" not in r.output


def test_bad_names_and_sizes():
    with pytest.raises(UserError) as e:
        B.resolve_policies("none,cat-1x2")
    assert e.value.exit_code == 2 and "'cat-1x2'" in str(e.value) and "cat-1x1-3x3+stem+td+up" in str(e.value)
    assert B.resolve_policies("all") == list(B.POLICIES)
    assert B.parse_size("1024x2048") == (1024, 2048) and B.parse_size("768") == (768, 768)
    with pytest.raises(UserError):
        B.parse_size("1024by2048")
    with pytest.raises(UserError) as e:
        B.check_device("tpu")
    assert e.value.exit_code == 2
    # --down/--up pick the d→u variant of the named model (paper Table 11 trains LDN121 32→4)
    assert B.resolve_bench_model("ldn121", down=32) == "ldn121-32to4"
    assert B.resolve_bench_model("ldn121-32to4") == "ldn121-32to4"
    with pytest.raises(UserError):
        B.resolve_bench_model("ldn121", down=32, up=3)


def test_policy_names_match_the_model_zoo():
    from ldnbench.models.checkpointing import POLICIES

    assert tuple(POLICIES) == B.POLICIES


def test_cpu_peak_meter_sees_a_freed_spike_and_resets():
    import mmap

    meter = B.PeakMemory("cpu")
    meter.start()
    # an anonymous mapping, so that the spike does not depend on how malloc is tuned in this process
    spike = mmap.mmap(-1, 64 * 2**20)
    spike.write(b"x" * len(spike))  # every page touched
    spike.close()
    assert meter.method in ("rss-hwm", "ru_maxrss")
    assert meter.peak_mb() >= 60
    if meter.method == "rss-hwm":  # the high-water mark can be reset: a new window starts near 0
        meter.start()
        assert meter.peak_mb() < 30


@pytest.mark.slow
def test_memory_every_policy_in_its_own_process(cli_runner, tmp_path):
    out, rec_path = tmp_path / "rows.json", tmp_path / "rec.json"
    r = cli_runner.invoke(main, ["bench", "memory", "--model", "ldn121", "--crop", "64", "--batch-size", "2",
                                 "--steps", "1", "--warmup", "0", "--threads", "1", "--find-max-batch",
                                 "--json", str(out),
                                 "--out", str(rec_path)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [row["policy"] for row in rows] == list(B.POLICIES)
    for row in rows:
        assert list(row) == list(B.MEMORY_JSON_KEYS)  # stable schema, exactly these keys
        assert row["peak_mb"] > 0 and row["images_per_s"] > 0
        assert row["max_batch"] is None  # never searched on CPU ...
    rec = json.loads(rec_path.read_text())
    assert rec["kind"] == "bench-memory" and rec["model"] == "ldn121-64to4"
    pids = {row["pid"] for row in rec["rows"]}
    assert len(pids) == len(B.POLICIES) and os.getpid() not in pids  # one fresh process per policy
    for row in rec["rows"]:
        assert {"model", "policy", "size", "batch_size", "peak_mb", "images_per_s", "max_batch"} <= set(row)
        assert row["method"] == "rss-hwm" and row["error"] is None
        assert "CPU" in row["max_batch_note"]  # ... and the record says why
    for policy in B.POLICIES:
        assert policy in r.output


def test_memory_worker_failure_is_reported_not_raised():
    cfg = B.MemoryConfig(model="ldn121-64to4", crop=64, batch_size=1, steps=1, warmup=0, num_classes=0, threads=1)
    row = B.run_policy_subprocess(cfg, "none")
    assert row.peak_mb is None and row.error and row.error.startswith("worker failed")


def test_speed_rows_and_json_schema(cli_runner, tmp_path):
    out, rec_path = tmp_path / "rows.json", tmp_path / "rec.json"
    r = cli_runner.invoke(main, ["bench", "speed", "--model", "ldn121", "--size", "64x96", "--runs", "2",
                                 "--threads", "1",
                                 "--compare", "tv-lraspp-mobilenet-v3-large", "--json", str(out),
                                 "--out", str(rec_path)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [row["model"] for row in rows] == ["ldn121-64to4", "tv-lraspp-mobilenet-v3-large"]
    for row in rows:
        assert list(row) == list(B.SPEED_JSON_KEYS)
        assert row["size"] == "64x96" and row["batch_size"] == 1
        assert row["latency_ms_median"] > 0 and row["latency_ms_iqr"] >= 0 and row["fps"] > 0
        assert row["gmac"] > 0
        # achieved GFLOP/s = 2 x MACs / median latency (2 decimals of rounding)
        assert row["gflops_per_s"] == pytest.approx(2 * row["gmac"] / (row["latency_ms_median"] / 1000), rel=0.02,
                                                    abs=0.002)
    assert rows[0]["relative_latency"] == 1.0
    rec = json.loads(rec_path.read_text())
    assert rec["kind"] == "bench-speed" and len(rec["rows"]) == 2 and len(rec["rows"][0]["latencies_ms"]) == 2
    assert all(row["cpu_ms_median"] > 0 and row["folded_bn"] > 0 for row in rec["rows"])  # BN folded by default
    assert "speedup_vs_tv-lraspp-mobilenet-v3-large" in rec["metrics"]
    ldn, peer = rec["rows"]  # LDN's transitions pool before their 1x1 convs; the peer has nothing to move
    assert ldn["gmac_executed"] < ldn["gmac"] and peer["gmac_executed"] == peer["gmac"]
    assert "on the MACs computed it reaches" in r.output
    # the fused kernel: used on AVX-512 builds (and then named in the header), never the peer's (no clamps)
    assert peer["fused_clamp_conv"] == 0 and (ldn["fused_clamp_conv"] > 0) == ("C kernel: ldn121-64to4 71x" in r.output)


def test_speed_no_fused_kernel_runs_the_unfused_ops(cli_runner, tmp_path):
    rec_path = tmp_path / "rec.json"
    r = cli_runner.invoke(main, ["bench", "speed", "--model", "ldn121", "--size", "64x96", "--runs", "1",
                                 "--threads", "1", "--no-fused-kernel", "--out", str(rec_path)])
    assert r.exit_code == 0, r.output
    rec = json.loads(rec_path.read_text())
    assert rec["rows"][0]["fused_clamp_conv"] == 0 and rec["rows"][0]["kernel"] == ""
    assert rec["config"]["fused_kernel"] is False and "C kernel" not in r.output



def test_fold_batchnorm_keeps_outputs_and_folds_only_conv_fed_bns():
    from torch import nn

    from ldnbench.inference import fold_batchnorm
    from ldnbench.models import build_model
    from ldnbench.models.densenet import DenseLayer
    from ldnbench.models.layers import TransitionUp

    torch.manual_seed(0)
    model = build_model("ldn121-64to4", 19)
    for m in model.modules():  # non-trivial statistics, so that a wrong fold shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded, n = fold_batchnorm(model, torch.randn(1, 3, 128, 128))
    # Foldable: the BN after each unit's 1x1 bottleneck, and the BN of each TU blend after its 1x1.
    # Pre-activation BNs reading concatenations, sums or pooled tensors must stay.
    expected = sum(isinstance(m, DenseLayer) and m.has_bottleneck for m in model.modules()) + \
        sum(isinstance(m, TransitionUp) and m.bt is not None for m in model.modules())
    assert n == expected > 50
    assert all(isinstance(m.norm1, nn.BatchNorm2d) for m in folded.modules()
               if isinstance(m, DenseLayer) and m.has_bottleneck)
    x = torch.randn(1, 3, 96, 160)  # another size than the probe
    with torch.inference_mode():
        ref, got = model(x), folded(x)
    assert torch.allclose(ref, got, atol=1e-3 * ref.abs().max().item())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # the original is untouched


def test_fold_preactivation_turns_bn_relu_1x1_into_a_clamp_and_keeps_outputs():
    from torch import nn

    from ldnbench.inference import ClampChannels, fold_batchnorm, fold_preactivation
    from ldnbench.models import build_model
    from ldnbench.models.densenet import DenseLayer, Transition

    def randomize(model):  # mixed-sign and zero BN scales: both clamp directions and the constant channel
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(-1.5, 1.5)
                m.weight.data[0] = 0.0
                m.bias.data.uniform_(-0.5, 0.5)
        return model.eval()

    torch.manual_seed(0)
    model = randomize(build_model("ldn121-64to4", 19))
    x = torch.randn(1, 3, 96, 160)
    base, _ = fold_batchnorm(model, torch.randn(1, 3, 128, 128))
    folded, n = fold_preactivation(base, torch.randn(1, 3, 128, 128))
    dense = [m for m in folded.modules() if isinstance(m, DenseLayer)]
    n_1x1 = sum(m.has_bottleneck for m in dense) + sum(isinstance(m, Transition) for m in folded.modules())
    assert n >= n_1x1 > 50
    assert all(isinstance(m.norm1, ClampChannels) and isinstance(m.relu1, nn.Identity) for m in dense if m.has_bottleneck)
    assert all(isinstance(m.norm2, (nn.BatchNorm2d, nn.Identity)) for m in dense)  # before a padded 3x3: never
    with torch.inference_mode():
        ref, got = model(x), folded(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert not any(isinstance(m, ClampChannels) for m in base.modules())  # its input is untouched

    # a padded 3x3 after BN-ReLU is not folded; a triple registered in order but run otherwise is refused
    seq = randomize(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)))
    assert fold_preactivation(seq, torch.randn(1, 4, 8, 8)) == (seq, 0)

    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.relu, self.conv = nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)

        def forward(self, t):
            return self.relu(self.conv(self.norm(t)))

    odd = randomize(Shuffled())
    with pytest.warns(RuntimeWarning, match="kept them apart"):
        assert fold_preactivation(odd, torch.randn(1, 4, 8, 8)) == (odd, 0)


def test_pool_before_pointwise_moves_transition_pools_first_and_keeps_outputs():
    from torch import nn

    from ldnbench.inference import pool_before_pointwise, prepare_model
    from ldnbench.models import build_model, count_macs
    from ldnbench.models.densenet import Transition

    torch.manual_seed(0)
    model = build_model("ldn121-64to4", 19).eval()
    for m in model.modules():  # non-trivial statistics and biases, so that the bias is moved too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.bias.data.uniform_(-0.5, 0.5)
    net = prepare_model(model, channels_last=False)
    transitions = [m for m in net.modules() if isinstance(m, Transition) and hasattr(m, "pool")]
    assert len(transitions) == 3
    for t in transitions:  # pool right before the conv; the state-dict names are unchanged
        names = list(t._modules)
        assert names.index("pool") + 1 == names.index("conv")
    unfused = dict(channels_last=False, fused_kernel=False)  # fusion renames what it fuses
    assert set(prepare_model(model, **unfused).state_dict()) == set(prepare_model(model, pool_first=False, **unfused).state_dict())
    x = torch.randn(1, 3, 96, 160)
    with torch.inference_mode():
        ref, got = model(x), net(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    executed = count_macs(net, 256, 512).gmac
    assert executed < count_macs(model, 256, 512).gmac * 0.96

    # not swapped: a 3x3 conv, an overlapping pool, a pool with padding, a custom forward
    for seq in (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(2)),
                nn.Sequential(nn.Conv2d(2, 2, 1), nn.AvgPool2d(3, 2)),
                nn.Sequential(nn.Conv2d(2, 2, 1), nn.AvgPool2d(2, 2, padding=1))):
        assert pool_before_pointwise(seq)[1] == 0

    class Custom(nn.Sequential):
        def forward(self, t):
            return self[1](self[0](t)) * 2

    assert pool_before_pointwise(Custom(nn.Conv2d(2, 2, 1), nn.AvgPool2d(2)))[1] == 0
    odd = nn.Sequential(nn.Conv2d(2, 3, 1), nn.AvgPool2d(2), nn.ReLU())
    y = torch.randn(1, 2, 7, 9)  # odd sizes: floor mode drops the same row and column either way
    want = odd(y)
    assert pool_before_pointwise(odd)[1] == 1 and isinstance(odd[0], nn.AvgPool2d)
    torch.testing.assert_close(odd(y), want)


def test_memory_channels_last_option_trains_in_that_layout():
    cfg = B.MemoryConfig(model="ldn121-64to4", crop=64, batch_size=1, steps=1, warmup=0, threads=1)
    assert cfg.channels_last  # the default
    x, _ = B._train_batch(cfg, 1, "cpu")
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert B._train_batch(B.MemoryConfig(channels_last=False, crop=64), 1, "cpu")[0].is_contiguous()
    row = B.run_policy_subprocess(cfg, "cat-1x1-3x3+stem+td+up")
    assert row.error is None and row.peak_mb > 0 and row.images_per_s > 0


def test_time_calls_interleaves_rounds_and_reverses_every_other():
    log = []
    calls = [lambda k=k: log.append(k) for k in "abc"]
    out = B.time_calls(calls, runs=3, warmup=2, device="cpu", interleave=True, settle_s=0)
    assert "".join(log) == "abc" + "cba" + "abc" + "cba" + "abc"  # two warm-up rounds, then three timed
    assert [len(t) for t, _ in out] == [3, 3, 3] and all(len(c) == 3 for _, c in out)
    log.clear()
    out = B.time_calls(calls, runs=2, warmup=1, device="cpu", interleave=False)
    assert "".join(log) == "aaabbbccc" and [len(t) for t, _ in out] == [2, 2, 2]


def test_speed_sequential_gives_the_same_rows_as_interleaved(cli_runner, tmp_path):
    rows = {}
    for mode in ("--interleave", "--sequential"):
        out = tmp_path / f"{mode}.json"
        r = cli_runner.invoke(main, ["bench", "speed", "--model", "ldn121", "--size", "64x96", "--runs", "2",
                                     "--threads", "1", "--compare", "tv-lraspp-mobilenet-v3-large", mode,
                                     "--out", str(out)])
        assert r.exit_code == 0, r.output
        rows[mode] = json.loads(out.read_text())["rows"]
        assert (mode == "--interleave") == ("interleaved" in r.output)
    for a, b in zip(rows["--interleave"], rows["--sequential"]):
        assert (a["model"], a["backend"], a["gmac"], a["folded_bn"]) == (b["model"], b["backend"], b["gmac"], b["folded_bn"])
        assert len(a["latencies_ms"]) == len(b["latencies_ms"]) == 2
