"""Figures (``tli plot``, ``tli.plots``): every results file is read before anything is drawn.

The scan's own figure is tested in test_scan.py.
"""

import shutil

import pytest

from conftest import assert_user_error

#: A results file damaged in place -> words of the error of `tli plot`.
DAMAGED_RESULTS = {
    "config.toml": ["config.toml", "bad TOML"],
    "scan/scan.json": ["scan.json", "cannot read"],
    "eval/evaluation.json": ["evaluation.json", "cannot read"],
    "eval/pairs.csv": ["pairs.csv", "not a tli evaluation table"],
    "eval/vectors.safetensors": ["vectors.safetensors", "corrupted or unreadable"],
    "probe/probe_rank.json": ["probe_rank.json", "cannot read"],
}


@pytest.mark.parametrize(("name", "needles"), DAMAGED_RESULTS.items(), ids=DAMAGED_RESULTS.keys())
def test_plot_of_damaged_results(run_cli, tmp_path, results, name, needles):
    run = tmp_path / "run"
    shutil.copytree(results, run)
    (run / name).parent.mkdir(exist_ok=True)
    (run / name).write_bytes(b"{garbage")
    code, _, err = run_cli("plot", run)
    assert_user_error(code, err, *needles)
    assert not (run / "figures").exists()  # every input is read before anything is drawn


def test_plot_when_figures_is_a_file(run_cli, tmp_path, results):
    run = tmp_path / "run"
    shutil.copytree(results, run)
    (run / "figures").write_text("x")
    code, _, err = run_cli("plot", run)
    assert_user_error(code, err, "figures", "exists and is not a directory")


def test_yardstick_bars_come_from_the_saved_files(tmp_path, results):
    import json
    import math

    from tli.evaluate import EvalResult
    from tli.plots import plot_yardsticks, yardstick_bars
    from tli.stats import wilson_interval
    from tli.yardsticks import best

    from conftest import PNG_MAGIC

    ev = EvalResult.load(results / "eval")
    data = yardstick_bars(results / "eval", tmp_path / "no-probe")
    assert list(data["sets"]) == ["control", "trained"] and data["kind"] == "s2t_centered"
    for name, bars in data["sets"].items():
        n, final = ev.sets[name]["n"], ev.num_layers
        base, top, raw, calibrated, adapter = bars
        p = ev.sets[name]["pre"]["p_at_1_s2t_centered"][final]
        lo, hi = wilson_interval(round(p * n), n)
        assert base[1:4] == pytest.approx((p, p - lo, hi - p))
        want = best(ev.yardsticks, name, "s2t", ev.layers)
        assert top[1] == want["p_at_1"] and f"layer {want['layer']}" in top[0]
        assert ("in-sample" in top[0]) == (name == "trained")
        assert math.isnan(raw[1]) and "tli probe --rank did not run" in raw[4]
        assert adapter[1] == ev.sets[name]["post"]["p_at_1_s2t_centered"][final]
    harm = ev.perplexity["sets"]
    assert [r[0] for r in data["perplexity"]] == ["Swahili", "English"]
    assert data["perplexity"][0][1] == pytest.approx(100 * harm["sw"]["change"])
    # a saved LM ranking fills its bars; the sets or directions it skipped say so
    probe = tmp_path / "probe"
    probe.mkdir()
    row = {
        "set": "control",
        "direction": "s2t",
        "n": 2,
        "n_candidates": 3,
        "chance": 0.33,
        "p_at_1_raw": 0.5,
        "p_at_1_raw_lo": 0.1,
        "p_at_1_raw_hi": 0.9,
        "hits_raw": 1,
        "mrr_raw": 0.7,
        "p_at_1_calibrated": 1.0,
        "p_at_1_calibrated_lo": 0.3,
        "p_at_1_calibrated_hi": 1.0,
        "hits_calibrated": 2,
        "mrr_calibrated": 1.0,
    }
    (probe / "probe_rank.json").write_text(
        json.dumps(
            {
                "stage": "probe_rank",
                "config": {"shots": 2},
                "model": {},
                "scores": [row],
                "items": [],
            }
        )
    )
    data = yardstick_bars(results / "eval", probe)
    raw, calibrated = data["sets"]["control"][2:4]
    assert raw[1:4] == pytest.approx((0.5, 0.4, 0.4)) and "(2 items)" in raw[0]
    assert calibrated[1:4] == pytest.approx((1.0, 0.7, 0.0))
    assert "skipped this set" in data["sets"]["trained"][2][4]
    path = plot_yardsticks(results / "eval", tmp_path / "y.png", probe)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_training_figure_from_the_training_log_alone(tmp_path, run_cli):
    from tli.plots import plot_training, read_train_log

    from conftest import PNG_MAGIC

    train = tmp_path / "train"
    train.mkdir()
    rows = ["step,epoch,loss,pos_sim,neg_sim,lr"]
    rows += [f"{s},{1 + (s - 1) // 5},{1 / s},{0.1 * s},{0.05 * s},{1e-4 * min(s, 3)}"
             for s in range(1, 11)]  # fmt: skip
    (train / "train_log.csv").write_text("\n".join(rows) + "\n")
    log = read_train_log(train)
    assert log["step"] == list(range(1, 11)) and log["epoch"][4:6] == [1.0, 2.0]
    assert plot_training(train, tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    (train / "train_log.csv").write_text("step,epoch,loss\n1,1,0.5\n")
    with pytest.raises(Exception, match=r"train_log\.csv: not a tli result or damaged"):
        plot_training(train, tmp_path / "u.png")
    assert not (tmp_path / "u.png").exists()
#: Results files replaced by a FIFO in `test_plot_never_reads_a_fifo`.
FIFO_RESULTS = ("config.toml", "scan/scan.json", "eval/evaluation.json", "eval/pairs.csv")


@pytest.mark.parametrize("name", FIFO_RESULTS)
def test_plot_never_reads_a_fifo(tmp_path, results, name):
    """Reading a FIFO blocks until a writer comes. tli reads only regular files: a FIFO in
    place of a results file counts as absent (exit 0, what is there is drawn) or is named in
    one line; the command never hangs."""
    import os
    import subprocess
    import sys

    from conftest import python_env

    run = tmp_path / "run"
    shutil.copytree(results, run)
    (run / name).unlink()
    os.mkfifo(run / name)
    proc = subprocess.run([sys.executable, "-m", "tli", "plot", str(run)], capture_output=True,
                          text=True, env=python_env(), timeout=300)  # fmt: skip
    if proc.returncode == 0:
        assert all(line.startswith("tli: ") for line in proc.stderr.splitlines()), proc.stderr
    else:
        assert_user_error(proc.returncode, proc.stderr, name.split("/")[-1],
                          "not a regular file")
