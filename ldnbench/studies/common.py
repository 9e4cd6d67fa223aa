"""Pieces shared by the studies: loading a trained model and evaluating it into a metrics dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldnbench.errors import UserError

#: ``evaluate_fn(model, dataset, mapping) -> metrics dict`` (keys of ``MetricResult.to_dict``).
EvaluateFn = Callable[[nn.Module, Any, Any], dict]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the last.pt/best.pt of a training run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not a usable checkpoint
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it or point elsewhere") from None
    return ckpt if isinstance(ckpt, dict) else {"model": ckpt}


def load_trained_model(model_name: str | None, checkpoint: str | Path | None, num_classes: int | None,
                       **options: Any) -> nn.Module:
    """Build the model a checkpoint was trained as and load its weights (eval mode).

    Trainer checkpoints carry ``model_name``, ``num_classes`` and the training ``config``; their
    layout (ImageNet-compatible or not, model options) is rebuilt from it. A bare state dict needs
    ``model_name`` and ``num_classes``.
    """
    from ldnbench.models import build_model, resolve_model_name

    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else {}
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    name = resolve_model_name(model_name) if model_name else ckpt.get("model_name")
    if ckpt.get("model_name") and name != ckpt["model_name"]:
        raise UserError(f"checkpoint {checkpoint} holds a {ckpt['model_name']} model, not {name}; "
                        f"pass --model {ckpt['model_name']}", 2)
    classes = ckpt.get("num_classes") or num_classes
    if not name or not classes:
        raise UserError(f"checkpoint {checkpoint} does not say which model it holds; pass --model", 2)
    opts = dict(config.get("model_options") or {})
    opts.update(options)
    if "pretrained" in config:
        opts.setdefault("imagenet_compatible", str(config["pretrained"]).lower() != "none")
    opts.setdefault("checkpointing", "none")
    model = build_model(name, int(classes), **opts)
    if checkpoint is not None:
        state = ckpt
        for key in ("model", "model_state", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {checkpoint} does not fit model {name} with {classes} classes ({first}); "
                            "pass the --model it was trained with") from None
    model.label_space_name = ckpt.get("label_space")
    model.trained_on = config.get("dataset")
    return model.eval()


def model_mapping(model: nn.Module, dataset: Any):
    """Label mapping from the model's training space to the dataset's (identity when unknown)."""
    from ldnbench.data.spaces import get_label_space, get_mapping

    dst = dataset_label_space(dataset)
    src_name = getattr(model, "label_space_name", None)
    if not src_name or src_name == dst.name:
        return None
    return get_mapping(get_label_space(src_name), dst)


def dataset_label_space(dataset: Any):
    while not hasattr(dataset, "label_space") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # torch Subset
    return dataset.label_space


def default_eval_settings() -> dict[str, Any]:
    """The settings :func:`default_evaluate` runs with (``evaluate()``'s defaults: single scale, fp32)."""
    from dataclasses import asdict

    from ldnbench.evaluate import EvalSettings

    return asdict(EvalSettings())


def default_evaluate(device: str = "cpu") -> EvaluateFn:
    """``ldnbench.evaluate.evaluate`` at single scale, returning the metrics dict."""

    def run(model: nn.Module, dataset: Any, mapping: Any = None) -> dict:
        from ldnbench.evaluate import evaluate

        res = evaluate(model, dataset, mapping=mapping, device=device, progress=False)
        metrics = getattr(res, "metrics", res)
        return metrics.to_dict() if hasattr(metrics, "to_dict") else dict(metrics)

    return run
