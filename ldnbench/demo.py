"""``ldnbench demo``: the whole suite on a fresh machine, no dataset or download needed.

1. write synthetic Cityscapes, Vistas and KITTI trees (:func:`ldnbench.data.synthetic.generate`),
2. ``cross``: train LDN121 on synthetic Vistas and on synthetic Cityscapes, evaluate both on
   synthetic Cityscapes and KITTI (the trainings are the cross study's rows),
3. ``prune``: the pruning curve of both trained models on synthetic Cityscapes,
4. ``export``: leaderboards (CSV/LaTeX/Markdown) and figures,
5. a gallery: ``eval --per-image`` of the Cityscapes-trained model, ``predict`` of the val split and
   ``gallery.png`` of its worst and best images.

Resolution protocol (:data:`RESIZE`): synthetic Vistas images, like the real ones, come in many
sizes; they are resized to the Cityscapes width, as the paper resizes Vistas to width 2048
(Section 5.5). Cityscapes and KITTI stay at full resolution; every cell is scored at the labels'
original resolution. The cross records state it (``resize``, ``protocol``, cells' ``eval_settings``).

Every step is resumable: a second ``demo`` with the same ``--out`` reuses finished work.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write_text


@dataclass(frozen=True)
class DemoBudget:
    """How much work the demo does (image size, training iterations, model width)."""

    name: str
    size: tuple[int, int]  #: synthetic Cityscapes (width, height)
    n: int  #: images per synthetic dataset (20% validation)
    iters: int  #: training iterations per training set
    crop: int
    batch_size: int
    lr: float
    fractions: tuple[float, ...]
    model: str = "ldn121-64to4"
    model_options: dict[str, Any] = field(default_factory=dict)
    eval_limit: int | None = None

    @property
    def resize(self) -> dict[str, int]:
        """The cross study's ``--resize``: Vistas to the Cityscapes width."""
        return {"vistas": self.size[0]}


BUDGETS: dict[str, DemoBudget] = {
    # The real LDN121 64→4 (9.5M parameters), random init: the main demo.
    "small": DemoBudget("small", size=(160, 80), n=150, iters=400, crop=64, batch_size=8, lr=2e-3,
                        fractions=tuple(round(i / 10, 1) for i in range(11))),
    # A narrow LDN121-shaped model on tiny images: a smoke test of every step in well under a minute.
    "tiny": DemoBudget("tiny", size=(64, 32), n=5, iters=2, crop=64, batch_size=2, lr=2e-3,
                       fractions=(0.0, 0.5, 1.0),
                       model_options={"growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16,
                                      "spp_bt": 32, "spp_level": 8, "spp_out": 32, "up_widths": (16, 16, 16, 16),
                                      "up_bottleneck": 16}),
}

TRAIN_SETS = ["vistas", "cityscapes"]
EVAL_SETS = ["cityscapes", "kitti"]


@dataclass
class DemoResult:
    out: Path
    budget: str
    seconds: dict[str, float]
    matrix: Any
    prune_csv: list[Path]
    leaderboard_files: list[Path]
    study_files: list[Path]
    gallery: Path | None = None
    protocol: str = "full resolution"

    def summary(self) -> str:
        from ldnbench.studies.cross import format_matrix

        lines = [f"ldnbench demo ({self.budget} budget) finished in {self.seconds['total']:.0f} s "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items() if k != 'total')})", "",
                 "cross-dataset mIoU (%) on synthetic data — rows: trained on, columns: evaluated on; "
                 + self.protocol,
                 format_matrix(self.matrix), ""]
        lines += ["where everything went:",
                  f"  datasets      {self.out / 'datasets'}  (synthetic Cityscapes / Vistas / KITTI trees)",
                  f"  runs+records  {self.out / 'results'}"]
        lines += [f"  pruning       {p}" for p in self.prune_csv]
        lines += [f"  cross study   {p}" for p in self.study_files if p.suffix in (".csv", ".md", ".png")]
        lines += [f"  leaderboard   {p}" for p in self.leaderboard_files]
        if self.gallery:
            lines += [f"  gallery       {self.gallery}  (worst and best val images of the Cityscapes-trained model)"]
        return "\n".join(lines)


def _synthetic(root: Path, b: DemoBudget, say: Callable[[str], None]) -> None:
    from ldnbench.data.synthetic import MARKER, generate

    want = {"seed": 0, "size": list(b.size), "n": b.n}
    marks = [root / d / MARKER for d in ("cityscapes", "vistas", "kitti")]
    if all(m.is_file() and json.loads(m.read_text()) == want for m in marks):
        say(f"synthetic datasets already in {root}")
        return
    say(f"writing synthetic Cityscapes, Vistas and KITTI ({b.n} images each, {b.size[0]}x{b.size[1]}) to {root}")
    generate(root, size=b.size, n=b.n, seed=0)


def _gallery(out: Path, root: str, ckpt: Path, b: DemoBudget, device: str, say: Callable[[str], None]) -> Path:
    """Per-image evaluation, predictions and the gallery of one trained model on synthetic Cityscapes val.

    Written to ``out/gallery`` (not ``results/``: the leaderboard already has this model's cell).
    """
    from ldnbench.data.registry import get_dataset
    from ldnbench.evaluate import PerImageMetrics, evaluate, per_image_frame
    from ldnbench.predict import load_model, run_predict
    from ldnbench.report.gallery import draw_gallery
    from ldnbench.report.records import write_record

    ds = get_dataset("cityscapes", root, "val")
    model, _, options = load_model(ckpt)
    say(f"per-image evaluation, predictions and gallery of the cityscapes-trained model -> {out}")
    res = evaluate(model, ds, device=device, progress=False, max_images=b.eval_limit,
                   accumulators=[PerImageMetrics(ds.label_space)])
    rec = res.to_record(model=model.name, model_options=options, dataset="cityscapes", root=ds.root, split="val",
                        checkpoint=str(ckpt))
    write_record(out / "eval-per-image.json", rec)
    atomic_write_text(out / "eval-per-image.per_image.csv",
                      per_image_frame(res.extra["per_image"], ds.label_space.classes).to_csv(index=False, float_format="%.6g"))
    pred = run_predict(ckpt, out / "predictions", dataset="cityscapes", root=root, split="val", fmt="labelIds",
                       device=device, progress=False)
    return draw_gallery(rec, ds, pred.out, out / "gallery.png", n=min(3, max(1, len(ds) // 2)), pred_format="labelIds")


def run_demo(out: str | Path = "demo", budget: str = "small", device: str = "cpu",
             progress: Callable[[str], None] = print) -> DemoResult:
    """Run every step of the demo into ``out`` and return where everything went."""
    from ldnbench.report.tables import export
    from ldnbench.studies.cross import CrossConfig, run_cross
    from ldnbench.studies.prune import PruneConfig, run_prune

    if budget not in BUDGETS:
        raise UserError(f"unknown demo budget {budget!r}; choose one of: {', '.join(BUDGETS)}", 2)
    b = BUDGETS[budget]
    out = Path(out)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def step(name: str, t: float) -> float:
        now = time.perf_counter()
        seconds[name] = now - t
        return now

    t = t0
    _synthetic(out / "datasets", b, progress)
    t = step("data", t)

    roots = {name: str(out / "datasets" / name) for name in ("cityscapes", "vistas", "kitti")}
    # cosine schedule over exactly the iteration budget (n_train images per training set)
    n_train = b.n - max(1, round(0.2 * b.n))
    epochs = max(1, math.ceil(b.iters * b.batch_size / n_train))
    train_options = {"epochs": epochs, "max_iters": b.iters, "crop": b.crop, "batch_size": b.batch_size, "lr": b.lr,
                     "pretrained": "none", "workers": 0, "progress": False, "ckpt": "none", "model_options": dict(b.model_options)}
    cross = run_cross(CrossConfig(train=TRAIN_SETS, eval=EVAL_SETS, model=b.model, roots=roots,
                                  results=out / "results", eval_limit=b.eval_limit, device=device,
                                  train_options=train_options, resize=b.resize), progress=progress)
    if cross.missing:
        raise UserError("the demo's cross study left cells missing: " + "; ".join(
            f"{t} -> {e}: {w}" for (t, e), w in cross.missing.items()))
    t = step("train+cross", t)

    prune_csv = []
    for train_set, ckpt in cross.checkpoints.items():
        progress(f"pruning the {train_set}-trained model, evaluated on synthetic Cityscapes val")
        pr = run_prune(PruneConfig(model=b.model, checkpoint=ckpt, dataset="cityscapes", root=roots["cityscapes"],
                                   fractions=b.fractions, device=device, max_images=b.eval_limit,
                                   out=out / "results" / "prune" / f"trained-on-{train_set}"),
                       progress=lambda s: progress(f"  {s}"))
        prune_csv.append(pr.csv)
    t = step("prune", t)

    # Rows on synthetic data are grouped as synthetic-<name>, so no published row sits beside them.
    lb = export(out / "results", out / "leaderboards")
    for bad in lb.bad:
        progress(f"skipped {bad.path}: {bad.reason}")
    t = step("export", t)

    gallery = _gallery(out / "gallery", roots["cityscapes"], cross.checkpoints["cityscapes"], b, device, progress)
    step("gallery", t)
    seconds["total"] = time.perf_counter() - t0
    from ldnbench.studies.cross import describe_protocol

    return DemoResult(out, budget, seconds, cross.matrix, prune_csv, lb.files, cross.files, gallery,
                      describe_protocol(b.resize, "original"))

