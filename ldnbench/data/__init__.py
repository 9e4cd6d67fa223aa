"""Datasets: label spaces, one adapter module per dataset, transforms, synthetic scenes."""

from ldnbench.data.base import Sample, SampleFiles, SegDataset
from ldnbench.data.labels import IGNORE, LabelSpace, get_label_space

__all__ = ["IGNORE", "LabelSpace", "Sample", "SampleFiles", "SegDataset", "get_label_space"]
