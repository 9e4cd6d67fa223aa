"""Input normalisation and the paper's training augmentation."""

from __future__ import annotations

import numpy as np
import torch

# torchvision's ImageNet statistics: the backbones are torchvision models.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: The mean pixel as uint8 RGB: image padding uses it so that padding is 0 after normalisation.
MEAN_PIXEL = tuple(round(255 * m) for m in MEAN)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N)x3xHxW in 0..255 -> float32 normalised with :data:`MEAN`/:data:`STD`."""
    x = images.float().div_(255)
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(MEAN, device=x.device).view(shape)
    std = torch.tensor(STD, device=x.device).view(shape)
    return x.sub_(mean).div_(std)


def to_input(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One HxWx3 uint8 image -> 1x3xHxW normalised float tensor (the model's input)."""
    t = torch.as_tensor(image)
    return normalize(t.permute(2, 0, 1).unsqueeze(0))
