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
