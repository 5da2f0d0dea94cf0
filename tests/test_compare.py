"""``tli compare`` (``tli.compare``): runs and sweep cells side by side, from saved results only."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from tli.cli import main
from tli.pairs import Pair, write_pairs
from tli.sweep import read_grid, run_sweep

from conftest import PNG_MAGIC, WORDS, assert_one_line_error


@pytest.fixture(scope="module")
def two_results(tiny_model_dir, inputs, tmp_path_factory):
    """A finished `tli run` and a finished sweep cell of the tiny model."""
    d = tmp_path_factory.mktemp("compare")
    run = d / "paper"
    argv = ["run", "--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv", "--out", run,
            "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "scan.n_boot=50",
            "--set", "evaluate.n_boot=50", "--set", "figures.tsne_pairs=8"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    pairs = [Pair(s, t, split="trained") for s, t in WORDS[:8]]
    pairs += [Pair(s, t, split="control") for s, t in WORDS[8:]]
    write_pairs(pairs, d / "pairs.tsv")
    grid = d / "grid.toml"
    grid.write_text(
        f'[sweep]\nmodel = "{tiny_model_dir}"\npairs = "{d / "pairs.tsv"}"\nn_boot = 50\n'
        "[train]\nlayer = 2\nepochs = 1\nbatch_size = 4\nwarmup_steps = 1\nlr = 5e-3\n"
        '[grid]\nloss = ["info_nce"]\nseed = [0]\n'
    )
    run_sweep(read_grid(grid), d / "sweep")
    (cell,) = (d / "sweep" / "cells").iterdir()
    return run, cell


def test_compare_writes_a_table_a_page_a_figure_and_the_records(two_results, tmp_path,
                                                                 monkeypatch, capsys):
    import tli.models

    def no_model(*args, **kwargs):
        raise AssertionError("tli compare loads no model")

    monkeypatch.setattr(tli.models, "load_model", no_model)
    run, cell = two_results
    out = tmp_path / "cmp"
    assert main(["compare", str(run), str(cell), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    assert md.count("| paper | trained | Swahili → English |") == 1
    assert "| paper | control |" in md and f"| {cell.name} | control | Swahili → English |" in md
    assert "| paper | control |" in stdout and "wrote " in stdout
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    html = (out / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "<table>" in html
    records = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["kind"] for r in records] == ["run", "sweep cell"]
    # the figures are those the run and the cell saved, at the final layer
    ev = json.loads((run / "eval" / "evaluation.json").read_text())
    control = records[0]["sets"]["control"]
    i = ev["layers"].index(ev["num_layers"])
    assert control["margin_post"] == ev["sets"]["control"]["post"]["margin"][i]
    assert control["verdict"] == ev["verdicts"]["control"]["label"]
    train = json.loads((run / "train" / "train.json").read_text())
    assert records[0]["train_seconds"] == train["seconds"]
    cell_json = json.loads((cell / "cell.json").read_text())
    got = records[1]["sets"]["control"]
    assert got["p1_retrieval"] == "s2t_centered"  # the verdict's retrieval
    assert got["p1_post"] == cell_json["post"]["p_at_1_s2t_centered"]
    assert got["margin_change_lo"] == cell_json["post"]["margin_change_lo"]
    k = round(got["p1_post"] * got["n"])
    ci = binomtest(k, got["n"]).proportion_ci(method="wilson")
    assert got["p1_post_ci"] == pytest.approx([ci.low, ci.high])
    assert records[1]["train_seconds"] == cell_json["train_seconds"]


def test_compare_names_runs_with_the_same_folder_name_apart(two_results, tmp_path, capsys):
    import shutil

    run, _ = two_results
    for side in ("a", "b"):
        shutil.copytree(run, tmp_path / side / "paper")
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "a" / "paper"), str(tmp_path / "b" / "paper"),
                 "--out", str(out)]) == 0  # fmt: skip
    md = (out / "compare.md").read_text()
    assert "| a/paper | trained |" in md and "| b/paper | trained |" in md


def test_compare_of_a_directory_that_holds_no_result_is_one_line(tmp_path, run_cli, two_results):
    run, _ = two_results
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("compare", run, tmp_path / "empty", "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, "empty: neither a finished run", "nor a finished sweep cell")
    assert not (tmp_path / "cmp").exists()  # every directory is read before anything is written
    bad = tmp_path / "bad"
    (bad / "eval").mkdir(parents=True)
    (bad / "eval" / "evaluation.json").write_text('{"num_layers": 1}')
    code, _, err = run_cli("compare", bad, "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, "evaluation.json: not a tli evaluation")
    code, _, err = run_cli("compare", tmp_path / "nope", "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, "nope: no such directory")
