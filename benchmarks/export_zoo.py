"""Export every zoo model (random weights) to ONNX, verify it in ONNX Runtime, and try a dynamic H/W export.

    python benchmarks/export_zoo.py [--height 128 --width 256] [--models a,b] [--threads 1]

Prints one row per model: static export ok / the error sentence, max |dlogit|, label agreement,
and whether a dynamic-size export works (or the first reason it does not).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def try_dynamic(model, args, path) -> str:
    from ldnbench.deploy import export_onnx
    from ldnbench.errors import UserError

    m = model.pad_multiple  # the dynamic range starts at 2 x the multiple + 1
    size = (max(args.height, 2 * m) + m // 2, max(args.width, 2 * m) + m // 2)
    try:
        export_onnx(model, path, size=size, dynamic=True)
        return "ok"
    except UserError as e:
        return "no: " + str(e).split("(", 1)[-1][:90] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--models", default=None, help="comma list (default: every registered model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-dynamic", action="store_true", help="skip the dynamic-size attempt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ldnbench.deploy import export_onnx
    from ldnbench.errors import UserError
    from ldnbench.models import MODELS, build_model

    names = args.models.split(",") if args.models else list(MODELS)
    print(f"| model | static {args.height}x{args.width} | max abs dlogit (relative) | label agreement | dynamic H/W | s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            model = build_model(name, 19, checkpointing="none").eval()
            try:
                res = export_onnx(model, Path(tmp) / "m.onnx", size=(args.height, args.width))
                p = res.parity[0]
                static, diff, agree = "ok", f"{p.max_abs_diff:.2g} ({p.relative_diff:.1g})", f"{100 * p.agreement:.4f} %"
            except UserError as e:
                static, diff, agree = f"fails: {e}", "-", "-"
            dynamic = "not tried" if args.no_dynamic else try_dynamic(model, args, Path(tmp) / "d.onnx")
            print(f"| {name} | {static} | {diff} | {agree} | {dynamic} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
