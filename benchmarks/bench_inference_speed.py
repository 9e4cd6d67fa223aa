"""Goal check for inference speed (paper Table 4 setting) on this machine.

Goals (2-core CPU, fp32): LDN121 64->4 on one 1024x2048 image in <= 2.5 s (median) and >= 6x faster
than torchvision's DeepLabV3-ResNet50 timed in the same process on the same input.

    python benchmarks/bench_inference_speed.py [--size 1024x2048] [--runs 5] [--no-channels-last]

Exit status 0 = goals met, 1 = missed.
"""

from __future__ import annotations

import argparse
import sys

from ldnbench.bench import SpeedConfig, bench_speed, format_speed_table, parse_size, speed_record
from ldnbench.report.records import write_record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ldn121-64to4")
    ap.add_argument("--size", default="1024x2048")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--compare", default="deeplabv3_resnet50")
    ap.add_argument("--max-seconds", type=float, default=2.5)
    ap.add_argument("--min-speedup", type=float, default=6.0)
    ap.add_argument("--json", help="write the result record here too")
    args = ap.parse_args(argv)

    cfg = SpeedConfig(model=args.model, size=parse_size(args.size), runs=args.runs, warmup=args.warmup,
                      channels_last=not args.no_channels_last,
                      compare=tuple(c for c in args.compare.split(",") if c))
    result = bench_speed(cfg, progress=lambda m: print(m, flush=True))
    print(format_speed_table(result))
    if args.json:
        write_record(args.json, speed_record(result, command=sys.argv))
    ldn = result.rows[0]
    ok = ldn.latency_ms_median <= args.max_seconds * 1000
    print(f"{'PASS' if ok else 'FAIL'}: {ldn.model} median {ldn.latency_ms_median / 1000:.2f} s "
          f"(goal <= {args.max_seconds} s)")
    ref = next((r for r in result.rows if r.model == "deeplabv3_resnet50"), None)
    if ref is not None:
        fast = ref.relative_latency >= args.min_speedup
        print(f"{'PASS' if fast else 'FAIL'}: {ref.relative_latency:.1f}x faster than deeplabv3_resnet50 "
              f"(goal >= {args.min_speedup}x)")
        ok = ok and fast
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
