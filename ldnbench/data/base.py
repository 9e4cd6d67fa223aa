"""The adapter interface every dataset module implements.

An adapter is a map-style ``torch.utils.data.Dataset`` over one split of one dataset found under
``root``. ``dataset[i]`` returns a :class:`Sample` with the label already in the adapter's
:class:`~ldnbench.data.labels.LabelSpace`.

Instances follow one convention for every dataset: ``instances`` is an int32 HxW map where 0 means
"no instance" and every other value identifies one object within that image; the object's class
is the ground-truth label at its pixels. (Cityscapes' ``instanceIds`` values below 1000 become 0.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch.utils.data

from ldnbench.data.labels import LabelSpace
from ldnbench.errors import UserError


@dataclass
class Sample:
    image: np.ndarray               #: HxWx3 uint8 RGB
    label: np.ndarray               #: HxW uint8 class indices, 255 = ignore
    id: str                         #: stable key, e.g. Cityscapes' ``city_seq_frame``
    instances: np.ndarray | None = None  #: HxW int32, 0 = none (see module docstring)


@dataclass(frozen=True)
class SampleFiles:
    """Where one sample lives on disk (used by ``score`` and ``datasets check``)."""

    id: str
    image: Path
    label: Path | None
    instances: Path | None = None


@dataclass(frozen=True)
class CombinedTarget:
    """Ground truth as one map whose values encode class and instance (Cityscapes instanceIds), for
    :meth:`ldnbench.metrics.SegMetrics.update_combined`: the class of value ``v`` is ``class_of[v]``
    (-1 = invalid) and ``v`` is an instance from ``instance_from`` on."""

    values: np.ndarray      #: HxW uint16
    class_of: np.ndarray    #: 65536 entries: class index, ignore index or -1
    instance_from: int
    source: str             #: what ``values`` came from, for errors


class SegDataset(torch.utils.data.Dataset):
    """Base class of the dataset adapters.

    Subclasses set the class attributes, find their files in ``__init__`` (raising
    :class:`~ldnbench.errors.UserError` naming the expected glob on a wrong root) and implement
    :meth:`load_target` (label + instances of sample ``i``).
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    #: Folder layout expected below ``root``, shown by ``ldnbench datasets``.
    layout: ClassVar[str] = ""
    #: Random-crop size of the paper's training recipe for this dataset.
    crop_size: ClassVar[int] = 768

    label_space: LabelSpace
    files: list[SampleFiles]

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, i: int) -> np.ndarray:
        from ldnbench.data.io import read_rgb

        return read_rgb(self.files[i].image)

    def labelled_files(self, i: int) -> SampleFiles:
        """The files of sample ``i``, which must have a label (test splits often have none)."""
        f = self.files[i]
        if f.label is None:
            raise UserError(f"{self.name} sample {f.id} has no label file; use a split with labels")
        return f

    def load_target(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(label HxW uint8 in ``label_space``, instances HxW int32 or None) of sample ``i``."""
        raise NotImplementedError

    def load_target_combined(self, i: int) -> CombinedTarget | None:
        """Sample ``i``'s target as one combined map if the adapter's format has one (``score``'s
        fastest path), else None."""
        return None

    def __getitem__(self, i: int) -> Sample:
        label, instances = self.load_target(i)
        return Sample(self.load_image(i), label, self.files[i].id, instances)


def dataset_label_space(dataset: Any) -> LabelSpace:
    """The label space of an adapter, or of a wrapper of one (torch ``Subset``, ``Resized``, ...)."""
    d = dataset
    while not hasattr(d, "label_space") and hasattr(d, "dataset"):
        d = d.dataset
    if not hasattr(d, "label_space"):
        raise TypeError("the dataset must have a label_space (a SegDataset adapter or a wrapper of one)")
    return d.label_space
