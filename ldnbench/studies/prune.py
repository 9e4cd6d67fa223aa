"""Pruning study (paper section 5.6, Fig. 5): how accuracy falls as the backbone tail is switched off.

A *unit* is a dense layer of a DenseNet block (switching it off zeroes its ``k`` new maps, i.e. the
output of its 3×3 convolution) or a residual unit of a ResNet stage (switching it off zeroes the
residual branch, i.e. the output of its last BatchNorm, so the identity or 1×1 projection still
passes). Transition-down units and projections are never touched. For a fraction ``f`` the last
``round(f · n)`` units of each selected block are switched off, so every block loses an equal
portion from its tail. Switching off is done with forward hooks: the weights (and any checkpoint)
are unchanged, and removing the hooks restores the model exactly. There is no retraining.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from ldnbench.checkpoints import CheckpointMeta, load_checkpoint
from ldnbench.data.base import dataset_label_space
from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write_text
from ldnbench.studies.common import EvaluateFn, default_evaluate, model_mapping

DEFAULT_FRACTIONS = tuple(round(i / 10, 1) for i in range(11))


@dataclass(frozen=True)
class Unit:
    """One prunable unit: ``block`` name, position in the block, and the module whose output is zeroed."""

    block: str
    index: int
    name: str
    output: nn.Module = field(compare=False, repr=False)


def backbone_blocks(model: nn.Module) -> list[tuple[str, list[Unit]]]:
    """The backbone's processing blocks (DenseNet ``denseblockN`` / ResNet ``layerN``) and their units."""
    bb = getattr(model, "backbone", model)
    blocks = []
    for name, mod in bb.named_children():
        if re.fullmatch(r"denseblock\d+", name):
            units = [Unit(name, i, f"{name}.{n}", u.conv2) for i, (n, u) in enumerate(mod.named_children())]
        elif re.fullmatch(r"layer\d+", name):
            units = []
            for i, (n, u) in enumerate(mod.named_children()):
                last_bn = getattr(u, "bn3", None) or getattr(u, "bn2", None)
                if last_bn is None:
                    raise UserError(f"cannot find the residual branch of {name}.{n} ({type(u).__name__})")
                units.append(Unit(name, i, f"{name}.{n}", last_bn))
        else:
            continue
        blocks.append((name, units))
    if not blocks:
        raise UserError(f"model {getattr(model, 'name', type(model).__name__)} has no DenseNet or ResNet backbone "
                        "blocks to prune; use an ldn* or lrn* model")
    blocks.sort(key=lambda b: int(re.sub(r"\D", "", b[0])))
    return blocks


def select_blocks(model: nn.Module, blocks: str | Sequence[str] = "last2") -> list[tuple[str, list[Unit]]]:
    """``lastN`` (the paper uses ``last2``), ``all``, or a comma list of block names."""
    available = backbone_blocks(model)
    names = [b for b, _ in available]
    if isinstance(blocks, str):
        spec = blocks.strip().lower()
        m = re.fullmatch(r"last(\d+)", spec)
        if spec == "all":
            return available
        if m:
            n = int(m.group(1))
            if not 1 <= n <= len(available):
                raise UserError(f"--blocks {blocks}: the backbone has {len(available)} blocks ({', '.join(names)})", 2)
            return available[-n:]
        blocks = [b.strip() for b in spec.split(",") if b.strip()]
    wrong = [b for b in blocks if b not in names]
    if wrong or not blocks:
        raise UserError(f"--blocks: unknown block(s) {', '.join(wrong) or '(none)'}; use lastN, all, or names from "
                        f"{', '.join(names)}", 2)
    return [b for b in available if b[0] in blocks]


def units_to_prune(blocks: list[tuple[str, list[Unit]]], fraction: float) -> list[Unit]:
    """The tail ``round(fraction · n)`` units of every block."""
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"pruned fraction {fraction} must lie in [0, 1]", 2)
    out = []
    for _, units in blocks:
        k = int(round(fraction * len(units) + 1e-9))
        out += units[len(units) - k:] if k else []
    return out


def _zero_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


class UnitPruner:
    """Switch units off with forward hooks; ``remove()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, units: Sequence[Unit]):
        self.units = list(units)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def apply(self) -> "UnitPruner":
        self.remove()
        self._handles = [u.output.register_forward_hook(_zero_output) for u in self.units]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "UnitPruner":
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def parse_fractions(spec: str | Sequence[float]) -> list[float]:
    """``"0,0.1,...,1"`` style lists (``...`` continues the step of the two values before it)."""
    if not isinstance(spec, str):
        vals = [float(v) for v in spec]
    else:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        vals = []
        try:
            for i, p in enumerate(parts):
                if p == "...":
                    if len(vals) < 2 or i + 1 >= len(parts):
                        raise ValueError
                    step, end = vals[-1] - vals[-2], float(parts[i + 1])
                    if step <= 0:
                        raise ValueError
                    n = int(round((end - vals[-1]) / step))
                    vals += [round(vals[-1] + step * j, 6) for j in range(1, n)]
                else:
                    vals.append(float(p))
        except ValueError:
            raise UserError(f"--fractions {spec!r}: give comma-separated numbers in [0, 1], e.g. 0,0.1,...,1", 2) from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise UserError(f"--fractions {spec!r}: every fraction must lie in [0, 1]", 2)
    return sorted(set(vals))


@dataclass
class PruneConfig:
    """One pruning study: a trained model evaluated under increasing tail pruning."""

    model: str
    checkpoint: str | Path | None
    dataset: str
    root: str | Path | None = None
    split: str = "val"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    blocks: str = "last2"
    device: str = "cpu"
    max_images: int | None = None
    out: str | Path = "results"
    #: resolution protocol of the evaluations (ldnbench.data.resize); None = full resolution
    resize: int | None = None
    eval_at: str = "original"


@dataclass
class PruneResult:
    curve: list[dict[str, Any]]
    classes: list[str]
    units_per_block: dict[str, int]
    csv: Path | None = None
    record: Path | None = None
    figures: list[Path] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """fraction × (units pruned, mIoU, per-class IoU), fractions 0–1."""
        rows = [{"fraction": p["fraction"], "units_pruned": p["units_pruned"], "miou": p["miou"],
                 **{f"iou_{c}": p["class_iou"].get(c) for c in self.classes}} for p in self.curve]
        return pd.DataFrame(rows)


def prune_curve(model: nn.Module, dataset: Any, fractions: Sequence[float], evaluate_fn: EvaluateFn,
                blocks: str | Sequence[str] = "last2", mapping: Any = None,
                progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict[str, int]]:
    """Evaluate ``model`` on ``dataset`` once per fraction; the model is left unpruned afterwards."""
    sel = select_blocks(model, blocks)
    curve = []
    for f in fractions:
        units = units_to_prune(sel, f)
        with UnitPruner(units):
            m = evaluate_fn(model, dataset, mapping)
        curve.append({"fraction": float(f), "units_pruned": len(units), "miou": m.get("miou"),
                      "class_iou": dict(m.get("class_iou") or {}), "confusion": m.get("confusion")})
        if progress:
            miou = m.get("miou")
            progress(f"fraction {f:.2f}: {len(units):3d} units off, mIoU "
                     f"{'-' if miou is None else f'{100 * miou:.1f}'}")
    return curve, {b: len(u) for b, u in sel}


def run_prune(cfg: PruneConfig, *, evaluate_fn: EvaluateFn | None = None, model: nn.Module | None = None,
              meta: CheckpointMeta | None = None, dataset: Any = None, progress: Callable[[str], None] | None = None,
              command: list[str] | None = None) -> PruneResult:
    """Run the study, write ``<out>/prune-<model>-<dataset>-<id>/{prune.csv,result.json,*.png,*.pdf}``."""
    from ldnbench.data.registry import get_dataset
    from ldnbench.report import figures as F
    from ldnbench.report.records import make_record, write_record

    if model is None and cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise UserError(f"checkpoint {cfg.checkpoint} does not exist; pass the last.pt/best.pt of a training run")
    if dataset is None:
        dataset = get_dataset(cfg.dataset, cfg.root, cfg.split)
    if cfg.max_images is not None and cfg.max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(cfg.max_images))
    from ldnbench.data.resize import apply_resize, check_eval_at, check_width, protocol
    from ldnbench.evaluate import EvalSettings

    if cfg.eval_at == "resized" and cfg.resize is None:
        raise UserError("--eval-at resized needs --resize W (the width the images and labels are resized to)", 2)
    dataset = apply_resize(dataset, check_width(cfg.resize), check_eval_at(cfg.eval_at))
    space = dataset_label_space(dataset)
    if model is None:
        model, meta = load_checkpoint(cfg.checkpoint, cfg.model, num_classes=space.num_classes)
    model.eval()
    evaluate_fn = evaluate_fn or default_evaluate(cfg.device, meta.normalization if meta else None)
    mapping = model_mapping(meta.label_space if meta else None, dataset)
    curve, per_block = prune_curve(model, dataset, cfg.fractions, evaluate_fn, cfg.blocks, mapping,
                                   progress)
    classes = list(space.classes)
    result = PruneResult(curve, classes, per_block)
    rec = make_record("prune", model=getattr(model, "name", cfg.model), dataset=cfg.dataset, root=cfg.root,
                      split=cfg.split, device=cfg.device, command=command,
                      metrics={"miou_unpruned": next((p["miou"] for p in curve if p["fraction"] == 0), None)},
                      checkpoint=str(cfg.checkpoint) if cfg.checkpoint else None, blocks=cfg.blocks,
                      train_dataset=meta.trained_on if meta else None,
                      units_per_block=per_block, classes=classes, curve=curve, max_images=cfg.max_images,
                      eval_settings=EvalSettings(resize=protocol(dataset)[0], eval_at=protocol(dataset)[1]).to_dict())
    out = Path(cfg.out) / f"prune-{rec['model']}-{cfg.dataset}-{rec['run_id'].split('-', 1)[1]}"
    df = result.frame()
    result.csv = atomic_write_text(out / "prune.csv", df.to_csv(index=False, float_format="%.6g"))
    result.record = write_record(out / "result.json", rec)
    curves = F.prune_curves_frame(rec).assign(model=F.prune_label(rec))
    result.figures = F.pruning_curves(curves, out / "pruning_miou") + F.pruning_class_curves(
        curves, classes, out / "pruning_classes", title=f"Per-class IoU after pruning ({rec['model']})")
    return result
