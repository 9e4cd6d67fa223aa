"""The paper's training loss: cross-entropy on the final logits plus soft-target auxiliary losses.

Auxiliary heads predict at a coarse resolution (``factor`` k times below the padded input). Their
targets are the class distributions of the k×k label windows at native resolution (paper eq. 2):
for every window, the fraction of pixels of each class. A window in which at least half of the
pixels are ignored is invalid and does not contribute; in valid windows the ignored pixels are
dropped and the distribution renormalised over the remaining ones (as the authors' released
``downsample_labels_th`` does). Each auxiliary loss is the soft cross-entropy averaged over its
valid windows (eq. 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = 255


def window_counts(labels: torch.Tensor, num_classes: int, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """Per-window class counts: N x (C+1) x h x w, the last channel counting ignored pixels.

    ``labels`` (N x H x W) is padded bottom/right to ``h*factor x w*factor`` (the model's internal
    padding) with pixels that count as ignored. Every value outside ``0..num_classes-1`` (the
    ignore label 255 in particular) counts as ignored.
    """
    n, height, width = labels.shape
    h, w = size
    hp, wp = h * factor, w * factor
    if hp < height or wp < width:
        raise ValueError(f"aux logits {h}x{w} at factor {factor} cover {hp}x{wp} pixels, "
                         f"less than the {height}x{width} labels")
    lab = labels.long()
    lab = torch.where((lab >= 0) & (lab < num_classes), lab, num_classes)
    lab = F.pad(lab, (0, wp - width, 0, hp - height), value=num_classes)
    # Flat bin of every pixel: ((image, window row, window col), class); one bincount does the rest.
    rows = torch.arange(hp, device=lab.device) // factor
    cols = torch.arange(wp, device=lab.device) // factor
    cell = (rows[:, None] * w + cols[None, :]).unsqueeze(0) + (torch.arange(n, device=lab.device) * (h * w))[:, None, None]
    idx = cell * (num_classes + 1) + lab
    counts = torch.bincount(idx.reshape(-1), minlength=n * h * w * (num_classes + 1))
    return counts.view(n, h, w, num_classes + 1).permute(0, 3, 1, 2)


def soft_targets(labels: torch.Tensor, num_classes: int, factor: int,
                 size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets N x C x h x w float, valid N x h x w bool) for an aux head of spatial ``size``.

    Targets sum to 1 over classes in valid windows and are 0 in invalid ones.
    """
    counts = window_counts(labels, num_classes, factor, size).float()
    ignored = counts[:, num_classes]
    valid = ignored * 2 < factor * factor  # p(ignore) < 0.5
    cls = counts[:, :num_classes]
    total = cls.sum(1)
    targets = cls / total.clamp_min(1).unsqueeze(1)
    return targets * valid.unsqueeze(1), valid


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                       count: torch.Tensor | None = None) -> torch.Tensor:
    """−Σ_f y_f log softmax(logits)_f averaged over valid cells (0, with a graph, if none is valid).

    ``count`` replaces the number of valid cells as the denominator (see :class:`SegLoss`).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    per_cell = -(targets * logp).sum(1)
    return (per_cell * valid).sum() / (valid.sum() if count is None else count).clamp_min(1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE,
                  count: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel cross-entropy averaged over non-ignored pixels (0 rather than NaN if all are ignored).

    ``count`` replaces the number of non-ignored pixels as the denominator (see :class:`SegLoss`).
    """
    labels = labels.long()
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / ((labels != ignore_index).sum() if count is None else count).clamp_min(1)


@dataclass
class SegLoss:
    """Total loss = ``main_weight`` · CE(final logits) + ``aux_weight`` · mean(aux losses).

    Paper section 5.1: weights 0.6 and 0.4. A model without auxiliary heads is trained with the
    plain cross-entropy (weight 1), so its loss scale matches the ``--aux-weight 0`` case.

    ``count_reduce`` maps this process's denominators (valid pixels / valid cells, one per term)
    to the ones to divide by. Data-parallel training passes "all-reduce, divide by the number of
    processes": the averaged gradients then equal those of one process on the whole global batch,
    even when processes hold different numbers of ignored pixels.
    """

    num_classes: int
    main_weight: float = 0.6
    aux_weight: float = 0.4
    ignore_index: int = IGNORE
    count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, output, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``output`` is the model's train-mode return: ``logits`` or ``(logits, [(aux, factor), ...])``.

        Returns the scalar loss and its parts (detached tensors ``main`` and ``aux``; ``aux`` is None
        without auxiliary heads).
        """
        logits, aux = output if isinstance(output, tuple) else (output, [])
        if self.aux_weight == 0:
            aux = []
        soft = [soft_targets(labels, self.num_classes, int(factor), tuple(a.shape[-2:])) for a, factor in aux]
        counts = torch.stack([(labels != self.ignore_index).sum(), *(valid.sum() for _, valid in soft)]).float()
        if self.count_reduce is not None:
            counts = self.count_reduce(counts)
        main = cross_entropy(logits, labels, self.ignore_index, counts[0])
        if not aux:
            return main, {"main": main.detach(), "aux": None}
        aux_losses = [soft_cross_entropy(a, targets, valid, count)
                      for (a, _), (targets, valid), count in zip(aux, soft, counts[1:])]
        aux_loss = torch.stack(aux_losses).mean()
        total = self.main_weight * main + self.aux_weight * aux_loss
        return total, {"main": main.detach(), "aux": aux_loss.detach()}
