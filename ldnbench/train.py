"""The paper's training recipe (section 5.1) for any model of the zoo on any dataset adapter.

``train(TrainConfig(...))`` runs in one process, or in every process of a ``torchrun`` launch:
the process group is created from torchrun's environment, each process trains on its slice of
every global batch under DistributedDataParallel with synchronised BatchNorm
(:func:`convert_sync_batchnorm`, CPU/gloo and CUDA/NCCL), and only rank 0 writes files. :func:`ldnbench.launch.launch` starts such a run on this machine.

Determinism and resumption: the sample order of epoch ``e`` is a permutation seeded by
``(seed, e)`` and the augmentation of sample ``i`` in epoch ``e`` uses a generator seeded by
``(seed, e, i)``, so neither depends on the number of DataLoader workers, and a resumed run skips
the already-consumed batches without reading them. ``last.pt`` also holds the model, optimizer,
scheduler, RNG states and the position within the epoch, so a run killed at any point and
resumed with the same options ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from ldnbench.checkpoints import CheckpointMeta, read_checkpoint, save_checkpoint
from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write_text
from ldnbench.losses import SegLoss
from ldnbench.models.batchnorm import convert_sync_batchnorm, recompute_bn_stats
from ldnbench.runtime import (
    AMP_MODES,
    Distributed,
    amp_precision,
    autocast,
    default_workers,
    resolve_amp,
    resolve_device,
)
from ldnbench.train_config import TrainConfig

#: Iteration key of the pass that recomputes BatchNorm statistics (its crops differ from every epoch's).
_BN_EPOCH_KEY = 2**31 - 1

def _zero_running() -> dict[str, float]:
    return {"loss": 0.0, "main": 0.0, "aux": 0.0, "n": 0, "time": 0.0}


@dataclass
class Progress:
    """Where a run is: everything besides weights, optimizer and RNG that ``last.pt`` must hold
    to resume exactly (saved with :meth:`to_dict`, restored with :meth:`from_dict`, whole)."""

    epoch: int = 0  #: completed epochs
    step: int = 0  #: batches done in the current epoch
    iteration: int = 0
    running: dict[str, float] = field(default_factory=_zero_running)  #: sums over the current epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    #: BatchNorm running statistics of training, kept while the checkpoint holds recomputed ones
    train_bn: dict[str, torch.Tensor] | None = None
    final_metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Progress":
        values = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        values["running"], values["history"] = dict(values["running"]), list(values["history"])
        return cls(**values)


@dataclass
class TrainResult:
    out_dir: Path
    record_path: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    epochs: int  #: completed epochs
    iterations: int
    final_metrics: dict[str, Any] | None
    best_miou: float | None
    history: list[dict[str, Any]]
    rank: int = 0  #: this process's rank under torchrun (only rank 0 wrote the files)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --- data -----------------------------------------------------------------------------------------


def _mix_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class EpochBatchSampler:
    """Batches of ``(epoch, index)`` keys for one process.

    Epoch ``e`` visits a permutation seeded by ``(seed, e)``, repeated cyclically to fill the last
    global batch (as the authors' reader oversamples). Process ``rank`` of ``world`` gets its
    contiguous slice of each global batch, so the union over processes is the single-process batch.
    ``set_epoch(e, start)`` skips the first ``start`` batches (resumption). With ``cycle=False``
    every sample is visited exactly once and the last batch may be short (BN recomputation).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, cycle: bool = True):
        if n < 1:
            raise UserError("the training split is empty", 1)
        self.n, self.batch_size, self.seed, self.rank, self.world, self.cycle = n, batch_size, seed, rank, world, cycle
        self.epoch, self.start = 0, 0

    @property
    def num_batches(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)
        total = self.num_batches * self.batch_size if self.cycle else self.n
        perm = perm.repeat(math.ceil(total / self.n))[:total].tolist()
        for b in range(self.start, self.num_batches):
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            per = math.ceil(len(batch) / self.world)
            mine = batch[self.rank * per:(self.rank + 1) * per]
            yield [(self.epoch, i) for i in mine]


class SeededTrainSet(torch.utils.data.Dataset):
    """``dataset[i]`` through ``transform`` with a generator seeded by ``(seed, epoch, i)``."""

    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, i))
        return self.transform(self.dataset[i], generator=g)


def _loader(dataset, sampler: EpochBatchSampler, workers: int, pin: bool):
    from ldnbench.data.transforms import collate

    # A private generator keeps the DataLoader from drawing on the global RNG (which the
    # checkpoint restores) when it creates an iterator.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_skip_empty(collate),
                                       pin_memory=pin, generator=torch.Generator())


class _skip_empty:
    """collate that tolerates the empty slice a process may get in the short last BN batch."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, batch):
        return self.collate(batch) if batch else None


# --- RNG state as checkpoint-safe plain types -----------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# --- distributed ----------------------------------------------------------------------------------


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# --- the run --------------------------------------------------------------------------------------



def _autocast_factory(amp: str, device: torch.device):
    return lambda: autocast(amp_precision(amp), device)


def check_config(cfg: TrainConfig) -> None:
    """Options that are wrong whatever the data: UserError before anything runs."""
    from ldnbench.models import resolve_model_name

    resolve_model_name(cfg.model)  # an unknown name is the first thing to report
    if cfg.amp not in AMP_MODES:
        raise UserError(f"unknown --amp mode {cfg.amp!r}; use {', '.join(AMP_MODES)}", 2)
    if cfg.workers is not None and cfg.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {cfg.workers}", 2)
    for name in ("epochs", "batch_size", "save_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}", 2)
    if cfg.crop is not None and cfg.crop < 1:
        raise UserError(f"--crop must be positive, got {cfg.crop}", 2)
    if cfg.max_iters is not None and cfg.max_iters < 1:
        raise UserError(f"--max-iters must be at least 1, got {cfg.max_iters}", 2)
    if not 0 < cfg.scale[0] <= cfg.scale[1]:
        raise UserError(f"scale range {cfg.scale} must satisfy 0 < min <= max", 2)
    from ldnbench.data.resize import check_eval_at, check_width

    check_eval_at(cfg.eval_at)
    for w in (cfg.resize.values() if isinstance(cfg.resize, dict) else [cfg.resize]):
        check_width(w)
    if cfg.eval_at == "resized" and cfg.resize is None:
        raise UserError("--eval-at resized needs --resize W (the width the images and labels are resized to)", 2)
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'ldnbench[tensorboard]' "
                            "(or pip install tensorboard)", 2) from None


def check_out(cfg: TrainConfig) -> None:
    """The run folder: an existing run needs --resume, --resume needs one."""
    last = cfg.out_dir() / "last.pt"
    if last.exists() and not cfg.resume:
        raise UserError(f"{cfg.out_dir()} already holds a run (last.pt); pass --resume to continue it or choose "
                        f"another --out", 2)
    if cfg.resume and not last.exists():
        raise UserError(f"--resume: no checkpoint {last}; start without --resume", 1)


def _open_datasets(cfg: TrainConfig, train_set, val_set):
    from ldnbench.data.registry import DATASETS, default_root, get_dataset

    if train_set is None:
        if cfg.dataset not in DATASETS:
            raise UserError(f"unknown dataset {cfg.dataset!r}; known datasets: {', '.join(sorted(DATASETS))}", 2)
        root = Path(cfg.root) if cfg.root else default_root(cfg.dataset)
        if not root.is_dir():
            raise UserError(f"dataset root {root} does not exist; pass --root DIR pointing at the {cfg.dataset} "
                            f"folder (see `ldnbench datasets`)", 1)
        train_set = get_dataset(cfg.dataset, root, cfg.split, **cfg.dataset_options)
        if val_set is None and cfg.val_split:
            if cfg.val_split in DATASETS[cfg.dataset].splits:
                val_set = get_dataset(cfg.dataset, root, cfg.val_split, **cfg.dataset_options)
                if len(val_set) == 0:
                    val_set = None
    if len(train_set) == 0:
        raise UserError(f"the {cfg.split!r} split of {cfg.dataset} under {cfg.root} has no samples", 1)
    from ldnbench.data.resize import apply_resize, is_resized, width_for

    width = width_for(cfg.resize, cfg.dataset)
    if not is_resized(train_set):  # a caller's set that is resized already (cross) is used as given
        train_set = apply_resize(train_set, width, "resized")
    if val_set is not None and not is_resized(val_set):
        val_set = apply_resize(val_set, width, cfg.eval_at)
    return train_set, val_set


def _image_sizes(train_set, limit: int = 64) -> list[tuple[int, int]]:
    """(H, W) of up to ``limit`` images spread over the set, from file headers where there are files."""
    n = len(train_set)
    idx = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(limit, n))})
    files = getattr(train_set, "files", None)
    if files is not None and len(files) == n and all(getattr(files[i], "image", None) for i in idx):
        sizes = []
        for i in idx:
            with Image.open(files[i].image) as im:
                sizes.append((im.height, im.width))
        return sizes
    return [tuple(train_set[i].image.shape[:2]) for i in idx[:1]]


def _check_crop(cfg: TrainConfig, crop: int, train_set) -> None:
    if cfg.pad:
        # Padding makes any crop possible, but a crop far beyond every rescaled image is only padding
        # (and a 4096² batch of it exhausts memory before a single step): refuse it up front.
        from ldnbench.data.resize import find_resized, resized_size

        sizes = _image_sizes(train_set)
        r = find_resized(train_set)
        if r is not None:  # file headers give the sizes before resizing
            sizes = [resized_size(h, w, r.width) for h, w in sizes]
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        largest = cfg.scale[1] * max(h, w)
        if crop > 2 * largest:
            seen = sorted(set(sizes))
            shown = ", ".join(f"{b}x{a}" for a, b in seen[:3]) + (" ..." if len(seen) > 3 else "")
            raise UserError(f"crop {crop} is more than twice the largest training image after the largest rescale "
                            f"(images are {shown} WxH, {round(largest)} px on the long side at scale {cfg.scale[1]}); "
                            f"use --crop {int(largest)} or less", 2)
        return
    # Without padding every rescaled image must hold the crop; the first image stands for the set.
    h, w = train_set[0].image.shape[:2]
    smallest = cfg.scale[0] * min(h, w)
    if crop > smallest:
        raise UserError(f"crop {crop} is larger than the training images ({h}x{w}, {round(smallest)} px on the short "
                        f"side at scale {cfg.scale[0]}) and padding is disabled; use --crop {int(smallest)} or less, "
                        f"or allow padding", 2)


def _build_model(cfg: TrainConfig, num_classes: int):
    from ldnbench.models import build_model, resolve_model_name

    name = resolve_model_name(cfg.model)
    opts = dict(cfg.model_options)
    if cfg.ckpt is not None:
        opts["checkpointing"] = cfg.ckpt
    if cfg.init:
        # The start checkpoint carries the weights; build its layout without loading ImageNet again.
        model = build_model(name, num_classes, imagenet_compatible=cfg.is_pretrained, **opts)
        ck = read_checkpoint(cfg.init)
        init_classes = ck.meta.num_classes if ck.meta else None
        if init_classes != num_classes:
            raise UserError(f"--init checkpoint {cfg.init} has {init_classes} classes, the dataset "
                            f"{num_classes}", 2)
        try:
            model.load_state_dict(ck.state)
        except RuntimeError as e:
            raise UserError(f"--init checkpoint {cfg.init} does not fit model {name}: {str(e).splitlines()[0]}", 2) from None
        return model
    pretrained = None if not cfg.is_pretrained else cfg.pretrained
    if pretrained not in (None, "imagenet") and not Path(pretrained).is_file():
        raise UserError(f"--pretrained {pretrained}: no such file; use imagenet, none or a state-dict path", 2)
    return build_model(name, num_classes, pretrained=pretrained, **opts)


def _param_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    if not cfg.is_pretrained:
        return [{"params": list(model.parameters()), "lr": cfg.lr, "name": "all"}]
    return [{"params": model.backbone_parameters(), "lr": cfg.lr / cfg.backbone_lr_div, "name": "backbone"},
            {"params": model.head_parameters(), "lr": cfg.lr, "name": "head"}]


def _validate(model, val_set, device, limit: int | None) -> dict[str, Any]:
    """``evaluate()`` with its defaults (float32 whatever the training precision): the number that
    ``ldnbench eval`` reports for the same checkpoint."""
    from ldnbench.evaluate import evaluate

    return evaluate(model, val_set, device=device, progress=False, max_images=limit).metrics.to_dict()


def _complexity(model, imagenet_compatible: bool) -> dict[str, Any]:
    from ldnbench.models import count_params

    out: dict[str, Any] = {"params": count_params(model)}
    try:
        from ldnbench.models import model_complexity

        c = model_complexity(model.name, num_classes=model.num_classes, imagenet_compatible=imagenet_compatible)
        if c.params == out["params"]:  # the zoo's count describes this exact configuration
            out["gmac_1mpx"] = c.gmac
    except Exception:  # complexity is informative only; a custom configuration may not be countable
        pass
    return out


def train(config: TrainConfig, *, train_set=None, val_set=None) -> TrainResult:
    """Run (or resume) training; returns where everything went and the final metrics.

    ``train_set``/``val_set`` replace the adapters named by ``config`` (any
    :class:`~ldnbench.data.SegDataset`).
    """
    check_config(config)
    with Distributed(config.device) as d:
        return _Run(config, d, train_set, val_set).run()


class _Run:
    def __init__(self, cfg: TrainConfig, d: Distributed, train_set, val_set):
        from ldnbench.data.transforms import TrainTransform

        if cfg.aux_weight == 0 and "aux" not in cfg.model_options:
            # Heads that get no gradient would stall DDP (unused parameters) and cost compute: build none.
            # The option is part of the config, so every later load builds the same layout.
            cfg = dataclasses.replace(cfg, model_options={**cfg.model_options, "aux": False})
        self.cfg, self.d = cfg, d
        self.workers = default_workers() if cfg.workers is None else cfg.workers
        self.device = resolve_device(cfg.device)
        self.amp = resolve_amp(cfg.amp, self.device)  # what "auto" became on this device type, recorded
        if cfg.batch_size % d.world:
            raise UserError(f"batch size {cfg.batch_size} is not divisible by the {d.world} processes", 2)
        self.out = cfg.out_dir()
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        self.record_path = self.out / "result.json"
        check_out(cfg)
        self.train_set, self.val_set = _open_datasets(cfg, train_set, val_set)
        self.label_space = self.train_set.label_space
        self.crop = cfg.crop or self.train_set.crop_size
        _check_crop(cfg, self.crop, self.train_set)
        torch.manual_seed(cfg.seed)  # identical initialisation in every process
        self.model = _build_model(cfg, self.label_space.num_classes).to(self.device)
        torch.manual_seed(_mix_seed(cfg.seed, d.rank, 1))  # per-process stream (dropout)
        np.random.seed(_mix_seed(cfg.seed, d.rank, 2))
        random.seed(_mix_seed(cfg.seed, d.rank, 3))
        self.net: nn.Module = self.model
        if d.enabled:
            # Not torch's SyncBatchNorm: it is GPU-only, and it would replace the models' BatchNorm2d,
            # whose running statistics must not be updated again when a checkpointed segment is recomputed.
            self.net = convert_sync_batchnorm(self.net)
            self.model = self.net
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(_param_groups(self.model, cfg), lr=cfg.lr, amsgrad=True,
                                          weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.epochs,
                                                                    eta_min=cfg.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.autocast = _autocast_factory(self.amp, self.device)
        self.loss = SegLoss(self.label_space.num_classes, cfg.main_weight, cfg.aux_weight,
                            count_reduce=_global_mean_count if d.enabled else None)
        transform = TrainTransform(self.crop, cfg.scale, cfg.flip, cfg.pad)
        self.data = SeededTrainSet(self.train_set, transform, cfg.seed)
        self.sampler = EpochBatchSampler(len(self.train_set), cfg.batch_size, cfg.seed, d.rank, d.world)
        self.iters_per_epoch = self.sampler.num_batches
        total = cfg.epochs * self.iters_per_epoch
        self.total_iters = min(total, cfg.max_iters) if cfg.max_iters else total
        self.p = Progress()  # saved and restored whole
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if cfg.resume:
            ck = read_checkpoint(self.last_path)
            self._restore({**ck.extra, **(ck.meta.to_dict() if ck.meta else {}), "model": ck.state})

    @property
    def is_main(self) -> bool:
        return self.d.rank == 0

    def _log(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)

    # --- checkpoints ------------------------------------------------------------------------------

    def _meta(self) -> CheckpointMeta:
        # the layout the model was built in (build_model: pretrained weights imply the torchvision layout)
        compat = bool(self.cfg.model_options.get("imagenet_compatible")) or self.cfg.is_pretrained
        options = {**self.cfg.model_options, "imagenet_compatible": compat}
        return CheckpointMeta(self.model.name, self.label_space.num_classes, self.label_space.name, options,
                              config=dataclasses.asdict(self.cfg), provenance={"source": "ldnbench-train"})

    def _state(self) -> dict[str, Any]:
        """The progress state that goes into last.pt beside the weights and the meta."""
        rng = _rng_state(self.device)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rng, "world_size": self.d.world,
                 **self.p.to_dict()}
        if self.d.enabled:
            ranks = [None] * self.d.world
            dist.all_gather_object(ranks, rng)
            state["rng_ranks"] = ranks
        return state

    def _save_last(self) -> None:
        state = self._state()  # collective under DDP: every process must get here
        if self.is_main:
            save_checkpoint(self.last_path, self.model.state_dict(), self._meta(), **state)

    def _restore(self, ck: dict[str, Any]) -> None:
        if ck.get("model_name") != self.model.name or ck.get("num_classes") != self.label_space.num_classes:
            raise UserError(f"{self.last_path} was written for {ck.get('model_name')} with {ck.get('num_classes')} "
                            f"classes, not {self.model.name} with {self.label_space.num_classes}; use another --out", 2)
        self.model.load_state_dict(ck["model"])
        if ck.get("train_bn"):
            # The checkpoint holds the final (recomputed) statistics; training continues from its own.
            self.model.load_state_dict(ck["train_bn"], strict=False)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        rng = ck["rng"]
        if self.d.enabled and ck.get("world_size") == self.d.world and ck.get("rng_ranks"):
            rng = ck["rng_ranks"][self.d.rank]
        _set_rng_state(rng, self.device)
        # the training-time statistics were loaded above; the recomputation runs again at the end
        self.p = dataclasses.replace(Progress.from_dict(ck), train_bn=None)
        self._log(f"resumed {self.last_path} at epoch {self.p.epoch + 1}, iteration {self.p.iteration}")

    # --- record -----------------------------------------------------------------------------------

    def _write_record(self, status: str) -> None:
        if not self.is_main:
            return
        from ldnbench.report.records import make_record, write_record

        cfg = self.cfg
        rec = make_record(
            "train", model=self.model.name, model_options=cfg.model_options, dataset=cfg.dataset,
            root=cfg.root, split=cfg.split, metrics=self.p.final_metrics or {}, device=str(self.device),
            run_id=self.out.name, config=dataclasses.asdict(cfg), seed=cfg.seed, status=status,
            label_space=self.label_space.name, val_split=cfg.val_split if self.val_set is not None else None,
            crop=self.crop, world_size=self.d.world, epochs_done=self.p.epoch, iterations=self.p.iteration,
            iters_per_epoch=self.iters_per_epoch, history=self.p.history, best=self.p.best,
            checkpoints={"last": str(self.last_path), "best": str(self.best_path) if self.p.best else None},
            complexity=self.complexity, started=self.started, workers=self.workers,
            train_precision=amp_precision(self.amp),
            eval_settings=self._eval_settings())
        write_record(self.record_path, rec)

    def _eval_settings(self) -> dict[str, Any]:
        from ldnbench.data.resize import protocol

        s: dict[str, Any] = {"scales": [1.0], "flip": False, "sliding": None, "precision": "fp32"}
        if self.val_set is not None:
            width, eval_at = protocol(self.val_set)
            if width is not None:
                s.update(resize=width, eval_at=eval_at)
        return s

    def _write_curves(self) -> None:
        """history.csv and curves.png next to the record, rewritten (atomically) after every epoch."""
        if not self.is_main:
            return
        from ldnbench.report.curves import history_frame, training_curves

        atomic_write_text(self.out / "history.csv", history_frame(self.p.history).to_csv(index=False, float_format="%.10g"))
        training_curves(self.p.history, self.p.final_metrics, self.out / "curves.png",
                        title=f"{self.model.name} on {self.cfg.dataset}/{self.cfg.split}")

    def _tb_log(self, entry: dict[str, Any] | None = None, final: dict[str, Any] | None = None) -> None:
        if self.tb is None:
            return
        if entry is not None:
            step = entry["epoch"]
            for key, tag in (("loss", "train/loss"), ("loss_main", "train/loss_main"), ("loss_aux", "train/loss_aux"),
                             ("lr", "train/lr"), ("images_per_s", "train/images_per_s")):
                if entry.get(key) is not None:
                    self.tb.add_scalar(tag, entry[key], step)
            if entry.get("val") and entry["val"].get("miou") is not None:
                self.tb.add_scalar("val/miou", entry["val"]["miou"], step)
        if final and final.get("miou") is not None:
            self.tb.add_scalar("val/final_miou", final["miou"], self.p.epoch)
        self.tb.flush()

    # --- loop -------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.complexity = _complexity(self.model, self.cfg.is_pretrained) if self.is_main else {}
        self.tb = None
        if self.is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
        try:
            return self._run()
        finally:
            if self.tb is not None:
                self.tb.close()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            where = f" x {self.d.world} processes" if self.d.enabled else ""
            self._log(f"training {self.model.name} on {cfg.dataset}/{cfg.split} ({len(self.train_set)} images, "
                      f"crop {self.crop}, batch {cfg.batch_size}{where}, {self.iters_per_epoch} it/epoch, "
                      f"{self.total_iters} iterations) on {self.device} -> {self.out}")
        pin = self.device.type == "cuda"
        loader = _loader(self.data, self.sampler, self.workers, pin)
        while self.p.iteration < self.total_iters and self.p.epoch < cfg.epochs:
            self._train_epoch(loader)
            if self.p.step == self.iters_per_epoch:
                self._end_epoch()
        if self.p.step:  # stopped mid-epoch by max_iters: keep the exact position
            r = self.p.running
            self._log(f"stopped at iteration {self.p.iteration} (--max-iters) after {self.p.step}/{self.iters_per_epoch} "
                      f"batches of epoch {self.p.epoch + 1}: loss {r['loss'] / max(r['n'], 1):.4f} over them")
            self._save_last()
        if cfg.recompute_bn and self.p.train_bn is None:
            self.p.train_bn = _bn_buffers(self.model)
            self._log("recomputing BatchNorm statistics over the training set")
            sampler = EpochBatchSampler(len(self.train_set), cfg.batch_size, cfg.seed, self.d.rank, self.d.world,
                                        cycle=False)
            sampler.set_epoch(_BN_EPOCH_KEY)
            recompute_bn_stats(self.model, self._bn_batches(_loader(self.data, sampler, self.workers, pin)),
                               self.device, self.autocast)
            self.p.final_metrics = None
        if self.p.final_metrics is None:
            self.p.final_metrics = self._validate()
            if self.p.final_metrics is not None:
                self._maybe_best(self.p.final_metrics, final=True)
        self._save_last()
        self._write_record("finished")
        self._write_curves()
        self._tb_log(final=self.p.final_metrics)
        if self.p.final_metrics:
            self._log(f"final: mIoU {_pct(self.p.final_metrics.get('miou'))} on {cfg.dataset}/{cfg.val_split}")
        return TrainResult(self.out, self.record_path, self.last_path,
                           self.best_path if self.p.best else None, self.p.epoch, self.p.iteration, self.p.final_metrics,
                           self.p.best["miou"] if self.p.best else None, self.p.history, self.d.rank)

    def _train_epoch(self, loader) -> None:
        cfg = self.cfg
        self.net.train()
        self.sampler.set_epoch(self.p.epoch, self.p.step)
        lr = self.optimizer.param_groups[-1]["lr"]
        bar = tqdm(total=self.iters_per_epoch, initial=self.p.step, desc=f"epoch {self.p.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.is_main), leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with self.autocast():
                    output = self.net(images)
                loss, parts = self.loss(output, labels)
                stats = torch.stack([loss.detach().float(), parts["main"].float(),
                                     parts["aux"].float() if parts["aux"] is not None else torch.zeros((), device=self.device)])
                if self.d.enabled:
                    dist.all_reduce(stats)
                    stats /= self.d.world
                value, main, aux = stats.tolist()
                if not math.isfinite(value):
                    self._write_record("diverged")
                    raise TrainingDiverged(
                        f"the loss is {value} at iteration {self.p.iteration + 1} (epoch {self.p.epoch + 1}); stopped. "
                        f"The last good checkpoint is {self.last_path} (from iteration "
                        f"{self._last_saved_iteration()}); start a new run (another --out, or --init from it) "
                        f"with a lower --lr or without --amp", 1)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.p.step += 1
                self.p.iteration += 1
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                r = self.p.running
                r["loss"] += value
                r["main"] += main
                r["aux"] += aux
                r["n"] += 1
                r["time"] += dt
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{cfg.batch_size / max(dt, 1e-9):.1f}",
                                refresh=False)
                if self.p.iteration % cfg.save_every == 0 and self.p.step < self.iters_per_epoch:
                    self._save_last()
                if self.p.iteration >= self.total_iters:
                    break
        finally:
            bar.close()

    def _bn_batches(self, loader) -> Iterator[torch.Tensor | None]:
        for batch in loader:
            if batch is None and self.d.enabled:
                # Synchronised BatchNorm is collective: a process without images takes part with an empty batch.
                yield torch.empty(0, 3, self.crop, self.crop)
            else:
                yield None if batch is None else batch[0]

    def _last_saved_iteration(self) -> str:
        if not self.last_path.exists():
            return "none yet"
        try:
            return str(read_checkpoint(self.last_path).extra["iteration"])
        except Exception:
            return "unknown"

    def _end_epoch(self) -> None:
        cfg = self.cfg
        r = self.p.running
        lr = self.optimizer.param_groups[-1]["lr"]
        self.scheduler.step()
        self.p.epoch += 1
        self.p.step = 0
        entry = {"epoch": self.p.epoch, "iterations": self.p.iteration, "loss": r["loss"] / max(r["n"], 1),
                 "loss_main": r["main"] / max(r["n"], 1),
                 "loss_aux": r["aux"] / max(r["n"], 1) if self.loss_has_aux else None, "lr": lr,
                 "time_s": r["time"], "images_per_s": r["n"] * cfg.batch_size / max(r["time"], 1e-9), "val": None}
        self.p.running = _zero_running()
        last_epoch = self.p.epoch == cfg.epochs or self.p.iteration >= self.total_iters
        if cfg.val_every and self.p.epoch % cfg.val_every == 0 and not last_epoch:
            entry["val"] = self._validate()
            if entry["val"] is not None:
                self._maybe_best(entry["val"])
        self.p.history.append(entry)
        val = f", val mIoU {_pct(entry['val'].get('miou'))}" if entry["val"] else ""
        self._log(f"epoch {self.p.epoch}/{cfg.epochs}: loss {entry['loss']:.4f} (main {entry['loss_main']:.4f}"
                  + (f", aux {entry['loss_aux']:.4f}" if entry["loss_aux"] is not None else "")
                  + f"), lr {lr:.2e}, {entry['images_per_s']:.1f} img/s, {entry['time_s']:.0f} s{val}")
        self._save_last()
        self._write_record("running")
        self._write_curves()
        self._tb_log(entry)

    @property
    def loss_has_aux(self) -> bool:
        return bool(getattr(self.model, "aux_heads", None)) and self.cfg.aux_weight != 0

    def _validate(self) -> dict[str, Any] | None:
        if self.val_set is None:
            return None
        return _validate(self.model, self.val_set, self.device, self.cfg.val_limit)

    def _maybe_best(self, metrics: dict[str, Any], final: bool = False) -> None:
        miou = metrics.get("miou")
        if miou is None or (self.p.best is not None and miou <= self.p.best["miou"]):
            return
        self.p.best = {"miou": miou, "epoch": self.p.epoch, "iteration": self.p.iteration, "final": final}
        if self.is_main:
            save_checkpoint(self.best_path, self.model.state_dict(), self._meta(), epoch=self.p.epoch,
                            iteration=self.p.iteration, metrics=metrics)


def _global_mean_count(counts: torch.Tensor) -> torch.Tensor:
    counts = counts.clone()
    dist.all_reduce(counts)
    return counts / dist.get_world_size()


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
