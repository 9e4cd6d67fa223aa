"""Run every CUDA path of ldnbench once on synthetic data and print one table (a few minutes on one GPU).

    python benchmarks/gpu_check.py [--work DIR] [--keep]

Paths: eval on CUDA in fp32 against the same checkpoint on the CPU (mIoU difference, should be
<= 1e-4), eval in bf16/fp16 when asked, training with fp16 autocast + GradScaler and with bf16,
`bench memory --find-max-batch`, `bench speed` in fp32 and fp16, and with two or more GPUs visible,
NCCL DDP training and a 2-process torchrun `eval`. On a machine without CUDA it says so and exits 0.
Exit status 1 when any path failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: A narrow LDN121 so that the CPU reference run is quick; the CUDA code paths are the full model's.
TINY = dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2, spp_bt=32, spp_level=8,
            spp_out=32, up_widths=(16, 16, 16), up_bottleneck=16)
MODEL = "ldn121-32to4"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="scratch folder [default: a temporary one]")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device is visible to torch on this machine: there is no GPU path to check here (exit 0)")
        return 0

    from ldnbench.data.registry import get_dataset
    from ldnbench.data.synthetic import generate
    from ldnbench.evaluate import evaluate
    from ldnbench.runtime import native_bf16
    from ldnbench.checkpoints import load_checkpoint
    from ldnbench.launch import launch
    from ldnbench.train import TrainConfig, train

    work = Path(args.work or tempfile.mkdtemp(prefix="ldnbench-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    generate(work / "synth", size=(320, 160), n=24)
    root = work / "synth" / "cityscapes"
    val = get_dataset("cityscapes", root, "val")
    rows: list[tuple[str, str, float, str]] = []

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            note = fn() or ""
            status = "ok"
        except Exception as e:  # noqa: BLE001 - the table reports every failure and goes on
            status, note = "failed", _first_line(e)
        rows.append((name, status, time.perf_counter() - t0, note))
        print(f"{name}: {status} {note}", flush=True)

    def cfg(out: str, **kw) -> TrainConfig:
        base = dict(model=MODEL, dataset="cityscapes", root=str(root), out=str(work / out), epochs=2, batch_size=4,
                    crop=128, pretrained="none", val_split="val", model_options=TINY, progress=False, workers=2,
                    device="cpu")
        base.update(kw)
        return TrainConfig(**base)

    ref: dict = {}

    def cpu_reference():
        res = train(cfg("cpu-fp32"))
        ref["ck"] = res.last_checkpoint
        ref["cpu"] = evaluate(load_checkpoint(res.last_checkpoint)[0], val, device="cpu", progress=False)
        return f"mIoU {100 * ref['cpu'].metrics.miou:.2f} on CPU"

    def cuda_eval_fp32():
        model = load_checkpoint(ref["ck"])[0]
        got = evaluate(model, val, device="cuda", progress=False)
        diff = abs(got.metrics.miou - ref["cpu"].metrics.miou)
        if diff > 1e-4:
            raise AssertionError(f"CUDA fp32 mIoU differs from CPU fp32 by {diff:.2e} (> 1e-4)")
        return f"|mIoU(CUDA fp32) - mIoU(CPU fp32)| = {diff:.2e}"

    def cuda_eval(precision):
        def run():
            got = evaluate(load_checkpoint(ref["ck"])[0], val, device="cuda", precision=precision,
                           progress=False)
            return f"mIoU {100 * got.metrics.miou:.2f} (fp32 {100 * ref['cpu'].metrics.miou:.2f})"
        return run

    def cuda_train(amp):
        def run():
            res = train(cfg(f"cuda-{amp}", device="cuda", amp=amp))
            rec = json.loads(Path(res.record_path).read_text())
            return f"loss {res.history[0]['loss']:.3f} -> {res.history[-1]['loss']:.3f}, " \
                   f"train {rec['train_precision']}, val mIoU {100 * res.final_metrics['miou']:.2f} (fp32)"
        return run

    def ddp_nccl():
        code = launch(cfg("cuda-ddp", device="cuda", batch_size=8), 2)
        if code:
            raise RuntimeError(f"torchrun exited with {code}")
        rec = json.loads((work / "cuda-ddp" / "result.json").read_text())
        return f"world size {rec['world_size']}, val mIoU {100 * rec['metrics']['miou']:.2f}"

    def torchrun_eval():
        out = work / "eval-2gpu.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ldnbench",
               "eval", "--checkpoint", str(ref["ck"]), "--dataset", "cityscapes", "--root", str(root),
               "--device", "cuda", "--out", str(out), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "torchrun failed")
        got = json.loads(out.read_text())["metrics"]["miou"]
        diff = abs(got - ref["cpu"].metrics.miou)
        if diff > 1e-4:
            raise AssertionError(f"2-GPU eval mIoU differs from CPU fp32 by {diff:.2e}")
        return f"|mIoU(2 GPUs) - mIoU(CPU fp32)| = {diff:.2e}"

    def bench_memory():
        from ldnbench.bench import MemoryConfig, bench_memory as run

        res = run(MemoryConfig(model="ldn121-32to4", crop=256, batch_size=2, steps=1, warmup=1, device="cuda",
                               find_max_batch=True, max_batch_limit=64), "none,full")
        bad = [r for r in res.rows if r.error]
        if bad:
            raise RuntimeError(f"{bad[0].policy}: {bad[0].error}")
        return "; ".join(f"{r.policy}: {r.peak_mb:.0f} MB, max batch {r.max_batch}" for r in res.rows)

    def bench_speed(precision):
        def run():
            from ldnbench.bench import SpeedConfig, bench_speed as speed

            res = speed(SpeedConfig(size=(512, 1024), runs=3, device="cuda", precision=precision))
            r = res.rows[0]
            return f"{r.model} 512x1024: {r.latency_ms_median:.1f} ms, {r.folded_bn} BNs folded"
        return run

    check("train CPU fp32 (reference checkpoint)", cpu_reference)
    if "ck" in ref:
        check("eval CUDA fp32 vs CPU fp32", cuda_eval_fp32)
        if native_bf16("cuda:0"):
            check("eval CUDA bf16 (asked for)", cuda_eval("bf16"))
        check("eval CUDA fp16 (asked for)", cuda_eval("fp16"))
    check("train CUDA --amp fp16 (GradScaler)", cuda_train("fp16"))
    if native_bf16("cuda:0"):
        check("train CUDA --amp bf16", cuda_train("bf16"))
    if torch.cuda.device_count() >= 2:
        check("train NCCL DDP, 2 GPUs", ddp_nccl)
        if "ck" in ref:
            check("eval torchrun, 2 GPUs", torchrun_eval)
    else:
        rows.append(("NCCL DDP / torchrun eval", "skipped", 0.0, "needs 2 visible GPUs"))
    check("bench memory --find-max-batch", bench_memory)
    check("bench speed fp32", bench_speed("fp32"))
    check("bench speed fp16", bench_speed("fp16"))

    print(f"\n{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}")
    print(f"{'path':<40} {'status':<8} {'seconds':>8}  note")
    for name, status, secs, note in rows:
        print(f"{name:<40} {status:<8} {secs:>8.1f}  {note}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r[1] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
