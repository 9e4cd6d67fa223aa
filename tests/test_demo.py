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
