"""The label-space types: :class:`LabelSpace`, ``IGNORE``, :class:`LabelMapping`, and cityscapes19.

A :class:`LabelSpace` knows its class names, colours, optional categories and which classes have
instances (for iIoU). Label maps in a space hold class indices ``0..num_classes-1`` and
``IGNORE`` (255) for pixels that are not evaluated. This module is the ground floor of
``ldnbench.data``: the adapters build on it, and the registry of built-in spaces and
:func:`~ldnbench.data.spaces.get_mapping` sit above them in :mod:`ldnbench.data.spaces`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np

IGNORE = 255


@dataclass(frozen=True)
class LabelSpace:
    """An ordered set of classes with everything metrics and figures need to know about them."""

    name: str
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    #: Category names (e.g. Cityscapes' 7) and, per class, the index of its category.
    categories: tuple[str, ...] = ()
    class_category: tuple[int, ...] = ()
    #: Indices of classes evaluated with instance-level IoU (iIoU).
    instance_classes: tuple[int, ...] = ()
    #: Per-class average instance size in pixels used to weight iIoU (NaN where unused).
    avg_instance_size: tuple[float, ...] = ()
    #: Categories that get a category iIoU (Cityscapes: human, vehicle).
    instance_categories: tuple[int, ...] = ()
    ignore_index: int = IGNORE
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        n = len(self.classes)
        if len(self.colors) != n:
            raise ValueError(f"{self.name}: {n} classes but {len(self.colors)} colours")
        if self.class_category and len(self.class_category) != n:
            raise ValueError(f"{self.name}: class_category must have one entry per class")
        if n >= self.ignore_index:
            raise ValueError(f"{self.name}: {n} classes collide with the ignore index {self.ignore_index}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_categories(self) -> bool:
        return bool(self.categories)

    @property
    def has_instances(self) -> bool:
        return bool(self.instance_classes)

    def index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not a class of label space {self.name!r}") from None

    def palette(self) -> np.ndarray:
        """(256, 3) uint8 colour table; unused entries and ignore are black."""
        pal = np.zeros((256, 3), np.uint8)
        pal[: self.num_classes] = np.asarray(self.colors, np.uint8)
        return pal


@cache
def cityscapes19() -> LabelSpace:
    """The 19 Cityscapes train classes, their categories and iIoU sizes, from cityscapesScripts."""
    from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import args as cs_args
    from cityscapesscripts.helpers.labels import labels

    train = sorted((l for l in labels if 0 <= l.trainId < IGNORE), key=lambda l: l.trainId)
    cats: list[str] = []
    for l in train:
        if l.category not in cats:
            cats.append(l.category)
    inst = tuple(i for i, l in enumerate(train) if l.hasInstances and not l.ignoreInEval)
    inst_cats = tuple(sorted({cats.index(train[i].category) for i in inst}))
    return LabelSpace(
        name="cityscapes19",
        classes=tuple(l.name for l in train),
        colors=tuple(tuple(l.color) for l in train),
        categories=tuple(cats),
        class_category=tuple(cats.index(l.category) for l in train),
        instance_classes=inst,
        avg_instance_size=tuple(float(cs_args.avgClassSize.get(l.name, float("nan"))) for l in train),
        instance_categories=inst_cats,
    )


@dataclass(frozen=True)
class LabelMapping:
    """How predictions in space ``src`` become predictions in space ``dst``.

    ``index is None`` and ``groups is None`` means identity. ``index``: dst class ``j`` is src logit
    ``index[j]`` (the remaining src classes are dropped, so argmax picks among the dst classes
    only). ``groups`` (a table): dst class ``j`` scores the log of the summed probability of the src
    classes ``groups[j]`` (logsumexp of their logits); src classes in no group are dropped.
    """

    src: str
    dst: str
    index: tuple[int, ...] | None = None
    groups: tuple[tuple[int, ...], ...] | None = None

    def logits(self, logits):
        """NxC_src x H x W (or C_src x H x W) tensor -> the same in the dst space."""
        import torch

        dim = 1 if logits.dim() == 4 else 0
        if self.groups is not None:
            return torch.stack([logits.index_select(dim, torch.as_tensor(g, device=logits.device)).logsumexp(dim)
                                for g in self.groups], dim)
        if self.index is None:
            return logits
        return logits.index_select(dim, torch.as_tensor(self.index, device=logits.device))
