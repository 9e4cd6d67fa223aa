"""Where a zoo model's time goes under ONNX Runtime: kernel time per op type and per convolution shape.

    python benchmarks/profile_onnx.py [--model ldn121] [--size 512x1024] [--runs 4] [--threads 2] [--probe N]

Exports the model (random weights, as ``ldnbench onnx`` does: RGB 0..255 in, logits out), runs it
with ONNX Runtime's profiler on (all graph optimisations, so what is profiled is the optimised graph,
e.g. NCHWc convolutions with fused activations) and sums the kernel times over ``--runs`` runs after
one warm-up. Convolutions are grouped by weight shape; a ``C×1×1×1`` weight is a depthwise 1×1
convolution, which is how ORT runs a BatchNormalization it could not fold. GFLOP/s per group =
2 × MACs / kernel time, MACs from the profiled input and output shapes.

ORT's profiler stretches small kernels, so ``--probe N`` also measures, without the profiler, what
the BatchNorm+ReLU passes over concatenations cost: it times the graph and a copy of it with those
passes cut out (a cost probe only: its labels are wrong) in N interleaved rounds, and prints both
medians, i.e. the most that a kernel fusing them into the next convolution could save.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ldn121")
    ap.add_argument("--size", default="512x1024", help="HxW")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="convolution groups to list")
    ap.add_argument("--probe", type=int, default=0, metavar="N",
                    help="time the graph against a copy without BN+ReLU after Concat, N interleaved rounds")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    import onnx
    import onnxruntime as ort

    from ldnbench.deploy import export_onnx
    from ldnbench.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(args.model, 19).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, size=(h, w), input_dtype="float32")
        exported = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = {session.get_inputs()[0].name: np.random.default_rng(0).uniform(0, 255, (1, 3, h, w)).astype(np.float32)}
        session.run(None, x)  # warm-up, dropped below by counting only the last --runs runs
        for _ in range(args.runs):
            session.run(None, x)
        events = [e for e in json.loads(Path(session.end_profiling()).read_text())
                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        del session
        probe = probe_bn_cost(path, x, args.threads, args.probe) if args.probe else None
    per_run = len(events) // (args.runs + 1)
    events = events[per_run:]  # the warm-up's nodes come first
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_conv: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for e in events:
        a = e["args"]
        by_op[a["op_name"]][0] += e["dur"]
        by_op[a["op_name"]][1] += 1
        if a["op_name"] != "Conv":
            continue
        wshape = next(iter(a["input_type_shape"][1].values()))
        out = int(np.prod(next(iter(a["output_type_shape"][0].values()))))
        depthwise = wshape[1:] == [1, 1, 1]
        key = "depthwise 1x1 (a BatchNorm)" if depthwise else f"{wshape[2]}x{wshape[3]} {wshape[1]}->{wshape[0]}"
        g = by_conv[key]
        g[0] += e["dur"]
        g[1] += out * int(np.prod(wshape[1:]))
        g[2] += 1
    total = sum(d for d, _ in by_op.values())
    print(f"{args.model} at {h}x{w}, ONNX Runtime {ort.__version__}, {args.threads} threads, mean of {args.runs} runs; "
          f"exported graph: {dict(exported.most_common(6))}")
    print(f"kernel time {total / args.runs / 1000:.1f} ms per run")
    print(f"{'op':<32}{'ms/run':>9}{'share':>8}{'nodes':>7}")
    for op, (d, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        print(f"{op:<32}{d / args.runs / 1000:>9.1f}{100 * d / total:>7.1f}%{n // args.runs:>7}")
    conv_total = by_op["Conv"][0] or 1.0
    print(f"\n{'convolution (weight shape)':<32}{'ms/run':>9}{'of conv':>8}{'nodes':>7}{'GFLOP/s':>9}")
    for key, (d, macs, n) in sorted(by_conv.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{key:<32}{d / args.runs / 1000:>9.1f}{100 * d / conv_total:>7.1f}%{n // args.runs:>7}"
              f"{2 * macs / d / 1e3:>9.1f}")
    if probe:
        (full, cut), n = probe
        print(f"\nwithout the profiler, {args.probe} interleaved rounds: {full:.1f} ms median per run; with the {n} "
              f"BatchNorm+ReLU passes after a Concat cut out {cut:.1f} ms ({100 * (full - cut) / full:.1f} % less)")


def _without_bn_after_concat(path: Path, out: Path) -> int:
    """Copy of the graph at ``path`` in which every BatchNormalization+Relu reading a Concat is bypassed."""
    import onnx

    model = onnx.load(str(path))
    nodes = model.graph.node
    producer = {o: n for n in nodes for o in n.output}
    cut = []
    for bn in nodes:
        if bn.op_type != "BatchNormalization" or producer.get(bn.input[0], bn).op_type != "Concat":
            continue
        relus = [n for n in nodes if n.op_type == "Relu" and list(n.input) == [bn.output[0]]]
        if len(relus) != 1 or sum(bn.output[0] in n.input for n in nodes) != 1:
            continue
        for n in nodes:
            n.input[:] = [bn.input[0] if i == relus[0].output[0] else i for i in n.input]
        cut += [bn, relus[0]]
    for n in cut:
        nodes.remove(n)
    onnx.save(model, str(out))
    return len(cut) // 2


def probe_bn_cost(path: Path, x: dict, threads: int, rounds: int) -> tuple[tuple[float, float], int]:
    """Median ms per run of the graph and of its copy without BN+ReLU after Concat, timed alternately
    (``bench speed``'s interleaved protocol, each run as ``bench speed`` times a deployed graph)."""
    from ldnbench.bench import time_calls
    from ldnbench.deploy import make_runner

    cut_path = path.with_name("cut.onnx")
    n = _without_bn_after_concat(path, cut_path)
    [image] = x.values()
    runners = [make_runner("onnxruntime", p, threads=threads) for p in (path, cut_path)]
    timed = time_calls([lambda r=r: r.infer(image) for r in runners], runs=rounds, warmup=1, device="cpu")
    full, cut = (1000 * float(np.median(times)) for times, _ in timed)
    return (full, cut), n

if __name__ == "__main__":
    main()
