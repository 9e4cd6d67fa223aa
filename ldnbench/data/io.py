"""Image decoding (torchvision.io, fast libjpeg/libpng) with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from ldnbench.errors import UserError


def _decode(path: Path, mode: ImageReadMode) -> torch.Tensor:
    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        return decode_image(data, mode=mode)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot decode image {path}: {e}; replace the corrupt file or remove it from the split") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB."""
    return _decode(Path(path), ImageReadMode.RGB).permute(1, 2, 0).numpy()


def read_label(path: str | Path) -> np.ndarray:
    """HxW uint8 of a single-channel label PNG: grey values, or palette indices of a 'P' PNG (never colours)."""
    t = _decode(Path(path), ImageReadMode.UNCHANGED)
    if t.shape[0] != 1 or t.dtype != torch.uint8:
        raise UserError(f"label file {path} has {t.shape[0]} channel(s) of {t.dtype}; expected one 8-bit channel "
                        "(class ids or palette indices)")
    return t[0].numpy()


def read_png16(path: str | Path, dtype=np.int32) -> np.ndarray:
    """HxW array of a 16-bit (or 8-bit) single-channel PNG, e.g. Cityscapes/KITTI/Vistas instance maps:
    int32 by default, or ``np.uint16`` as decoded (no conversion pass)."""
    t = _decode(Path(path), ImageReadMode.UNCHANGED)
    if t.shape[0] != 1:
        raise UserError(f"instance file {path} has {t.shape[0]} channels; expected one 16-bit channel")
    if dtype == np.uint16:
        return t[0].numpy() if t.dtype == torch.uint16 else t[0].to(torch.uint16).numpy()
    return t[0].to(torch.int32).numpy()
