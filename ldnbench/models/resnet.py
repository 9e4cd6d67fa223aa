"""ResNet backbone for the ladder ResNets (LRN): torchvision's ResNet without ``avgpool``/``fc``.

State-dict keys equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...). Skips are the
outputs of ``layer1``..``layer3`` (after the ReLU; SwiftNet taps them before it, which changes neither
parameters nor MACs). BatchNorm layers are :class:`~ldnbench.models.layers.BatchNorm2d` so that
recomputation in checkpoint segments does not update running statistics twice.
"""

from __future__ import annotations

from functools import partial

import torchvision
from torch import Tensor, nn

from ldnbench.models.checkpointing import CheckpointPolicy, maybe_checkpoint
from ldnbench.models.layers import BatchNorm2d

RESNET_DEPTHS = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50,
                 101: torchvision.models.resnet101, 152: torchvision.models.resnet152}


class ResNetBackbone(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        net = RESNET_DEPTHS[depth](weights=None, norm_layer=partial(BatchNorm2d))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        widths = [layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels
                  for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
        self.skip_channels = widths[:3]
        self.skip_reductions = [4, 8, 16]
        self.out_channels = widths[3]
        self.reduction = 32
        self.policy = CheckpointPolicy()

    def set_checkpointing(self, policy: CheckpointPolicy) -> None:
        self.policy = policy

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _layer(self, layer: nn.Sequential, x: Tensor) -> Tensor:
        p = self.policy
        ckpt = self.training
        if p.unit == "block":
            return maybe_checkpoint(ckpt, layer, x, modules=[layer])
        for blk in layer:
            x = maybe_checkpoint(ckpt and p.unit != "none", blk, x, modules=[blk])
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = maybe_checkpoint(self.policy.stem and self.training, self._stem, x, modules=[self.conv1, self.bn1])
        skips = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = self._layer(layer, x)
            skips.append(x)
        return self._layer(self.layer4, x), skips
