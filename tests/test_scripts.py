"""scripts/frontier.py: the sweep frontier figure of docs/findings.md."""

import importlib.util

import pytest

from conftest import ROOT


def test_frontier_averages_each_cell_over_its_seeds(tmp_path, capsys):
    import json

    spec = importlib.util.spec_from_file_location("frontier", ROOT / "scripts" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    seeds = [(0.1, 0.5, 0.02, 0.04), (0.3, 0.7, 0.06, 0.0)]
    for seed, (control, trained, sw, en) in enumerate(seeds):
        cell = tmp_path / "cells" / f"objective=a__seed={seed}"
        cell.mkdir(parents=True)
        record = {
            "axes": {"objective": "a", "seed": seed},
            "post": {"p_at_1_s2t_centered": control},
            "trained": {"post": {"p_at_1_s2t_centered": trained}},
            "perplexity": {"sw": {"change": sw}, "en": {"change": en}},
        }
        (cell / "cell.json").write_text(json.dumps(record))
    (point,) = frontier.cell_points(tmp_path)
    assert point["label"] == "objective=a" and point["seeds"] == 2
    assert point["control"] == pytest.approx(0.2) and point["trained"] == pytest.approx(0.6)
    assert point["ppl"] == pytest.approx(0.05)  # the larger language per seed, then the mean
    assert "validation" not in point
    frontier.main([str(tmp_path), "--out", str(tmp_path / "f.png"), "--mark", "objective=a"])
    assert (tmp_path / "f.png").stat().st_size > 0
    # two rounds of a search on one figure: every cell of each
    capsys.readouterr()
    frontier.main([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "g.png")])
    assert len(capsys.readouterr().out.splitlines()) == 2
