"""Gradient-checkpointing policies of the paper's Table 11, by name.

A policy says which subgraphs become checkpoint segments (the segment's inputs are cached, everything
inside is recomputed in backward):

- ``none``: plain autograd.
- ``3x3``: the second BN-ReLU-3×3 group of every dense unit.
- ``cat-1x1``: the concatenation and the first BN-ReLU-1×1 group of every dense unit.
- ``cat-1x1+3x3``: both of the above, as two separate segments.
- ``block+stem+td+up``: every dense block (each half of a split block), the stem, every
  transition-down and every transition-up (with the classifier).
- ``cat-1x1-3x3``: every dense unit as one segment (only the k-map unit outputs are cached).
- ``cat-1x1-3x3+stem+td+up``: the above plus stem, transitions down and up (default for training).

ResNet backbones have no concatenation: unit-level policies make each residual block one segment
and ``block`` each ``layerN``.

Recomputation must not update BatchNorm running statistics a second time: segments are run through
:func:`checkpoint_segment`, which switches ``update_stats`` off on the segment's
:class:`~ldnbench.models.layers.BatchNorm2d` modules while the segment is recomputed. The running
statistics after a step are therefore identical to those of the unchecked model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ldnbench.errors import UserError
from ldnbench.models.layers import BatchNorm2d

DEFAULT_TRAIN_POLICY = "cat-1x1-3x3+stem+td+up"


@dataclass(frozen=True)
class CheckpointPolicy:
    """Parsed policy: the unit-level segmentation plus the stem/TD/UP switches."""

    name: str = "none"
    unit: str = "none"  # none | 3x3 | cat-1x1 | cat-1x1+3x3 | cat-1x1-3x3 | block
    stem: bool = False
    td: bool = False
    up: bool = False


POLICIES: dict[str, CheckpointPolicy] = {
    "none": CheckpointPolicy("none"),
    "3x3": CheckpointPolicy("3x3", unit="3x3"),
    "cat-1x1": CheckpointPolicy("cat-1x1", unit="cat-1x1"),
    "cat-1x1+3x3": CheckpointPolicy("cat-1x1+3x3", unit="cat-1x1+3x3"),
    "block+stem+td+up": CheckpointPolicy("block+stem+td+up", unit="block", stem=True, td=True, up=True),
    "cat-1x1-3x3": CheckpointPolicy("cat-1x1-3x3", unit="cat-1x1-3x3"),
    "cat-1x1-3x3+stem+td+up": CheckpointPolicy("cat-1x1-3x3+stem+td+up", unit="cat-1x1-3x3", stem=True, td=True,
                                                up=True),
}


def get_policy(name: str | CheckpointPolicy) -> CheckpointPolicy:
    """Look a policy up by name (``UserError`` exit 2 listing the valid names)."""
    if isinstance(name, CheckpointPolicy):
        return name
    if name not in POLICIES:
        raise UserError(f"unknown checkpointing policy {name!r}; valid policies: {', '.join(POLICIES)}", 2)
    return POLICIES[name]


@contextmanager
def _frozen_bn_stats(modules: Iterable[nn.Module]):
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, BatchNorm2d)]
    for bn in bns:
        bn.update_stats = False
    try:
        yield
    finally:
        for bn in bns:
            bn.update_stats = True


def checkpoint_segment(fn: Callable, *args, modules: Iterable[nn.Module]):
    """Run ``fn(*args)`` as one non-reentrant checkpoint segment.

    ``modules`` are the modules ``fn`` uses; their BatchNorm layers do not update running statistics
    during the backward-time recomputation.
    """
    modules = tuple(modules)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True,
        context_fn=lambda: (nullcontext(), _frozen_bn_stats(modules)),
    )


def maybe_checkpoint(enabled: bool, fn: Callable, *args, modules: Iterable[nn.Module]):
    """``checkpoint_segment`` when ``enabled`` and autograd is recording, else a plain call."""
    if enabled and torch.is_grad_enabled():
        return checkpoint_segment(fn, *args, modules=modules)
    return fn(*args)
