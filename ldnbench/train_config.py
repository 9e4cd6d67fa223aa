"""The configuration of a training run: every option, its default and its CLI help, in one place.

Kept free of torch so that the command line can declare its options without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ldnbench.errors import UserError

#: Training mixed-precision modes. ``auto`` resolves by device *type* only (see
#: :func:`ldnbench.runtime.resolve_amp`).
AMP_MODES = ("none", "auto", "bf16", "fp16")

#: Where a resized evaluation is scored (see :mod:`ldnbench.data.resize`): at the labels' original
#: resolution, or against labels resized the same way.
EVAL_AT = ("original", "resized")
#: Scoring against the dataset's own labels: numbers comparable across --resize values and with
#: the official server (see docs/evaluation.md).
DEFAULT_EVAL_AT = "original"

# Per-dataset presets of the paper (section 5): the values that differ from the defaults of
# :class:`TrainConfig`. ``crop`` comes from each adapter's ``crop_size`` (448/512/768). CamVid's
# epoch count depends on initialisation (400 ImageNet / 800 random), VOC is trained in two runs:
# 100 epochs on ``voc-aug`` then 100 on ``voc`` started from the first (``init``), both with the
# pretrained weights at lr/8.
PRESETS: dict[str, dict[str, Any]] = {
    "cityscapes": {"epochs": 300},
    "camvid": {"epochs": 400, "epochs_random_init": 800, "val_split": "test"},
    "voc-aug": {"epochs": 100, "backbone_lr_div": 8.0},
    "voc": {"epochs": 100, "backbone_lr_div": 8.0},
}


def _cli(help: str, **how: Any) -> dict[str, Any]:
    """Field metadata of an option that the CLI offers: its help, and how it is declared there
    (``flag``, ``nargs``, ``choices``, ``multiple``, ...; see ``ldnbench.cli.config_options``).
    The default is the field's own, so it lives in one place."""
    return {"help": help, "cli": how}


@dataclass
class TrainConfig:
    """Every option of a training run; defaults are the paper's Cityscapes recipe.

    ``batch_size`` is the global batch over all processes. ``crop=None`` takes the adapter's
    ``crop_size``. ``pretrained`` is ``imagenet``, ``none`` or a path to a torchvision-format state
    dict; only pretrained backbone parameters get ``lr / backbone_lr_div``. ``ckpt`` is the
    gradient-checkpointing policy (None: the model's training default). ``amp``: ``none``,
    ``auto`` (bf16 on CPU, fp16 on CUDA), ``bf16`` or ``fp16`` (CUDA only). ``val_every`` (epochs, 0 = only at the end) and
    ``save_every`` (iterations; ``last.pt`` is also written after every epoch) set the periodic
    work; ``max_iters`` stops early (smoke runs). ``init`` starts from the model weights of a
    checkpoint (VOC's second stage). ``workers=None``: ``min(4, usable CPUs)`` DataLoader processes.
    Validation, whatever ``amp`` is, runs in float32 (see :mod:`ldnbench.runtime`).
    """

    model: str = field(metadata=_cli("Model name or alias (see `ldnbench zoo`), e.g. ldn121.", required=True))
    dataset: str = field(metadata=_cli("Dataset adapter (see `ldnbench datasets`); picks the paper's preset.",
                                       required=True))
    root: str | None = field(default=None, metadata=_cli("Dataset folder [default: ./datasets/<dataset>]."))
    out: str | None = field(default=None, metadata=_cli("Run folder [default: results/<model>-<dataset>]."))
    split: str = field(default="train", metadata=_cli("Training split."))
    val_split: str | None = field(default="val", metadata=_cli("Validation split, or 'none' (camvid preset: test).",
                                                                none_word=True))
    epochs: int = field(default=300, metadata=_cli("Epochs (presets: camvid 400, or 800 from random init; voc 100)."))
    batch_size: int = field(default=16, metadata=_cli("Global batch over all processes."))
    crop: int | None = field(default=None, metadata=_cli("Square crop side [default: the dataset's 448/512/768]."))
    scale: tuple[float, float] = field(default=(0.5, 2.0), metadata=_cli("Random rescale range.", nargs=2))
    flip: bool = True
    pad: bool = field(default=True, metadata=_cli("Pad crops larger than the rescaled image (--no-pad: refuse them).",
                                                  flag="--pad/--no-pad"))
    lr: float = field(default=4e-4, metadata=_cli("Initial learning rate."))
    min_lr: float = 0.0
    backbone_lr_div: float = field(default=4.0, metadata=_cli("Learning-rate divisor of pretrained parameters "
                                                              "(voc preset: 8)."))
    weight_decay: float = field(default=0.0, metadata=_cli("Adam weight decay."))
    main_weight: float = field(default=0.6, metadata=_cli("Weight of the final cross-entropy."))
    aux_weight: float = field(default=0.4, metadata=_cli("Weight of the mean aux loss; 0 builds no aux heads."))
    pretrained: str = field(default="imagenet", metadata=_cli("imagenet, none or PATH to a torchvision state dict."))
    init: str | None = field(default=None, metadata=_cli("Start from the model weights of this checkpoint "
                                                         "(e.g. VOC stage 2)."))
    ckpt: str | None = field(default=None, metadata=_cli("Gradient-checkpointing policy [default: the model's "
                                                         "training default]."))
    amp: str = field(default="none", metadata=_cli(
        "Training mixed precision; --amp alone = auto (bf16 on CPU, fp16 on CUDA, on every machine). Validation "
        "always runs in fp32.", choices=AMP_MODES, flag_value="auto"))
    recompute_bn: bool = field(default=True, metadata=_cli("Recompute the BatchNorm statistics over the training "
                                                           "set at the end.", flag="--bn-recompute/--no-bn-recompute"))
    val_every: int = field(default=10, metadata=_cli("Validate every N epochs, 0 = only at the end."))
    val_limit: int | None = field(default=None, metadata=_cli("Validate on the first N images only (smoke runs)."))
    save_every: int = field(default=500, metadata=_cli("Write last.pt every N iterations."))
    max_iters: int | None = field(default=None, metadata=_cli("Stop after N iterations in total (smoke runs)."))
    seed: int = field(default=0, metadata=_cli("Seed of the initialisation, sample order and augmentation."))
    workers: int | None = field(default=None, metadata=_cli("DataLoader workers per process [default: min(4, usable "
                                                            "CPUs)]."))
    device: str = field(default="auto", metadata=_cli("auto, cpu, cuda or cuda:N."))
    resume: bool = field(default=False, metadata=_cli("Continue the run in --out from its last.pt.", flag="--resume"))
    model_options: dict[str, Any] = field(default_factory=dict, metadata=_cli(
        "Extra build_model option, e.g. growth_rate=16 (repeatable).", multiple="--model-option"))
    dataset_options: dict[str, Any] = field(default_factory=dict, metadata=_cli(
        "Extra adapter option (repeatable).", multiple="--dataset-option"))
    progress: bool = field(default=True, metadata=_cli("tqdm bars (--no-progress: one line per epoch only).",
                                                       flag="--progress/--no-progress"))
    #: image width after resizing (aspect kept): an int, or ``{dataset: width}`` with ``"*"`` for all
    #: (see :mod:`ldnbench.data.resize`), for training and validation; the CLI's ``--resize``.
    resize: int | dict[str, int] | None = None
    #: the validation's label resolution under ``resize`` (:data:`EVAL_AT`); the CLI's ``--eval-at``.
    eval_at: str = DEFAULT_EVAL_AT
    tensorboard: bool = field(default=False, metadata=_cli("Also write TensorBoard event files to OUT/tensorboard "
                                                           "(pip install 'ldnbench[tensorboard]').",
                                                           flag="--tensorboard"))

    @classmethod
    def preset(cls, model: str, dataset: str, **overrides: Any) -> "TrainConfig":
        """The paper's recipe for ``dataset`` (see :data:`PRESETS`); ``overrides`` that are not None win."""
        values = dict(PRESETS.get(dataset, {}))
        random_init_epochs = values.pop("epochs_random_init", None)
        given = {k: v for k, v in overrides.items() if v is not None}
        if random_init_epochs and str(given.get("pretrained", "imagenet")).lower() == "none":
            values["epochs"] = random_init_epochs
        values.update(given)
        return cls(model=model, dataset=dataset, **values)

    @property
    def is_pretrained(self) -> bool:
        return str(self.pretrained).lower() != "none"

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / f"{self.model}-{self.dataset}"


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``["growth_rate=8", "block_config=2,2,2,2"]`` → ``{"growth_rate": 8, "block_config": (2, 2, 2, 2)}``."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"option {item!r} is not KEY=VALUE", 2)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word is a string
    return out
