"""ldnbench: Ladder-style DenseNet segmentation benchmark suite."""

__version__ = "0.1.0"
