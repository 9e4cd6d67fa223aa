"""Building blocks shared by the DenseNet and ResNet ladders: pre-activation convs, SPP, transition-up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel ``(a, s)`` with ``bn(x) == a·x + s`` in eval mode (running statistics)."""
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    s = -bn.running_mean * a
    if bn.bias is not None:
        s = s + bn.bias
    return a, s


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same state-dict keys) whose running-statistics update can be switched off.

    Checkpointed segments run their forward twice per step; during the recomputation
    ``update_stats`` is False so the batch is normalised with the same batch statistics but the
    running mean/var are updated exactly once (see :mod:`ldnbench.models.checkpointing`).
    A training batch with a single value per channel is normalised with the running statistics.
    """

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.update_stats = True

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.numel() == x.shape[1] and self.running_mean is not None:
            # One value per channel (SPP's 1×1 grid cell at batch size 1): batch statistics are undefined,
            # so normalise with the running ones instead of failing.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.training and not self.update_stats and self.running_mean is not None:
            # Same op as the first pass (autograd saves the same tensors), but the update goes to throwaway copies.
            return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias, True,
                                0.0 if self.momentum is None else self.momentum, self.eps)
        if not self.training and self.running_mean is not None and x.dim() == 4 and not torch.compiler.is_compiling():
            # Eval: one multiply-add. F.batch_norm is 2x slower on the channel-prefix views of a
            # preallocated dense-block concatenation (eager LDN121 at 1024x2048: 300 ms of 1.25 s).
            # Exported and compiled graphs keep the BatchNorm op, which their runtimes fuse themselves.
            scale, shift = bn_scale_shift(self)
            return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
        return super().forward(x)


class BNReLUConv(nn.Sequential):
    """Pre-activation unit BN → ReLU → Conv (no conv bias unless asked), as in the reference code.

    ``separable=True`` makes a k×k conv depthwise (k×k, no bias) followed by a pointwise 1×1 (the DWS ablation).
    """

    def __init__(self, cin: int, cout: int, k: int = 1, bias: bool = False, dilation: int = 1,
                 separable: bool = False):
        super().__init__()
        self.norm = BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        pad = dilation * (k // 2)
        if separable and k > 1:
            self.conv = nn.Sequential(
                nn.Conv2d(cin, cin, k, padding=pad, dilation=dilation, groups=cin, bias=False),
                nn.Conv2d(cin, cout, 1, bias=bias),
            )
        else:
            self.conv = nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=bias)


def upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize (``align_corners=False``, as in the reference code)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad bottom/right so that height and width are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph))


class SpatialPyramidPooling(nn.Module):
    """The paper's SPP (Fig. 2): 1×1 bottleneck, average pools over grids with ``g`` rows and
    aspect-ratio columns, 1×1 per level, bilinear upsampling, concatenation and a 1×1 fuse."""

    def __init__(self, cin: int, bt: int = 512, level: int = 128, out: int = 256,
                 grids: tuple[int, ...] = (8, 4, 2, 1), square_grid: bool = False):
        super().__init__()
        self.grids = tuple(grids)
        self.square_grid = square_grid
        self.bt = BNReLUConv(cin, bt, 1)
        self.levels = nn.ModuleList(BNReLUConv(bt, level, 1) for _ in grids)
        self.fuse = BNReLUConv(bt + level * len(grids), out, 1)
        self.out_channels = out

    def forward(self, x: Tensor) -> Tensor:
        x = self.bt(x)
        h, w = (int(v) for v in x.shape[-2:])  # plain ints: traced and exported graphs take the grid as constant
        parts = [x]
        for g, conv in zip(self.grids, self.levels):
            # (w / h) * g, evaluated in the reference code's order so that .5 ties round the same way
            cells = (g, g) if self.square_grid else (g, max(1, round(w / h * g)))
            parts.append(upsample(conv(F.adaptive_avg_pool2d(x, cells)), (h, w)))
        return self.fuse(torch.cat(parts, 1))


class PyramidPoolingPSP(nn.Module):
    """PSPNet-style pyramid pooling [17] for the ablation: square grids 1/2/3/6, a 1×1 conv to
    ``cin/4`` maps per level, concatenation with the input and a 1×1 fuse."""

    def __init__(self, cin: int, out: int = 256, grids: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.grids = tuple(grids)
        level = cin // len(grids)
        self.levels = nn.ModuleList(BNReLUConv(cin, level, 1) for _ in grids)
        self.fuse = BNReLUConv(cin + level * len(grids), out, 1)
        self.out_channels = out

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        parts = [x] + [upsample(conv(F.adaptive_avg_pool2d(x, g)), size) for g, conv in zip(self.grids, self.levels)]
        return self.fuse(torch.cat(parts, 1))


class TransitionUp(nn.Module):
    """Residual transition-up block (paper Fig. 3, reference ``UpsampleResidual``).

    The skip is projected to the input width, added to the upsampled input, reduced to
    ``bottleneck`` maps by a 1×1 (only when wider), blended by one 3×3 to ``cout`` maps, and the
    upsampled input (projected to ``cout`` when the widths differ) is added back.
    """

    def __init__(self, cin: int, skip_channels: int, cout: int, bottleneck: int = 128,
                 separable: bool = False):
        super().__init__()
        self.proj = BNReLUConv(skip_channels, cin, 1)
        self.bt = BNReLUConv(cin, bottleneck, 1) if cin > bottleneck else None
        self.blend = BNReLUConv(bottleneck if cin > bottleneck else cin, cout, 3, separable=separable)
        self.skip_bt = BNReLUConv(cin, cout, 1) if cin != cout else None
        self.out_channels = cout

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        skip = self.proj(skip)
        up = upsample(x, skip.shape[-2:])
        y = skip + up
        if self.bt is not None:
            y = self.bt(y)
        y = self.blend(y)
        return y + (up if self.skip_bt is None else self.skip_bt(up))


class BackboneSplit:
    """Mixin of segmentation models with a ``backbone`` submodule: the parameter groups of training
    (the ImageNet-initialisable backbone gets its own learning rate)."""

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (ImageNet-initialisable) backbone."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything else: context module, upsampling path, classifier, aux heads."""
        ids = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in ids]
