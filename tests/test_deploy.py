"""ONNX export, the onnxruntime/openvino backends in eval, predict and bench speed (ldnbench.deploy)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from ldnbench import deploy  # noqa: E402
from ldnbench.cli import main  # noqa: E402
from ldnbench.data.registry import get_dataset  # noqa: E402
from ldnbench.data.synthetic import write_cityscapes  # noqa: E402
from ldnbench.data.transforms import normalize  # noqa: E402
from ldnbench.errors import UserError  # noqa: E402
from ldnbench.evaluate import evaluate  # noqa: E402
from ldnbench.inference import predict  # noqa: E402

MODEL = "ldn121-64to4"
TINY = {"growth_rate": 8, "block_config": (1, 1, 2, 1), "num_init_features": 16, "spp_bt": 16, "spp_level": 8,
        "spp_out": 16, "up_widths": (16, 16, 16, 16), "up_bottleneck": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A narrow LDN121 64→4 with non-trivial BN statistics, its trainer checkpoint and a Cityscapes tree."""
    from ldnbench.models import build_model

    tmp = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = build_model(MODEL, 19, checkpointing="none", **TINY)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    ck = tmp / "best.pt"
    torch.save({"model": model.state_dict(), "model_name": MODEL, "num_classes": 19, "label_space": "cityscapes19",
                "config": {"model_options": TINY, "pretrained": "none"}, "epoch": 3}, ck)
    rng = np.random.default_rng(0)
    for sid in ("frankfurt_000000_000294", "lindau_000001_000019"):
        ids = rng.choice([7, 8, 11, 21, 23, 26], size=(8, 12)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        inst = np.where(ids == 26, 26000, ids).astype(np.uint16)
        write_cityscapes(tmp / "cs", "val", sid, rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), ids, inst)
    return tmp, model, ck


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_is_self_contained_and_verified(tiny, tmp_path):
    _, model, _ = tiny
    out = tmp_path / "m.onnx"
    res = deploy.export_onnx(model, out, size=(64, 128))
    onnx.checker.check_model(str(out))
    assert res.size == (64, 128) and len(res.parity) == 1 and res.parity[0].agreement >= 0.999
    assert "label agreement" in res.summary() and "max |dlogit|" in res.summary()
    s = _session(out)
    [inp], [outp] = s.get_inputs(), s.get_outputs()
    assert inp.type == "tensor(uint8)" and inp.shape == [1, 3, 64, 128] and outp.shape == [1, 19, 64, 128]
    # deployment needs nothing from ldnbench: raw RGB in, the logits of normalise -> model out
    raw = torch.randint(0, 256, (1, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    got = torch.from_numpy(s.run(None, {inp.name: raw.numpy()})[0])
    with torch.inference_mode():
        ref = model(normalize(raw))
    assert (got - ref).abs().max() < 1e-3 * max(1.0, ref.abs().max().item())
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def test_float_input_and_another_normalisation_are_inside_the_graph(tiny, tmp_path):
    _, model, _ = tiny
    norm = deploy.Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    out = tmp_path / "f.onnx"
    deploy.export_onnx(model, out, size=(64, 64), normalization=norm, input_dtype="float32")
    s = _session(out)
    raw = torch.rand(1, 3, 64, 64) * 255
    got = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: raw.numpy()})[0])
    with torch.inference_mode():
        ref = model((raw / 255 - 0.5) / 0.25)
    assert s.get_inputs()[0].type == "tensor(float)"
    assert (got - ref).abs().max() < 1e-3 * max(1.0, ref.abs().max().item())


class _Conv(torch.nn.Module):
    """A fully convolutional model of the zoo contract, with no size-dependent ops."""

    name, num_classes = "conv", 5

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_dynamic_export_runs_at_other_sizes_and_ldn_says_why_not(tiny, tmp_path):
    torch.manual_seed(0)
    res = deploy.export_onnx(_Conv().eval(), tmp_path / "d.onnx", size=(160, 192), dynamic=True)
    assert res.size is None and len(res.parity) == 2 and res.parity[0].size != res.parity[1].size
    s = _session(tmp_path / "d.onnx")
    assert isinstance(s.get_inputs()[0].shape[2], str)  # symbolic height
    assert s.run(None, {s.get_inputs()[0].name: np.zeros((2, 3, 150, 170), np.uint8)})[0].shape == (2, 5, 150, 170)
    _, model, _ = tiny
    with pytest.raises(UserError, match="cannot be exported with dynamic height/width.*fixed --height/--width") as e:
        deploy.export_onnx(model, tmp_path / "x.onnx", size=(192, 256), dynamic=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.onnx").exists()


def test_unsupported_operator_is_named(tmp_path):
    class Cummax(_Conv):
        def forward(self, x):
            return torch.cummax(self.conv(x), 1)[0]

    with pytest.raises(UserError, match=r"conv cannot be exported to ONNX: .*aten\.cummax"):
        deploy.export_onnx(Cummax().eval(), tmp_path / "c.onnx", size=(16, 16))
    assert not (tmp_path / "c.onnx").exists()


def test_cli_onnx_exports_and_stops_on_disagreement(tiny, tmp_path, cli_runner, monkeypatch):
    _, _, ck = tiny
    out = tmp_path / "cli.onnx"
    r = cli_runner.invoke(main, ["onnx", "--checkpoint", str(ck), "--out", str(out), "--height", "64", "--width", "96"])
    assert r.exit_code == 0, r.output
    agreement = float(re.search(r"label agreement ([\d.]+) %", r.output).group(1))
    assert out.is_file() and agreement >= 99.9 and "max |dlogit|" in r.output  # rounding differs by ISA, labels not
    # a graph that disagrees with PyTorch (here: PyTorch's reference negated) is not written
    real = deploy._reference_logits
    monkeypatch.setattr(deploy, "_reference_logits", lambda m, x: -real(m, x))
    bad = tmp_path / "bad.onnx"
    r = cli_runner.invoke(main, ["onnx", "--checkpoint", str(ck), "--out", str(bad), "--height", "64", "--width", "96"])
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert "disagrees with PyTorch" in r.output and not bad.exists()
    assert (tmp_path / "bad.onnx.rejected.onnx").is_file()


def test_eval_backend_onnxruntime_matches_torch(tiny, cli_runner):
    tmp, model, ck = tiny
    ds = get_dataset("cityscapes", tmp / "cs", "val")
    ref = evaluate(model, ds, progress=False)
    got = evaluate(deploy.deployed_model(model, "onnxruntime"), ds, progress=False, fast=False)
    # same argmax on >= 99.9 % of pixels is the contract; on this fixture every pixel agrees
    n = ref.metrics.confusion.sum()
    assert np.abs(got.metrics.confusion - ref.metrics.confusion).sum() / 2 <= 1e-3 * n
    out = tmp / "results" / "ort.json"
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root",
                                 str(tmp / "cs"), "--backend", "onnxruntime", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["backend"] == "onnxruntime" and rec["backend_version"] == f"onnxruntime {ort.__version__}"
    assert rec["metrics"]["num_images"] == 2
    assert abs(rec["metrics"]["miou"] - ref.metrics.miou) <= 1e-3
    r = cli_runner.invoke(main, ["eval", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root",
                                 str(tmp / "cs"), "--backend", "onnxruntime", "--precision", "bf16", "--quiet"])
    assert r.exit_code == 2 and "fp32 graphs only" in r.output


def test_predict_backend_onnxruntime_writes_the_torch_labels(tiny, tmp_path, cli_runner):
    from PIL import Image

    tmp, _, ck = tiny
    common = ["predict", "--checkpoint", str(ck), "--dataset", "cityscapes", "--root", str(tmp / "cs"), "--quiet",
              "--format", "trainIds"]
    for backend in ("torch", "onnxruntime"):
        r = cli_runner.invoke(main, [*common, "--backend", backend, "--out", str(tmp_path / backend)])
        assert r.exit_code == 0, r.output
    pngs = sorted((tmp_path / "torch").glob("*.png"))
    assert len(pngs) == 2
    for p in pngs:
        a = np.asarray(Image.open(p))
        b = np.asarray(Image.open(tmp_path / "onnxruntime" / p.name))
        assert a.shape == b.shape == (64, 96) and (a == b).mean() >= 0.999
    r = cli_runner.invoke(main, [*common, "--backend", "onnxruntime", "--precision", "bf16", "--out",
                                 str(tmp_path / "bf16")])
    assert r.exit_code == 2 and "fp32 graphs only" in r.output and not (tmp_path / "bf16").exists()


def test_deployed_model_is_a_zoo_model_for_predict(tiny):
    _, model, _ = tiny
    net = deploy.DeployedModel(model, "onnxruntime")
    x = normalize(torch.randint(0, 256, (1, 3, 50, 70), dtype=torch.uint8))
    for kwargs in ({}, {"scales": (0.75, 1.0), "flip": True}):
        a, b = predict(net, x, **kwargs), predict(model, x, **kwargs)
        assert a.shape == b.shape == (1, 50, 70) and (a == b).float().mean() >= 0.999
    assert len(net._runners) == 2  # one graph per input shape: 50x70 and the 0.75 scale's
    with pytest.raises(ValueError, match="eval mode only"):
        net.train()


def test_openvino_backend_is_fp32_and_agrees(tiny):
    pytest.importorskip("openvino")
    _, model, _ = tiny
    net = deploy.DeployedModel(model, "openvino")
    x = normalize(torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    with torch.inference_mode():
        ref = model(x)
    got = net(x)
    # bf16 (OpenVINO's default on CPUs that have it) would be ~1e-2 off; fp32 is ~1e-6
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-3 * max(1.0, ref.abs().max().item())
    assert net.version.startswith("openvino ")
    # logits come out channels-last (no full-resolution reorder), as an N×C×H×W view
    arr = deploy.to_raw(x, deploy.IMAGENET).numpy()
    view = net.runner(arr.shape).infer(arr)
    assert view.shape == tuple(ref.shape) and view.strides[1] == view.itemsize
    assert np.array_equal(net.runner(arr.shape)(arr), view)


def test_tensorrt_path_exists_and_fails_clearly(tiny, tmp_path):
    with pytest.raises(UserError, match="needs --device cuda"):
        deploy.check_backend("tensorrt", "cpu")
    _, model, _ = tiny
    deploy.export_onnx(_Conv().eval(), tmp_path / "t.onnx", size=(16, 16))
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserError, match="no TensorrtExecutionProvider.*untested"):
            deploy.make_runner("tensorrt", tmp_path / "t.onnx", device="cuda")
    with pytest.raises(UserError, match="unknown backend 'tvm'"):
        deploy.resolve_backends("torch,tvm")


def test_bench_speed_times_two_backends_in_one_run(tmp_path, cli_runner):
    from ldnbench import bench as B

    cfg = B.SpeedConfig(model=MODEL, size=(64, 128), runs=2, warmup=1, model_options=TINY,
                        backends=("torch", "onnxruntime"), threads=1)
    res = B.bench_speed(cfg)
    assert [(r.model, r.backend) for r in res.rows] == [(MODEL, "torch"), (MODEL, "onnxruntime")]
    ort_row = res.rows[1]
    assert ort_row.backend_version == f"onnxruntime {ort.__version__}" and len(ort_row.latencies_ms) == 2
    assert ort_row.gmac == res.rows[0].gmac and ort_row.gflops_per_s > 0 and ort_row.cpu_ms_median > 0
    table = B.format_speed_table(res)
    assert "onnxruntime" in table and "backend" in table.splitlines()[0]
    rec = B.speed_record(res)
    assert [r["backend"] for r in rec["rows"]] == ["torch", "onnxruntime"]
    r = cli_runner.invoke(main, ["bench", "speed", "--size", "32", "--backend", "torch,nope"])
    assert r.exit_code == 2 and "unknown backend 'nope'" in r.output


def test_speed_table_prints_the_gflops_ratio_of_the_best_backend():
    from ldnbench import bench as B

    def row(model, backend, gfs):
        return B.SpeedRow(model, "8x8", 1, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, gfs, 1.0, backend=backend)

    res = B.SpeedResult(B.SpeedConfig(), [row("ldn", "torch", 200.0), row("ldn", "openvino", 300.0),
                                          row("dlv3", "torch", 400.0), row("dlv3", "openvino", 500.0)])
    assert B.gflops_ratio_lines(res) == ["ldn [openvino] reaches 75% of dlv3's GFLOP/s in torch, "
                                         "60% of its best [openvino]",
                                         "ldn against dlv3 on the same backend: torch 50%, openvino 60%"]
    for r in res.rows[:2]:  # ldn computes 90 % of its counted MACs: the line on computed MACs
        r.gmac_executed = 0.9
    assert B.gflops_ratio_lines(res)[1] == ("ldn computes 0.9 of its 1.0 GMAC (average pools before the 1x1 convs "
                                            "they follow); on the MACs computed it reaches 54% of dlv3's best")


def test_runner_reuses_its_output_buffer_but_calls_return_copies(tmp_path):
    torch.manual_seed(0)
    deploy.export_onnx(_Conv().eval(), tmp_path / "s.onnx", size=(16, 16), input_dtype="float32")
    r = deploy.make_runner("onnxruntime", tmp_path / "s.onnx", threads=1)
    a, b = np.zeros((1, 3, 16, 16), np.float32), np.full((1, 3, 16, 16), 255, np.float32)
    ya, yb = r(a), r(b)
    assert not np.shares_memory(ya, yb) and not np.allclose(ya, yb)
    assert r.infer(a) is r.infer(b)  # the zero-copy call bench speed times
    np.testing.assert_allclose(r.infer(a), ya, rtol=0, atol=0)


def test_profile_probe_cuts_only_the_bn_relu_that_reads_a_concat(tmp_path, benchmark_script):
    """benchmarks/profile_onnx.py --probe: the cost probe bypasses BN+ReLU after Concat, nothing else."""
    from onnx import TensorProto, helper, numpy_helper

    prof = benchmark_script("profile_onnx")
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w", (4, 8, 1, 1)), ("w0", (4, 4, 1, 1))]]
    for stem, c in (("a", 4), ("b", 8)):
        inits += [numpy_helper.from_array(np.full(c, v, np.float32), f"{stem}{k}")
                  for k, v in (("s", 2.0), ("t", -1.0), ("m", 0.0), ("v", 1.0))]
    bn = lambda stem, i, o: helper.make_node("BatchNormalization", [i, f"{stem}s", f"{stem}t", f"{stem}m", f"{stem}v"], [o])  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"]), bn("a", "c0", "n0"), helper.make_node("Relu", ["n0"], ["r0"]),
             helper.make_node("Concat", ["x", "r0"], ["cat"], axis=1), bn("b", "cat", "n1"),
             helper.make_node("Relu", ["n1"], ["r1"]), helper.make_node("Conv", ["r1", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    assert prof._without_bn_after_concat(tmp_path / "g.onnx", tmp_path / "cut.onnx") == 1
    cut = onnx.load(tmp_path / "cut.onnx")
    assert [n.op_type for n in cut.graph.node] == ["Conv", "BatchNormalization", "Relu", "Concat", "Conv"]
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "cut.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    r0 = np.maximum(2 * np.einsum("oi,nihw->nohw", numpy_helper.to_array(inits[1])[:, :, 0, 0], x) - 1, 0)
    want = np.einsum("oi,nihw->nohw", numpy_helper.to_array(inits[0])[:, :, 0, 0], np.concatenate([x, r0], 1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_profile_openvino_counts_conv_macs_and_reads_the_plugin_counters(tmp_path, benchmark_script):
    """benchmarks/profile_openvino.py: MACs per Conv node from the graph; the runner's counters name those nodes."""
    pytest.importorskip("openvino")
    prof = benchmark_script("profile_openvino")
    torch.manual_seed(0)
    deploy.export_onnx(_Conv().eval(), tmp_path / "c.onnx", size=(16, 24), input_dtype="float32")
    macs = prof.conv_macs(tmp_path / "c.onnx")
    assert list(macs.values()) == [((5, 3, 3, 3), 16 * 24 * 5 * 3 * 9)]
    r = deploy._OpenVINORunner(tmp_path / "c.onnx", 1, profiling=True)
    r.infer(np.zeros((1, 3, 16, 24), np.float32))
    convs = [p.node_name for p in r.request.profiling_info if p.node_type == "Convolution"]
    assert convs == [f"{name}/WithoutBiases" for name in macs]  # the name the script strips


class _ConcatNet(torch.nn.Module):
    """Two convolutions whose outputs are concatenated and read by a third: a dense block in miniature."""

    name, num_classes = "concat", 4

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 16, 1)
        self.c = torch.nn.Conv2d(32, 4, 1)

    def forward(self, x):
        a = self.a(x)
        return self.c(torch.cat([a, self.b(torch.relu(a))], 1))


def test_profile_openvino_blocked_ir_asks_every_convolution_for_blocked_kernels(tmp_path, benchmark_script):
    """``--blocked``: the IR names the kernels on every Convolution, OpenVINO reads it, the logits stay."""
    ov = pytest.importorskip("openvino")
    prof = benchmark_script("profile_openvino")
    torch.manual_seed(0)
    deploy.export_onnx(_ConcatNet().eval(), tmp_path / "c.onnx", size=(16, 24), input_dtype="float32")
    ir = prof.blocked_ir(tmp_path / "c.onnx", tmp_path / "c.xml")
    convs = [op for op in ov.Core().read_model(str(ir)).get_ordered_ops() if op.get_type_name() == "Convolution"]
    assert len(convs) == 3
    # the IR reader makes it the plugin's attribute (keyed with its version), not a string it would ignore
    assert all(any(k.startswith("primitives_priority") for k in op.get_rt_info().keys()) for op in convs)
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 16, 24)).astype(np.float32)
    want = deploy._OpenVINORunner(tmp_path / "c.onnx", 1)(x)
    np.testing.assert_allclose(deploy._OpenVINORunner(ir, 1)(x), want, rtol=1e-4, atol=1e-4)
