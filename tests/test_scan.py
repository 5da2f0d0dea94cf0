"""The layer scan stage and its figure (the metric maths are tested in test_metrics.py)."""

import csv
import json
import logging
import math
import os
from pathlib import Path

import pytest

from tli.cli.plot import redraw
from tli.errors import TLIError
from tli.models import ModelConfig, load_model
from tli.pairs import Pair
from tli.plots import plot_scan
from tli.scan import ScanConfig, ScanResult, build_result, check_choice, run_scan, select_layer

from conftest import PNG_MAGIC, assert_one_line_error

N = 4  # blocks of the tiny model in conftest's tiny_model_dir

TRAINED = [
    ("mtoto", "child", "", "trained"),
    ("kitabu", "book", "", "trained"),
    ("maji", "water", "", "trained"),
    ("bahari", "sea", "ocean", "trained"),
    ("nyumba", "house", "home", "trained"),
    ("mti", "tree", "", "trained"),
    ("jua", "sun", "", "trained"),
    ("habari za asubuhi", "good morning", "", "trained"),
]
CONTROL = [
    ("mkate", "bread", "", "control"),
    ("mbwa", "dog", "", "control"),
    ("dirisha", "window", "", "control"),
    ("daktari", "doctor", "", "control"),
]


def write_pairs_tsv(path: Path, rows, split: bool = True) -> Path:
    header = "swahili\tenglish\talternatives" + ("\tsplit" if split else "")
    lines = [header] + ["\t".join(r if split else r[:3]) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs_tsv(tmp_path_factory.mktemp("pairs") / "pairs.tsv", TRAINED + CONTROL)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(str(tiny_model_dir)))


def pairs_of(rows):
    return [Pair(s, t, tuple(a.split(";")) if a else (), split=sp) for s, t, a, sp in rows]


# ---------------------------------------------------------------------------------------------
# End to end on a tiny random model


def test_cli_scan_writes_every_layer_for_both_sets(run_cli, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "scan"
    code, stdout, _ = run_cli(
        "scan",
        "--model",
        tiny_model_dir,
        "--pairs",
        pairs_file,
        "--out",
        out,
        "--n-boot",
        "50",
        "--center",
        "--batch-size",
        "5",
    )
    assert code == 0
    with open(out / "scan.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "set", "metric", "value"]
    for set_name in ("trained", "control"):
        for metric in (
            "pair_mean",
            "baseline",
            "margin_lo",
            "p_at_1_s2t_csls",
            "mrr_t2s_nn",
            "centered_margin",
            "centered_p_at_1_s2t_nn",
            "p_at_1_s2t_centered",
            "mrr_t2s_centered",
        ):
            layers = {
                int(r["layer"]) for r in rows if r["set"] == set_name and r["metric"] == metric
            }
            assert layers == set(range(N + 1)), (set_name, metric)
    data = json.loads((out / "scan.json").read_text())
    assert data["num_layers"] == N and data["layers"] == list(range(N + 1))
    assert data["n_pairs"] == {"trained": 8, "control": 4}
    assert data["inputs"] == {"pairs": str(pairs_file)}
    assert data["config"]["center"] is True and data["config"]["pooling"] == "mean"
    assert data["chosen_layer"] in range(N + 1) and data["next_best_layer"] in range(N + 1)
    assert data["chosen_layer"] != data["next_best_layer"]
    assert set(data["sets"]) == set(data["centered"]) == {"trained", "control"}
    assert all(len(v) == N + 1 for v in data["sets"]["control"].values())
    # --center centres each set by its own mean, as the always-reported centred retrieval does
    for name in ("trained", "control"):
        for d in ("s2t", "t2s"):
            assert data["centered"][name][f"p_at_1_{d}_nn"] == pytest.approx(
                data["sets"][name][f"p_at_1_{d}_centered"]
            )
    assert "P@1 centred" in stdout
    assert (out / "scan.png").read_bytes()[:8] == PNG_MAGIC
    assert f"chosen layer (*): {data['chosen_layer']}" in stdout
    assert "trained (8 pairs" in stdout and "control (4 pairs" in stdout
    assert "next best (+)" in stdout
    # the frozen yardsticks: in the CSV per layer, in the JSON, in the printed table
    yard = data["yardsticks"]
    assert yard["fit_set"] == "trained" and yard["n_fit"] == 8 and yard["absent"] == {}
    for name in ("trained", "control"):
        for metric in (
            "p_at_1_s2t_procrustes_csls",
            "mrr_t2s_procrustes_nn",
            "p_at_1_s2t_centered",
        ):
            got = [
                float(r["value"])
                for r in rows
                if r["set"] == name and r["metric"] == "yardstick_" + metric
            ]
            assert got == yard["sets"][name][metric] and len(got) == N + 1
        # the map-free centred yardstick is the scan's own centred retrieval
        assert (
            yard["sets"][name]["p_at_1_t2s_centered"] == data["sets"][name]["p_at_1_t2s_centered"]
        )
    assert "frozen yardsticks (Procrustes fitted on the 8 trained pairs" in stdout
    assert "trained (in-sample: the map was fitted on these pairs)" in stdout
    assert stdout.count("best s→t: ") == 2 and stdout.count("best t→s: ") == 2


def test_scan_without_control_set_says_the_yardstick_is_absent(run_cli, tiny_model_dir, tmp_path):
    trained = write_pairs_tsv(tmp_path / "t.tsv", TRAINED, split=False)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        "scan", "--model", tiny_model_dir, "--pairs", trained, "--out", out, "--n-boot", "20"
    )
    assert code == 0
    yard = ScanResult.load(out).yardsticks
    assert set(yard["sets"]) == {"trained"}
    assert "no control set" in yard["absent"]["control"]
    assert "yardstick absent (control): no control set" in stdout


def test_cli_control_file_gives_the_control_set(run_cli, tiny_model_dir, tmp_path):
    trained = write_pairs_tsv(tmp_path / "t.tsv", TRAINED, split=False)
    control = write_pairs_tsv(tmp_path / "c.tsv", CONTROL, split=False)
    out = tmp_path / "out"
    code, _, _ = run_cli(
        "scan",
        "--model",
        tiny_model_dir,
        "--pairs",
        trained,
        "--control",
        control,
        "--out",
        out,
        "--n-boot",
        "20",
    )
    assert code == 0
    assert ScanResult.load(out).n_pairs == {"trained": 8, "control": 4}


def test_run_scan_round_trips_through_its_directory(loaded, tmp_path):
    sets = {"trained": pairs_of(TRAINED), "control": pairs_of(CONTROL)}
    result = run_scan(loaded, sets, ScanConfig(n_boot=30, center=True, select_by="margin"))
    assert result.layers == list(range(N + 1))
    result.save(tmp_path)
    back = ScanResult.load(tmp_path)
    assert back == result
    assert back.to_csv() == (tmp_path / "scan.csv").read_text(encoding="utf-8")
    # Each distinct string is embedded once; the margin chose the layer on the trained set.
    assert result.timings["n_strings"] == 2 * (len(TRAINED) + len(CONTROL))
    margins = result.sets["trained"]["margin"]
    assert margins[result.chosen_layer] == max(margins)


def test_plot_redraws_the_png_from_the_directory_alone(run_cli, loaded, tmp_path):
    sets = {"trained": pairs_of(TRAINED), "control": pairs_of(CONTROL)}
    run_dir = tmp_path / "run"
    run_scan(loaded, sets, ScanConfig(n_boot=20)).save(run_dir / "scan")
    png = run_dir / "scan" / "scan.png"
    assert not png.exists()
    code, stdout, _ = run_cli("plot", run_dir)  # a run directory: the scan lies in scan/
    assert code == 0 and str(png) in stdout
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    png.unlink()
    code, _, _ = run_cli("plot", run_dir / "scan")  # the scan directory itself
    assert code == 0 and png.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_results_is_a_one_line_error(run_cli, tmp_path):
    assert_one_line_error(*run_cli("plot", tmp_path)[::2], "no results to plot")
    assert_one_line_error(*run_cli("plot")[::2], "required: DIR")
    assert_one_line_error(*run_cli("plot", tmp_path / "nope")[::2], "no such directory")
    (tmp_path / "scan.json").write_text("{not json")
    assert_one_line_error(*run_cli("plot", tmp_path)[::2], "scan.json")


def test_sets_need_two_pairs_and_empty_sets_are_skipped(loaded):
    with pytest.raises(TLIError, match="at least 2"):
        run_scan(loaded, {"trained": pairs_of(TRAINED[:1])}, ScanConfig(n_boot=10))
    result = run_scan(
        loaded, {"trained": pairs_of(TRAINED[:3]), "control": []}, ScanConfig(n_boot=10)
    )
    assert list(result.sets) == ["trained"]


# ---------------------------------------------------------------------------------------------
# Choosing the layer, on constructed results


def summary(pair_mean, baseline, lo=None, hi=None, p1=None):
    margin = [p - b for p, b in zip(pair_mean, baseline, strict=True)]
    n = len(pair_mean)
    return {
        "pair_mean": list(pair_mean),
        "pair_std": [0.01] * n,
        "baseline": list(baseline),
        "margin": margin,
        "margin_lo": lo if lo is not None else [m - 0.01 for m in margin],
        "margin_hi": hi if hi is not None else [m + 0.01 for m in margin],
        "p_at_1_s2t_nn": p1 if p1 is not None else [0.0] * n,
        "p_at_1_s2t_csls": [0.0] * n,
        "chance_p_at_1_s2t": [0.125] * n,
    }


def test_selection_rules_take_the_argmax_of_their_metric():
    # cosine peaks at layer 2 (anisotropy), margin at 4, P@1 at 1.
    s = summary(
        pair_mean=[0.30, 0.90, 0.99, 0.95, 0.60],
        baseline=[0.28, 0.89, 0.989, 0.90, 0.40],
        p1=[0.1, 0.5, 0.2, 0.3, 0.4],
    )
    layers = [0, 1, 2, 3, 4]
    assert select_layer(s, layers, "cosine") == (2, 3)
    assert select_layer(s, layers, "margin") == (4, 3)
    assert select_layer(s, layers, "p_at_1") == (1, 4)
    # Ties in the rule's metric go to the larger margin; NaN ranks last.
    t = summary(pair_mean=[0.5, 0.5, math.nan], baseline=[0.4, 0.2, 0.0], p1=[0.0, 0.0, 0.0])
    assert select_layer(t, [0, 1, 2], "cosine") == (1, 0)
    assert select_layer(t, [0, 1, 2], "p_at_1") == (1, 0)
    # A one-layer scan has no runner-up; layer indices need not start at 0.
    assert select_layer(summary([0.5], [0.1]), [7], "margin") == (7, None)


def test_choice_is_made_on_the_select_on_set():
    sets = {
        "trained": summary([0.2, 0.6, 0.4], [0.1, 0.1, 0.1]),
        "control": summary([0.9, 0.2, 0.1], [0.1, 0.1, 0.1]),
    }
    cfg = ScanConfig(select_by="cosine")
    assert (
        build_result(
            cfg,
            model="m",
            num_layers=2,
            layers=[0, 1, 2],
            sets=sets,
            n_pairs={"trained": 8, "control": 4},
        ).chosen_layer
        == 1
    )
    on_control = ScanConfig(select_on="control")
    assert (
        build_result(
            on_control,
            model="m",
            num_layers=2,
            layers=[0, 1, 2],
            sets=sets,
            n_pairs={"trained": 8, "control": 4},
        ).chosen_layer
        == 0
    )
    missing = build_result(
        on_control,
        model="m",
        num_layers=2,
        layers=[0, 1, 2],
        sets={"trained": sets["trained"]},
        n_pairs={"trained": 8},
    )
    assert missing.select_set == "trained" and "no set 'control'" in missing.notes[0]
    with pytest.raises(TLIError, match="select_on must be one of trained, control, got 'contrl'"):
        ScanConfig(select_on="contrl")  # a typo is refused, never a silent fallback


def test_anisotropic_choice_warns(caplog, tmp_path):
    logger = logging.getLogger("tli")
    logger.propagate = False  # as after cli.main(); capture on the "tli" logger itself
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="tli")
    # Layer 1 has the highest raw cosine, but mismatched pairs are as close: anisotropy.
    sets = {
        "trained": summary(
            pair_mean=[0.30, 0.9987, 0.95],
            baseline=[0.25, 0.9986, 0.80],
            lo=[0.03, -0.0004, 0.12],
            hi=[0.07, 0.0006, 0.18],
        )
    }
    result = build_result(
        ScanConfig(), model="m", num_layers=2, layers=[0, 1, 2], sets=sets, n_pairs={"trained": 8}
    )
    assert result.chosen_layer == 1
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("includes zero" in m for m in messages)
    assert any("anisotropy, not alignment" in m and "0.9986" in m for m in messages)
    assert result.warnings == messages
    # The warnings are saved with the result and shown in its table.
    result.save(tmp_path)
    assert ScanResult.load(tmp_path).warnings == messages
    assert "warning: " in result.table()
    # By margin, layer 2 is chosen: a clear margin and a baseline below 0.9, so no warning.
    caplog.clear()
    clean = build_result(
        ScanConfig(select_by="margin"),
        model="m",
        num_layers=2,
        layers=[0, 1, 2],
        sets=sets,
        n_pairs={"trained": 8},
    )
    assert clean.chosen_layer == 2 and clean.warnings == [] and not caplog.records
    assert any("final layer" in n for n in clean.notes)


def test_margin_below_zero_and_layer_zero_warn():
    s = summary([0.5, 0.1], [0.2, 0.3], lo=[0.2, -0.3], hi=[0.4, -0.1])
    warnings, notes = check_choice({"control": s}, [0, 1], 1, 1)
    assert any("less similar than mismatched" in w for w in warnings)
    assert any("final layer" in n for n in notes)
    warnings, _ = check_choice({"trained": s}, [0, 1], 0, 1)
    assert warnings == [w for w in warnings if "layer 0" in w] and len(warnings) == 1


def test_plot_scan_from_a_constructed_result(tmp_path):
    sets = {"trained": summary([0.3, 0.99, 0.5], [0.2, 0.98, 0.1], p1=[0.1, 0.0, 0.4])}
    result = build_result(
        ScanConfig(), model="m", num_layers=2, layers=[0, 1, 2], sets=sets, n_pairs={"trained": 8}
    )
    path = plot_scan(result, tmp_path / "fig.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    result.save(tmp_path / "d")  # the result is saved without its figure
    assert redraw(tmp_path / "d") == [tmp_path / "d" / "scan.png"]


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pooling", "max"),
        ("select_by", "loss"),
        ("batch_size", 0),
        ("n_boot", 0),
        ("csls_k", 0),
        ("level", 1.5),
        ("select_on", " "),
        ("baseline_warn", 2.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(TLIError, match=field):
        ScanConfig(**{field: value})


BAD = [
    (["--model", "no-such-model"], ["no-such-model", "not an embedded name"]),
    (["--model", "{tmp}/missing"], ["missing"]),
    (["--pairs", "{tmp}/nope.tsv"], ["nope.tsv", "cannot read"]),
    (["--pairs", "{tmp}/bad.tsv"], ["bad.tsv", 'missing column "swahili"']),
    (["--pairs", "{tmp}/one.tsv"], ["'trained' has 1 pair"]),
    (["--pairs", "{pairs}", "--control", "{pairs}"], ["--control"]),
    (["--pooling", "max"], ["--pooling", "'max' is not one of mean, mean_all, last"]),
    (["--select-by", "loss"], ["--select-by", "'loss'"]),
    (["--batch-size", "0"], ["batch_size must be an integer >= 1"]),
    (["--n-boot", "many"], ["--n-boot", "'many'"]),
    (["--out", "{tmp}/file.txt"], ["file.txt", "not a directory"]),
    (["--out", "{tmp}/file.txt/sub"], ["file.txt", "not a directory"]),
    (["--device", "cuda"], ["CUDA is not available"]),
]


@pytest.mark.parametrize(("argv", "needles"), BAD)
def test_cli_bad_input_one_line_exit_2(
    run_cli, tiny_model_dir, pairs_file, tmp_path, argv, needles
):
    import torch

    if torch.cuda.is_available() and any("CUDA" in n for n in needles):
        pytest.skip("this machine has CUDA")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "bad.tsv").write_text("a\tb\nx\ty\n")
    write_pairs_tsv(tmp_path / "one.tsv", TRAINED[:1], split=False)
    base = {
        "--model": str(tiny_model_dir),
        "--pairs": str(pairs_file),
        "--out": str(tmp_path / "out"),
    }
    argv = [a.format(tmp=tmp_path, pairs=pairs_file) for a in argv]
    for flag, value in base.items():
        if flag not in argv:
            argv += [flag, value]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(*run_cli("scan", *argv)[::2], *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_cli_unwritable_out_dir(run_cli, tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: Path(p) != locked and real(p, m, **k))
    for out in (locked, locked / "new"):
        code, _, err = run_cli(
            "scan", "--model", tiny_model_dir, "--pairs", pairs_file, "--out", out
        )
        assert_one_line_error(code, err, "not writable")
    assert list(locked.iterdir()) == []
