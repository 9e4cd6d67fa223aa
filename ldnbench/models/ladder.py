"""The ladder segmentation model: backbone → context (SPP) → transition-up blocks → classifier."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ldnbench.models.checkpointing import DEFAULT_TRAIN_POLICY, get_policy, maybe_checkpoint
from ldnbench.models.densenet import cat, parts
from ldnbench.models.layers import (
    BackboneSplit,
    BNReLUConv,
    PyramidPoolingPSP,
    SpatialPyramidPooling,
    TransitionUp,
    pad_to_multiple,
    upsample,
)


@dataclass(frozen=True)
class HeadConfig:
    """Everything after the backbone.

    ``context``: ``spp`` (the paper's), ``psp`` (PSPNet pooling, ablation), ``conv3x3`` (NoSPP
    ablation: one BN-ReLU-3×3) or ``none``. ``up_widths``: output widths of the TU blocks, coarse →
    fine (empty = no upsampling path, logits straight from the context features).
    """

    context: str = "spp"
    spp_bt: int = 512
    spp_level: int = 128
    spp_out: int = 256
    spp_grids: tuple[int, ...] = (8, 4, 2, 1)
    up_widths: tuple[int, ...] = (256, 256, 128, 128)
    up_bottleneck: int = 128
    aux: bool = True
    dws: bool = False


class LadderNet(BackboneSplit, nn.Module):
    """Semantic segmentation model following the ldnbench model contract.

    Input: normalised float ``N×3×H×W`` of any size; it is zero-padded bottom/right to a multiple
    of ``pad_multiple``. ``eval()`` forward returns logits ``N×C×H×W``; ``train()`` forward returns
    ``(logits, aux)`` with ``aux`` a list of ``(aux_logits, factor)`` where ``aux_logits`` has
    size ``(Hp/factor, Wp/factor)`` of the padded input (coarsest first; empty without aux heads).
    """

    def __init__(self, name: str, num_classes: int, backbone: nn.Module, head: HeadConfig):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.head_config = head
        self.backbone = backbone
        c = backbone.out_channels
        if head.context == "spp":
            self.context = SpatialPyramidPooling(c, head.spp_bt, head.spp_level, head.spp_out, head.spp_grids)
            c = head.spp_out
        elif head.context == "psp":
            self.context = PyramidPoolingPSP(c, head.spp_out)
            c = head.spp_out
        elif head.context == "conv3x3":
            self.context = BNReLUConv(c, head.spp_out, 3)
            c = head.spp_out
        elif head.context == "none":
            self.context = nn.Identity()
        else:
            raise ValueError(f"unknown context module {head.context!r}")
        n_up = len(head.up_widths)
        skip_c = backbone.skip_channels[len(backbone.skip_channels) - n_up:][::-1] if n_up else []
        skip_r = backbone.skip_reductions[len(backbone.skip_reductions) - n_up:][::-1] if n_up else []
        if n_up > len(backbone.skip_channels) or any(r != backbone.reduction >> (i + 1) for i, r in enumerate(skip_r)):
            raise ValueError(f"backbone skips at /{backbone.skip_reductions} cannot feed {n_up} upsampling steps "
                             f"from /{backbone.reduction}")
        self.ups = nn.ModuleList()
        self.aux_heads = nn.ModuleList()
        self.aux_factors = []
        red = backbone.reduction
        for width, sc in zip(head.up_widths, skip_c):
            if head.aux:
                self.aux_heads.append(BNReLUConv(c, num_classes, 1, bias=True))
                self.aux_factors.append(red)
            self.ups.append(TransitionUp(c, sc, width, head.up_bottleneck, separable=head.dws))
            c = width
            red //= 2
        self.logits = BNReLUConv(c, num_classes, 1, bias=True)
        self.output_reduction = red
        self.pad_multiple = backbone.reduction
        self.checkpointing = "none"
        self.pretrained_report = None  # set by build_model when backbone weights are loaded
        self._policy = get_policy("none")
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference code: He init for convs, (1, 0) for BN, Xavier for the (aux) logits.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for head in [self.logits, *self.aux_heads]:
            nn.init.xavier_normal_(head.conv.weight)

    def set_checkpointing(self, policy: str = DEFAULT_TRAIN_POLICY) -> None:
        """Select a checkpointing policy of paper Table 11 by name (see :mod:`~ldnbench.models.checkpointing`)."""
        p = get_policy(policy)
        self._policy = p
        self.checkpointing = p.name
        self.backbone.set_checkpointing(p)


    def forward(self, x: Tensor):
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        hp, wp = x.shape[-2:]
        y, skips = self.backbone(x)
        y = self.context(y)
        aux = []
        ckpt_up = self._policy.up and self.training
        skips = skips[::-1]
        for i, tu in enumerate(self.ups):
            if self.training and self.aux_heads:
                aux.append((self.aux_heads[i](y), self.aux_factors[i]))
            # a skip may be a DenseNet block's list of feature maps: concatenated inside the segment
            y = maybe_checkpoint(ckpt_up, lambda y, *s, tu=tu: tu(y, cat(s)), y, *parts(skips[i]), modules=[tu])
        logits = maybe_checkpoint(ckpt_up, self.logits, y, modules=[self.logits])
        logits = upsample(logits, (hp, wp))
        if (hp, wp) != (h, w):
            logits = logits[..., :h, :w]
        return (logits, aux) if self.training else logits
