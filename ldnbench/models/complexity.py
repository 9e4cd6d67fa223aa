"""Parameter and multiply-add counting with ``torch.utils.flop_counter`` on the meta device.

``FlopCounterMode`` counts 2 FLOPs per multiply-add for convolutions and matrix products (and
attention); BatchNorm, ReLU, pooling, interpolation, additions and concatenation are not counted.
The paper's "FLOP" column counts multiply-adds, so ``gmac = total / 2 / 1e9`` is what compares to
it. The model runs on ``torch.device("meta")`` (shapes only, no arithmetic), so counting a
1024×1024 forward pass takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Complexity:
    """Cost of one eval-mode forward pass of a ``1×3×height×width`` image."""

    model: str
    height: int
    width: int
    params: int
    gmac: float
    gflop: float
    counted_ops: dict[str, float]  # aten op -> GMAC
    uncounted_ops: list[str]
    padded: tuple[int, int] = (0, 0)  # size the model computes on after padding to its pad_multiple

    @property
    def params_m(self) -> float:
        return self.params / 1e6


class _OpRecorder(TorchDispatchMode):
    """Records the name of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, auxiliary heads included)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, height: int = 1024, width: int = 1024, name: str | None = None) -> Complexity:
    """Count the eval-mode forward pass of one ``height×width`` image; ``model`` may live on any device
    (meta is fastest: build it under ``with torch.device("meta"):``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, height, width, device=device)
    counter = FlopCounterMode(display=False)
    recorder = _OpRecorder()
    try:
        with torch.no_grad(), counter, recorder:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts().get("Global", {})
    counted = {str(op): flops / 2e9 for op, flops in counts.items()}
    total = counter.get_total_flops()
    m = getattr(model, "pad_multiple", 1)
    padded = (-(-height // m) * m, -(-width // m) * m)
    return Complexity(name or getattr(model, "name", type(model).__name__), height, width, count_params(model),
                      total / 2e9, total / 1e9, counted, sorted(recorder.seen - set(counted)), padded)


def model_complexity(name: str, height: int = 1024, width: int = 1024, num_classes: int = 19,
                     imagenet_compatible: bool = False, **options) -> Complexity:
    """Build ``name`` on the meta device and count it; ``options`` are ``build_model`` options (a
    checkpoint's ``meta.model_options``, e.g. ``spp_out=512, stem_pool=2`` of a converted LDN)."""
    from ldnbench.models.registry import build_model

    with torch.device("meta"):
        model = build_model(name, num_classes, imagenet_compatible=imagenet_compatible, **options)
    return count_macs(model, height, width)
