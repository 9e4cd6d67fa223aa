"""Speed and memory benchmarks: training memory per checkpointing policy, inference latency.

``bench_memory`` reproduces the rows of paper Tables 11/12: every checkpointing policy trains in its
own fresh Python process (``python -m ldnbench.bench memory-worker ...``), so that no allocator
cache, oneDNN primitive cache or heap fragmentation of one policy leaks into the next.

Peak memory is measured the same way for every policy:

* CUDA: ``torch.cuda.max_memory_allocated()`` over the measured steps (it includes weights,
  gradients and optimizer state, like the paper's numbers).
* CPU: the peak resident set size above the baseline RSS taken right before the first training
  step (weights, input batch and the runtime are in the baseline, so the peak counts gradients,
  optimizer state and activations). On Linux the kernel's high-water mark ``VmHWM`` is reset by writing
  ``5`` to ``/proc/self/clear_refs`` at the baseline and read after the last step, so short spikes
  are not missed as with RSS sampling. Without ``/proc`` the fallback is ``ru_maxrss``, which cannot
  be reset (the row's ``method`` says which was used).
  glibc's malloc raises its mmap threshold dynamically up to 32 MB and then keeps freed
  activation buffers in the heap, so RSS would overstate live memory by whatever the allocator
  hoards. The worker therefore starts with ``MALLOC_MMAP_THRESHOLD_`` fixed (default 1 MiB,
  :attr:`MemoryConfig.malloc_mmap_threshold`), which makes every large tensor an mmap that is
  returned to the OS on free; this applies only inside the worker process. Those fresh mappings are
  page-faulted in 4 KiB pages, which on a VM costs a third of a step; the worker therefore also
  asks torch for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, :attr:`MemoryConfig.huge_pages`):
  buffers of 2 MiB and more are 2 MiB-aligned and marked with ``madvise``, 512 times fewer faults, still
  returned on free.

The worker trains in the channels-last memory format by default (:attr:`MemoryConfig.channels_last`):
oneDNN's convolution backward then works on the tensors as they are, while in NCHW it reorders
inputs and gradients into blocked layouts, temporary copies that were 8 % of the full policy's peak.

``bench_speed`` times inference (forward pass to logits at input resolution) with warm-up and
device synchronisation, reports median and inter-quartile range, FPS and achieved GFLOP/s
(2 × the MACs of the zoo's counter, ``ldnbench.models.count_macs``), and runs torchvision
segmentation models (random weights, nothing downloaded) in the same process for a ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write_json
from ldnbench.inference import model_notes, pool_before_pointwise, prepare_model, reuse_freed_memory
from ldnbench.models.checkpointing import POLICIES as _MODEL_POLICIES
from ldnbench.models.peers import PEERS
from ldnbench.runtime import autocast, check_precision, resolve_device

#: Checkpointing policies of paper Table 11, in the table's order (the model zoo's names).
POLICIES = tuple(_MODEL_POLICIES)

#: The torchvision peers of the zoo (``tv-*``) suggested for ``--compare``; any zoo name is accepted.
COMPARE_MODELS = {name: spec.description for name, spec in PEERS.items()}

#: Columns of ``--json`` for ``bench memory`` (a stable schema: exactly these keys, in this order).
MEMORY_JSON_KEYS = ("policy", "peak_mb", "images_per_s", "max_batch")
#: Columns of ``--json`` for ``bench speed``.
SPEED_JSON_KEYS = ("model", "size", "batch_size", "latency_ms_median", "latency_ms_iqr", "fps", "gmac",
                   "gflops_per_s", "relative_latency")

_MB = 2**20


# ------------------------------------------------------------------------------------------------
# shared helpers


def check_device(device: str) -> str:
    """``cpu`` / ``cuda:N`` after checking it exists (UserError otherwise); see :func:`ldnbench.runtime.resolve_device`."""
    return str(resolve_device(device))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x2048"`` (height x width) or ``"768"`` (square) -> (height, width)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise UserError(f"size {text!r} is not HEIGHTxWIDTH (e.g. 1024x2048) or a single positive side.", 2)
    return hw  # type: ignore[return-value]


def resolve_policies(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"all"`` or a comma list -> list of known policy names (UserError exit 2 on unknown names)."""
    names = list(POLICIES) if spec == "all" else (
        [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec))
    unknown = [p for p in names if p not in POLICIES]
    if unknown or not names:
        raise UserError(f"unknown checkpointing polic{'y' if len(unknown) == 1 else 'ies'} "
                        f"{', '.join(map(repr, unknown)) or '(none given)'}; valid: all, {', '.join(POLICIES)}.", 2)
    return names


def resolve_compare(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Comma list of zoo names (the ``tv-*`` peers, any LDN, torchvision's own function names as aliases)
    -> canonical names (UserError exit 2 naming the peers)."""
    from ldnbench.models import resolve_model_name

    if not spec:
        return []
    names = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    out, unknown = [], []
    for n in names:
        try:
            out.append(resolve_model_name(n))
        except UserError:
            unknown.append(n)
    if unknown:
        raise UserError(f"unknown --compare model {', '.join(map(repr, unknown))}; valid: "
                        f"{', '.join(COMPARE_MODELS)} or any zoo model (`ldnbench zoo --peers`).", 2)
    return out


def resolve_bench_model(name: str, down: int | None = None, up: int | None = None) -> str:
    """Canonical zoo name; ``down``/``up`` replace the d→u part (``ldn121`` + 32, 4 -> ``ldn121-32to4``)."""
    from ldnbench.models import resolve_model_name

    canonical = resolve_model_name(name)
    if down is None and up is None:
        return canonical
    m = re.match(r"^(.*?)-(\d+)to(\d+)(.*)$", canonical)
    if not m:
        raise UserError(f"model {canonical!r} has no d→u variant; drop --down/--up.", 2)
    d = down if down is not None else int(m.group(2))
    u = up if up is not None else int(m.group(3))
    return resolve_model_name(f"{m.group(1)}-{d}to{u}{m.group(4)}")


# ------------------------------------------------------------------------------------------------
# peak memory meter


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of this process between :meth:`start` and :meth:`peak_mb` (see module docstring)."""

    def __init__(self, device: str):
        self.device = device
        self.baseline_mb = 0.0
        self.method = ""

    def start(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / _MB
            self.method = "cuda-max-allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            rss = _proc_status_kb("VmRSS")
            if rss is None:
                raise OSError("no VmRSS")
            self.baseline_mb = rss / 1024
            self.method = "rss-hwm"
        except OSError:
            self.baseline_mb = self._maxrss_kb() / 1024
            self.method = "ru_maxrss"

    @staticmethod
    def _maxrss_kb() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux

    def peak_mb(self) -> float:
        """Peak since :meth:`start`: CUDA total allocated; CPU resident memory above the baseline."""
        if self.method == "cuda-max-allocated":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / _MB
        if self.method == "rss-hwm":
            return (_proc_status_kb("VmHWM") or 0) / 1024 - self.baseline_mb
        return self._maxrss_kb() / 1024 - self.baseline_mb


# ------------------------------------------------------------------------------------------------
# bench memory


@dataclass
class MemoryConfig:
    """What one ``bench memory`` run measures (the same for every policy)."""

    model: str = "ldn121-64to4"
    num_classes: int = 19
    crop: int = 768
    batch_size: int = 6
    steps: int = 2
    warmup: int = 1
    device: str = "cpu"
    model_options: dict[str, Any] = field(default_factory=dict)
    find_max_batch: bool = False
    max_batch_limit: int = 256
    threads: int | None = None
    seed: int = 0
    #: glibc mmap threshold (bytes) set in the worker's environment; None keeps glibc's dynamic one.
    malloc_mmap_threshold: int | None = 2**20
    #: CPU: transparent huge pages for torch's large buffers in the worker (``THP_MEM_ALLOC_ENABLE``).
    huge_pages: bool = True
    #: Channels-last weights and input batch (oneDNN then needs no layout reorders in backward).
    channels_last: bool = True


@dataclass
class MemoryRow:
    """One policy's measurement (``peak_mb``/``images_per_s`` are None if the worker failed)."""

    policy: str
    peak_mb: float | None
    images_per_s: float | None
    max_batch: int | None = None
    max_batch_note: str | None = None
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # process CPU time per step (robust to other load)
    baseline_mb: float | None = None
    method: str | None = None
    pid: int | None = None
    error: str | None = None

    def json_row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MEMORY_JSON_KEYS}


def _train_batch(cfg: MemoryConfig, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(batch, 3, cfg.crop, cfg.crop, generator=g)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (batch, cfg.crop, cfg.crop), generator=g, dtype=torch.int64)
    return x.to(device), y.to(device)


def _make_step(model: nn.Module, loss_fn: Callable, opt: torch.optim.Optimizer) -> Callable:
    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _is_allocation_failure(e: BaseException) -> bool:
    text = str(e)
    return any(k in text for k in ("out of memory", "ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED",
                                   "CUDNN_STATUS_INTERNAL_ERROR", "32-bit index", "canUse32BitIndexMath"))


def _find_max_batch(cfg: MemoryConfig, step: Callable, device: str) -> tuple[int | None, str | None]:
    """Largest batch for which one training step fits on the GPU: doubling, then bisection."""
    if not device.startswith("cuda"):
        return None, ("not searched on CPU: host RAM has no allocator limit to hit, a too-large batch "
                      "swaps or gets the process OOM-killed instead of failing cleanly")

    def fits(b: int) -> bool:
        if b * cfg.num_classes * cfg.crop * cfg.crop >= 2**31:
            return False  # logits past 2^31 elements exceed the 32-bit indexing of many CUDA kernels
        x = y = None
        try:
            x, y = _train_batch(cfg, b, device)
            step(x, y)
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as e:  # cuBLAS/cuDNN report failed allocations as their own errors
            if _is_allocation_failure(e):
                return False
            raise
        finally:
            del x, y
            gc.collect()
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= cfg.max_batch_limit and fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0:
        return 0, "a batch of 1 does not fit"
    if hi > cfg.max_batch_limit:
        return lo, f"search capped at {cfg.max_batch_limit}"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, None


def measure_policy(cfg: MemoryConfig, policy: str,
                   on_measured: Callable[["MemoryRow"], None] | None = None) -> MemoryRow:
    """Train ``cfg.warmup + cfg.steps`` steps with ``policy`` in THIS process and measure them.

    Call it in a fresh process (as :func:`bench_memory` does) for numbers comparable across policies.
    """
    from ldnbench.losses import SegLoss
    from ldnbench.models import build_model

    device = check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.num_classes, **cfg.model_options).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_checkpointing(policy)
    model.train()
    # The paper's optimizer (AMSGrad); its state is allocated in the first step, after the baseline.
    opt = torch.optim.Adam(model.parameters(), lr=4e-4, amsgrad=True)
    step = _make_step(model, SegLoss(cfg.num_classes), opt)
    x, y = _train_batch(cfg, cfg.batch_size, device)

    meter = PeakMemory(device)
    meter.start()
    for _ in range(cfg.warmup):
        step(x, y)
    times, cpu = [], []
    for _ in range(cfg.steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = meter.peak_mb()
    total = sum(times)
    row = MemoryRow(policy=policy, peak_mb=round(peak, 1),
                    images_per_s=round(cfg.batch_size * len(times) / total, 4) if total > 0 else None,
                    step_s=[round(t, 4) for t in times], cpu_s=[round(t, 4) for t in cpu],
                    baseline_mb=round(meter.baseline_mb, 1), method=meter.method, pid=os.getpid())
    if cfg.find_max_batch:
        del x, y
        if on_measured is not None:
            on_measured(row)  # a search that kills the process must not take the measured peak with it
        row.max_batch, row.max_batch_note = _find_max_batch(cfg, step, device)
    return row


def _worker_env(cfg: MemoryConfig) -> dict[str, str]:
    env = dict(os.environ)
    if cfg.malloc_mmap_threshold is not None:
        # A fixed threshold also switches off glibc's dynamic threshold (see the module docstring).
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(cfg.malloc_mmap_threshold))
    if cfg.huge_pages:
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch's CPU allocator at its first allocation
    else:
        env.pop("THP_MEM_ALLOC_ENABLE", None)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    return env


def run_policy_subprocess(cfg: MemoryConfig, policy: str, timeout: float | None = None) -> MemoryRow:
    """Run :func:`measure_policy` in a fresh ``python -m ldnbench.bench memory-worker`` process.

    A crashed or killed worker gives a row with ``error`` set instead of raising, so that the
    other policies' measurements are kept.
    """
    with tempfile.TemporaryDirectory(prefix="ldnbench-bench-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "ldnbench.bench", "memory-worker", "--policy", policy,
               "--config", json.dumps(asdict(cfg)), "--out", str(out)]
        try:
            proc = subprocess.run(cmd, env=_worker_env(cfg), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return MemoryRow(policy, None, None, error=f"worker timed out after {timeout:.0f} s")
        if proc.returncode == 0 and out.exists():
            return MemoryRow(**json.loads(out.read_text()))
        if out.exists():  # died in the max-batch search: the measured row survives
            row = MemoryRow(**json.loads(out.read_text()))
            row.max_batch_note = f"{row.max_batch_note} (worker exit {proc.returncode})"
            return row
        if proc.returncode < 0:
            reason = f"worker killed by signal {-proc.returncode}"
            if proc.returncode == -9:
                reason += " (most likely out of memory: try a smaller --batch-size or --crop)"
        else:
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            reason = f"worker failed (exit {proc.returncode}): {tail[-1] if tail else 'no message'}"
        return MemoryRow(policy, None, None, error=reason)


@dataclass
class MemoryResult:
    config: MemoryConfig
    rows: list[MemoryRow]

    def summary(self) -> dict[str, Any]:
        """Reduction of peak memory and the speed kept (images/s and CPU time), of every policy relative to ``none``."""
        base = next((r for r in self.rows if r.policy == "none" and r.peak_mb), None)
        out: dict[str, Any] = {}
        if base is None:
            return out
        for r in self.rows:
            if r.policy != "none" and r.peak_mb and base.images_per_s and r.images_per_s:
                out[r.policy] = {"memory_reduction": round(base.peak_mb / r.peak_mb, 3),
                                 "speed_ratio": round(r.images_per_s / base.images_per_s, 3)}
                if base.cpu_s and r.cpu_s:  # the same ratio from CPU time: robust to other load
                    out[r.policy]["cpu_speed_ratio"] = round(statistics.median(base.cpu_s)
                                                             / statistics.median(r.cpu_s), 3)
        return out


def bench_memory(cfg: MemoryConfig, policies: list[str] | str = "all",
                 progress: Callable[[str], None] | None = None, timeout: float | None = None,
                 on_row: Callable[[MemoryResult], None] | None = None) -> MemoryResult:
    """Measure every policy in its own fresh worker process, one after the other.

    ``on_row(partial_result)`` is called after each policy (the CLI saves the record there, so a long
    run that is interrupted keeps the policies already measured).
    """
    from ldnbench.models import build_model

    check_device(cfg.device)
    names = resolve_policies(policies)
    if cfg.crop < 1 or cfg.batch_size < 1 or cfg.steps < 1 or cfg.warmup < 0:
        raise UserError("--crop, --batch-size and --steps must be positive and --warmup >= 0.", 2)
    # Fail here, in one line, rather than in every worker: the model must build with these options.
    try:
        build_model(cfg.model, cfg.num_classes, **cfg.model_options)
    except TypeError as e:
        raise UserError(f"model {cfg.model!r} does not accept these options: {e}", 2) from None
    result = MemoryResult(cfg, [])
    for p in names:
        if progress:
            progress(f"policy {p}: training {cfg.warmup}+{cfg.steps} steps of batch {cfg.batch_size} "
                     f"at {cfg.crop}x{cfg.crop} on {cfg.device} in a fresh process ...")
        result.rows.append(run_policy_subprocess(cfg, p, timeout=timeout))
        if progress:
            r = result.rows[-1]
            progress(f"policy {p}: " + (r.error or f"peak {r.peak_mb:.0f} MB, {r.images_per_s:.3f} images/s"))
        if on_row:
            on_row(result)
    return result


def memory_record(result: MemoryResult, command: list[str] | None = None, run_id: str | None = None) -> dict[str, Any]:
    """The ``bench-memory`` result record (rows carry model, policy, peak_mb, images_per_s, ...)."""
    from ldnbench.report.records import make_record

    cfg = result.config
    rows = [{"model": cfg.model, "size": f"{cfg.crop}x{cfg.crop}", "batch_size": cfg.batch_size, **asdict(r)}
            for r in result.rows]
    return make_record("bench-memory", model=cfg.model, model_options=cfg.model_options, device=cfg.device,
                       metrics=result.summary(), command=command, run_id=run_id, config=asdict(cfg), rows=rows)


def format_memory_table(result: MemoryResult) -> str:
    """Human table; 'vs none' columns are relative to the ``none`` row when it was measured."""
    base = next((r for r in result.rows if r.policy == "none" and r.peak_mb), None)
    lines = [f"{'policy':<24} {'peak MB':>9} {'vs none':>8} {'images/s':>9} {'vs none':>8} {'CPU s/step':>10} "
             f"{'max batch':>9}"]
    for r in result.rows:
        if r.error:
            lines.append(f"{r.policy:<24} {'failed: ' + r.error}")
            continue
        mem_x = f"{base.peak_mb / r.peak_mb:.2f}x" if base and r.peak_mb else "-"
        spd = f"{r.images_per_s / base.images_per_s:.0%}" if base and r.images_per_s and base.images_per_s else "-"
        cpu = f"{statistics.median(r.cpu_s):.1f}" if r.cpu_s else "-"
        mb = "-" if r.max_batch is None else str(r.max_batch)
        lines.append(f"{r.policy:<24} {r.peak_mb:>9.0f} {mem_x:>8} {r.images_per_s:>9.3f} {spd:>8} {cpu:>10} {mb:>9}")
    notes = {r.max_batch_note for r in result.rows if r.max_batch_note}
    lines += [f"max batch: {n}" for n in sorted(notes)]
    if result.rows and result.rows[0].method:
        lines.append(f"peak memory: {_METHOD_TEXT.get(result.rows[0].method, result.rows[0].method)}")
    return "\n".join(lines)


_METHOD_TEXT = {
    "rss-hwm": "resident set high-water mark (VmHWM) above the RSS right before the first step",
    "ru_maxrss": "ru_maxrss above its value before the first step (cannot be reset: lower bound)",
    "cuda-max-allocated": "torch.cuda.max_memory_allocated (weights, gradients, optimizer state, activations)",
}


# ------------------------------------------------------------------------------------------------
# bench speed


@dataclass
class SpeedConfig:
    """What one ``bench speed`` run measures (the same for every model in it)."""

    model: str = "ldn121-64to4"
    num_classes: int = 19
    size: tuple[int, int] = (1024, 2048)
    batch_size: int = 1
    device: str = "cpu"
    #: fp32 unless bf16/fp16 is asked for by name (ldnbench.runtime)
    precision: str = "fp32"
    channels_last: bool = True
    compare: tuple[str, ...] = ()
    runs: int = 5
    warmup: int = 1
    model_options: dict[str, Any] = field(default_factory=dict)
    #: Fold every BatchNorm that only reads a convolution's output into that convolution (all models).
    fold_bn: bool = True
    #: torch rows on a CPU with AVX-512: run clamp → 1×1 conv pairs by the fused kernel (``inference.prepare_model``)
    fused_kernel: bool = True
    #: Keep freed large blocks in the heap (``ldnbench.inference.reuse_freed_memory``, process-wide).
    heap_reuse: bool = True
    threads: int | None = None
    seed: int = 0
    #: time this checkpoint's model (its layout and weights, read by ldnbench.checkpoints) instead of ``model``
    checkpoint: str | None = None
    #: runtimes timed for every model, in this order (``ldnbench.deploy.BACKENDS``)
    backends: tuple[str, ...] = ("torch",)
    #: time every model x backend in rounds (one forward of each per round, order reversed every other
    #: round), all of them in memory, so that the machine's drift hits all rows alike; False: one
    #: row after the other, one model in memory at a time
    interleave: bool = True


@dataclass
class SpeedRow:
    model: str
    size: str
    batch_size: int
    latency_ms_median: float
    latency_ms_iqr: float
    latency_ms_min: float
    latency_ms_max: float
    fps: float
    gmac: float | None
    gflops_per_s: float | None
    relative_latency: float | None = None
    params_m: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    cpu_ms_median: float | None = None  # process CPU time per forward, all threads
    folded_bn: int = 0
    backend: str = "torch"
    backend_version: str = ""
    #: GMAC the prepared/exported model really computes (average pools moved before 1x1 convs); gmac is the architecture's
    gmac_executed: float | None = None
    #: clamp → 1x1 conv pairs the torch row runs in one pass (``inference.fuse_clamp_conv``), and how its kernel was built
    fused_clamp_conv: int = 0
    kernel: str = ""

    def json_row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SPEED_JSON_KEYS}


def build_compare_model(name: str, num_classes: int) -> nn.Module:
    """A zoo model (e.g. a ``tv-*`` peer) with random weights, as ``build_model`` makes it."""
    from ldnbench.models import build_model

    [key] = resolve_compare([name])
    return build_model(key, num_classes, checkpointing="none")


def image_gmacs(make: Callable[[], nn.Module], height: int, width: int) -> tuple[float, float]:
    """GMAC of one ``1x3xHxW`` eval forward, counted by the zoo's counter on the meta device: (the
    architecture's, what the prepared and exported model computes).

    ``make`` builds the model; it is called under ``torch.device("meta")`` (no weights, no arithmetic),
    so torchvision models and LDNs are counted by the same rules (convolutions and matrix products).
    The second count has the average pools moved before the 1x1 convolutions they follow
    (:func:`~ldnbench.inference.pool_before_pointwise`).
    """
    from ldnbench.models import count_macs

    with torch.device("meta"):
        model = make().eval()
    architecture = count_macs(model, height, width).gmac
    model, _ = pool_before_pointwise(model)
    return architecture, count_macs(model, height, width).gmac


def time_calls(calls: list[Callable[[], Any]], *, runs: int, warmup: int, device: str, precision: str = "fp32",
               interleave: bool = True, settle_s: float = 0.05) -> list[tuple[list[float], list[float]]]:
    """(wall-clock latencies, process CPU times) in seconds of ``runs`` timed calls of each of ``calls``
    after ``warmup`` untimed ones, device-synchronised. CPU time (all threads) does not depend on other load.

    ``interleave``: warm up and time in rounds, one call of each per round and the order reversed every
    other round, so that the machine's speed drifting over minutes (shared VMs) hits every call alike
    and their ratios stay fair; otherwise each call's runs follow one another. Interleaved calls start after
    ``settle_s`` idle seconds: ONNX Runtime's workers spin ~40 ms after a run, which would slow the
    call that follows by as much.
    """
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in calls]

    def timed(i: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        calls[i]()
        _sync(device)
        out[i][0].append(time.perf_counter() - t0)
        out[i][1].append(time.process_time() - c0)

    with torch.inference_mode(), autocast(precision, device):
        order = list(range(len(calls)))
        if interleave:
            # warm-up rounds alternate like the timed ones: the heap and the runtimes' arenas settle into
            # the state that interleaving keeps (after one warm-up per call in a row, the first timed
            # LDN121 forward at 1024x2048 following DeepLabV3's took 2.1-2.5 s against ~1.0 s for the rest)
            for r in range(warmup + runs):
                for i in (order if r % 2 == 0 else order[::-1]):
                    if r < warmup:
                        calls[i]()
                        continue
                    _sync(device)
                    time.sleep(settle_s)
                    timed(i)
        else:
            for i in order:
                for _ in range(warmup):
                    calls[i]()
                _sync(device)
                for _ in range(runs):
                    timed(i)
    return out


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _prepare(model: nn.Module, cfg: SpeedConfig, device: str) -> tuple[nn.Module, int]:
    """The model as ``eval`` runs it (:func:`~ldnbench.inference.prepare_model`) and how many BNs were folded."""
    net = prepare_model(model, device, channels_last=cfg.channels_last, fold_bn=cfg.fold_bn,
                        fused_kernel=cfg.fused_kernel)
    bns = lambda m: sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    return net, bns(model) - bns(net)


def _row(name: str, cfg: SpeedConfig, times: list[float], cpu: list[float], gmac: float | None,
         params: int) -> SpeedRow:
    h, w = cfg.size
    med = statistics.median(times)
    ms = [t * 1000 for t in times]
    return SpeedRow(
        model=name, size=f"{h}x{w}", batch_size=cfg.batch_size,
        latency_ms_median=round(med * 1000, 2),
        latency_ms_iqr=round(_quantile(ms, 0.75) - _quantile(ms, 0.25), 2),
        latency_ms_min=round(min(ms), 2), latency_ms_max=round(max(ms), 2),
        fps=round(cfg.batch_size / med, 4),
        gmac=round(gmac, 3) if gmac else None,
        gflops_per_s=round(2 * gmac * cfg.batch_size / med, 3) if gmac else None,
        params_m=round(params / 1e6, 3),
        latencies_ms=[round(t, 2) for t in ms], cpu_ms_median=round(statistics.median(cpu) * 1000, 2))


def _input(cfg: SpeedConfig) -> torch.Tensor:
    h, w = cfg.size
    return torch.randn(cfg.batch_size, 3, h, w, generator=torch.Generator().manual_seed(cfg.seed))


@dataclass
class _Timed:
    """One row to time: a ready forward (exported and compiled already) and what its row reports."""

    name: str
    backend: str
    call: Callable[[], Any]
    gmac: float
    params: int
    folded_bn: int = 0
    notes: dict = field(default_factory=dict)  # inference.model_notes of a torch row
    keep: Any = None  # what ``call`` needs alive (a DeployedModel and its export folder)
    gmac_executed: float = 0.0


def _timed(name: str, model: nn.Module, backend: str, cfg: SpeedConfig, device: str,
           gmacs: tuple[float, float]) -> _Timed:
    """``model``'s forward on a random ``cfg.batch_size x 3 x H x W`` input as ``backend`` runs it.

    torch: the model as ``eval`` prepares it. An ONNX runtime: the deployment call, float RGB 0..255
    in, logits in the runtime's reused output buffer (an application reads them there;
    ``DeployedModel`` adds a copy), exported and compiled here, before any warm-up.
    """
    params = sum(p.numel() for p in model.parameters())
    gmac, executed = gmacs
    if backend == "torch":
        net, folded = _prepare(model, cfg, device)
        x = _input(cfg).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return _Timed(name, backend, lambda: net(x), gmac, params, folded, model_notes(net), gmac_executed=executed)
    from ldnbench.deploy import DeployedModel, to_raw

    deployed = DeployedModel(model, backend, threads=cfg.threads, device=device)
    raw = to_raw(_input(cfg), deployed.normalization).numpy()
    runner = deployed.runner(tuple(raw.shape))
    return _Timed(name, backend, lambda: runner.infer(raw), gmac, params, keep=deployed, gmac_executed=executed)


def _timed_rows(timed: list[_Timed], cfg: SpeedConfig, device: str) -> list[SpeedRow]:
    from ldnbench.deploy import backend_version

    measured = time_calls([t.call for t in timed], runs=cfg.runs, warmup=cfg.warmup, device=device,
                          precision=cfg.precision, interleave=cfg.interleave)
    rows = []
    for t, (times, cpu) in zip(timed, measured):
        rows.append(_row(t.name, cfg, times, cpu, t.gmac, t.params))
        rows[-1].folded_bn, rows[-1].backend = t.folded_bn, t.backend
        rows[-1].fused_clamp_conv = t.notes.get("fused_clamp_conv", 0)
        rows[-1].kernel = t.notes.get("kernel", "")
        rows[-1].gmac_executed = round(t.gmac_executed, 3)
        rows[-1].backend_version = backend_version(t.backend)
    return rows


@dataclass
class SpeedResult:
    config: SpeedConfig
    rows: list[SpeedRow]
    #: whether freed memory was kept for reuse (``cfg.heap_reuse`` and glibc allowed it)
    heap_reuse: bool = False


def bench_speed(cfg: SpeedConfig, progress: Callable[[str], None] | None = None) -> SpeedResult:
    """Time ``cfg.model`` and then every ``cfg.compare`` model in this process, same input and settings."""
    from ldnbench.models import build_model

    compare = resolve_compare(list(cfg.compare))  # before any work: a typo must not cost a run
    device = check_device(cfg.device)
    check_precision(cfg.precision, device)
    if cfg.runs < 1 or cfg.warmup < 1 or cfg.batch_size < 1:
        raise UserError("--runs, --warmup and --batch-size must be at least 1.", 2)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    heap_reuse = reuse_freed_memory() if cfg.heap_reuse and device == "cpu" else False
    torch.manual_seed(cfg.seed)
    loaded = None
    if cfg.checkpoint:
        from ldnbench.checkpoints import load_checkpoint

        loaded, meta = load_checkpoint(cfg.checkpoint)
        cfg = dataclasses.replace(cfg, model=meta.model_name, num_classes=meta.num_classes,
                                  model_options=dict(meta.model_options))
    rows = []
    entries: list[tuple[str, Callable[[], nn.Module]]] = [
        (cfg.model, lambda: build_model(cfg.model, cfg.num_classes, **cfg.model_options))]
    entries += [(n, lambda n=n: build_compare_model(n, cfg.num_classes)) for n in compare]
    from ldnbench.deploy import check_backend

    for b in cfg.backends:  # a missing extra or a wrong device must fail before anything is timed
        check_backend(b, device, cfg.precision)
    pending: list[_Timed] = []
    for i, (name, make) in enumerate(entries):
        gmacs = image_gmacs(make, *cfg.size)
        model = loaded if i == 0 and loaded is not None else make()
        for backend in cfg.backends:
            if progress:
                progress(f"{name} [{backend}]: " + ("exporting/preparing" if cfg.interleave else
                         f"{cfg.warmup} warm-up + {cfg.runs} timed forwards of "
                         f"{cfg.batch_size}x3x{cfg.size[0]}x{cfg.size[1]} on {device}") + " ...")
            pending.append(_timed(name, model, backend, cfg, device, gmacs))
            if not cfg.interleave:  # one row in memory at a time
                rows += _timed_rows(pending, cfg, device)
                pending.clear()
                gc.collect()
        del model
    if pending:
        if progress:
            progress(f"{cfg.warmup} warm-up + {cfg.runs} timed forwards of {cfg.batch_size}x3x{cfg.size[0]}x"
                     f"{cfg.size[1]} on {device} for each of {len(pending)} rows, interleaved ...")
        rows = _timed_rows(pending, cfg, device)
        pending.clear()
        gc.collect()
    ref = rows[0].latency_ms_median
    for r in rows:
        r.relative_latency = round(r.latency_ms_median / ref, 3)
    return SpeedResult(cfg, rows, heap_reuse)


def speed_record(result: SpeedResult, command: list[str] | None = None) -> dict[str, Any]:
    """The ``bench-speed`` result record (one row per model, the first being the LDN model)."""
    from ldnbench.report.records import make_record

    cfg = result.config
    main_row = result.rows[0]
    metrics = {"latency_ms_median": main_row.latency_ms_median, "fps": main_row.fps,
               "gflops_per_s": main_row.gflops_per_s}
    for r in result.rows[1:]:
        metrics[f"speedup_vs_{r.model}"] = r.relative_latency
    conf = asdict(cfg)
    conf["size"] = f"{cfg.size[0]}x{cfg.size[1]}"
    conf["heap_reuse_applied"] = result.heap_reuse
    return make_record("bench-speed", model=cfg.model, model_options=cfg.model_options, device=cfg.device,
                       metrics=metrics, command=command, config=conf, rows=[asdict(r) for r in result.rows])


def format_speed_table(result: SpeedResult) -> str:
    ref_cpu = result.rows[0].cpu_ms_median
    lines = [f"{'model':<30} {'backend':<12} {'median ms':>10} {'IQR ms':>8} {'FPS':>7} {'GMAC':>8} {'GFLOP/s':>8} {'x slower':>8} "
             f"{'CPU ms':>9} {'x by CPU':>8}"]
    for r in result.rows:
        gm = f"{r.gmac:.1f}" if r.gmac is not None else "-"
        gf = f"{r.gflops_per_s:.1f}" if r.gflops_per_s is not None else "-"
        xc = f"{r.cpu_ms_median / ref_cpu:.2f}" if r.cpu_ms_median and ref_cpu else "-"
        lines.append(f"{r.model:<30} {r.backend:<12} {r.latency_ms_median:>10.1f} {r.latency_ms_iqr:>8.1f} {r.fps:>7.3f} "
                     f"{gm:>8} {gf:>8} {r.relative_latency:>8.2f} {r.cpu_ms_median or 0:>9.0f} {xc:>8}")
    cfg = result.config
    fused = {r.model: r.fused_clamp_conv for r in result.rows if r.backend == "torch" and r.fused_clamp_conv}
    kernel = next((r.kernel for r in result.rows if r.backend == "torch" and r.kernel), "")
    fusion = (f"; clamp-1x1(-ReLU) in one pass by ldnbench's C kernel: "
              f"{', '.join(f'{n} {k}x' for n, k in fused.items())}" if fused else
              f"; clamp-1x1 not fused: {kernel}" if kernel else "")
    lines.append(f"input {cfg.batch_size}x3x{cfg.size[0]}x{cfg.size[1]}, {cfg.device}, "
                 f"{cfg.precision}, "
                 f"{f'BN folded into convs (torch: BN-ReLU-1x1 as clamp-1x1{fusion})' if cfg.fold_bn else 'BN not folded'}, "
                 f"average pools before the 1x1 convs they follow, "
                 f"{'freed memory reused' if result.heap_reuse else 'freed memory returned to the OS'}, "
                 f"{'channels-last' if cfg.channels_last else 'NCHW'}, {torch.get_num_threads()} threads; "
                 f"GMAC per image; 'x slower' = median latency / {result.rows[0].model} [{result.rows[0].backend}]'s; "
                 f"'CPU ms' = process CPU time per forward (all threads), robust to other load")
    return "\n".join(lines + gflops_ratio_lines(result))


def gflops_ratio_lines(result: SpeedResult) -> list[str]:
    """Per compared model: the main model's best backend's GFLOP/s as a share of that model's (torch and best),
    and backend by backend."""
    main = result.rows[0].model
    best = lambda rows: max(rows, key=lambda r: r.gflops_per_s or 0)  # noqa: E731
    ours = best([r for r in result.rows if r.model == main])
    lines = []
    for other in dict.fromkeys(r.model for r in result.rows if r.model != main):
        rows = [r for r in result.rows if r.model == other]
        ref = {r.backend: r for r in rows}
        theirs = best(rows)
        if not (ours.gflops_per_s and theirs.gflops_per_s):
            continue
        torch_part = (f"{ours.gflops_per_s / ref['torch'].gflops_per_s:.0%} of {other}'s GFLOP/s in torch"
                      if "torch" in ref and ref["torch"].gflops_per_s else "")
        lines.append(f"{main} [{ours.backend}] reaches {torch_part}{', ' if torch_part else ''}"
                     f"{ours.gflops_per_s / theirs.gflops_per_s:.0%} of its best [{theirs.backend}]")
        done = lambda r: (r.gmac_executed or r.gmac) / r.gmac  # noqa: E731  (share of the counted MACs computed)
        if abs(done(ours) - 1) > 1e-3 or abs(done(theirs) - 1) > 1e-3:
            lines.append(f"{main} computes {ours.gmac_executed or ours.gmac:.1f} of its {ours.gmac:.1f} GMAC (average pools "
                         f"before the 1x1 convs they follow); on the MACs computed it reaches "
                         f"{ours.gflops_per_s * done(ours) / (theirs.gflops_per_s * done(theirs)):.0%} of {other}'s best")
        same = [f"{r.backend} {r.gflops_per_s / ref[r.backend].gflops_per_s:.0%}" for r in result.rows
                if r.model == main and r.gflops_per_s and r.backend in ref and ref[r.backend].gflops_per_s]
        if len(same) > 1 or (same and not torch_part):
            lines.append(f"{main} against {other} on the same backend: {', '.join(same)}")
    return lines


# ------------------------------------------------------------------------------------------------
# worker entry point: python -m ldnbench.bench memory-worker --policy P --config JSON --out FILE


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldnbench.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("memory-worker", help="measure one checkpointing policy (used by bench memory)")
    w.add_argument("--policy", required=True)
    w.add_argument("--config", required=True, help="MemoryConfig as JSON")
    w.add_argument("--out", required=True, help="file to write the MemoryRow JSON to")
    args = parser.parse_args(argv)
    cfg = MemoryConfig(**json.loads(args.config))

    def partial(row: MemoryRow) -> None:
        atomic_write_json(args.out, {**asdict(row), "max_batch_note": "the max-batch search did not finish"})

    try:
        row = measure_policy(cfg, args.policy, on_measured=partial)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    atomic_write_json(args.out, asdict(row))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
