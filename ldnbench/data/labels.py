"""Label spaces and remaps between them.

A :class:`LabelSpace` knows its class names, colours, optional categories and which classes have
instances (for iIoU). Label maps in a space hold class indices ``0..num_classes-1`` and
``IGNORE`` (255) for pixels that are not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _cityscapes19() -> LabelSpace:
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


def _camvid11() -> LabelSpace:
    from ldnbench.data.camvid import camvid11

    return camvid11()


#: Builders of the built-in label spaces (a plain registry: name -> zero-argument builder).
LABEL_SPACES = {
    "cityscapes19": _cityscapes19,
    "camvid11": _camvid11,
}


def get_label_space(name: str) -> LabelSpace:
    """The built-in label space called ``name``."""
    from ldnbench.errors import UserError

    try:
        builder = LABEL_SPACES[name]
    except KeyError:
        raise UserError(f"unknown label space {name!r}; known: {', '.join(sorted(LABEL_SPACES))}", 2) from None
    return builder()
