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


def _voc21() -> LabelSpace:
    from ldnbench.data.voc import voc21

    return voc21()


def _scannet20() -> LabelSpace:
    from ldnbench.data.scannet import scannet20

    return scannet20()


def _rob39() -> LabelSpace:
    from ldnbench.data.rob2018 import rob39

    return rob39()


#: Builders of the built-in label spaces (a plain registry: name -> zero-argument builder).
LABEL_SPACES = {
    "cityscapes19": _cityscapes19,
    "camvid11": _camvid11,
    "voc21": _voc21,
    "scannet20": _scannet20,
    "rob39": _rob39,
}


def get_label_space(name: str) -> LabelSpace:
    """The built-in label space called ``name``."""
    from ldnbench.errors import UserError

    try:
        builder = LABEL_SPACES[name]
    except KeyError:
        raise UserError(f"unknown label space {name!r}; known: {', '.join(sorted(LABEL_SPACES))}", 2) from None
    return builder()


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


#: Grouping tables between spaces that share no class names: dst class -> src classes whose
#: probabilities it sums. cityscapes19 -> camvid11 follows the usual CamVid reading of the
#: Cityscapes classes (terrain counts as Tree, wall as Fence, rider as Bicyclist).
MAPPING_TABLES: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("cityscapes19", "camvid11"): {
        "Sky": ("sky",), "Building": ("building",), "Pole": ("pole", "traffic light"), "Road": ("road",),
        "Pavement": ("sidewalk",), "Tree": ("vegetation", "terrain"), "SignSymbol": ("traffic sign",),
        "Fence": ("fence", "wall"), "Car": ("car", "truck", "bus", "train"), "Pedestrian": ("person",),
        "Bicyclist": ("rider", "bicycle", "motorcycle"),
    },
}


def _namespaces(space: LabelSpace) -> dict[str, dict[str, int]]:
    """Class names grouped by namespace: ``"cs:road"`` is ``road`` in namespace ``cs`` ("" = no prefix)."""
    out: dict[str, dict[str, int]] = {}
    for i, name in enumerate(space.classes):
        ns, _, base = name.rpartition(":")
        out.setdefault(ns, {})[base] = i
    return out


def get_mapping(src: str | LabelSpace, dst: str | LabelSpace) -> LabelMapping:
    """The mapping from label space ``src`` to ``dst``.

    Identity for equal spaces; a subset of logits when every dst class is a src class by name, all
    from one namespace (rob39's ``cs:road`` ... serve cityscapes19's ``road`` ...); a grouping from
    :data:`MAPPING_TABLES` where one is defined. Anything else raises a UserError naming both spaces.
    """
    from ldnbench.errors import UserError

    src = get_label_space(src) if isinstance(src, str) else src
    dst = get_label_space(dst) if isinstance(dst, str) else dst
    if src.classes == dst.classes:
        return LabelMapping(src.name, dst.name)
    for names in _namespaces(src).values():
        if all(c in names for c in dst.classes):
            return LabelMapping(src.name, dst.name, tuple(names[c] for c in dst.classes))
    table = MAPPING_TABLES.get((src.name, dst.name))
    if table is not None:
        return LabelMapping(src.name, dst.name,
                            groups=tuple(tuple(src.index(n) for n in table[c]) for c in dst.classes))
    missing = [c for c in dst.classes if c not in src.classes][:5]
    raise UserError(f"no label mapping from {src.name} ({src.num_classes} classes) to {dst.name} "
                    f"({dst.num_classes} classes): {', '.join(missing)} ... have no counterpart in {src.name}; "
                    "evaluate on a dataset in the model's label space or train in a space that contains it")
