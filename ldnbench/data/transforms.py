"""Input normalisation and the paper's training augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from ldnbench.errors import UserError

# torchvision's ImageNet statistics: the backbones are torchvision models.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: The mean pixel as uint8 RGB: image padding uses it so that padding is 0 after normalisation.
MEAN_PIXEL = tuple(round(255 * m) for m in MEAN)


@dataclass(frozen=True)
class Normalization:
    """How a model wants its input: ``(pixel / 255 * max_value - mean) / std`` per RGB channel.

    ``max_value`` is the scale the mean/std are given on: 1 for torchvision's ImageNet statistics,
    255 for models trained on raw 0-255 pixels (the paper's released LDN checkpoints).
    """

    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    max_value: float = 1.0

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "max_value": self.max_value}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Normalization":
        if not d:
            return IMAGENET
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
                   float(d.get("max_value", 1.0)))


#: torchvision's ImageNet statistics on the 0-1 scale: every ldnbench-trained and torchvision model.
IMAGENET = Normalization()


def normalize(images: torch.Tensor, normalization: Normalization = IMAGENET) -> torch.Tensor:
    """uint8 (N)x3xHxW in 0..255 -> float32 normalised as ``normalization`` says (ImageNet by default)."""
    n = normalization
    x = images.float()
    if n.max_value != 255:
        x = x.div_(255 / n.max_value)
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(n.mean, device=x.device).view(shape)
    std = torch.tensor(n.std, device=x.device).view(shape)
    return x.sub_(mean).div_(std)


def to_input(image: np.ndarray | torch.Tensor, normalization: Normalization = IMAGENET) -> torch.Tensor:
    """One HxWx3 uint8 image -> 1x3xHxW normalised float tensor (the model's input)."""
    t = torch.as_tensor(image)
    return normalize(t.permute(2, 0, 1).unsqueeze(0), normalization)


def _crop_size(crop: int | tuple[int, int]) -> tuple[int, int]:
    return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))


class TrainTransform:
    """The paper's training augmentation: Sample -> (3xHcxWc normalised float, HcxWc int64 label).

    Random horizontal flip, rescale by ``s ~ U(scale)`` (bilinear image, nearest label), random
    ``crop`` (int or (h, w)); where the rescaled image is smaller than the crop it is padded with
    :data:`MEAN_PIXEL` (0 after normalisation) and the label with ignore (255), at a random
    position. Randomness comes from torch's RNG only, so a seeded generator (or DataLoader
    generator with workers) reproduces the same crops.
    """

    def __init__(self, crop: int | tuple[int, int], scale: tuple[float, float] | None = (0.5, 2.0),
                 flip: bool = True, pad: bool = True):
        self.crop = _crop_size(crop)
        self.scale = tuple(scale) if scale else (1.0, 1.0)
        self.flip = flip
        self.pad = pad

    def __repr__(self) -> str:
        return f"TrainTransform(crop={self.crop}, scale={self.scale}, flip={self.flip}, pad={self.pad})"

    def __call__(self, sample, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        def rand() -> float:
            return torch.rand((), generator=generator).item()

        image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
        label = torch.from_numpy(np.ascontiguousarray(sample.label))[None]
        H, W = image.shape[1:]
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * rand()
        h, w = max(1, round(H * s)), max(1, round(W * s))  # size of the rescaled image
        ch, cw = self.crop
        if not self.pad and (h < ch or w < cw):
            raise UserError(f"crop {ch}x{cw} is larger than image {sample.id} ({h}x{w} after rescaling); "
                            "use a smaller crop or allow padding")
        # Crop window in rescaled coordinates; y0/x0 < 0 places the image inside a padded canvas.
        y0 = int(torch.randint(min(0, h - ch), max(0, h - ch) + 1, (), generator=generator))
        x0 = int(torch.randint(min(0, w - cw), max(0, w - cw) + 1, (), generator=generator))
        sy, sx = max(y0, 0), max(x0, 0)
        ey, ex = min(y0 + ch, h), min(x0 + cw, w)
        if (h, w) != (H, W):
            # Rescale only the source window under the crop (not the whole image): same result up to
            # sub-pixel rounding, and much cheaper for 2048x1024 images scaled by 2.
            ty, by = int(sy * H / h), min(H, -(-ey * H // h))
            tx, bx = int(sx * W / w), min(W, -(-ex * W // w))
            oy, ox = round(sy - ty * h / H), round(sx - tx * w / W)
            size = [max(round((by - ty) * h / H), oy + ey - sy), max(round((bx - tx) * w / W), ox + ex - sx)]
            image = F.resize(image[:, ty:by, tx:bx], size, interpolation=InterpolationMode.BILINEAR, antialias=True)
            label = F.resize(label[:, ty:by, tx:bx], size, interpolation=InterpolationMode.NEAREST_EXACT)
            image = image[:, oy: oy + ey - sy, ox: ox + ex - sx]
            label = label[:, oy: oy + ey - sy, ox: ox + ex - sx]
        else:
            image, label = image[:, sy:ey, sx:ex], label[:, sy:ey, sx:ex]
        out_img = torch.tensor(MEAN_PIXEL, dtype=torch.uint8).view(3, 1, 1).repeat(1, ch, cw)
        out_lab = torch.full((ch, cw), 255, dtype=torch.uint8)
        out_img[:, sy - y0: ey - y0, sx - x0: ex - x0] = image
        out_lab[sy - y0: ey - y0, sx - x0: ex - x0] = label[0]
        if self.flip and rand() < 0.5:
            out_img, out_lab = out_img.flip(-1), out_lab.flip(-1)
        return normalize(out_img), out_lab.long()


class EvalTransform:
    """Sample -> (3xHxW normalised float, HxW int64 label) at full resolution."""

    def __call__(self, sample) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
        return normalize(image), torch.from_numpy(np.ascontiguousarray(sample.label)).long()


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs; different sizes are padded bottom/right (image 0 = mean, label 255)."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = torch.zeros(len(batch), 3, h, w, dtype=batch[0][0].dtype)
    labels = torch.full((len(batch), h, w), 255, dtype=torch.long)
    for i, (img, lab) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        labels[i, : lab.shape[-2], : lab.shape[-1]] = lab
    return images, labels


class TransformedDataset(torch.utils.data.Dataset):
    """``transform(dataset[i])`` for every sample: wraps an adapter for a DataLoader."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(self.dataset[i])
