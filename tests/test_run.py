import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tli.cli import main
from tli.cli.reference import config_reference
from tli.config import parse_set
from tli.errors import TLIError
from tli.pairs import load_lexicon, write_pairs
from tli.pipeline.config import load_run_config, resolve_config, to_toml
from tli.pipeline.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    """60 lexicon pairs, re-split by the run (fast on a tiny model)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    import dataclasses

    write_pairs([dataclasses.replace(p, split=None) for p in load_lexicon()[:60]], path)
    return path


def run_argv(model_dir, pairs, out, *extra):
    return ["run", "--model", str(model_dir), "--pairs", str(pairs), "--out", str(out),
            "--set", "train.epochs=1", "--set", "train.batch_size=4",
            "--set", "figures.tsne_pairs=12", "--set", "scan.n_boot=200",
            "--set", "evaluate.n_boot=200", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, small_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(run_argv(tiny_model_dir, small_pairs, out)) == 0
    return out


@pytest.mark.filterwarnings("error")
def test_end_to_end_on_a_tiny_model_with_warnings_as_errors(tiny_model_dir, small_pairs, tmp_path,
                                                             capsys):
    out = tmp_path / "run"
    assert main(run_argv(tiny_model_dir, small_pairs, out)) == 0
    stdout = capsys.readouterr().out
    assert "trained (layer" in stdout and "control (layer" in stdout
    for name in ("config.toml", "environment.json", "run.json", "report.md", "report.html",
                 "pairs/pairs.tsv", "scan/scan.json", "scan/scan.csv", "train/final",
                 "train/train_log.csv", "eval/evaluation.json", "eval/evaluation.md",
                 "eval/pairs.csv", "figures/scan.png", "figures/tsne_pre.png",
                 "figures/tsne_post.png", "figures/layers.png", "figures/change_hist.png"):
        assert (out / name).exists(), name
    env = json.loads((out / "environment.json").read_text())
    assert {"python", "packages", "git_commit", "seeds", "device", "time"} <= env.keys()
    assert {"torch", "transformers", "peft", "accelerate"} <= env["packages"].keys()
    assert not (out / "run.lock").exists()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and 'src="figures/' not in html
    md = (out / "report.md").read_text()
    assert "Table 1" in md and "Table 2" in md and "Verdicts" in md
    # The resolved config re-runs: it parses to the same RunConfig.
    cfg = load_run_config(out / "config.toml")
    assert cfg.model.name == str(tiny_model_dir) and cfg.train.epochs == 1


def test_plot_redraws_every_figure_from_the_run_directory_alone(finished_run, capsys):
    figures = sorted((finished_run / "figures").glob("*.png"))
    before = {p.name: p.read_bytes() for p in figures}
    for p in figures:
        p.unlink()
    assert main(["plot", str(finished_run)]) == 0
    after = {p.name: p.read_bytes() for p in sorted((finished_run / "figures").glob("*.png"))}
    assert after.keys() == before.keys() and len(after) == 5
    assert after == before  # seeded t-SNE, same results: the same pictures


def test_existing_directory_needs_overwrite_or_resume(finished_run, tiny_model_dir, small_pairs,
                                                      capsys):
    code = main(run_argv(tiny_model_dir, small_pairs, finished_run))
    err = capsys.readouterr().err
    assert code == 2 and "exists and is not empty" in err and err.count("\n") == 1


def test_resume_skips_finished_stages(finished_run, capsys):
    report = finished_run / "report.html"
    evaluation = (finished_run / "eval" / "evaluation.json").read_bytes()
    report.unlink()
    assert main(["run", "--resume", str(finished_run)]) == 0
    assert report.is_file()
    assert (finished_run / "eval" / "evaluation.json").read_bytes() == evaluation
    assert main(["run", "--resume", str(finished_run), "--set", "train.epochs=3"]) == 2


def test_a_live_lock_refuses_and_a_stale_lock_is_taken_over(finished_run, capsys):
    import socket

    lock = finished_run / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        (finished_run / "report.html").unlink()
        assert main(["run", "--resume", str(finished_run)]) == 2
        assert "another tli run" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    assert main(["run", "--resume", str(finished_run)]) == 0
    assert "stale lock" in capsys.readouterr().err
    assert not lock.exists() and (finished_run / "report.html").is_file()


def test_config_layers_and_errors():
    cfg = resolve_config({"train": {"epochs": 3}}, parse_set(["train.lr=0.001", "model.name=x"]))
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.001 and cfg.model.name == "x"
    assert cfg.scan.pooling == cfg.train.pooling == cfg.evaluate.pooling == "mean_all"
    assert resolve_config({"pooling": "mean"}).train.pooling == "mean"
    for bad, needle in [
        ({"train": {"nope": 1}}, "unknown key 'nope'"),
        ({"nope": {}}, "unknown key or section 'nope'"),
        ({"preset": "nope"}, "unknown preset"),
        ({"train": {"pooling": "mean"}}, "set pooling once"),
        ({"train": {"epochs": 0}}, "epochs must be"),
        ({"train": {"batch_size": 1}}, "batch_size must be >= 2"),
        ({"train": {"lr": -1.0}}, "lr must be"),
        ({"pooling": "max"}, "pooling must be one of"),
    ]:
        with pytest.raises(TLIError, match=needle):
            resolve_config(bad)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = resolve_config({"train": {"epochs": 2, "max_grad_norm": 1.0}})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_run_config(path) == cfg


def test_presets_resolve():
    for name in PRESETS:
        assert resolve_config({"preset": name}).preset == name


def test_aligned_preset_trains_the_sweep_cell_that_chose_it():
    # docs/findings.md reports the `aligned` preset's figures from this sweep cell; a preset edited
    # without a new sweep would no longer be the setting those figures measure
    import dataclasses

    from tli.sweep import read_grid

    grid = read_grid(ROOT / "examples" / "sweep-aligned-seeds.toml")
    cell = next(c for c in grid.cells if c.axes["seed"] == 0)
    cfg = resolve_config({"preset": "aligned"})
    assert cfg.pooling == cell.train.pooling
    ignore = {"layer", "save_every"}  # the scan picks the layer; checkpoints do not change results
    for f in dataclasses.fields(cfg.train):
        if f.name not in ignore:
            assert getattr(cfg.train, f.name) == getattr(cell.train, f.name), f.name


def test_docs_config_md_is_current():
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == config_reference(), (
        "docs/config.md is stale: regenerate it with "
        "python -c 'from tli.cli.reference import config_reference; "
        "print(config_reference(), end=\"\")' "
        "> docs/config.md"
    )


def test_paper_example_config_is_valid():
    cfg = load_run_config(ROOT / "examples" / "paper-lugha-llama-8b.toml")
    assert cfg.model.load_in_4bit and cfg.model.dtype == "bfloat16"
    assert cfg.train.layer is None  # from the scan, as in the paper
    assert (cfg.train.lora_r, cfg.train.lora_alpha, cfg.train.lr, cfg.train.epochs) == (
        16, 32, 2e-4, 5)


def test_bad_toml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tli: error: ") and "bad.toml" in err and err.count("\n") == 1


@pytest.mark.skipif(
    not any(os.path.exists(p) for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
def test_report_renders_in_headless_chromium_without_console_messages(finished_run, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from render_report import render
    finally:
        sys.path.pop(0)
    result = render(finished_run / "report.html", tmp_path / "shot.png", height=1200)
    assert result["returncode"] == 0 and result["console"] == [], result
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mismatched_pairs_are_a_seeded_derangement():
    from tli.metrics import derangement

    for n in (2, 3, 10, 97):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm) == list(range(n))
            assert all(perm[i] != i for i in range(n))
            assert perm == derangement(n, seed)
