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
}


@pytest.mark.parametrize(("name", "needles"), DAMAGED_RESULTS.items(), ids=DAMAGED_RESULTS.keys())
def test_plot_of_damaged_results(run_cli, tmp_path, results, name, needles):
    run = tmp_path / "run"
    shutil.copytree(results, run)
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
