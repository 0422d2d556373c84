"""The `featurefail` command: help text and the demo end to end."""

from __future__ import annotations

import math

import pytest

from featurefail.cli import build_parser, main
from featurefail.demo import run_demo


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "penultimate" in out


def test_demo_runs_end_to_end(tmp_path, capsys):
    result = run_demo(tmp_path, epochs=6, n_components=6)
    out = capsys.readouterr().out
    assert "mistakes AUROC" in out and "photo patches AUROC" in out
    assert 0.7 < result.accuracy <= 1.0 and result.n_mistakes > 0
    for row in result.rows.values():
        assert all(math.isfinite(v) for v in row.values())
    assert result.rows["gmm"]["noise AUROC"] > 0.6
    assert result.figure is not None and result.figure.stat().st_size > 5000


def test_demo_parser_defaults():
    args = build_parser().parse_args(["demo"])
    assert args.seed == 0 and args.n_components == 10 and not args.no_plot


def test_quickstart_example_runs(capsys):
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "mistakes AUROC" in out and "OOD AUROC" in out
