"""Where and how computation runs: device, numeric precision, and the torchrun process group.

The precision rule: every reported number is computed in float32 unless reduced precision is
asked for by name (``precision="bf16"`` / ``"fp16"``). Nothing here ever switches reduced
precision on because the hardware could do it, so the same checkpoint and data give the same
number on every machine.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ldnbench.errors import UserError
from ldnbench.train_config import AMP_MODES

#: Inference/evaluation precisions, by name. ``fp32`` is the default everywhere.
PRECISIONS = ("fp32", "bf16", "fp16")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --- device -----------------------------------------------------------------------------------


def local_rank() -> int:
    """This process's LOCAL_RANK under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str = "cpu") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if present, else CPU) as a checked device.

    Under torchrun ``cuda`` means this process's ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` would
    put every process on one GPU, so it is refused there.
    """
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (torch sees no GPU); "
                            "use --device cpu", 2)
        if name == "cuda":
            return torch.device("cuda", local_rank() if launched_world_size() > 1 else torch.cuda.current_device())
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N", 2) from None
        if launched_world_size() > 1:
            raise UserError(f"--device {name} under torchrun would put every process on one GPU; pass --device "
                            "cuda and each process takes the GPU of its LOCAL_RANK", 2)
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)", 2)
        return torch.device("cuda", index)
    raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N", 2)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(limit: int = 4) -> int:
    """DataLoader processes: ``min(limit, usable CPUs)``."""
    return max(1, min(limit, usable_cpus()))


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels of ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- precision --------------------------------------------------------------------------------


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU of compute capability 8.0 or newer
    (Ampere+; emulated bf16 does not count), or a CPU on which oneDNN runs bf16 kernels.

    Informative only (``bench`` reports it): it never picks a precision.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index)[0] >= 8
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: str | torch.device) -> str:
    """``precision`` after checking it is a known name that ``device`` can run (UserError otherwise)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}", 2)
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise UserError("fp16 inference needs CUDA; use --precision bf16 or fp32 on CPU", 2)
    return precision


def autocast(precision: str, device: str | torch.device):
    """The compute context of ``precision`` on ``device``: autocast for bf16/fp16; for ``fp32`` on
    CUDA, cuDNN convolutions without TF32 (torch allows TF32 there by default, which rounds inputs to
    10 mantissa bits: not float32)."""
    if precision == "fp32":
        if torch.device(device).type == "cuda":
            return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def resolve_amp(amp: str, device: str | torch.device) -> str:
    """A training mixed-precision mode → ``none``, ``bf16`` or ``fp16``.

    ``auto`` depends on the device type alone, never on what a particular chip supports: bf16 on
    CPU, fp16 (with gradient scaling) on CUDA, so one command trains the same way on every GPU.
    """
    if amp not in AMP_MODES:
        raise UserError(f"unknown --amp mode {amp!r}; use {', '.join(AMP_MODES)}", 2)
    device = torch.device(device)
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("fp16 mixed precision needs CUDA; use --amp bf16 on CPU", 2)
    return amp


def amp_precision(amp: str) -> str:
    """The :data:`PRECISIONS` name of a resolved training amp mode (``none`` → ``fp32``)."""
    return "fp32" if amp == "none" else amp


# --- distributed ------------------------------------------------------------------------------


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@dataclass
class Distributed:
    """The process group torchrun describes, joined on enter and torn down on exit (if created here).

    ``with Distributed(device) as d:`` gives ``d.rank``, ``d.world``, ``d.local_rank``; outside a
    torchrun launch it is a single process (rank 0 of 1). A group that already exists is used as is
    and left for its creator to destroy.
    """

    device: str | torch.device = "cpu"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> "Distributed":
        self.local_rank = local_rank()
        if not is_distributed() and launched_world_size() > 1 and dist.is_available():
            name = str(self.device)
            cuda = torch.cuda.is_available() if name == "auto" else torch.device(name).type == "cuda"
            if cuda:
                torch.cuda.set_device(self.local_rank)  # before NCCL starts, or every rank talks to GPU 0
            dist.init_process_group("nccl" if cuda else "gloo")
            self.created = True
        self.rank, self.world = get_rank(), get_world_size()
        return self

    def __exit__(self, *exc) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
        self.created = False

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes in place (no-op for one process)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor
