"""Cross-dataset matrix: assembly with missing cells, means over present cells, resume and reuse."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ldnbench.data.labels import LabelSpace
from ldnbench.errors import UserError
from ldnbench.models import build_model
from ldnbench.report.records import make_record, write_record
from ldnbench.studies.cross import (CrossConfig, JoinedDataset, assemble_matrix, config_hash, format_matrix,
                                    parse_roots, run_cross)

SMALL_DN = dict(block_config=(2, 2, 2, 2), growth_rate=8, num_init_features=16)
TOY = LabelSpace("toy2", ("a", "b"), ((0, 0, 0), (255, 255, 255)))
OTHER = LabelSpace("toy3", ("a", "b", "c"), ((0, 0, 0), (255, 255, 255), (1, 2, 3)))


def test_assemble_matrix_missing_cell_and_means():
    cells = {("vistas", "cityscapes"): 60.0, ("vistas", "kitti"): 40.0,
             ("cityscapes", "cityscapes"): 70.0, ("cityscapes", "kitti"): None}
    m = assemble_matrix(cells, ["cityscapes", "vistas"], ["cityscapes", "kitti"])
    assert list(m.columns) == ["cityscapes", "kitti", "harmonic mean", "arithmetic mean"]
    assert math.isnan(m.loc["cityscapes", "kitti"])  # missing stays missing, never 0
    assert m.loc["cityscapes", "arithmetic mean"] == 70.0 and m.loc["cityscapes", "harmonic mean"] == 70.0
    assert m.loc["vistas", "arithmetic mean"] == 50.0
    assert m.loc["vistas", "harmonic mean"] == pytest.approx(2 / (1 / 60 + 1 / 40))
    text = format_matrix(m)
    assert "missing" in text and "48.0" in text and " 0.0" not in text
    empty = assemble_matrix({}, ["x"], ["y"])
    assert empty.isna().all().all()


class ToySet(torch.utils.data.Dataset):
    def __init__(self, name, n=2, space=TOY):
        self.name, self.label_space, self.crop_size = name, space, 64
        self.items = list(range(n))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return i


class Harness:
    """Counts calls of injected train/eval/open functions; train writes a trainer-format run."""

    def __init__(self, missing=()):
        self.trains, self.evals, self.missing = [], [], set(missing)
        self.scores = {"cityscapes": 0.7, "kitti": 0.55, "vistas": 0.65}

    def open(self, name, split):
        if name in self.missing:
            raise UserError(f"dataset root datasets/{name} does not exist; pass --roots {name}=DIR")
        return ToySet(name)

    def train(self, cfg, train_set):
        self.trains.append((cfg.dataset, type(train_set).__name__))
        from pathlib import Path

        out = Path(cfg.out)
        torch.manual_seed(0)
        model = build_model(cfg.model, train_set.label_space.num_classes, **cfg.model_options)
        ck = out / "last.pt"
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "model_name": model.name, "num_classes": model.num_classes,
                    "label_space": train_set.label_space.name, "config": dataclasses.asdict(cfg)}, ck)
        write_record(out / "result.json", make_record("train", model=model.name, dataset=cfg.dataset, status="finished",
                                                      config=dataclasses.asdict(cfg), checkpoints={"last": str(ck)}))
        return SimpleNamespace(last_checkpoint=ck)

    def evaluate(self, model, dataset, mapping):
        assert not model.training and model.num_classes == 2
        self.evals.append(dataset.name)
        return {"miou": self.scores[dataset.name], "class_iou": {"a": 0.5, "b": 0.5}}


def _cfg(tmp_path, **kw):
    base = dict(train=["vistas", "cityscapes"], eval=["cityscapes", "kitti"], model="ldn121-64to4",
                results=tmp_path / "results", train_options={"model_options": SMALL_DN, "pretrained": "none",
                                                             "epochs": 1, "batch_size": 2})
    base.update(kw)
    return CrossConfig(**base)


def _run(cfg, h):
    return run_cross(cfg, train_fn=h.train, evaluate_fn=h.evaluate, open_dataset=h.open, progress=lambda s: None)


def test_cross_missing_cell_then_resume_skips_finished_cells(tmp_path):
    h = Harness(missing={"kitti"})
    res = _run(_cfg(tmp_path), h)
    assert [t for t, _ in h.trains] == ["vistas", "cityscapes"]
    assert h.evals == ["cityscapes", "cityscapes"]
    m = res.matrix
    assert m["kitti"].isna().all() and m.loc["vistas", "cityscapes"] == pytest.approx(70.0)
    assert m.loc["vistas", "arithmetic mean"] == pytest.approx(70.0)  # over present cells only
    assert set(res.missing) == {("vistas", "kitti"), ("cityscapes", "kitti")}
    saved = json.loads((res.out_dir / "result.json").read_text())
    assert saved["kind"] == "cross" and saved["matrix"]["miou_pct"][0][1] is None
    back = pd.read_csv(res.out_dir / "matrix.csv", index_col=0)
    assert back.loc["vistas", "kitti"] != back.loc["vistas", "kitti"]  # NaN, not 0
    assert (res.out_dir / "cross_matrix.png").exists() and "missing" in (res.out_dir / "matrix.md").read_text()

    # KITTI appears: the rerun trains nothing and evaluates only the two missing cells
    h2 = Harness()
    res2 = _run(_cfg(tmp_path), h2)
    assert h2.trains == [] and sorted(h2.evals) == ["kitti", "kitti"]
    assert sorted(res2.skipped) == [("cityscapes", "cityscapes"), ("vistas", "cityscapes")]
    assert res2.reused == ["vistas", "cityscapes"] and not res2.missing
    assert res2.matrix.loc["cityscapes", "kitti"] == pytest.approx(55.0)
    assert res2.matrix.loc["cityscapes", "harmonic mean"] == pytest.approx(2 / (1 / 70 + 1 / 55))

    # everything finished: a third run neither trains nor evaluates
    h3 = Harness()
    res3 = _run(_cfg(tmp_path), h3)
    assert h3.trains == [] and h3.evals == [] and len(res3.skipped) == 4
    pd.testing.assert_frame_equal(res3.matrix, res2.matrix)

    # another recipe is another run
    h4 = Harness()
    _run(_cfg(tmp_path, train=["vistas"], train_options={**_cfg(tmp_path).train_options, "epochs": 2}), h4)
    assert len(h4.trains) == 1


def test_cross_joined_training_set(tmp_path):
    h = Harness()
    res = _run(_cfg(tmp_path, train=["cityscapes+vistas"], eval=["vistas"]), h)
    assert h.trains == [("cityscapes+vistas", "JoinedDataset")]
    assert res.matrix.loc["cityscapes+vistas", "vistas"] == pytest.approx(65.0)


def test_joined_dataset_needs_one_label_space():
    j = JoinedDataset("a+b", [ToySet("a", 2), ToySet("b", 3)])
    assert len(j) == 5 and j.label_space == TOY
    with pytest.raises(UserError, match="different label spaces"):
        JoinedDataset("a+c", [ToySet("a"), ToySet("c", space=OTHER)])


def test_config_hash_ignores_bookkeeping_only():
    from ldnbench.train import TrainConfig

    a = TrainConfig(model="ldn121-64to4", dataset="cityscapes", out="x", workers=2)
    assert config_hash(a) == config_hash(dataclasses.replace(a, out="y", workers=0, resume=True))
    assert config_hash(a) != config_hash(dataclasses.replace(a, lr=1e-3))
    assert config_hash(a) == config_hash(json.loads(json.dumps(dataclasses.asdict(a))))


def test_cross_bad_input(tmp_path, cli_runner):
    from ldnbench.cli import main

    with pytest.raises(UserError, match="NAME=DIR"):
        parse_roots(["cityscapes"])
    r = cli_runner.invoke(main, ["cross", "--train", "nosuchset", "--eval", "kitti", "--results", str(tmp_path)])
    assert r.exit_code == 2 and "unknown dataset" in r.stderr


def test_cross_reuses_a_training_run_only_at_the_same_resize(tmp_path):
    h = Harness()
    first = _run(_cfg(tmp_path), h)
    assert sorted(first.trained) == ["cityscapes", "vistas"]
    # Vistas at width 64 is another training run; Cityscapes (full resolution) is reused with its cells
    h2 = Harness()
    second = _run(_cfg(tmp_path, resize={"vistas": 64}), h2)
    assert second.trained == ["vistas"] and ("cityscapes", "kitti") in second.skipped
    assert h2.trains == [("vistas", "Resized")]
    ck = torch.load(second.checkpoints["vistas"], weights_only=True)
    assert ck["config"]["resize"] == 64
    # same protocol again: nothing is trained or evaluated
    h3 = Harness()
    third = _run(_cfg(tmp_path, resize={"vistas": 64}), h3)
    assert h3.trains == [] and h3.evals == [] and not third.trained
    # a bare width applies to every dataset: both retrained, every cell evaluated on resized images
    h4 = Harness()
    fourth = _run(_cfg(tmp_path, resize={"*": 48}, eval_at="resized"), h4)
    assert sorted(fourth.trained) == ["cityscapes", "vistas"] and len(h4.evals) == 4
    cells = [json.loads(p.read_text()) for p in (fourth.out_dir / "cells").rglob("*-w48-at-resized.json")]
    assert len(cells) == 4 and all(c["eval_settings"]["resize"] == 48 and c["eval_settings"]["eval_at"] == "resized"
                                   for c in cells)
    study = json.loads((fourth.out_dir / "result.json").read_text())
    assert study["resize"] == {"*": 48} and study["protocol"] == "every dataset width 48 (eval at resized)"
    # and the full-resolution runs of the first call are still found for a full-resolution study
    h5 = Harness()
    _run(_cfg(tmp_path), h5)
    assert h5.trains == [] and h5.evals == []


def test_config_hash_keeps_old_full_resolution_runs():
    from ldnbench.train import TrainConfig

    cfg = TrainConfig(model="ldn121", dataset="cityscapes")
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resize", "eval_at", "tensorboard")}
    assert config_hash(old) == config_hash(cfg)  # records written before --resize existed
    assert config_hash(dataclasses.replace(cfg, resize=1024)) != config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, eval_at="resized", tensorboard=True)) == config_hash(cfg)
