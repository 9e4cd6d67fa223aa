"""The demo end to end with the tiny budget: every step runs and leaves its outputs."""

from __future__ import annotations

import json
import math

import pandas as pd

from ldnbench.cli import main
from ldnbench.report.tables import read_csv


def test_demo_tiny_runs_every_step(tmp_path, cli_runner):
    out = tmp_path / "demo"
    r = cli_runner.invoke(main, ["demo", "--out", str(out), "--budget", "tiny"])
    assert r.exit_code == 0, r.output
    assert "where everything went" in r.output and "finished in" in r.output
    # synthetic datasets in the real on-disk formats
    for name in ("cityscapes", "vistas", "kitti"):
        assert (out / "datasets" / name).is_dir()
    # cross study: full 2x2 matrix of real numbers (no missing cell)
    study = next((out / "results" / "cross").glob("*/result.json"))
    rec = json.loads(study.read_text())
    assert rec["matrix"]["train"] == ["vistas", "cityscapes"] and rec["matrix"]["eval"] == ["cityscapes", "kitti"]
    vals = [v for row in rec["matrix"]["miou_pct"] for v in row]
    assert all(v is not None and 0 <= v <= 100 and math.isfinite(v) for v in vals)
    # two trained runs (trainer records), each with a checkpoint
    trains = [json.loads(p.read_text()) for p in (out / "results").rglob("result.json")]
    assert sorted(t["dataset"] for t in trains if t["kind"] == "train") == ["cityscapes", "vistas"]
    # pruning curves for both models
    prunes = sorted((out / "results" / "prune").rglob("prune.csv"))
    assert len(prunes) == 2
    assert list(pd.read_csv(prunes[0])["fraction"]) == [0.0, 0.5, 1.0]
    # leaderboards + figures, no published rows beside synthetic numbers
    lb = read_csv(out / "leaderboards" / "synthetic-kitti.csv")
    assert len(lb) == 2 and set(lb["train_dataset"]) == {"vistas", "cityscapes"} and (lb["source"] == "ours").all()
    for fig in ("cross_matrix", "pruning_miou", "pruning_classes"):
        assert (out / "leaderboards" / f"{fig}.png").stat().st_size > 0

    # rerun: everything is reused (no training, no cross evaluation)
    r2 = cli_runner.invoke(main, ["demo", "--out", str(out), "--budget", "tiny"])
    assert r2.exit_code == 0, r2.output
    assert "synthetic datasets already in" in r2.output and "training ldn121" not in r2.output
    assert r2.output.count("cells finished earlier; skipped") == 2


def test_demo_states_its_protocol_and_ends_with_a_gallery(tmp_path, cli_runner):
    from PIL import Image

    out = tmp_path / "demo"
    r = cli_runner.invoke(main, ["demo", "--out", str(out), "--budget", "tiny"])
    assert r.exit_code == 0, r.output
    assert "vistas width 64, others full resolution (eval at original)" in r.output
    study = json.loads(next((out / "results" / "cross").glob("*/result.json")).read_text())
    assert study["resize"] == {"vistas": 64} and study["eval_at"] == "original"
    trains = {t["dataset"]: t for t in (json.loads(p.read_text()) for p in (out / "results").rglob("result.json"))
              if t["kind"] == "train"}
    assert trains["vistas"]["config"]["resize"] == 64 and trains["cityscapes"]["config"]["resize"] is None
    assert len(list((out / "results" / "cross").glob("*/train-*/curves.png"))) == 2
    g = out / "gallery" / "gallery.png"
    assert "gallery" in r.output and Image.open(g).size[1] > 100
    rec = json.loads((out / "gallery" / "eval-per-image.json").read_text())
    assert len(rec["per_image"]) == 1 and len(list((out / "gallery" / "predictions").glob("*.png"))) == 1
