"""Pieces shared by the studies: label mapping and evaluating a model into a metrics dict (checkpoints: ldnbench.checkpoints)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ldnbench.data.base import dataset_label_space


#: ``evaluate_fn(model, dataset, mapping) -> metrics dict`` (keys of ``MetricResult.to_dict``).
EvaluateFn = Callable[[nn.Module, Any, Any], dict]


def model_mapping(src_name: str | None, dataset: Any):
    """Label mapping from a model's label space (``meta.label_space``) to the dataset's (identity when unknown)."""
    from ldnbench.data.spaces import get_label_space, get_mapping

    dst = dataset_label_space(dataset)
    if not src_name or src_name == dst.name:
        return None
    return get_mapping(get_label_space(src_name), dst)


def default_evaluate(device: str = "cpu", normalization: Any = None) -> EvaluateFn:
    """``ldnbench.evaluate.evaluate`` at single scale, returning the metrics dict; ``normalization``
    is the checkpoint's (``meta.normalization``, ImageNet when None)."""

    def run(model: nn.Module, dataset: Any, mapping: Any = None) -> dict:
        from ldnbench.data.transforms import IMAGENET
        from ldnbench.evaluate import evaluate

        res = evaluate(model, dataset, mapping=mapping, device=device, progress=False,
                       normalization=normalization or IMAGENET)
        metrics = getattr(res, "metrics", res)
        return metrics.to_dict() if hasattr(metrics, "to_dict") else dict(metrics)

    return run
