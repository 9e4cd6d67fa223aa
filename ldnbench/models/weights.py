"""ImageNet initialisation of the backbone from torchvision weights (downloaded or from a file)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from ldnbench.errors import UserError

# torchvision's old DenseNet checkpoints (the ones its weights API serves) name unit layers
# "norm.1"/"conv.2"; the modules are now "norm1"/"conv2" (torchvision.models.densenet does the same).
_OLD_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
# Parts of the classification network that the segmentation backbone does not have.
_CLASSIFIER_KEY = re.compile(r"^(classifier|fc|norm5)\.")


@dataclass
class LoadReport:
    """What happened when loading a state dict into the backbone."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape-mismatched", self.mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        return "; ".join(parts)


def torchvision_arch(family: str, depth: int) -> str:
    return f"{family}{depth}"


def normalize_state_dict(state: dict) -> dict:
    """Map a torchvision classification state dict onto backbone keys: strip ``features.`` / ``module.``,
    rename old DenseNet keys, drop the classifier and ``norm5``."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "features."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        m = _OLD_DENSE_KEY.match(key)
        if m:
            key = m.group(1) + m.group(2)
        if not _CLASSIFIER_KEY.match(key):
            out[key] = value
    return out


def load_backbone_state(backbone: nn.Module, state: dict, source: str) -> LoadReport:
    """Load a torchvision-format state dict into ``backbone``; incompatible shapes are skipped and reported."""
    state = normalize_state_dict(state)
    own = backbone.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape))
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    backbone.load_state_dict(usable, strict=False)
    missing = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    return LoadReport(source, len(usable), missing, unexpected, mismatched)


def _weights_state(weights, what: str, fallback: str) -> dict:
    """State dict of a torchvision weights enum member: the torch hub cache first, then the download."""
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    advice = f"download {url} on a machine with internet and {fallback} (or copy it to {cached})"
    if not cached.exists():
        # Fail in well under a second offline instead of letting urllib wait for a connection.
        host = urlparse(url).hostname
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as e:
            raise UserError(f"cannot download {what} ({host} unreachable: {e}); {advice}") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # urllib, hash and unpickling errors all mean the same to the user
        raise UserError(f"cannot get {what} ({type(e).__name__}: {e}); {advice}") from None


def _imagenet_state_dict(arch: str, weights_name: str = "DEFAULT") -> dict:
    try:
        weights = getattr(torchvision.models.get_model_weights(arch), weights_name)
    except (ValueError, AttributeError):
        raise UserError(f"torchvision has no ImageNet weights for {arch}; use pretrained=None or a state-dict path") \
            from None
    return _weights_state(weights, f"ImageNet weights for {arch}", "pass its path as the pretrained weights")


def torchvision_weights_state(name: str) -> dict:
    """State dict of torchvision weights given by enum name, e.g. ``DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1``."""
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"torchvision has no weights named {name!r}; e.g. "
                        f"DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1", 2) from None
    return _weights_state(weights, f"torchvision weights {name}", "pass the file's path")


def load_backbone_file(backbone: nn.Module, arch: str, pretrained: str, model_name: str,
                       weights_name: str = "DEFAULT") -> LoadReport:
    """Initialise ``backbone`` from ``"imagenet"`` (torchvision's ``arch`` weights ``weights_name``, torch hub
    cache first) or a torchvision-format state-dict file."""
    if pretrained == "imagenet":
        state, source = _imagenet_state_dict(arch, weights_name), f"torchvision {arch} ImageNet weights"
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise UserError(f"pretrained weights file {path} does not exist; pass 'imagenet' or the path of a "
                            f"torchvision {arch} state dict")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read weights {path} ({type(e).__name__}); it must be a torchvision state dict "
                            f"saved with torch.save(model.state_dict(), path)") from None
        if not isinstance(state, dict):
            raise UserError(f"{path} does not hold a state dict; save it with torch.save(model.state_dict(), path)")
        source = str(path)
    report = load_backbone_state(backbone, state, source)
    if report.loaded == 0:
        raise UserError(f"no tensor of {source} fits the {arch} backbone of {model_name}; is it a torchvision "
                        f"{arch} state dict?")
    return report


def load_pretrained(model: nn.Module, spec, pretrained: str) -> LoadReport:
    """Initialise ``model.backbone`` from ``"imagenet"`` (torchvision weights API) or a state-dict file."""
    return load_backbone_file(model.backbone, torchvision_arch(spec.family, spec.depth), pretrained, spec.name)
