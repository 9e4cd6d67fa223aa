"""torchvision's segmentation models as zoo members (``tv-*``), following the ldnbench model contract.

State-dict keys equal torchvision's (``backbone.*``, ``classifier.*``, ``aux_classifier.*``), so a
torchvision state dict loads as it is. ``eval()`` forward returns logits at input size; ``train()``
forward returns ``(logits, aux)`` where ``aux`` is ``[(aux_logits, 1)]``: torchvision's auxiliary FCN
head (on ``layer3`` / the MobileNet's /8 features) upsampled to the input, i.e. factor 1 of the
ldnbench aux-loss interface (plain cross-entropy on it), or ``[]`` without an aux head
(``aux=False``; LR-ASPP has none).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ldnbench.errors import UserError
from ldnbench.models.layers import BackboneSplit, upsample


@dataclass(frozen=True)
class PeerSpec:
    name: str
    builder: str  # torchvision.models.segmentation function
    backbone: str  # torchvision classification architecture of the backbone (ImageNet weights)
    head: str  # deeplabv3 | fcn | lraspp
    description: str
    #: torchvision's COCO-with-VOC-labels weights enum (label space voc21)
    coco_weights: str

    @property
    def has_aux_head(self) -> bool:
        return self.head != "lraspp"


PEERS: dict[str, PeerSpec] = {s.name: s for s in [
    PeerSpec("tv-deeplabv3-resnet50", "deeplabv3_resnet50", "resnet50", "deeplabv3",
             "DeepLabV3, ResNet-50 backbone, output stride 8", "DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"),
    PeerSpec("tv-deeplabv3-resnet101", "deeplabv3_resnet101", "resnet101", "deeplabv3",
             "DeepLabV3, ResNet-101 backbone, output stride 8",
             "DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"),
    PeerSpec("tv-deeplabv3-mobilenet-v3-large", "deeplabv3_mobilenet_v3_large", "mobilenet_v3_large", "deeplabv3",
             "DeepLabV3, MobileNetV3-Large backbone", "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"),
    PeerSpec("tv-fcn-resnet50", "fcn_resnet50", "resnet50", "fcn", "FCN, ResNet-50 backbone, output stride 8",
             "FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"),
    PeerSpec("tv-fcn-resnet101", "fcn_resnet101", "resnet101", "fcn", "FCN, ResNet-101 backbone, output stride 8",
             "FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"),
    PeerSpec("tv-lraspp-mobilenet-v3-large", "lraspp_mobilenet_v3_large", "mobilenet_v3_large", "lraspp",
             "Lite R-ASPP, MobileNetV3-Large backbone", "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"),
]}

#: torchvision's own function names (``deeplabv3_resnet50`` ...), accepted wherever a model name is.
PEER_ALIASES: dict[str, str] = {s.builder: s.name for s in PEERS.values()}


class TorchvisionSegNet(BackboneSplit, nn.Module):
    """A torchvision segmentation network behind the ldnbench model contract (see the module docstring)."""

    pad_multiple = 1  # any input size; torchvision upsamples the logits to it

    def __init__(self, spec: PeerSpec, num_classes: int, net: nn.Module):
        super().__init__()
        self.name = spec.name
        self.spec = spec
        self.num_classes = num_classes
        self.backbone = net.backbone
        self.classifier = net.classifier
        self.aux_classifier = getattr(net, "aux_classifier", None)
        self.checkpointing = "none"
        self.pretrained_report = None

    @property
    def aux_heads(self) -> list[nn.Module]:
        return [] if self.aux_classifier is None else [self.aux_classifier]

    def set_checkpointing(self, policy: str = "none") -> None:
        """Gradient checkpointing is not implemented for torchvision models; every policy name is accepted
        (so the trainer's default works) and training runs without checkpointing."""
        from ldnbench.models.checkpointing import get_policy

        get_policy(policy)


    def forward(self, x: Tensor):
        size = x.shape[-2:]
        features = self.backbone(x)
        # LR-ASPP's head reads both the /8 ("low") and /16 ("high") features; the others read "out"
        logits = upsample(self.classifier(features if self.spec.head == "lraspp" else features["out"]), size)
        if not self.training:
            return logits
        aux = [] if self.aux_classifier is None else [(upsample(self.aux_classifier(features["aux"]), size), 1)]
        return logits, aux


def build_peer(name: str, num_classes: int, *, pretrained: str | None = None, aux: bool | None = None,
               imagenet_compatible: bool = True, **options) -> TorchvisionSegNet:
    """Build ``tv-*`` model ``name``: random weights, or the backbone from ``pretrained`` (``"imagenet"``:
    torchvision's ImageNet weights via the hub cache / weights API; or a torchvision state-dict file).
    ``aux``: build torchvision's auxiliary head (default: yes where torchvision has one).
    ``imagenet_compatible`` is accepted for uniformity (these models have one layout)."""
    from torchvision.models import segmentation

    spec = PEERS[name]
    if options:
        raise UserError(f"unknown model option(s) {', '.join(sorted(options))} for {name}; valid: pretrained, aux, "
                        f"checkpointing", 2)
    aux = spec.has_aux_head if aux is None else bool(aux)
    if aux and not spec.has_aux_head:
        raise UserError(f"{name} has no auxiliary head in torchvision; drop aux=true", 2)
    kw = {"aux_loss": aux} if spec.has_aux_head else {}
    net = getattr(segmentation, spec.builder)(weights=None, weights_backbone=None, num_classes=num_classes, **kw)
    model = TorchvisionSegNet(spec, num_classes, net)
    if pretrained is not None:
        from ldnbench.models.weights import load_backbone_file

        model.pretrained_report = load_backbone_file(model.backbone, spec.backbone, pretrained, name,
                                                     weights_name="IMAGENET1K_V1")
    return model
