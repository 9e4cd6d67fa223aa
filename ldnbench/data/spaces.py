"""The built-in label spaces by name and the mappings between them (above the adapters that define them)."""

from __future__ import annotations

from ldnbench.data.camvid import camvid11
from ldnbench.data.labels import LabelMapping, LabelSpace, cityscapes19
from ldnbench.data.rob2018 import rob39
from ldnbench.data.scannet import scannet20
from ldnbench.data.voc import voc21
from ldnbench.errors import UserError

#: Builders of the built-in label spaces (a plain registry: name -> zero-argument builder).
LABEL_SPACES = {
    "cityscapes19": cityscapes19,
    "camvid11": camvid11,
    "voc21": voc21,
    "scannet20": scannet20,
    "rob39": rob39,
}


def get_label_space(name: str) -> LabelSpace:
    """The built-in label space called ``name``."""
    try:
        builder = LABEL_SPACES[name]
    except KeyError:
        raise UserError(f"unknown label space {name!r}; known: {', '.join(sorted(LABEL_SPACES))}", 2) from None
    return builder()


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
