"""The fused clamp → 1×1 kernel against clamp + oneDNN: one layer and a whole eager forward, in one run.

    python benchmarks/bench_fused_kernel.py [--model ldn121] [--size 1024x2048] [--rounds 8]

Times, interleaved (order reversed every other round), ``prepare_model(..., fused_kernel=False)``
and ``prepare_model(...)`` of the same model with non-trivial BatchNorm statistics, and the
kernel alone against ``torch.clamp`` + ``F.conv2d`` on a dense layer's shape (a 224-map prefix of a
256-map channels-last block buffer to 128 maps at 1/4 of the input size). Prints medians, the
ratios, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ldnbench.bench import parse_size
from ldnbench.inference import model_notes, prepare_model, reuse_freed_memory
from ldnbench.kernels import compile_kernel
from ldnbench.models import build_model


def interleaved(calls: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call, the calls alternating round by round."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                calls[name]()
                if r >= warmup:
                    times[name].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ldn121")
    ap.add_argument("--size", default="1024x2048")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    h, w = parse_size(args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()
    kernel, how = compile_kernel()
    print(f"kernel: {how}; {torch.get_num_threads()} threads")
    if kernel is None:
        return 1

    g = torch.Generator().manual_seed(0)
    buf = torch.randn(1, 256, h // 4, w // 4, generator=g).contiguous(memory_format=torch.channels_last)
    x = buf[:, :224]
    lo, hi = torch.randn(224, generator=g) - 0.5, torch.full((224,), float("inf"))
    weight = (torch.randn(128, 224, 1, 1, generator=g) / 15).contiguous(memory_format=torch.channels_last)
    bias, packed = torch.randn(128, generator=g), kernel.pack(weight)
    layer = interleaved({
        "clamp + conv2d": lambda: F.conv2d(torch.clamp(x, lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)), weight, bias),
        "fused kernel": lambda: kernel(x, lo, hi, packed, bias),
    }, args.rounds * 3)
    gflop = 2 * x.shape[-2] * x.shape[-1] * 224 * 128 / 1e9
    print(f"1x1 224->128 of a 256-map buffer at {h // 4}x{w // 4}: " + ", ".join(
        f"{k} {v:.1f} ms ({gflop / v * 1e3:.0f} GFLOP/s)" for k, v in layer.items())
        + f"; fused/unfused {layer['fused kernel'] / layer['clamp + conv2d']:.2f}")

    torch.manual_seed(0)
    model = build_model(args.model, 19).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.1, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.data.uniform_(0.5, 1.5, generator=g)
        bn.bias.data.normal_(0, 0.1, generator=g)
    plain, fused = prepare_model(model, fused_kernel=False), prepare_model(model)
    print(f"{args.model}: {model_notes(fused)}")
    image = torch.randn(1, 3, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        diff = (plain(image) - fused(image)).abs().max().item()
    whole = interleaved({"unfused": lambda: plain(image), "fused": lambda: fused(image)}, args.rounds)
    print(f"{args.model} forward at {h}x{w}: unfused {whole['unfused']:.1f} ms, fused {whole['fused']:.1f} ms "
          f"(median of {args.rounds} interleaved); fused/unfused {whole['fused'] / whole['unfused']:.2f}; "
          f"max |dlogit| {diff:.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
