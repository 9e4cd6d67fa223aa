"""Complexity counting and the zoo: paper numbers within tolerance, formats, CLI."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch

import ldnbench.models.zoo as zoo
from ldnbench.cli import main
from ldnbench.models import MODELS, build_model, count_macs, count_params, model_complexity

# Rows the README states are reproduced within 1.5 % (params and GMAC); the issue requires at least
# the first nine. The remaining registered rows with a paper number are documented deviations.
REPRODUCED = ["ldn121-64to4", "ldn121-32to4", "ldn121-128to4", "ldn161-64to4", "ldn121-64to4-dws", "dn121-32",
              "lrn18-32to4", "lrn50-32to4", "lrn101-32to4", "ldn121-64to4-noaux", "ldn169-32to4",
              "ddn121-8", "lddn121-8to4", "lddn121-16to4"]
DEVIATING = ["ldn121-32to2", "ldn121-64to4-nospp", "ldn121-64to4-pspspp"]
TOL = 0.015


@pytest.fixture(scope="module")
def rows():
    return {r.model: r for r in zoo.zoo_rows()}


def test_every_registered_model_has_a_row(rows):
    assert list(rows) == list(MODELS)
    for r in rows.values():
        assert r.gflop == pytest.approx(2 * r.gmac)
        assert r.params_m > 1 and r.gmac > 10


@pytest.mark.parametrize("name", REPRODUCED)
def test_reproduces_paper_counts(rows, name):
    r = rows[name]
    assert r.paper_params_m is not None and r.paper_gmac is not None
    assert abs(r.params_dev) <= TOL, (name, r.params_m, r.paper_params_m)
    assert abs(r.gmac_dev) <= TOL, (name, r.gmac, r.paper_gmac)


def test_documented_deviations_are_real_and_explained(rows):
    with_paper = {n for n, r in rows.items() if r.paper_gmac is not None}
    assert with_paper == set(REPRODUCED) | set(DEVIATING)
    for name in DEVIATING:
        r = rows[name]
        assert max(abs(r.params_dev), abs(r.gmac_dev)) > TOL
        assert r.note  # one-line reason shown in the docs


def test_known_values_ldn121(rows):
    # ARCHITECTURE.md §4 FIT: 9.543 M without aux heads (+19 k with them), 66.69 GMAC incl. the logits conv.
    r = rows["ldn121-64to4"]
    assert r.params_m == pytest.approx(9.562, abs=0.001)
    assert r.gmac == pytest.approx(66.69, abs=0.01)


def test_meta_count_equals_real_count():
    # The meta device only skips arithmetic: a real CPU model gives the same numbers.
    opts = dict(growth_rate=8, block_config=(2, 2, 4, 2), num_init_features=16)
    torch.manual_seed(0)
    real = build_model("ldn121-64to4", 19, **opts)
    with torch.device("meta"):
        meta = build_model("ldn121-64to4", 19, **opts)
    a, b = count_macs(real, 128, 192), count_macs(meta, 128, 192)
    assert a.gmac == b.gmac and a.params == b.params == count_params(real)
    assert a.counted_ops.keys() == {"aten.convolution"}
    # eval BatchNorms run as one multiply-add (models/layers.py)
    assert "aten.upsample_bilinear2d" in a.uncounted_ops and "aten.addcmul" in a.uncounted_ops


def test_conv_macs_by_hand():
    # One 3x3 conv 3->8 on 10x12 (padding 1): 10*12*8*3*9 MACs.
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    c = count_macs(conv, 10, 12, name="conv")
    assert c.gmac * 1e9 == pytest.approx(10 * 12 * 8 * 3 * 9)
    assert c.params == 8 * 3 * 9


def test_imagenet_compatible_layout_costs_more():
    paper = model_complexity("ldn121-64to4")
    full = model_complexity("ldn121-64to4", imagenet_compatible=True)
    assert full.params - paper.params == 81920 + 128
    assert full.gmac - paper.gmac == pytest.approx(4.50, abs=0.02)  # ARCHITECTURE §1.1


# --- formats and CLI ----------------------------------------------------------------------------

SUBSET = {k: MODELS[k] for k in ("ldn121-64to4", "ldn169-64to4")}


@pytest.fixture
def small_zoo(monkeypatch):
    monkeypatch.setattr(zoo, "MODELS", SUBSET)


def test_cli_help(cli_runner):
    res = cli_runner.invoke(main, ["--help"])
    assert res.exit_code == 0 and "zoo" in res.output and "flops" in res.output
    for cmd in ("zoo", "flops"):
        res = cli_runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_cli_zoo_json_schema(cli_runner, small_zoo):
    res = cli_runner.invoke(main, ["zoo", "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [d["model"] for d in data] == list(SUBSET)
    for d in data:
        assert list(d) == ["model", "params_m", "gmac", "gflop", "paper_params_m", "paper_gmac"]
    assert data[0]["paper_params_m"] == 9.5 and data[0]["paper_gmac"] == 66.5
    assert data[0]["gflop"] == pytest.approx(2 * data[0]["gmac"])
    assert data[1]["paper_params_m"] is None and data[1]["paper_gmac"] is None


def test_cli_zoo_table_formats(cli_runner, small_zoo):
    res = cli_runner.invoke(main, ["zoo", "--format", "csv"])
    assert res.exit_code == 0
    df = pd.read_csv(io.StringIO(res.output))
    assert list(df["model"]) == list(SUBSET) and df["params (M)"].iloc[0] == pytest.approx(9.562, abs=1e-3)
    assert df["Δ params"].iloc[0] == "+0.6%"
    md = cli_runner.invoke(main, ["zoo", "--format", "markdown"]).output
    assert md.startswith("|") and "ldn121-64to4" in md
    tex = cli_runner.invoke(main, ["zoo", "--format", "latex"]).output
    assert "\\begin{tabular}" in tex
    table = cli_runner.invoke(main, ["zoo"]).output
    assert "ldn169-64to4" in table
    compat = json.loads(cli_runner.invoke(main, ["zoo", "--format", "json", "--imagenet-compatible"]).output)
    assert compat[0]["params_m"] == pytest.approx(9.562 + 0.082, abs=1e-3)
    assert compat[0]["paper_params_m"] is None  # the paper's numbers are for the paper layout


def test_cli_flops(cli_runner):
    res = cli_runner.invoke(main, ["flops", "--model", "lrn18", "--height", "65", "--width", "97"])
    assert res.exit_code != 0  # lrn18 is not a name
    res = cli_runner.invoke(main, ["flops", "--model", "ldn121", "--height", "512", "--width", "1024"])
    assert res.exit_code == 0, res.output
    assert "model: ldn121-64to4" in res.output and "aten.convolution" in res.output
    assert "ran but not counted:" in res.output and "aten.upsample_bilinear2d" in res.output
    gmac = float(res.output.split("GMAC:")[1].split()[0])
    assert gmac == pytest.approx(66.69 / 2, rel=0.01)


def test_cli_flops_reports_padding(cli_runner):
    res = cli_runner.invoke(main, ["flops", "--model", "lddn121-8to4", "--height", "65", "--width", "97"])
    assert res.exit_code == 0 and "1x3x65x97 (the model pads it to 72x104)" in res.output


def test_cli_unknown_model_exit_2(cli_runner):
    res = cli_runner.invoke(main, ["flops", "--model", "ldn999"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'ldn999'")
    assert "ldn121-64to4" in lines[0] and "lrn101-32to4" in lines[0]
