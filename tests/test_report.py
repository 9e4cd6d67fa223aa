"""Leaderboards: published tables, export formats, bad records, figures."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from ldnbench.cli import main
from ldnbench.report.paper import PAPER_COLUMNS, load_paper_tables
from ldnbench.report.records import make_record, write_record
from ldnbench.report.tables import (build_tables, collect, describe_model, export, latex_escape, read_csv,
                                    to_latex)


def _records(root):
    write_record(root / "r1" / "result.json",
                 make_record("eval", model="ldn121-64to4", dataset="cityscapes", split="val",
                             metrics={"miou": 0.7123, "iiou": 0.5, "cat_iou": 0.881}, params=9.5e6))
    write_record(root / "r2" / "result.json",
                 make_record("train", model="lrn50-32to4", dataset="cityscapes", split="val", metrics={"miou": 0.65}))
    write_record(root / "r3" / "result.json",
                 make_record("eval", model="my_net&co-100%", dataset="camvid", split="test", metrics={"miou": 0.5}))
    write_record(root / "bench" / "speed.json",
                 make_record("bench-speed", model="ldn121-64to4", metrics={"latency_ms_median": 41.5}))


def test_paper_tables_are_complete_and_typed():
    df = load_paper_tables()
    assert list(df.columns) == PAPER_COLUMNS
    assert sorted(df["table"].unique()) == list(range(1, 10))
    t2 = df[(df.table == 2) & (df.method == "LDN121") & (df.down_up == "64→4") & df.variant.isna()]
    assert t2[["miou_pct", "cat_iou_pct", "params_m", "gmac_1mpx"]].values.tolist() == [[79.0, 90.3, 9.5, 66.5]]
    # Table 7 is a full 3x3 matrix (train set x eval set)
    t7 = df[df.table == 7].pivot(index="train_dataset", columns="dataset", values="miou_pct")
    assert t7.loc["vistas", "kitti"] == 64.7 and t7.notna().all().all()
    # Table 3 prints TFLOP; stored as GMAC
    assert df[(df.table == 3) & (df.method == "LDN161") & (df.split == "test")]["gmac_1mpx"].item() == 139
    assert ((df["miou_pct"] > 40) & (df["miou_pct"] < 90)).all()


def test_describe_model():
    assert describe_model("ldn121-64to4") == {"method": "LDN121", "backbone": "dn121", "down_up": "64→4",
                                              "variant": None}
    assert describe_model("lrn50-32to4-dws")["variant"] == "dws"
    assert describe_model("weird name")["method"] == "weird name"


def test_collect_fills_speed_from_bench_records(tmp_path):
    _records(tmp_path)
    rows = collect(tmp_path).rows
    assert len(rows) == 3
    ldn = rows[rows.model == "ldn121-64to4"].iloc[0]
    assert ldn.miou_pct == pytest.approx(71.23) and ldn.params_m == pytest.approx(9.5) and ldn.ms == 41.5
    assert ldn.commit == json.loads((tmp_path / "r1" / "result.json").read_text())["environment"]["git_commit"]


def test_export_csv_roundtrip_and_published_rows(tmp_path):
    _records(tmp_path / "results")
    res = export(tmp_path / "results", tmp_path / "lb", "csv,markdown", with_paper=True, figures=False)
    assert sorted(p.name for p in res.files) == ["camvid.csv", "camvid.md", "cityscapes.csv", "cityscapes.md"]
    back = read_csv(tmp_path / "lb" / "cityscapes.csv")
    pd.testing.assert_frame_equal(back, res.tables["cityscapes"])
    ours = back[back.source == "ours"]
    assert ours["run_id"].notna().all() and ours["date"].notna().all()
    pub = back[back.source == "published"]
    assert len(pub) == len(load_paper_tables().query("dataset == 'cityscapes'"))
    assert (pub["kind"] == "paper").all()
    md = (tmp_path / "lb" / "cityscapes.md").read_text()
    assert "published (T2)" in md and "| 71.2 |" in md.replace("  ", " ").replace("  ", " ")


def test_export_without_paper_only_has_own_rows(tmp_path):
    _records(tmp_path / "results")
    res = export(tmp_path / "results", tmp_path / "lb", "csv", with_paper=False, figures=False)
    assert (res.tables["cityscapes"]["source"] == "ours").all() and len(res.tables["cityscapes"]) == 2


def _latex_rows(tex: str) -> list[str]:
    body = tex.split("\\begin{tabular}")[1].split("\\end{tabular}")[0]
    return [l for l in body.splitlines()[1:] if l.strip().endswith("\\\\")]


def test_latex_fragment_structure_and_compiles(tmp_path):
    _records(tmp_path / "results")
    res = export(tmp_path / "results", tmp_path / "lb", "latex", with_paper=True, figures=False)
    tex = (tmp_path / "lb" / "camvid.tex").read_text()
    assert tex.count("\\begin{tabular}") == 1 and tex.count("\\end{tabular}") == 1
    rows = _latex_rows(tex)
    assert len(rows) == 1 + len(res.tables["camvid"])  # header + one line per row
    ncols = len(tex.split("\\begin{tabular}{")[1].split("}")[0])
    assert all(r.count(" & ") == ncols - 1 for r in rows)  # an unescaped & would add a column
    assert r"my\_net\&co-100\%" in tex and "$\\rightarrow$" in tex
    assert "→" not in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed: structure checked, compilation not")
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\\begin{document}\n"
                   f"\\input{{{tmp_path / 'lb' / 'camvid.tex'}}}\n\\end{{document}}\n")
    p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_latex_escape():
    assert latex_escape("a_b & 5% #1 {x} ~^\\") == r"a\_b \& 5\% \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}"


def test_bad_and_foreign_records_are_reported_and_skipped(tmp_path, cli_runner):
    res_dir = tmp_path / "results"
    _records(res_dir)
    (res_dir / "corrupt.json").write_text('{"kind": "eval", "run_')
    (res_dir / "foreign.json").write_text('{"accuracy": 0.9}')
    write_record(res_dir / "percent.json", make_record("eval", model="x", dataset="cityscapes", metrics={"miou": 71.0}))
    write_record(res_dir / "future.json", {**make_record("eval", model="x", dataset="cityscapes",
                                                          metrics={"miou": 0.7}), "schema": 99})
    r = cli_runner.invoke(main, ["export", "--results", str(res_dir), "--out", str(tmp_path / "lb"), "--no-paper",
                                 "--format", "csv"])
    assert r.exit_code == 0, r.output
    skipped = [l for l in r.stderr.splitlines() if l.startswith("skipped ")]
    assert len(skipped) == 4
    assert {s.split(":")[0].split("/")[-1] for s in skipped} == {"corrupt.json", "foreign.json", "percent.json",
                                                                   "future.json"}
    back = read_csv(tmp_path / "lb" / "cityscapes.csv")
    assert sorted(back["model"]) == ["ldn121-64to4", "lrn50-32to4"]


def test_export_bad_options(tmp_path, cli_runner):
    r = cli_runner.invoke(main, ["export", "--results", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.stderr
    (tmp_path / "res").mkdir()
    r = cli_runner.invoke(main, ["export", "--results", str(tmp_path / "res"), "--format", "csv,docx"])
    assert r.exit_code == 2 and "docx" in r.stderr


def test_export_draws_figures_from_records(tmp_path):
    res_dir = tmp_path / "results"
    write_record(res_dir / "e.json", make_record("eval", model="ldn121-64to4", dataset="cityscapes", split="val",
                                                 metrics={"miou": 0.6}, gmac_1mpx=66.0))
    write_record(res_dir / "c.json", make_record(
        "cross", model="ldn121-64to4",
        matrix={"train": ["a", "b"], "eval": ["x", "y"], "miou_pct": [[50.0, None], [40.0, 30.0]]}))
    curve = [{"fraction": f, "miou": 0.6 * (1 - f), "class_iou": {"road": 0.9 - f / 2, "car": 0.5 * (1 - f)}}
             for f in np.linspace(0, 1, 5)]
    write_record(res_dir / "p.json", make_record("prune", model="ldn121-64to4", dataset="cityscapes", curve=curve,
                                                 classes=["road", "car"]))
    write_record(res_dir / "m.json", make_record("bench-memory", model="ldn121-64to4", rows=[
        {"model": "ldn121-64to4", "policy": "none", "peak_mb": 900.0},
        {"model": "ldn121-64to4", "policy": "all", "peak_mb": 300.0}]))
    res = export(res_dir, tmp_path / "lb", "csv", with_paper=True)
    names = {p.name for p in res.files}
    for stem in ("cityscapes_iou_vs_tflop", "cross_matrix", "pruning_miou", "pruning_classes",
                 "checkpointing_memory"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (tmp_path / "lb" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "lb" / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"


def test_build_tables_groups(tmp_path):
    _records(tmp_path)
    c = collect(tmp_path)
    assert set(build_tables(c, "model")) == {"ldn121-64to4", "lrn50-32to4", "my_net_co-100_"}
    assert set(build_tables(c, "none")) == {"leaderboard"}
    assert "tabular" in to_latex(build_tables(c, "none")["leaderboard"])


def test_custom_model_options_are_marked_and_not_mixed(tmp_path):
    write_record(tmp_path / "full.json", make_record("train", model="ldn121-64to4", dataset="cityscapes",
                                                     metrics={"miou": 0.7}, complexity={"params": 9.5e6}))
    write_record(tmp_path / "narrow.json", make_record("eval", model="ldn121-64to4", dataset="cityscapes",
                                                       model_options={"growth_rate": 8}, metrics={"miou": 0.3}))
    write_record(tmp_path / "narrow_train.json", make_record("train", model="ldn121-64to4", dataset="cityscapes",
                                                             model_options={"growth_rate": 8},
                                                             complexity={"params": 35000}))
    rows = collect(tmp_path).rows.set_index("miou_pct")
    assert rows.loc[70.0, "params_m"] == 9.5 and pd.isna(rows.loc[70.0, "variant"])
    assert rows.loc[30.0, "params_m"] == pytest.approx(0.035) and rows.loc[30.0, "variant"] == "custom"
    assert "growth_rate=8" in rows.loc[30.0, "notes"]
    md = to_latex(build_tables(collect(tmp_path), "none")["leaderboard"])
    assert "0.035" in md


def test_synthetic_roots_are_never_grouped_with_the_real_dataset(tmp_path):
    from ldnbench.data.synthetic import MARKER

    root = tmp_path / "synth" / "cityscapes"
    root.mkdir(parents=True)
    (root / MARKER).write_text("{}")
    write_record(tmp_path / "res" / "a.json", make_record("eval", model="ldn121-64to4", dataset="cityscapes",
                                                          root=root, metrics={"miou": 0.8}))
    res = export(tmp_path / "res", tmp_path / "lb", "csv", figures=False)
    assert list(res.tables) == ["synthetic-cityscapes"]
    assert (res.tables["synthetic-cityscapes"]["source"] == "ours").all()  # no published rows beside it


def test_protocols_and_precisions_are_stated_never_silently_mixed(tmp_path):
    from ldnbench.report.tables import to_markdown

    def rec(name, miou, **settings):
        es = {"scales": [1.0], "flip": False, "sliding": None, "precision": "fp32", **settings}
        write_record(tmp_path / "res" / f"{name}.json", make_record("eval", model="ldn121-64to4", dataset="cityscapes",
                                                                    split="val", metrics={"miou": miou},
                                                                    eval_settings=es))

    rec("full", 0.70)
    rec("half", 0.66, resize=1024, eval_at="resized")
    rec("half_orig", 0.64, resize=1024, eval_at="original")
    rec("bf16", 0.69, precision="bf16")
    res = export(tmp_path / "res", tmp_path / "lb", "csv,markdown", figures=False, with_paper=False)
    rows = res.tables["cityscapes"].set_index("miou_pct")
    assert rows.loc[70.0, "protocol"] == "full" and rows.loc[66.0, "protocol"] == "w1024@resized"
    assert rows.loc[64.0, "protocol"] == "w1024@original"
    assert rows.loc[69.0, "precision"] == "bf16" and rows.loc[69.0, "variant"] == "bf16"  # its own row, marked
    assert pd.isna(rows.loc[70.0, "variant"])
    md = (tmp_path / "lb" / "cityscapes.md").read_text()
    assert "| Protocol" in md and "w1024@resized" in md and "| Precision" in md
    assert set(read_csv(tmp_path / "lb" / "cityscapes.csv")["protocol"]) == {"full", "w1024@resized", "w1024@original"}
    # one protocol, fp32 only: no extra columns to read
    shutil.rmtree(tmp_path / "res")
    rec("only", 0.70)
    md = to_markdown(build_tables(collect(tmp_path / "res"), "dataset")["cityscapes"])
    assert "Protocol" not in md and "Precision" not in md
