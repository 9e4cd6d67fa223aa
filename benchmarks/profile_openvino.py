"""Where a zoo model's time goes under OpenVINO: per-node time by op and kernel, convolutions by shape.

    python benchmarks/profile_openvino.py [--model ldn121] [--size 1024x2048] [--runs 3] [--threads 2] [--blocked]

Exports the model (random weights, RGB 0..255 in, logits out), compiles it exactly as the
``openvino`` backend does (``ldnbench.deploy``'s runner, fp32, latency hint, channels-last logits)
with the plugin's per-node counters on, and prints the last run's node times grouped by
(op type, kernel) and the slowest convolutions with their GFLOP/s (MACs from the ONNX weight and
output shapes). ``ref_*`` kernels are the plugin's generic implementations; a ``Reorder`` is a
layout conversion between nodes.

``--blocked`` is an experiment, not the backend: every convolution gets the plugin's
``primitives_priority`` ``cpu:jit_avx512_1x1,cpu:jit_avx512`` (written into the IR, the one way the
plugin reads it), so it runs oneDNN's blocked-layout (``aBcd16b``) kernels instead of its default
channels-last ``brgconv`` ones. In that layout a channel concatenation can be computed in place (its
inputs write straight into its output), which shows what DenseNet's concatenation copies cost
against the speed of the convolution kernels.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def conv_macs(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """ONNX Conv node name -> (weight shape, MACs), from shape inference."""
    import onnx
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(onnx.load(str(path))).graph
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in [*graph.value_info, *graph.output]}
    out = {}
    for n in graph.node:
        if n.op_type == "Conv" and n.input[1] in weights and n.output[0] in shapes:
            w = weights[n.input[1]]
            out[n.name] = (w, int(np.prod(shapes[n.output[0]]) * np.prod(w[1:])))
    return out


def blocked_ir(onnx_path: Path, out: Path) -> Path:
    """``onnx_path`` as OpenVINO IR ``out`` (.xml + .bin) whose convolutions ask for the blocked jit kernels."""
    import xml.etree.ElementTree as ET

    import openvino as ov

    ov.save_model(ov.Core().read_model(str(onnx_path)), str(out), compress_to_fp16=False)
    tree = ET.parse(out)
    for layer in tree.getroot().iter("layer"):
        if layer.get("type") == "Convolution":
            info = layer.find("rt_info")
            if info is None:
                info = ET.SubElement(layer, "rt_info")
            ET.SubElement(info, "attribute", name="primitives_priority", version="0",
                          value="cpu:jit_avx512_1x1,cpu:jit_avx512")
    tree.write(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ldn121")
    ap.add_argument("--size", default="1024x2048", help="HxW")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="convolutions to list")
    ap.add_argument("--blocked", action="store_true", help="force oneDNN's blocked-layout jit convolutions "
                    "(in-place concatenations; an experiment, see above)")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    import openvino as ov

    from ldnbench.deploy import _OpenVINORunner, export_onnx
    from ldnbench.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(args.model, 19).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, size=(h, w), input_dtype="float32")
        macs = conv_macs(path)
        compiled = blocked_ir(path, Path(tmp) / "model.xml") if args.blocked else path
        runner = _OpenVINORunner(compiled, args.threads, profiling=True)
        x = np.random.default_rng(0).uniform(0, 255, (1, 3, h, w)).astype(np.float32)
        runner.infer(x)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            runner.infer(x)
            times.append(time.perf_counter() - t0)
        # a biased Conv becomes "<name>/WithoutBiases" with the bias fused into it
        nodes = [(p.real_time.total_seconds() * 1e3, p.node_name.removesuffix("/WithoutBiases"), p.node_type, p.exec_type)
                 for p in runner.request.profiling_info]
    total = sum(t for t, *_ in nodes)
    by_kind: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for t, _, op, kernel in nodes:
        by_kind[op, kernel][0] += t
        by_kind[op, kernel][1] += 1
    layout = "blocked jit convolutions" if args.blocked else "default kernels"
    print(f"{args.model} at {h}x{w}, OpenVINO {ov.__version__}, {layout}, {args.threads} threads: median {1e3 * np.median(times):.1f} ms "
          f"over {args.runs} runs; node times of the last run sum to {total:.1f} ms")
    print(f"{'op':<16}{'kernel':<26}{'ms':>8}{'share':>8}{'nodes':>7}")
    for (op, kernel), (t, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        if t >= 0.05:
            print(f"{op:<16}{kernel:<26}{t:>8.1f}{100 * t / total:>7.1f}%{n:>7}")
    convs = sorted(((t, name) for t, name, op, _ in nodes if op == "Convolution" and name in macs), reverse=True)
    print(f"\n{'convolution (weight shape)':<32}{'ms':>8}{'GMAC':>8}{'GFLOP/s':>9}")
    for t, name in convs[: args.top]:
        wshape, m = macs[name]
        print(f"{'x'.join(map(str, wshape)):<32}{t:>8.1f}{m / 1e9:>8.2f}{2 * m / t / 1e6:>9.1f}")
    conv_t = sum(t for t, _ in convs)
    conv_m = sum(macs[name][1] for _, name in convs)
    print(f"all {len(convs)} convolutions: {conv_t:.1f} ms, {conv_m / 1e9:.1f} GMAC, {2 * conv_m / conv_t / 1e6:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
