"""Datasets: label spaces, one adapter module per dataset, transforms, synthetic scenes.

Layers: ``labels`` (types) < ``base``/``io``/``layout`` < one module per adapter < ``spaces`` (built-in
spaces by name, mappings) and ``registry`` (adapters by name).
"""

from ldnbench.data.base import Sample, SampleFiles, SegDataset
from ldnbench.data.labels import IGNORE, LabelMapping, LabelSpace

__all__ = ["IGNORE", "LabelMapping", "LabelSpace", "Sample", "SampleFiles", "SegDataset"]
