"""The pipeline (``tli run``, ``tli.pipeline``): the run config and presets, whole runs on a tiny
model, the run directory (leftovers, overwrite, lock), interruption, concurrency, repetition, and
fuzzing of the config layers.

``docs/reliability.md`` lists the failure modes these tests show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tli.cli import main
from tli.config import parse_set, read_toml
from tli.config import toml_loads as _toml_loads
from tli.errors import TLIError
from tli.io import is_leftover
from tli.pairs import read_pairs
from tli.pipeline.config import SECTIONS, load_run_config, resolve_config, to_toml
from tli.pipeline.presets import PRESETS
from tli.plots import TSNE_NOTE

from conftest import FUZZ_EXAMPLES, PNG_MAGIC, ROOT, assert_user_error, python_env

# --- tli run on a tiny model; the run config and presets --------------------------------------


@pytest.fixture(scope="module")
def small_pairs(inputs):
    """60 lexicon pairs, re-split by the run (fast on a tiny model)."""
    return inputs / "pairs.tsv"


def quick_run_argv(model_dir, pairs, out, *extra):
    return ["run", "--model", str(model_dir), "--pairs", str(pairs), "--out", str(out),
            "--set", "train.epochs=1", "--set", "train.batch_size=4",
            "--set", "figures.tsne_pairs=12", "--set", "scan.n_boot=200",
            "--set", "evaluate.n_boot=200", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, small_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(quick_run_argv(tiny_model_dir, small_pairs, out)) == 0
    return out


@pytest.mark.filterwarnings("error")
def test_end_to_end_on_a_tiny_model_with_warnings_as_errors(tiny_model_dir, small_pairs, tmp_path,
                                                             capsys):
    out = tmp_path / "run"
    rank = ["--set", "probe.rank=true", "--set", "probe.rank_n=3"]  # the LM ranking, alone
    assert main(quick_run_argv(tiny_model_dir, small_pairs, out, *rank)) == 0
    stdout = capsys.readouterr().out
    assert "trained (layer" in stdout and "control (layer" in stdout
    assert "geometry " in stdout and "retrieval " in stdout and "collapse flag" in stdout
    for name in ("config.toml", "environment.json", "run.json", "report.md", "report.html",
                 "pairs/pairs.tsv", "scan/scan.json", "scan/scan.csv", "train/final",
                 "train/train_log.csv", "eval/evaluation.json", "eval/evaluation.md",
                 "eval/pairs.csv", "figures/scan.png", "figures/tsne_pre.png",
                 "figures/tsne_post.png", "figures/layers.png", "figures/change_hist.png",
                 "figures/training.png", "train/final/README.md",
                 "figures/yardsticks.png", "probe/probe_rank.json", "probe/probe_rank.md"):
        assert (out / name).exists(), name
    env = json.loads((out / "environment.json").read_text())
    assert {"python", "packages", "git_commit", "seeds", "device", "time"} <= env.keys()
    assert {"torch", "transformers", "peft", "accelerate"} <= env["packages"].keys()
    assert not (out / "run.lock").exists()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and 'src="figures/' not in html
    md = (out / "report.md").read_text()
    # the yardstick figure and the do-no-harm line lead the report, before the verdicts
    lead = md.index("## Yardsticks and do no harm")
    assert lead < md.index("![Yardsticks: P@1") < md.index("## Verdicts")
    harm = md.index("do no harm (95% paired bootstrap CI): Swahili perplexity")
    assert lead < harm < md.index("## Verdicts")
    rank = md.index("LM ranking (4-shot, base model): control s2t P@1 ")
    assert harm < rank < md.index("## Verdicts")
    assert lead < md.index("| control | s→t | ") < md.index("## Verdicts")
    assert "do no harm (95% paired bootstrap CI)" in stdout
    assert not (out / "probe" / "probe.json").exists()  # enabled is off: the ranking ran alone
    assert "Table 1" in md and "Table 2" in md and "Verdicts" in md
    assert "| Set | N | Geometry: margin change [95% CI] | detects |" in md
    assert "## Retrieval: nearest neighbour, CSLS and centred (final layer)" in md
    assert "| control | Swahili→English centred NN (verdict) |" in md
    assert md.index("Figure 3: t-SNE") < md.index(TSNE_NOTE) < md.index("per-pair change:")
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
    assert after.keys() == before.keys() and len(after) == 7
    md = (finished_run / "report.md").read_text()
    assert "LM ranking: absent (it did not run" in md
    assert after == before  # seeded t-SNE, same results: the same pictures


def test_existing_directory_needs_overwrite_or_resume(finished_run, tiny_model_dir, small_pairs,
                                                      capsys):
    code = main(quick_run_argv(tiny_model_dir, small_pairs, finished_run))
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


#: German-English pairs under the keys de and en (a pair list with no Swahili in it).
GERMAN = [
    ("Hund", "dog"), ("Katze", "cat"), ("Wasser", "water"), ("Haus", "house"),
    ("Baum", "tree"), ("Sonne", "sun"), ("Mond", "moon"), ("Brot", "bread"),
    ("Buch", "book"), ("Kind", "child"), ("Feuer", "fire"), ("Meer", "sea"),
    ("Stadt", "city"), ("Stein", "stone"), ("Vogel", "bird"), ("Fisch", "fish"),
    ("Milch", "milk"), ("Apfel", "apple"), ("Tisch", "table"), ("Stuhl", "chair"),
    ("Fenster", "window"), ("Tür", "door"), ("Straße", "street"), ("Berg", "mountain"),
    ("Fluss", "river"), ("Wald", "forest"), ("Schnee", "snow"), ("Regen", "rain"),
    ("Wind", "wind"), ("Blume", "flower"),
]  # fmt: skip


@pytest.fixture(scope="module")
def german_run(tiny_model_dir, tmp_path_factory):
    """A whole `tli run` (probe included) on German-English pairs with the keys de and en."""
    d = tmp_path_factory.mktemp("german")
    pairs = d / "de-en.tsv"
    pairs.write_text("de\ten\n" + "".join(f"{a}\t{b}\n" for a, b in GERMAN), encoding="utf-8")
    out = d / "run"
    argv = quick_run_argv(tiny_model_dir, pairs, out, "--set", "pairs.src_key=de",
                          "--set", "pairs.tgt_key=en", "--set", "probe.enabled=true",
                          "--set", "probe.n=2", "--set", "probe.score_n=3",
                          "--set", "probe.max_new_tokens=4")  # fmt: skip
    assert main(argv) == 0
    return out


def test_a_german_english_run_never_says_swahili_or_english(german_run):
    files = [p for p in german_run.rglob("*") if p.is_file()]
    assert len(files) > 30 and (german_run / "probe" / "probe_scores.md").is_file()
    for path in files:
        data = path.read_bytes().lower()
        assert b"swahili" not in data and b"english" not in data, path
    # the languages of the pair file label the tables, figures' results and prompts
    summary = json.loads((german_run / "pairs" / "summary.json").read_text())
    assert (summary["src_lang"], summary["tgt_lang"]) == ("de", "en")
    md = (german_run / "report.md").read_text()
    assert "de → en" in md and "| de | en | Pre | Post | Change |" in md
    assert "P@1 de→en NN" in (german_run / "eval" / "evaluation.md").read_text()
    scan = json.loads((german_run / "scan" / "scan.json").read_text())
    assert scan["languages"] == ["de", "en"]
    probe = json.loads((german_run / "probe" / "probe.json").read_text())
    assert probe["languages"] == ["de", "en"]
    assert any(r["prompt"].startswith("Translate the de word into en.") for r in probe["rows"])
    assert "| trained | de -> en |" in (german_run / "probe" / "probe_scores.md").read_text()


def test_the_run_names_its_languages_on_the_command_line(tiny_model_dir, small_pairs, tmp_path):
    out = tmp_path / "run"
    argv = quick_run_argv(tiny_model_dir, small_pairs, out, "--src-lang", "Kiswahili",
                          "--tgt-lang", "Kiingereza", "--set", "train.epochs=1")  # fmt: skip
    assert main(argv) == 0
    assert "Kiswahili → Kiingereza" in (out / "report.md").read_text()
    card = (out / "train" / "final" / "README.md").read_text()
    assert "Kiswahili → Kiingereza" in card


def test_the_final_adapter_card_holds_the_evaluation(german_run, tiny_model_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(german_run / "train" / "final" / "README.md")
    assert card.data.base_model == str(tiny_model_dir)  # a local directory keeps its name
    assert card.data.library_name == "peft" and card.data.language == ["de", "en"]
    assert {"tli", "lora", "cross-lingual-alignment"} <= set(card.data.tags)
    assert card.data.license is None  # the tiny model records none; the card says so
    text = card.text
    assert "[More Information Needed]" not in str(card)
    assert "not a hub id" in text and "License: not known to tli" in text
    assert "## Evaluation" in text and "| Set | N | Pre mean (std)" in text
    assert "trained (layer" in text and "control (layer" in text
    assert f"tli run --config {german_run / 'config.toml'}" in text
    assert "Stanley Ngugi" in text and "year   = {2025}" in text
    summary = json.loads((german_run / "pairs" / "summary.json").read_text())
    assert summary["sha256"]["de-en.tsv"] in text
    epoch = ModelCard.load(german_run / "train" / "epoch-1" / "README.md")
    assert epoch.data.language == ["de", "en"] and "Not evaluated yet" in epoch.text


def test_the_evaluation_reuses_the_scan_vectors_and_gets_the_same_figures(german_run, tmp_path):
    """`tli run` takes the scan's base vectors; an evaluation that embeds again agrees exactly."""
    from tli.evaluate import EvalResult, evaluate
    from tli.models import load_model
    from tli.pipeline.runner import saved_sets

    record = json.loads((german_run / "run.json").read_text())
    assert record["stages"]["evaluate"]["base_vectors_reused"] is True
    cfg = load_run_config(german_run / "config.toml")
    fresh = evaluate(load_model(cfg.model), german_run / "train" / "final",
                     saved_sets(german_run), cfg.evaluate, tmp_path / "eval",
                     languages=("de", "en"))  # fmt: skip
    assert fresh.timings["base_vectors_reused"] == 0.0
    reused = EvalResult.load(german_run / "eval")
    saved = [json.loads((d / "evaluation.json").read_text()) for d in (german_run / "eval",
                                                                        tmp_path / "eval")]
    assert saved[0]["sets"] == saved[1]["sets"]  # every figure of every set at every layer
    assert saved[0]["verdicts"] == saved[1]["verdicts"]
    for name in reused.sets:
        for when in ("pre", "post"):
            assert (reused.cosines[name][when] == fresh.cosines[name][when]).all()


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
    assert (tmp_path / "shot.png").read_bytes()[:8] == PNG_MAGIC


# --- the run directory: leftovers, overwrite --------------------------------------------------


def test_leftovers_are_removed_on_resume_and_nothing_else(tmp_path):
    from tli.pipeline.rundir import remove_leftovers

    keep = ["config.toml", "eval/evaluation.json", "train/final/adapter_model.safetensors",
            ".user-notes", "train/.hidden.json"]  # fmt: skip
    drop = [".run.json.k3j2.tmp", "eval/.evaluation.json.x1.tmp", "train/.final.tmp-9a/a.bin",
            "train/.final.old/a.bin", "pairs/.pairs.tsv.q.tmp"]  # fmt: skip
    for name in keep + drop:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    remove_leftovers(tmp_path)
    for name in keep:
        assert (tmp_path / name).is_file(), name
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(keep)


def test_a_run_killed_before_its_config_was_written_can_start_again(tmp_path):
    """Only a stale lock and a temporary: not a run yet, so a new run may use the folder."""
    from tli.lock import acquire_lock
    from tli.pipeline.rundir import prepare_run_dir, refuse_existing

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": "elsewhere"}))
    (run / ".config.toml.a1.tmp").write_text("half")
    prepare_run_dir(run, overwrite=False, resume=False)
    acquire_lock(run)
    refuse_existing(run)  # nothing to refuse


def tree(run_dir: Path) -> dict[str, bytes]:
    """Every file of a directory (relative path -> bytes)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}  # fmt: skip


#: Settings that fail only against the model, the pairs or the machine: each once made
#: `--overwrite` delete a complete run before the error appeared.
LATE_ERRORS = {
    "layer-beyond-the-model": (["--set", "train.layer=19"], "layer must be in 1..4"),
    "adapt-layers-above-the-loss": (["--set", "train.layer=2", "--set", 'train.adapt_layers="3"'],
                                    "adapt_layers: block 3 is at or above"),
    "unknown-target-module": (["--set", 'train.target_modules=["nope"]'],
                              "target_modules nope: cannot add adapters"),
    "no-negatives": (["--pairs", "{d}/same.tsv"], "training has no negatives"),
    "leakage": (["--pairs", "{d}/leaky.tsv"], "overlap the trained set"),
    "missing-tokenizer": (["--model", "{bare}"], "cannot load tokenizer"),
}  # fmt: skip


@pytest.fixture(scope="module")
def bare_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model without its tokenizer files."""
    path = tmp_path_factory.mktemp("bare") / "model"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, path / name)
    return path


@pytest.mark.parametrize(("extra", "needle"), LATE_ERRORS.values(), ids=LATE_ERRORS.keys())
def test_overwrite_with_an_error_found_late_keeps_the_complete_run(
    finished_run, tiny_model_dir, small_pairs, inputs, bare_model_dir, tmp_path, capsys,
    extra, needle,
):  # fmt: skip
    run = tmp_path / "runB"
    shutil.copytree(finished_run, run)
    before = tree(run)
    extra = [e.format(d=inputs, bare=bare_model_dir) for e in extra]
    code = main([*quick_run_argv(tiny_model_dir, small_pairs, run), *extra, "--overwrite"])
    assert_user_error(code, capsys.readouterr().err, needle)
    assert tree(run) == before  # nothing deleted, nothing written, no lock left


def test_overwrite_puts_the_previous_run_back_when_the_new_one_fails_before_validation(
    finished_run, tiny_model_dir, small_pairs, tmp_path, capsys, monkeypatch
):
    """The scan runs before the scan-chosen layer can be checked: a failure there (here a
    disk error, then Ctrl-C) puts the previous run back; once training's checks pass, the
    previous run is gone."""
    import tli.pipeline.runner

    run = tmp_path / "runB"
    shutil.copytree(finished_run, run)
    before = tree(run)
    for failure in (TLIError("scan/scan.csv: cannot write: No space left on device"),
                    KeyboardInterrupt()):  # fmt: skip
        def fail(self, failure=failure):
            (self.run_dir / "scan").mkdir()
            (self.run_dir / "scan" / "half.csv").write_text("x")
            raise failure

        monkeypatch.setattr(tli.pipeline.runner.Runner, "_scan", fail)
        code = main([*quick_run_argv(tiny_model_dir, small_pairs, run), "--overwrite"])
        err = capsys.readouterr().err
        assert code in (2, 130), err
        assert "the previous run is back in place" in err
        assert tree(run) == before
    monkeypatch.undo()
    seen = []
    real = tli.pipeline.runner.Runner._train

    def train_then_look(self):
        real(self)
        seen.append(sorted(p.name for p in self.run_dir.iterdir()))

    monkeypatch.setattr(tli.pipeline.runner.Runner, "_train", train_then_look)
    argv = [*quick_run_argv(tiny_model_dir, small_pairs, run), "--set", "train.seed=1"]
    assert main([*argv, "--overwrite"]) == 0
    assert ".previous.old" not in seen[0]  # deleted once training's checks passed
    assert load_run_config(run / "config.toml").train.seed == 1


def test_a_new_run_that_fails_its_checks_leaves_nothing_behind(
    tiny_model_dir, small_pairs, tmp_path, capsys, monkeypatch
):
    """A check that needs the scan (the chosen layer) fails after the run directory was
    created: it is removed again (a half-made directory was left before)."""
    import tli.pipeline.runner

    def fail(self):
        raise TLIError("[train] adapt_layers: block 3 is at or above the deepest loss layer 2")

    monkeypatch.setattr(tli.pipeline.runner.Runner, "_train", fail)
    run = tmp_path / "new" / "run"
    code = main(quick_run_argv(tiny_model_dir, small_pairs, run))
    assert_user_error(code, capsys.readouterr().err, "adapt_layers: block 3")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_overwrite_is_undone_by_the_next_command(finished_run, tmp_path, capsys):
    """A kill after the previous run was set aside, before the new one passed its checks:
    the next tli command in the directory puts the previous run back."""
    from tli.io import SetAside

    run = tmp_path / "runB"
    shutil.copytree(finished_run, run)
    before = tree(run)
    SetAside(run, keep=("run.lock",))  # what --overwrite does first ...
    (run / "config.toml").write_text("# the new run's config\n")  # ... then it is killed
    (run / "run.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "elsewhere"}))
    assert main(["run", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "restored the run that an interrupted --overwrite had set aside" in err
    assert tree(run) == before


def test_set_aside_restores_or_discards_whole(tmp_path):
    from tli.io import ASIDE, SetAside, recover_aside

    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_text("old")
    (d / "sub" / "b").write_text("old")
    (d / "run.lock").write_text("lock")
    aside = SetAside(d, keep=("run.lock",))
    assert sorted(p.name for p in d.iterdir()) == sorted([ASIDE, "run.lock"])
    (d / "a.json").write_text("new")
    aside.restore()
    assert (d / "a.json").read_text() == "old" and (d / "sub" / "b").read_text() == "old"
    assert not (d / ASIDE).exists() and (d / "run.lock").read_text() == "lock"
    aside = SetAside(d, keep=("run.lock",))
    (d / "a.json").write_text("new")
    aside.discard()
    assert sorted(p.name for p in d.iterdir()) == ["a.json", "run.lock"]
    assert (d / "a.json").read_text() == "new"
    assert recover_aside(d) is False  # nothing set aside


# --- resuming with a changed config -----------------------------------------------------------


def test_each_stage_records_the_settings_it_ran_with(finished_run):
    from tli.pipeline.runner import config_hash, stage_config

    record = json.loads((finished_run / "run.json").read_text())
    cfg = load_run_config(finished_run / "config.toml")
    for stage in ("pairs", "scan", "train", "evaluate", "probe", "figures", "report"):
        rec = record["stages"][stage]
        assert rec["config"] == stage_config(cfg, stage), stage
        assert rec["config_sha256"] == config_hash(stage_config(cfg, stage))


def test_resume_refuses_a_config_changed_under_a_finished_stage(finished_run, tmp_path, capsys):
    """lr and epochs edited, eval/ deleted: the resume would report an adapter trained with
    other settings than the ones it prints. It refuses, naming the keys; --rerun-changed
    re-runs training and every stage after it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    text = (run / "config.toml").read_text()
    text = text.replace("lr = 0.0002", "lr = 0.001").replace("epochs = 1", "epochs = 2")
    (run / "config.toml").write_text(text)
    shutil.rmtree(run / "eval")
    scan_before = (run / "scan" / "scan.json").read_bytes()
    code = main(["run", "--resume", str(run)])
    assert_user_error(code, capsys.readouterr().err, "config.toml changed since stage 'train'",
                      "[train] epochs 1 -> 2", "[train] lr 0.0002 -> 0.001", "--rerun-changed")
    assert not (run / "eval").exists()
    assert main(["run", "--resume", str(run), "--rerun-changed"]) == 0
    err = capsys.readouterr().err
    assert "re-running train, evaluate, probe, figures, report" in err
    trained = json.loads((run / "train" / "train.json").read_text())["config"]["train"]
    assert (trained["lr"], trained["epochs"]) == (0.001, 2)
    assert (run / "scan" / "scan.json").read_bytes() == scan_before  # unchanged: not re-run
    assert main(["run", "--resume", str(run)]) == 0  # now consistent


def test_resume_refuses_settings_changed_under_an_unfinished_training(finished_run, tmp_path,
                                                                      capsys):  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    record = json.loads((run / "run.json").read_text())
    for stage in ("train", "evaluate", "probe", "figures", "report"):
        record["stages"].pop(stage)
    (run / "run.json").write_text(json.dumps(record))
    (run / "train" / "train.json").unlink()
    text = (run / "config.toml").read_text().replace("margin = 0.4", "margin = 0.3")
    (run / "config.toml").write_text(text)
    code = main(["run", "--resume", str(run)])
    assert_user_error(code, capsys.readouterr().err, "[train] margin 0.4 -> 0.3")
    assert main(["run", "--resume", str(run), "--rerun-changed"]) == 0
    trained = json.loads((run / "train" / "train.json").read_text())["config"]["train"]
    assert trained["margin"] == 0.3



def test_a_resume_needs_no_original_pair_file(finished_run, tmp_path, monkeypatch):
    """Once the pairs stage is done, a resume checks (and trains on) the run's own copy."""
    import tli.pipeline.runner

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "report.html").unlink()

    def gone(cfg):
        raise AssertionError("the original pair file was read")

    monkeypatch.setattr(tli.pipeline.runner, "load_sets", gone)
    assert main(["run", "--resume", str(run)]) == 0
    assert (run / "report.html").is_file()

# --- locks and file modes ---------------------------------------------------------------------


def test_every_file_a_run_writes_has_ordinary_modes(finished_run):
    """What a plain open() or mkdir() would give: no 0600 adapter weights, no 0700 folders."""
    from tli.io import current_umask

    mask = current_umask()
    for path in [finished_run, *finished_run.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))


# --- run config paths -------------------------------------------------------------------------


def test_run_config_paths_are_absolute(capsys, monkeypatch, tmp_path, inputs, tiny_model_dir):
    """A run started with relative paths records absolute ones (config.toml re-runs anywhere)."""
    import tli.pipeline.runner
    from tli.pipeline.config import load_run_config

    class Stop(Exception):
        pass

    def stop(self):
        raise Stop

    monkeypatch.setattr(tli.pipeline.runner.Runner, "run", stop)
    monkeypatch.chdir(tmp_path)
    shutil.copy(inputs / "pairs.tsv", "pairs.tsv")
    shutil.copy(inputs / "split.tsv", "control.tsv")
    os.symlink(tiny_model_dir, "model")
    Path("home.txt").write_text("Nyumba yetu ni ndogo.\n", encoding="utf-8")
    Path("food.txt").write_text("Chakula ni tayari.\n", encoding="utf-8")
    with pytest.raises(Stop):
        main(["run", "--model", "model", "--pairs", "pairs.tsv", "--set",
              'pairs.control="control.tsv"', "--set", "pairs.allow_overlap=true", "--set",
              'evaluate.texts=["Home=home.txt", "food.txt"]', "--out", "rel"])  # fmt: skip
    cfg = load_run_config(tmp_path / "rel" / "config.toml")
    assert cfg.evaluate.texts == (f"Home={tmp_path / 'home.txt'}", f"food={tmp_path / 'food.txt'}")
    # a missing text file stops a run before its directory exists
    code = main(["run", "--model", "model", "--pairs", "pairs.tsv", "--set",
                 'evaluate.texts=["gone.txt"]', "--out", "never"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "gone.txt: " in err and "no such file" in err
    assert not Path("never").exists()
    assert cfg.pairs.file == str(tmp_path / "pairs.tsv")
    assert cfg.pairs.control == str(tmp_path / "control.tsv")
    assert cfg.model.name == str(Path(tiny_model_dir).resolve())
    for value in (cfg.pairs.file, cfg.pairs.control, cfg.model.name):
        assert Path(value).is_absolute()


# --- concurrency ------------------------------------------------------------------------------
# test_a_live_lock_refuses_and_a_stale_lock_is_taken_over (above) checks the lock against a
# live and a dead process id; the tests below use real tli processes.


def _grab_lock(run_dir, barrier, results):
    from tli.errors import TLIError
    from tli.lock import acquire_lock

    barrier.wait()
    try:
        acquire_lock(Path(run_dir))
        results.put("took")
        time.sleep(1.5)  # hold it (alive) while the others look
    except TLIError as err:
        results.put(f"refused: {err}")
    results.close()
    results.join_thread()
    os._exit(0)  # leave the lock behind, as a killed run would


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_many_processes_racing_for_a_stale_lock_let_exactly_one_in(tmp_path):
    import multiprocessing
    import socket

    stale = {"pid": 2**22 + 12345, "host": socket.gethostname()}  # above Linux's pid_max
    (tmp_path / "run.lock").write_text(json.dumps(stale))
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_grab_lock, args=(tmp_path, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes.count("took") == 1, outcomes
    assert all(
        o.startswith("refused: ") and "another tli run" in o for o in outcomes if o != "took"
    )


# --- whole runs: interruption, concurrency, repetition (slow) ---------------------------------

#: Settings of every whole run below: small, seeded, with checkpoints every 2 steps.
RUN_SETTINGS = ["--set", "train.epochs=2", "--set", "train.batch_size=4",
                "--set", "train.save_every=2", "--set", "figures.tsne_pairs=4",
                "--set", "scan.n_boot=100", "--set", "evaluate.n_boot=100"]  # fmt: skip

#: Runs `tli` like its console script; TLI_TEST_PAUSE="stage:seconds,..." sleeps before a
#: stage (for "report": between report.md and report.html; for "step": in each training step)
#: to widen a kill window. Sleeping changes no result.
WRAPPER = r"""
import os, sys, time
pauses = dict(i.split(":") for i in os.environ.get("TLI_TEST_PAUSE", "").split(",") if i)
if pauses:
    import tli.report, tli.pipeline.runner
    def slowed(fn, seconds):
        def wrapper(*args, **kwargs):
            time.sleep(float(seconds))
            return fn(*args, **kwargs)
        return wrapper
    for stage in ("pairs", "scan", "train", "evaluate", "figures"):
        if stage in pauses:
            name = "_" + stage
            runner = tli.pipeline.runner.Runner
            setattr(runner, name, slowed(getattr(runner, name), pauses[stage]))
    if "report" in pauses:
        tli.report.build_html = slowed(tli.report.build_html, pauses["report"])
    if "step" in pauses:
        import tli.train
        tli.train.batch_gold = slowed(tli.train.batch_gold, pauses["step"])
from tli.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_argv(model_dir, pairs, out):
    return ["run", "--model", str(model_dir), "--pairs", str(pairs), "--out", str(out),
            *RUN_SETTINGS]  # fmt: skip


def start(argv, tmp_path, pause=""):
    """Start `tli ARGV` as a process (stdout and stderr to files)."""
    log = tmp_path / f"proc-{time.monotonic_ns()}"
    env = {**python_env(), "TLI_TEST_PAUSE": pause}
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *map(str, argv)],
                                stdout=out, stderr=err, env=env)  # fmt: skip
    proc.stderr_path = Path(f"{log}.err")
    return proc


def kill_when(proc, ready, timeout=600.0):
    """SIGKILL ``proc`` as soon as ``ready()``; polls every 2 ms. Returns when it is dead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the process ended (code {proc.returncode}) before the kill point: "
                + proc.stderr_path.read_text()
            )
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL  # killed, not finished
            return
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the kill point never came: " + proc.stderr_path.read_text())


def assert_every_file_whole(run_dir: Path) -> None:
    """Every visible file in a run directory parses or loads; temporaries are hidden."""
    import tomllib
    import torch

    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if any(is_leftover(part) for part in rel.parts):
            continue  # a killed writer's temporary: never a result name
        assert not path.name.endswith(".tmp"), rel
        if path.is_dir():
            continue
        data = path.read_bytes()
        if path.suffix == ".json" or path.name == "run.lock":
            json.loads(data)
        elif path.suffix == ".toml":
            tomllib.loads(data.decode("utf-8"))
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".png":
            assert data.startswith(PNG_MAGIC) and data.endswith(b"IEND\xaeB`\x82"), rel
        elif path.suffix == ".tsv":
            read_pairs(path)
        elif path.suffix == ".csv":
            assert data.endswith(b"\n") and len(data.splitlines()) >= 2, rel
        elif path.suffix == ".html":
            assert data.rstrip().endswith(b"</html>"), rel
        elif path.name == "latest":
            assert (path.parent / data.decode().strip() / "state.pt").is_file(), rel
        else:
            data.decode("utf-8")
    pointer = run_dir / "train" / "checkpoints" / "latest"
    if pointer.is_file():
        assert (
            pointer.parent / pointer.read_text().strip() / "adapter_model.safetensors"
        ).is_file()


VOLATILE = {"timings", "seconds", "steps_per_second", "time", "since"}


def stable(obj, run_dir):
    """A results JSON without timings, timestamps and the run directory's own path."""
    if isinstance(obj, dict):
        return {k: stable(v, run_dir) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [stable(v, run_dir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(run_dir), "<run>")
    return obj


def results_of(run_dir: Path) -> dict:
    out = {}
    for name in ("scan/scan.json", "eval/evaluation.json", "train/train.json", "run.json",
                 "pairs/summary.json"):  # fmt: skip
        out[name] = stable(json.loads((run_dir / name).read_text()), run_dir)
    for name in ("scan/scan.csv", "eval/pairs.csv", "train/train_log.csv", "pairs/pairs.tsv"):
        out[name] = (run_dir / name).read_text()
    out["adapter"] = load_file(run_dir / "train" / "final" / "adapter_model.safetensors")
    return out


def assert_same_results(a: dict, b: dict, *, ignore: tuple[str, ...] = ()) -> None:
    import torch

    wa, wb = a.pop("adapter"), b.pop("adapter")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    for name in a:
        x, y = a[name], b[name]
        if name == "run.json":
            for key in ignore:  # facts about how a stage ran (e.g. after a resume), not results
                for record in (x, y):
                    for facts in record["stages"].values():
                        facts.pop(key, None)
        assert x == y, f"{name}: {_difference(x, y)}"


def _difference(x, y, where=""):
    """The first place where two JSON-like values differ, for the failure message."""
    if isinstance(x, dict) and isinstance(y, dict):
        for key in sorted(x.keys() | y.keys()):
            if x.get(key) != y.get(key):
                return _difference(x.get(key), y.get(key), f"{where}.{key}")
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            if a != b:
                return _difference(a, b, f"{where}[{i}]")
    return f"{where}: {x!r:.300} != {y!r:.300}"


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, inputs, tmp_path_factory):
    """An uninterrupted run (in this process) that the others are compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(run_argv(tiny_model_dir, inputs / "pairs.tsv", out)) == 0
    return out


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_results(reference_run, tiny_model_dir, inputs,
                                                    tmp_path):  # fmt: skip
    again = tmp_path / "again"
    assert main(run_argv(tiny_model_dir, inputs / "pairs.tsv", again)) == 0
    assert_same_results(results_of(reference_run), results_of(again))
    # The figures are drawn from those results, seeded: the same pictures.
    for png in sorted((reference_run / "figures").glob("*.png")):
        assert png.read_bytes() == (again / "figures" / png.name).read_bytes(), png.name


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_results(
    reference_run, tiny_model_dir, inputs, tmp_path
):
    run = tmp_path / "killed"
    report = run / "report.html"

    # 1. Between stages: the scan is written, training has not started.
    proc = start(run_argv(tiny_model_dir, inputs / "pairs.tsv", run), tmp_path, pause="train:2")
    kill_when(proc, lambda: (run / "scan" / "scan.json").is_file())
    assert not (run / "train").exists() and not report.exists()
    assert_every_file_whole(run)

    # 2. During training: a checkpoint exists, the final adapter does not.
    proc = start(["run", "--resume", run], tmp_path, pause="step:0.05")
    kill_when(
        proc,
        lambda: (
            (run / "train" / "checkpoints" / "latest").is_file()
            and not (run / "train" / "final").exists()
        ),
    )
    assert "taking over a stale lock" in proc.stderr_path.read_text()
    assert not (run / "train" / "train.json").exists() and not report.exists()
    assert_every_file_whole(run)

    # 3. While writing the report: report.md is written, report.html is not.
    proc = start(["run", "--resume", run], tmp_path, pause="report:3")
    kill_when(proc, lambda: (run / "report.md").is_file())
    assert (run / "figures" / "figures.json").is_file() and not report.exists()
    assert_every_file_whole(run)

    # 4. Resume to the end.
    assert main(["run", "--resume", str(run)]) == 0
    assert report.is_file() and not (run / "run.lock").exists()
    assert_every_file_whole(run)
    assert not [p for p in run.rglob(".*") if is_leftover(p.name)]
    record = json.loads((run / "run.json").read_text())
    assert record["stages"]["train"]["resumed"] is True  # training continued from a checkpoint
    assert_same_results(results_of(reference_run), results_of(run),
                        ignore=("resumed", "base_vectors_reused"))  # fmt: skip


@pytest.mark.slow
def test_a_kill_between_a_stage_and_its_record_reruns_the_stage(reference_run, tmp_path):
    """train/train.json written, run.json not yet updated: the resume re-runs training (from
    its last checkpoint, to the same adapter) instead of leaving run.json without it."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    record = json.loads((run / "run.json").read_text())
    for stage in ("train", "evaluate", "figures", "report"):
        record["stages"].pop(stage)
    (run / "run.json").write_text(json.dumps(record))
    (run / "report.html").unlink()
    before = results_of(reference_run)
    assert main(["run", "--resume", str(run)]) == 0
    after = json.loads((run / "run.json").read_text())
    assert {"layer", "layer_source", "seconds"} <= after["stages"]["train"].keys()
    assert (run / "report.html").is_file()
    assert_same_results(before, results_of(run), ignore=("resumed", "base_vectors_reused"))


@pytest.mark.slow
def test_a_second_run_into_a_live_run_directory_refuses(run_cli, tiny_model_dir, inputs, tmp_path):
    run = tmp_path / "busy"
    argv = run_argv(tiny_model_dir, inputs / "pairs.tsv", run)
    first = start(argv, tmp_path, pause="scan:120")  # holds the lock, waits before its scan
    try:
        deadline = time.monotonic() + 300
        while not (run / "pairs" / "summary.json").is_file():
            assert first.poll() is None, first.stderr_path.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        needle = f"another tli run (pid {first.pid}) is using this directory"
        second = subprocess.run(
            [sys.executable, "-c", WRAPPER, *argv],
            capture_output=True, text=True, env=python_env(), timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and needle in second.stderr
        for other in (["run", "--resume", run], [*argv, "--overwrite"]):
            code, _, err = run_cli(*other)
            assert_user_error(code, err, needle)
        # --overwrite deleted nothing of the live run:
        assert (run / "config.toml").is_file() and (run / "pairs" / "pairs.tsv").is_file()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


# --- fuzzing ----------------------------------------------------------------------------------

FIELDS = sorted({f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)})
NAMES = st.sampled_from([*SECTIONS, "preset", "pooling", *FIELDS]) | st.text(max_size=8)
SCALARS = (
    st.booleans()
    | st.integers(-3, 70)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(-3, 3)
    | st.floats()
    | st.sampled_from(["paper", "mean", "mean_all", "last", "cosine", "q_proj", "final", "cpu"])
    | st.text(max_size=12)
    | st.datetimes()
    | st.dates()
    | st.times()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)
SECTION = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), VALUES, max_size=6)
CONFIGS = st.dictionaries(NAMES, SECTION | VALUES, max_size=5)
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)


def _check_config(*layers):
    try:
        cfg = resolve_config(*layers)
    except TLIError:
        return
    # A config that resolves writes a config.toml that resolves to the same config.
    assert resolve_config(_toml_loads(to_toml(cfg))) == cfg


@FUZZ
@given(layers=st.lists(CONFIGS, min_size=1, max_size=3))
def test_fuzz_resolve_config_gives_a_config_or_tlierror(layers):
    _check_config(*layers)


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
       raw=st.binary(max_size=60))  # fmt: skip
def test_fuzz_read_toml_gives_a_dict_or_tlierror(text, raw):
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("text.toml", text.encode("utf-8", "surrogatepass")), ("raw.toml", raw)):
            path = Path(tmp) / name
            path.write_bytes(data)
            try:
                loaded = read_toml(path)
            except TLIError as err:
                assert str(path) in str(err)
                continue
            assert isinstance(loaded, dict)
            _check_config(loaded)


@FUZZ
@given(items=st.lists(st.text(max_size=30) | st.sampled_from(["train.epochs=3", "pooling=mean",
       "train.lr=1e-3", "a.b.c=1", "=1", "train=5", "preset=[1]", "scan.seed=1.5"]),
       max_size=5))  # fmt: skip
def test_fuzz_set_options_give_a_config_or_tlierror(items):
    try:
        layer = parse_set(items)
    except TLIError:
        return
    _check_config(layer)
