"""Import other codebases' checkpoints as ordinary ldnbench checkpoints (``ldnbench convert``).

Two sources:

- ``ldn``: the paper's released Cityscapes models (github ivankreso/LDN, ``--pretrained=1`` layout): a
  flat state dict with torchvision-style DenseNet keys under ``features.``, the SPP under
  ``spp.spp.{spp_bn, spp0..3, spp_fuse}`` (512 maps out), upsampling units
  ``upsample_layers.upsample_i.{bottleneck, blend_bt, blend_conv, skip_bt, aux_logits}`` and
  ``logits.{norm, conv}``. Their forward needs the stem pool ``MaxPool2d(2, 2)`` (``stem_pool=2``) and
  the input on the 0-255 scale normalised with the reference's Cityscapes mean/std; outputs trainIds.
- ``torchvision``: torchvision's segmentation models (``tv-*`` peers), whose keys ldnbench keeps.

The key mapping is data (:data:`RULES`: ordered ``(regex, replacement)`` pairs, first match wins); the
model layout is read off the source's shapes, the converted weights are checked key by key against
the model that will load them, and a file that does not fit is refused with one sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldnbench.checkpoints import CheckpointMeta, save_checkpoint, sha256
from ldnbench.data.transforms import IMAGENET, Normalization
from ldnbench.errors import UserError

SOURCES = ("ldn", "torchvision")

#: Source key -> ldnbench key, per source format: ordered (regex, replacement) rules, first match wins.
#: A key that no rule matches is reported as unmapped.
RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "ldn": (
        # torchvision's old DenseNet names ("norm.1", "conv.2"), which the reference code also accepts
        (r"^features\.(.*denselayer\d+\.(?:norm|conv))\.([12])\.", r"backbone.\1\2."),
        (r"^features\.", "backbone."),
        (r"^spp\.spp\.spp_bn\.", "context.bt."),
        (r"^spp\.spp\.spp_fuse\.", "context.fuse."),
        (r"^spp\.spp\.spp(\d+)\.", r"context.levels.\1."),
        (r"^upsample_layers\.upsample_(\d+)\.bottleneck\.", r"ups.\1.proj."),
        (r"^upsample_layers\.upsample_(\d+)\.blend_bt\.", r"ups.\1.bt."),
        (r"^upsample_layers\.upsample_(\d+)\.blend_conv\.", r"ups.\1.blend."),
        (r"^upsample_layers\.upsample_(\d+)\.skip_bt\.", r"ups.\1.skip_bt."),
        (r"^upsample_layers\.upsample_(\d+)\.aux_logits\.", r"aux_heads.\1."),
        (r"^logits\.", "logits."),
    ),
    "torchvision": (
        (r"^(backbone|classifier|aux_classifier)\.", r"\1."),
    ),
}

#: The reference code's Cityscapes input statistics (RGB, 0-255 scale).
LDN_CITYSCAPES = Normalization((73.45286, 83.21195, 72.78044), (45.19961, 46.3659, 45.48506), 255.0)


def map_key(source: str, key: str) -> str | None:
    """The ldnbench key of source key ``key`` (``module.`` prefixes stripped), or None when no rule matches."""
    key = key[len("module."):] if key.startswith("module.") else key
    for pattern, repl in RULES[source]:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


@dataclass
class ConvertReport:
    """How the source keys landed on the model."""

    source: str
    model_name: str
    model_options: dict[str, Any]
    num_classes: int
    label_space: str | None
    mapped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # no rule, or the model has no such key
    wrong_shape: list[str] = field(default_factory=list)  # "src -> dst: (shape) vs model (shape)"
    missing: list[str] = field(default_factory=list)  # model keys no source key filled

    @property
    def fits(self) -> bool:
        return not (self.unmapped or self.wrong_shape or self.missing)

    def format(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.model_options.items()) or "-"
        lines = [f"source format: {self.source}", f"model: {self.model_name} ({opts}), {self.num_classes} classes, "
                 f"label space {self.label_space or '?'}",
                 f"keys mapped: {len(self.mapped)}", f"keys unmapped: {len(self.unmapped)}",
                 f"keys of the wrong shape: {len(self.wrong_shape)}", f"model keys missing: {len(self.missing)}"]
        for label, keys in (("unmapped", self.unmapped), ("wrong shape", self.wrong_shape),
                            ("missing", self.missing)):
            lines += [f"  {label}: {k}" for k in keys[:10]] + ([f"  ... {len(keys) - 10} more"] if len(keys) > 10 else [])
        return "\n".join(lines)

    def refusal(self, src: str | Path) -> str:
        parts = [f"{len(v)} {label} (first: {v[0]})" for label, v in
                 (("source keys unmapped", self.unmapped), ("keys of the wrong shape", self.wrong_shape),
                  ("model keys missing", self.missing)) if v]
        return (f"{src} does not fit {self.model_name} as a --from {self.source} checkpoint: {'; '.join(parts)}; "
                f"check --from and pass the --model it was trained as")


# ------------------------------------------------------------------ reading the source
def _state_of(obj: Any, src: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for k in ("model", "model_state", "state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{src} does not hold a state dict (a dict of tensors); save one with "
                        f"torch.save(model.state_dict(), path)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_source(src: str | Path, source: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict, sha256 of the file or None) of a file, or for ``torchvision`` a weights enum name such as
    ``DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1`` (torch hub cache first, then the internet)."""
    path = Path(src)
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
            raise UserError(f"cannot read {path} ({type(e).__name__}); it must be a state dict saved with "
                            f"torch.save") from None
        return _state_of(obj, str(path)), sha256(path)
    if source == "torchvision" and "." in str(src) and "/" not in str(src):
        from ldnbench.models.weights import torchvision_weights_state

        return _state_of(torchvision_weights_state(str(src)), str(src)), None
    raise UserError(f"{src} does not exist; pass a state-dict file" +
                    (" or a torchvision weights name such as DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"
                     if source == "torchvision" else ""))


# ------------------------------------------------------------------ layouts read off the source's shapes
def _ldn_layout(state: dict[str, torch.Tensor], model_name: str | None) -> tuple[str, dict[str, Any], int]:
    from ldnbench.models import get_spec, resolve_model_name
    from ldnbench.models.densenet import DENSENET_DEPTHS
    from ldnbench.models.registry import _up_widths

    if "logits.conv.weight" not in state or "features.conv0.weight" not in state:
        raise UserError("the file has no features.conv0 / logits.conv keys, so it is not an LDN reference "
                        "checkpoint; check --from (torchvision checkpoints: --from torchvision)")
    num_classes = int(state["logits.conv.weight"].shape[0])
    options: dict[str, Any] = {"imagenet_compatible": "features.norm0.weight" in state, "stem_pool": 2}
    if model_name is None:
        blocks = tuple(len({m for k in state for m in re.findall(rf"^features\.denseblock{b}\.denselayer(\d+)\.", k)})
                       for b in (1, 2, 3, 4))
        init = int(state["features.conv0.weight"].shape[0])
        depth = next((d for d, (_, bl, i) in DENSENET_DEPTHS.items() if bl == blocks and i == init), None)
        if depth is None:
            raise UserError(f"the DenseNet in the file has blocks {blocks} and {init} stem maps, which match no "
                            f"DenseNet-121/161/169/201; pass --model", 2)
        model_name = f"ldn{depth}-64to4"
    name = resolve_model_name(model_name)
    spec = get_spec(name)
    if spec.family != "densenet":
        raise UserError(f"--from ldn converts DenseNet ladders; {name} is not one", 2)
    n_up = 0 if spec.up is None else (spec.down // spec.up).bit_length() - 1
    # widths read off the output channels of the SPP's convolutions; defaults (512, 128) are left out
    for opt, key, default in (("spp_bt", "spp.spp.spp_bn.conv.weight", 512), ("spp_level", "spp.spp.spp0.conv.weight", 128),
                              ("spp_out", "spp.spp.spp_fuse.conv.weight", None)):
        if key in state and int(state[key].shape[0]) != default:
            options[opt] = int(state[key].shape[0])
    widths = tuple(int(state[f"upsample_layers.upsample_{i}.blend_conv.conv.weight"].shape[0]) for i in range(n_up)
                   if f"upsample_layers.upsample_{i}.blend_conv.conv.weight" in state)
    if len(widths) == n_up and widths != (spec.up_widths or _up_widths(n_up)):
        options["up_widths"] = widths
    options["aux"] = any(".aux_logits." in k for k in state)
    return name, options, num_classes


#: torchvision head -> key of its last (class) convolution.
_TV_CLASS_KEY = {"deeplabv3": "classifier.4.weight", "fcn": "classifier.4.weight",
                 "lraspp": "classifier.high_classifier.weight"}


def _torchvision_layout(state: dict[str, torch.Tensor], model_name: str | None) -> tuple[str, dict[str, Any], int]:
    from ldnbench.models import resolve_model_name
    from ldnbench.models.peers import PEERS

    if model_name is None:
        if "classifier.cbr.0.weight" in state:
            head = "lraspp"
        elif "classifier.0.convs.0.0.weight" in state:
            head = "deeplabv3"
        elif "classifier.0.weight" in state:
            head = "fcn"
        else:
            raise UserError("the file has no DeepLabV3 / FCN / LR-ASPP classifier keys, so it is not a torchvision "
                            "segmentation state dict; check --from (paper checkpoints: --from ldn)")
        if "backbone.layer3.0.conv1.weight" in state:
            n = len({k.split(".")[2] for k in state if k.startswith("backbone.layer3.")})
            backbone = {6: "resnet50", 23: "resnet101"}.get(n)
        else:
            backbone = "mobilenet_v3_large" if "backbone.0.0.weight" in state else None
        match = [s.name for s in PEERS.values() if s.head == head and s.backbone == backbone]
        if not match:
            raise UserError(f"no torchvision peer has a {head} head on a {backbone or 'unknown'} backbone; pass --model",
                            2)
        model_name = match[0]
    name = resolve_model_name(model_name)
    if name not in PEERS:
        raise UserError(f"--from torchvision converts the torchvision peers ({', '.join(PEERS)}); {name} is not one", 2)
    key = _TV_CLASS_KEY[PEERS[name].head]
    if key not in state:
        raise UserError(f"the file has no {key}, so it is not a {name} state dict; check --model and --from")
    options: dict[str, Any] = {}
    if PEERS[name].has_aux_head:
        options["aux"] = any(k.startswith("aux_classifier.") for k in state)
    return name, options, int(state[key].shape[0])


def _default_label_space(source: str, num_classes: int) -> str | None:
    # The released LDN models are Cityscapes (trainIds 0..18); torchvision's are COCO-with-VOC-labels.
    return {("ldn", 19): "cityscapes19", ("torchvision", 21): "voc21"}.get((source, num_classes))


# ------------------------------------------------------------------ the conversion
def map_state(source: str, state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
              report: ConvertReport) -> dict[str, torch.Tensor]:
    """Rename ``state`` by :data:`RULES` and check it against ``model_state``; fills ``report``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        dst = map_key(source, key)
        if dst is None or dst not in model_state:
            report.unmapped.append(key if dst is None else f"{key} -> {dst}")
        elif tuple(value.shape) != tuple(model_state[dst].shape):
            report.wrong_shape.append(f"{key} -> {dst}: {tuple(value.shape)} vs model {tuple(model_state[dst].shape)}")
        else:
            out[dst] = value
            report.mapped.append(key)
    for dst, value in model_state.items():
        if dst not in out:
            if dst.endswith("num_batches_tracked"):  # older files lack the counter; it does not change a forward
                out[dst] = value
            else:
                report.missing.append(dst)
    return out


def convert(src: str | Path, dst: str | Path, source: str, model_name: str | None = None,
            label_space: str | None = None) -> ConvertReport:
    """Convert ``src`` (``source``: ``ldn`` or ``torchvision``) into the ldnbench checkpoint ``dst``.

    Raises :class:`UserError` (nothing written) when the file does not fit the model.
    """
    from ldnbench.checkpoints import build_from_meta
    from ldnbench.data.spaces import get_label_space

    if source not in SOURCES:
        raise UserError(f"unknown --from {source!r}; valid: {', '.join(SOURCES)}", 2)
    state, digest = read_source(src, source)
    name, options, num_classes = (_ldn_layout if source == "ldn" else _torchvision_layout)(state, model_name)
    space = label_space or _default_label_space(source, num_classes)
    if space is None:
        raise UserError(f"{src} predicts {num_classes} classes; pass --label-space to say which", 2)
    if get_label_space(space).num_classes != num_classes:
        raise UserError(f"{src} predicts {num_classes} classes but label space {space} has "
                        f"{get_label_space(space).num_classes}; pass the right --label-space", 2)
    normalization = LDN_CITYSCAPES if source == "ldn" else IMAGENET
    provenance = {"source": f"converted-{source}", "original_file": str(src), "sha256": digest}
    meta = CheckpointMeta(name, num_classes, space, options, normalization, None, provenance)
    with torch.device("meta"):
        model_state = build_from_meta(meta).state_dict()
    report = ConvertReport(source, name, options, num_classes, space)
    converted = map_state(source, state, model_state, report)
    if not report.fits:
        raise UserError(report.refusal(src))
    meta.provenance["keys_mapped"] = len(report.mapped)
    model = build_from_meta(meta)
    model.load_state_dict(converted)  # strict: the report said every key fits
    if Path(dst).resolve() == Path(src).resolve():
        raise UserError(f"the destination {dst} is the source; write the converted checkpoint elsewhere", 2)
    save_checkpoint(dst, model.state_dict(), meta)
    return report
