from ldnbench.cli import main


def test_help_and_version(cli_runner):
    r = cli_runner.invoke(main, ["--help"])
    assert r.exit_code == 0 and "Usage" in r.output
    r = cli_runner.invoke(main, ["--version"])
    assert r.exit_code == 0 and "ldnbench" in r.output


def test_records_roundtrip_and_bad_files(tmp_path):
    import math

    from ldnbench.report.records import BadRecord, make_record, read_records, write_record

    rec = make_record("eval", model="ldn121-64to4", dataset="cityscapes", metrics={"miou": 0.5, "x": math.nan})
    write_record(tmp_path / "a" / "result.json", rec)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "foreign.json").write_text('{"hello": 1}')
    out = list(read_records(tmp_path))
    good = [r for r in out if not isinstance(r, BadRecord)]
    bad = [r for r in out if isinstance(r, BadRecord)]
    assert len(good) == 1 and good[0]["metrics"] == {"miou": 0.5, "x": None}
    assert good[0]["environment"]["torch"]
    assert sorted(b.path.name for b in bad) == ["broken.json", "foreign.json"]
