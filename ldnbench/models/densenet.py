"""DenseNet-BC backbone with torchvision's parameter layout, block splits (pooling "D") and dilation.

State-dict keys equal torchvision's ``features.*`` keys without the ``features.`` prefix
(``conv0``, ``norm0``, ``denseblock1.denselayer1.norm1`` ...), so torchvision/ImageNet weights load
directly when ``bottleneck_always=True`` (the full torchvision layout).

With ``bottleneck_always=False`` (the reference code's ``pretrained=0`` path, which reproduces the paper's
parameter and MAC counts) a dense unit whose input has at most ``bn_size * growth`` maps has no
1×1 bottleneck, and the stem has no ``norm0``/``relu0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldnbench.models.checkpointing import CheckpointPolicy, maybe_checkpoint
from ldnbench.models.layers import BatchNorm2d

#: Unit policies whose checkpoint segments start with the concatenation: every unit output is then
#: cached on its own, and a block's concatenation is only formed inside the segments that read it.
LAZY_CAT_UNITS = ("cat-1x1", "cat-1x1+3x3", "cat-1x1-3x3")


def cat(features: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """A block output given as a tensor or as its list of feature maps, as one tensor."""
    if isinstance(features, Tensor):
        return features
    return features[0] if len(features) == 1 else torch.cat(features, 1)


def parts(features: Tensor | list[Tensor]) -> list[Tensor]:
    """The feature maps of a block output (a list, or one tensor), to pass into a checkpoint segment."""
    return [features] if isinstance(features, Tensor) else list(features)


# depth -> (growth, blocks, initial features), as torchvision / the reference code
DENSENET_DEPTHS: dict[int, tuple[int, tuple[int, ...], int]] = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}


@dataclass(frozen=True)
class DenseNetConfig:
    """Backbone configuration. ``strides[i]`` is the stride of the transition after block ``i``
    (1 = no pooling, for dilated variants), ``splits[i]`` splits block ``i`` in half by a 2×2
    average pool, ``dilations[i]`` dilates the 3×3 convs of block ``i``. ``stem_pool`` is the kernel of
    the stem's stride-2 max pool: 3 (torchvision's ``MaxPool2d(3, 2, 1)``) or 2 (``MaxPool2d(2, 2)``, the
    reference code's, needed for a faithful forward of the paper's released checkpoints)."""

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    bottleneck_always: bool = False
    strides: tuple[int, ...] = (2, 2, 2)
    splits: tuple[bool, ...] = (False, False, True, False)
    dilations: tuple[int, ...] = (1, 1, 1, 1)
    stem_skip: bool = False
    stem_pool: int = 3


class DenseLayer(nn.Module):
    """One dense unit: [BN-ReLU-1×1 bottleneck] then BN-ReLU-3×3 on the concatenation of its inputs."""

    def __init__(self, cin: int, growth: int, bn_size: int, bottleneck: bool, dilation: int = 1):
        super().__init__()
        mid = cin
        if bottleneck:
            mid = bn_size * growth
            self.norm1 = BatchNorm2d(cin)
            self.relu1 = nn.ReLU(inplace=True)  # a module, so eval-time folding can replace the triple
            self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2 = BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)  # a module, so eval-time fusion can move it into the 1×1 before
        self.conv2 = nn.Conv2d(mid, growth, 3, padding=dilation, dilation=dilation, bias=False)
        self.has_bottleneck = bottleneck

    def cat_1x1(self, *features: Tensor) -> Tensor:
        x = features[0] if len(features) == 1 else torch.cat(features, 1)
        if self.has_bottleneck:
            x = self.conv1(self.relu1(self.norm1(x)))
        return x

    def conv3x3(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu2(self.norm2(x)))

    def unit(self, *features: Tensor) -> Tensor:
        return self.conv3x3(self.cat_1x1(*features))

    def forward(self, features: list[Tensor], unit_policy: str = "none") -> Tensor:
        ckpt = self.training
        if unit_policy == "cat-1x1-3x3":
            return maybe_checkpoint(ckpt, self.unit, *features, modules=[self])
        h = maybe_checkpoint(ckpt and unit_policy in ("cat-1x1", "cat-1x1+3x3"), self.cat_1x1, *features,
                             modules=[self])
        return maybe_checkpoint(ckpt and unit_policy in ("3x3", "cat-1x1+3x3"), self.conv3x3, h, modules=[self])


class DenseBlock(nn.ModuleDict):
    """A dense block (``denselayer1`` ... like torchvision). ``split`` inserts the pooling layer D
    after half of the units; the concatenation at that point is returned as an extra skip."""

    def __init__(self, cin: int, n: int, growth: int, bn_size: int, bottleneck_always: bool, dilation: int,
                 split: bool):
        super().__init__()
        for i in range(n):
            c = cin + i * growth
            self[f"denselayer{i + 1}"] = DenseLayer(c, growth, bn_size, bottleneck_always or c > bn_size * growth,
                                                    dilation)
        self.split_at = n // 2 if split else None
        self.growth = growth
        self.out_channels = cin + n * growth
        self.split_channels = cin + (n // 2) * growth if split else None

    def _run(self, layers: list[DenseLayer], x: Tensor, unit_policy: str, lazy: bool = False) -> Tensor | list[Tensor]:
        if not torch.is_grad_enabled():
            return self._run_preallocated(layers, x)
        features = [x]
        for layer in layers:
            features.append(layer(features, unit_policy))
        # lazy: the unit checkpoints cache every feature map already; a concatenation here would
        # keep all of them a second time (as the input of the transition-down and as a ladder skip)
        return features if lazy else torch.cat(features, 1)

    def _run_preallocated(self, layers: list[DenseLayer], x: Tensor) -> Tensor:
        # Without autograd, write every unit's output into one preallocated tensor instead of
        # re-concatenating all previous features for each unit (torchvision's quadratic copying).
        c = x.shape[1]
        fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        out = torch.empty((x.shape[0], c + len(layers) * self.growth, *x.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=fmt)
        out[:, :c] = x
        for layer in layers:
            out[:, c:c + self.growth] = layer.unit(out[:, :c])
            c += self.growth
        return out

    def forward(self, x: Tensor, policy: CheckpointPolicy) -> tuple[Tensor | list[Tensor], Tensor | list[Tensor] | None]:
        """(block output, split skip or None); with a unit policy from :data:`LAZY_CAT_UNITS` in
        training both are lists of feature maps (see :func:`cat`)."""
        layers = list(self.values())
        unit = "none" if policy.unit == "block" else policy.unit
        ckpt = self.training and policy.unit == "block"
        lazy = self.training and unit in LAZY_CAT_UNITS and torch.is_grad_enabled()
        halves = [layers] if self.split_at is None else [layers[:self.split_at], layers[self.split_at:]]
        skip = None
        for i, half in enumerate(halves):
            if i == 1:
                skip = x
                x = maybe_checkpoint(lazy, lambda *fs: F.avg_pool2d(cat(fs), 2, 2), *parts(x), modules=[])
            x = maybe_checkpoint(ckpt, lambda t, p=half: self._run(p, t, unit, lazy), x, modules=half)
        return x, skip


class Transition(nn.Sequential):
    """BN-ReLU-1×1 halving the maps, then 2×2 average pooling (omitted when ``stride == 1``)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.norm = BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        if stride > 1:
            self.pool = nn.AvgPool2d(stride, stride)


class DenseNetBackbone(nn.Module):
    """DenseNet feature extractor returning the last block's output and the ladder skips.

    Skips (fine → coarse) are the tensors entering each strided transition and the concatenation at
    each split, plus the stem output at /2 when ``stem_skip``.
    """

    def __init__(self, cfg: DenseNetConfig):
        super().__init__()
        self.cfg = cfg
        self.policy = CheckpointPolicy()
        c = cfg.num_init_features
        self.conv0 = nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False)
        if cfg.bottleneck_always:
            self.norm0 = BatchNorm2d(c)
        if cfg.stem_pool not in (2, 3):
            raise ValueError(f"stem_pool must be 2 or 3, got {cfg.stem_pool}")
        self.pool0 = nn.MaxPool2d(3, 2, 1) if cfg.stem_pool == 3 else nn.MaxPool2d(2, 2)
        red = 4
        self.skip_channels: list[int] = [c] if cfg.stem_skip else []
        self.skip_reductions: list[int] = [2] if cfg.stem_skip else []
        n_blocks = len(cfg.block_config)
        for i, n in enumerate(cfg.block_config):
            block = DenseBlock(c, n, cfg.growth_rate, cfg.bn_size, cfg.bottleneck_always, cfg.dilations[i],
                               cfg.splits[i])
            self.add_module(f"denseblock{i + 1}", block)
            if block.split_channels is not None:
                self.skip_channels.append(block.split_channels)
                self.skip_reductions.append(red)
                red *= 2
            c = block.out_channels
            if i < n_blocks - 1:
                stride = cfg.strides[i]
                if stride > 1:
                    self.skip_channels.append(c)
                    self.skip_reductions.append(red)
                    red *= stride
                self.add_module(f"transition{i + 1}", Transition(c, c // 2, stride))
                c //= 2
        self.out_channels = c
        self.reduction = red

    def set_checkpointing(self, policy: CheckpointPolicy) -> None:
        self.policy = policy

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.conv0(x)
        if self.cfg.bottleneck_always:
            s = F.relu(self.norm0(s), inplace=True)
        return self.pool0(s), s

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor | list[Tensor]]]:
        """(last block output, skips fine → coarse); in training with a unit policy from
        :data:`LAZY_CAT_UNITS` a skip may be a list of feature maps (see :func:`cat`)."""
        p = self.policy
        x, stem = maybe_checkpoint(p.stem and self.training, self._stem, x,
                                   modules=[self.conv0] + ([self.norm0] if self.cfg.bottleneck_always else []))
        skips = [stem] if self.cfg.stem_skip else []
        n_blocks = len(self.cfg.block_config)
        for i in range(n_blocks):
            x, split_skip = getattr(self, f"denseblock{i + 1}")(x, p)
            if split_skip is not None:
                # The split skip is the input of the pooled second half; insert it before that half's output.
                skips.append(split_skip)
            if i < n_blocks - 1:
                td = getattr(self, f"transition{i + 1}")
                if not p.td:
                    x = cat(x)  # one concatenation, shared by the skip and the transition's saved input
                if self.cfg.strides[i] > 1:
                    skips.append(x)
                x = maybe_checkpoint(p.td and self.training, lambda *fs, td=td: td(cat(fs)), *parts(x), modules=[td])
        return cat(x), skips
