"""Whole-image, multi-scale + flip and sliding-window inference for any model of the zoo contract.

The model takes a normalised Nx3xHxW float tensor of any size and returns logits at the input
resolution (in ``eval()`` mode). :func:`predict` returns the label map at the input resolution;
with several scales and/or flips it averages the softmax probabilities of every pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The multi-scale test of the paper's era: scales relative to the input, each also flipped.
MS_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _forward(model: nn.Module, x: torch.Tensor, mapping, channels_last: bool, amp: bool) -> torch.Tensor:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, amp):
        out = model(x)
    if isinstance(out, (tuple, list)):  # a model left in train mode returns (logits, aux)
        raise ValueError("predict() needs the model in eval() mode")
    if out.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"model returned {tuple(out.shape[-2:])} logits for a {tuple(x.shape[-2:])} input; "
                         "the model contract requires logits at input resolution")
    out = out.float()
    return mapping.logits(out) if mapping is not None else out


def _window_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1
    return [min(i * stride, size - tile) for i in range(n)]


def _probs(model: nn.Module, x: torch.Tensor, mapping, sliding: tuple[int, float] | None,
           channels_last: bool, amp: bool, out_size: tuple[int, int]) -> torch.Tensor:
    """Softmax probabilities at ``out_size``, by whole image or by overlapping tiles.

    Whole image: logits are resized first, then softmaxed (at scale 2 this keeps one C x H x W map
    instead of two 4x larger ones). Tiles: tile probabilities are averaged, then resized.
    """
    h, w = x.shape[-2:]
    if sliding is None or (h <= sliding[0] and w <= sliding[0]):
        logits = _forward(model, x, mapping, channels_last, amp)
        if (h, w) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.softmax(1)
    tile, overlap = sliding
    stride = max(1, int(tile * (1 - overlap)))
    total = None
    hits = torch.zeros(1, 1, h, w, device=x.device)
    for y in _window_starts(h, tile, stride):
        for x0 in _window_starts(w, tile, stride):
            crop = x[..., y:y + tile, x0:x0 + tile]
            p = _forward(model, crop, mapping, channels_last, amp).softmax(1)
            if total is None:
                total = torch.zeros(x.shape[0], p.shape[1], h, w, device=x.device)
            total[..., y:y + tile, x0:x0 + tile] += p
            hits[..., y:y + tile, x0:x0 + tile] += 1
    probs = total.div_(hits)
    if (h, w) != out_size:
        probs = F.interpolate(probs, size=out_size, mode="bilinear", align_corners=False)
    return probs


@torch.inference_mode()
def predict_probs(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                  sliding: int | tuple[int, float] | None = None, *, mapping=None, channels_last: bool = True,
                  amp: bool = False) -> torch.Tensor:
    """NxCxHxW class probabilities averaged over ``scales`` x (flip) passes. See :func:`predict`.

    Each pass's logits are resized to the input size bilinearly and then softmaxed.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"expected a normalised float Nx3xHxW image, got {tuple(image.shape)} {image.dtype}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {tuple(scales)}")
    if isinstance(sliding, int):
        sliding = (sliding, 1 / 3)
    h, w = image.shape[-2:]
    acc = None
    n = 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            p = _probs(model, xi, mapping, sliding, channels_last, amp, (h, w))
            if flipped:
                p = p.flip(-1)
            acc = p if acc is None else acc.add_(p)
            n += 1
    return acc.div_(n)


def predict(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
            sliding: int | tuple[int, float] | None = None, *, mapping=None, channels_last: bool = True,
            amp: bool = False) -> torch.Tensor:
    """Label map (HxW, or NxHxW for a batch; uint8 when C<=255, else int64) at the input resolution.

    ``image``: normalised float 3xHxW or Nx3xHxW (see :func:`ldnbench.data.transforms.to_input`) on
    the model's device; the model must be in ``eval()`` mode. ``scales``: input resize factors
    (:data:`MS_SCALES` for the usual multi-scale test); ``flip`` adds horizontally flipped passes;
    softmax probabilities of all passes are averaged. ``sliding``: tile size (or ``(tile,
    overlap)``, default overlap 1/3) to process images larger than the tile by overlapping windows.
    ``mapping``: a :class:`~ldnbench.data.labels.LabelMapping` applied to every pass's logits.
    ``amp``: bfloat16 autocast (off by default: CPUs without native bf16 get slower).
    """
    single = image.dim() == 3
    if tuple(scales) == (1.0,) and not flip and sliding is None:
        # one pass at full size: the argmax of the logits is the argmax of the probabilities
        with torch.inference_mode():
            x = image.unsqueeze(0) if single else image
            if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
                raise ValueError(f"expected a normalised float Nx3xHxW image, got {tuple(x.shape)} {x.dtype}")
            scores = _forward(model, x, mapping, channels_last, amp)
    else:
        scores = predict_probs(model, image, scales, flip, sliding, mapping=mapping,
                               channels_last=channels_last, amp=amp)
    labels = scores.argmax(1)
    if scores.shape[1] <= 255:
        labels = labels.to(torch.uint8)
    return labels[0] if single else labels
