"""The one checkpoint format: what a checkpoint holds, how it is written and how every command reads it.

A checkpoint is a ``torch.save``'d dict::

    {"model": state_dict, "model_name", "num_classes", "label_space", "model_options",
     "normalization", "provenance", "config", ...extra state (optimizer, rng, epoch, metrics...)}

Trainer checkpoints written before this module existed lack ``model_options``/``normalization``/
``provenance``; they are derived from ``config`` (ImageNet-compatible layout when the run was
pretrained, ImageNet normalisation). A bare state dict (``torch.save(model.state_dict())``) needs the
model name and its label space (or class count) and is tried in both layouts: the paper's, then the
ImageNet-compatible one. Files are read once, with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldnbench.data.transforms import IMAGENET, Normalization
from ldnbench.errors import UserError
from ldnbench.fileio import atomic_torch_save

#: Keys of the checkpoint dict that :class:`CheckpointMeta` owns; every other key is extra state.
META_KEYS = ("model_name", "num_classes", "label_space", "model_options", "normalization", "provenance", "config")
#: Where the weights may sit in foreign files (the first dict found wins).
_STATE_KEYS = ("model", "model_state", "state_dict")


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild and run the model of a checkpoint.

    ``model_options``: :func:`ldnbench.models.build_model` keywords (layout: ``imagenet_compatible``,
    ``stem_pool``, ``spp_out``, widths...). ``label_space``: name of the space the logits index (None
    when unknown). ``normalization``: how input pixels are normalised. ``config``: the training
    configuration (``TrainConfig`` as a dict) of ldnbench-trained models. ``provenance``: ``source``
    (``ldnbench-train``, ``converted-ldn``, ``converted-torchvision``, ``state-dict``), and for
    converted files ``original_file``, ``sha256``, ``mapping`` counts.
    """

    model_name: str
    num_classes: int
    label_space: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    normalization: Normalization = IMAGENET
    config: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_on(self) -> str | None:
        """Dataset the model was trained on (ldnbench runs), else None."""
        return (self.config or {}).get("dataset")

    def build_options(self) -> dict[str, Any]:
        """``build_model`` keywords of this layout (no pretrained weights, no checkpointing)."""
        return {**self.model_options, "checkpointing": "none"}

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "num_classes": self.num_classes, "label_space": self.label_space,
                "model_options": dict(self.model_options), "normalization": self.normalization.to_dict(),
                "provenance": dict(self.provenance), "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointMeta":
        """Meta of a self-describing checkpoint dict, old trainer checkpoints included."""
        config = d.get("config") if isinstance(d.get("config"), dict) else None
        options = d.get("model_options")
        if not isinstance(options, dict):  # written before this module: the layout follows from the config
            options = dict((config or {}).get("model_options") or {})
            if config and "pretrained" in config:
                options.setdefault("imagenet_compatible", str(config["pretrained"]).lower() != "none")
        provenance = d.get("provenance") if isinstance(d.get("provenance"), dict) else \
            {"source": "ldnbench-train" if config else "state-dict"}
        return cls(str(d["model_name"]), int(d["num_classes"]), d.get("label_space"), dict(options),
                   Normalization.from_dict(d.get("normalization")), config, dict(provenance))


@dataclass
class StoredCheckpoint:
    """A checkpoint file as read: its meta (None for a bare state dict), the weights and the extra state."""

    path: Path
    meta: CheckpointMeta | None
    state: dict[str, torch.Tensor]
    extra: dict[str, Any]


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model_state: dict[str, torch.Tensor], meta: CheckpointMeta,
                    **extra_state: Any) -> Path:
    """Write ``{"model": model_state, **meta, **extra_state}`` atomically (a crash never leaves half a file)."""
    clash = set(extra_state) & {"model", *META_KEYS}
    if clash:
        raise ValueError(f"extra state may not use the checkpoint's own keys {sorted(clash)}")
    return atomic_torch_save(path, {"model": model_state, **meta.to_dict(), **extra_state})


def read_checkpoint(path: str | Path) -> StoredCheckpoint:
    """Read a checkpoint file once (``weights_only=True``) without building anything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the last.pt/best.pt of a training run or a "
                        f"converted checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not a usable checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}{': ' + first[:120] if first else ''}); "
                        f"delete it or point elsewhere") from None
    if not isinstance(ck, dict):
        raise UserError(f"{path} does not hold a checkpoint dict or a state dict; save one with "
                        f"torch.save(model.state_dict(), path)")
    state = next((ck[k] for k in _STATE_KEYS if isinstance(ck.get(k), dict)), None)
    if state is None:
        return StoredCheckpoint(path, None, ck, {})
    described = ck.get("model_name") is not None and ck.get("num_classes") is not None
    meta = CheckpointMeta.from_dict(ck) if described else None
    extra = {k: v for k, v in ck.items() if k not in META_KEYS and v is not state}
    if meta is None and isinstance(ck.get("config"), dict):  # partial trainer-like dict: keep what it says
        extra["config"] = ck["config"]
    return StoredCheckpoint(path, meta, state, extra)


def _fit(model: nn.Module, state: dict, what: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} ({first}); pass the --model it was trained with") from None


def build_from_meta(meta: CheckpointMeta) -> nn.Module:
    """The model a meta describes, randomly initialised, in eval mode."""
    from ldnbench.models import build_model

    return build_model(meta.model_name, meta.num_classes, **meta.build_options()).eval()


def load_checkpoint(path: str | Path, model_name: str | None = None, label_space: str | None = None, *,
                    num_classes: int | None = None) -> tuple[nn.Module, CheckpointMeta]:
    """(model in eval mode with the checkpoint's weights, its meta).

    Self-describing checkpoints (trainer, ``convert``) need no argument; ``model_name`` must then
    agree with the file. A bare state dict needs ``model_name`` and ``label_space`` (or
    ``num_classes``) and is tried in the paper's layout, then the ImageNet-compatible one.
    """
    from ldnbench.data.spaces import get_label_space
    from ldnbench.models import resolve_model_name

    ck = read_checkpoint(path)
    name = resolve_model_name(model_name) if model_name else None
    if ck.meta is not None:
        meta = ck.meta
        if name and name != meta.model_name:
            raise UserError(f"checkpoint {path} holds a {meta.model_name} model, not {name}; "
                            f"pass --model {meta.model_name} or leave --model out", 2)
        model = build_from_meta(meta)
        _fit(model, ck.state, f"checkpoint {path} does not fit model {meta.model_name} with {meta.num_classes} classes")
        return model, meta
    if not name:
        raise UserError(f"checkpoint {path} does not say which model it holds; pass --model", 2)
    classes = num_classes or (get_label_space(label_space).num_classes if label_space else None)
    if not classes:
        raise UserError(f"checkpoint {path} does not say which classes it predicts; pass --label-space", 2)
    config = ck.extra.get("config") if isinstance(ck.extra.get("config"), dict) else None
    options = dict((config or {}).get("model_options") or {})
    meta = CheckpointMeta(name, int(classes), label_space, options, IMAGENET, config, {"source": "state-dict"})
    try:
        model = build_from_meta(meta)
        _fit(model, ck.state, f"checkpoint {path} does not fit model {name} with {classes} classes")
    except UserError:
        if "imagenet_compatible" in options:
            raise
        meta = replace(meta, model_options={**options, "imagenet_compatible": True})
        model = build_from_meta(meta)
        _fit(model, ck.state, f"checkpoint {path} does not fit model {name} with {classes} classes")
    return model, meta
