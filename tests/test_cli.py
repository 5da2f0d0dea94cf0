"""The `tli` command (the ``tli.cli`` package): every command under bad input, the one-line error
contract on the real console, internal bugs, fuzzed arguments, and the generated reference docs.

``docs/reliability.md`` lists each failure mode with the test that shows it. A user error is one
``tli: error:`` line naming the file or option, exit code 2, no traceback; an internal bug keeps
its traceback and exits 1.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tli.cli import main
from tli.cli.reference import config_reference

from conftest import (
    FUZZ_EXAMPLES,
    ROOT,
    assert_one_line_error,
    assert_user_error,
    python_env,
)


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "tli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("embed", "pairs", "train"):
        assert command in out


def test_threads_option_and_environment_set_torch_threads(run_cli, monkeypatch, tmp_path):
    import torch

    before = torch.get_num_threads()
    lexicon = ROOT / "src/tli/data/lexicon.tsv"
    try:
        assert run_cli("--threads", "1", "pairs", "check", lexicon)[0] == 0
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("TLI_THREADS", "2")
        assert run_cli("pairs", "check", lexicon)[0] == 0
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("TLI_THREADS", "many")
        code, _, err = run_cli("pairs", "check", lexicon)
        assert_one_line_error(code, err, "TLI_THREADS: not an integer: 'many'")
        code, _, err = run_cli("--threads", "0", "pairs", "check", "x.tsv")
        assert_one_line_error(code, err, "--threads", "must be >= 1")
    finally:
        torch.set_num_threads(before)


def test_embed_writes_vectors(run_cli, tiny_model_dir, tmp_path):
    out_file = tmp_path / "v.safetensors"
    code, out, _ = run_cli(
        "embed",
        "--model",
        str(tiny_model_dir),
        "--layers",
        "0,2,final",
        "mtoto",
        "child",
        "--out",
        str(out_file),
    )
    assert code == 0
    assert "(L=3, B=2, D=32)" in out
    assert load_file(out_file)["vectors"].shape == (3, 2, 32)


def test_embed_reads_a_file(run_cli, tiny_model_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("mtoto\nchild\nkitabu\n", encoding="utf-8")
    code, out, _ = run_cli(
        "embed",
        "--model",
        str(tiny_model_dir),
        "--layers",
        "1",
        "--file",
        str(words),
        "--out",
        str(tmp_path / "v.safetensors"),
    )
    assert code == 0 and "(L=1, B=3, D=32)" in out


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--model", "no-such-model", "x"], ["no-such-model", "not an embedded name"]),
        (["--model", "./missing/dir", "x"], ["./missing/dir"]),
        (["--model", "{model}", "--layers", "9", "x"], ["layer 9 is outside 0..4"]),
        (["--model", "{model}", "x", "   "], ["empty or whitespace-only"]),
        (["--model", "{model}", "--device", "cuda", "x"], ["CUDA is not available"]),
        (["--model", "{model}", "--file", "/nonexistent/words.txt"], ["no such file"]),
        (["--model", "{model}", "--batch-size", "0", "x"], ["--batch-size"]),
    ],
)
def test_embed_bad_input(run_cli, tiny_model_dir, tmp_path, argv, needles):
    import torch

    if torch.cuda.is_available() and any("CUDA" in n for n in needles):
        pytest.skip("this machine has CUDA")
    argv = [a.replace("{model}", str(tiny_model_dir)) for a in argv]
    code, _, err = run_cli("embed", *argv, "--out", str(tmp_path / "v.safetensors"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "v.safetensors").exists()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tli", "embed", "--model", "no-such-model", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# --- bad input: every command -----------------------------------------------------------------

#: (argv template, words the one error line must contain). ``{out}`` is a fresh path that must
#: still not exist afterwards: nothing is written when the input is bad.
BAD_INPUT = {
    # tli run
    "run-config-missing": ("run --config {d}/nope.toml --out {out}",
                           ["nope.toml", "no such file"]),
    "run-config-unreadable": ("run --config {d}/dir.toml --out {out}",
                              ["dir.toml", "cannot read"]),
    "run-config-not-utf8": ("run --config {d}/latin1.toml --out {out}",
                            ["latin1.toml", "cannot read"]),
    "run-config-bad-toml": ("run --config {d}/bad.toml --out {out}",
                            ["bad.toml", "bad TOML", "line 1"]),
    "run-config-unknown-key": ("run --config {d}/unknown_key.toml --out {out}",
                               ["unknown_key.toml", "[train] unknown key 'nope'"]),
    "run-config-unknown-section": ("run --config {d}/unknown_section.toml --out {out}",
                                   ["unknown_section.toml", "unknown key or section 'extra'"]),
    "run-config-wrong-type": ("run --config {d}/wrong_type.toml --out {out}",
                              ["wrong_type.toml", "[train] epochs must be an integer, got 'thr"]),
    "run-config-unknown-preset": ("run --config {d}/unknown_preset.toml --out {out}",
                                  ["unknown_preset.toml", "unknown preset 'nope'"]),
    "run-config-unknown-pooling": ("run --config {d}/bad_pooling.toml --out {out}",
                                   ["bad_pooling.toml", "pooling must be one of"]),
    "run-set-unknown-key": ("run --model {model} --set train.nope=1 --out {out}",
                            ["[train] unknown key 'nope'"]),
    "run-set-malformed": ("run --model {model} --set train.epochs --out {out}",
                          ["--set 'train.epochs'", "expected section.key=value"]),
    "run-unknown-preset": ("run --preset nope --out {out}",
                           ["unknown preset 'nope'; known: paper"]),
    "run-unknown-model": ("run --model no-such-model --pairs {d}/pairs.tsv --out {out}",
                          ["'no-such-model'", "not an embedded name"]),
    "run-model-dir-missing": ("run --model {d}/missing --pairs {d}/pairs.tsv --out {out}",
                              ["missing", "not an embedded name"]),
    "run-model-dir-without-config": ("run --model {d}/adir --pairs {d}/pairs.tsv --out {out}",
                                     ["adir", "no config.json"]),
    "run-unknown-pooling": ("run --model {model} --set pooling=max --out {out}",
                            ["pooling must be one of mean, mean_all, last, got 'max'"]),
    "run-pairs-missing": ("run --model {model} --pairs {d}/nope.tsv --out {out}",
                          ["nope.tsv", "cannot read"]),
    "run-pairs-unreadable": ("run --model {model} --pairs {d}/dir.tsv --out {out}",
                             ["dir.tsv", "cannot read"]),
    "run-pairs-bad-json": ("run --model {model} --pairs {d}/bad.json --out {out}",
                           ["bad.json", "bad JSON at line 2"]),
    "run-pairs-bad-csv": ("run --model {model} --pairs {d}/bad.csv --out {out}",
                          ["bad.csv", "bad CSV"]),
    "run-pairs-missing-field": ("run --model {model} --pairs {d}/nofield.json --out {out}",
                                ["nofield.json", "record 1", 'missing field "english"']),
    "run-pairs-empty-list": ("run --model {model} --pairs {d}/empty.json --out {out}",
                             ["empty.json", "no pairs"]),
    "run-pairs-one-pair": ("run --model {model} --pairs {d}/one.tsv --out {out}",
                           ["one.tsv", "need at least 2 trained and 2 control pairs, got 1 and 0"]),
    "run-layer-out-of-range": ("run --model {model} --set train.layer=9 --out {out}",
                               ["[train] layer must be in 1..4", "got 9", "has 4 layers"]),
    "run-layer-zero": ("run --model {model} --set train.layer=0 --out {out}",
                       ["[train] layer must be in 1..4", "got 0"]),
    "run-loss-layer-out-of-range": (
        "run --model {model} --set train.layer=2 --set train.loss_layers=[2,9] --out {out}",
        ["loss_layers: layer 9 is outside 1..4"]),
    "run-batch-size": ("run --model {model} --set train.batch_size=1 --out {out}",
                       ["[train] batch_size must be >= 2"]),
    "run-scan-batch-size": ("run --model {model} --set scan.batch_size=0 --out {out}",
                            ["[scan] batch_size must be an integer >= 1"]),
    "run-eval-batch-size": ("run --model {model} --set evaluate.batch_size=0 --out {out}",
                            ["[evaluate] batch_size must be an integer >= 1"]),
    "run-epochs": ("run --model {model} --set train.epochs=0 --out {out}",
                   ["[train] epochs must be >= 1, got 0"]),
    "run-epochs-not-integer": ("run --model {model} --set train.epochs=1.5 --out {out}",
                               ["[train] epochs must be an integer, got 1.5"]),
    "run-lr-negative": ("run --model {model} --set train.lr=-1e-4 --out {out}",
                        ["[train] lr must be > 0.0"]),
    "run-lr-too-large": ("run --model {model} --set train.lr=2.0 --out {out}",
                         ["[train] lr must be <= 1.0"]),
    "run-lr-nan": ("run --model {model} --set train.lr=nan --out {out}",
                   ["[train] lr must be a number, got nan"]),
    "run-margin-negative": ("run --model {model} --set train.margin=-0.1 --out {out}",
                            ["[train] margin must be >= 0.0"]),
    "run-margin-too-large": ("run --model {model} --set train.margin=3 --out {out}",
                             ["[train] margin must be <= 2.0"]),
    "run-control-fraction": ("run --model {model} --set pairs.control_fraction=0.95 --out {out}",
                             ["pairs.control_fraction must be <= 0.9"]),
    "run-out-is-a-file": ("run --model {model} --pairs {d}/pairs.tsv --out {d}/afile",
                          ["afile", "exists and is not a directory"]),
    "run-out-under-a-file": ("run --model {model} --pairs {d}/pairs.tsv --out {d}/afile/run",
                             ["afile/run", "is not a directory"]),
    "run-out-foreign-directory": ("run --model {model} --pairs {d}/pairs.tsv --out {d}/notrun",
                                  ["notrun", "not a tli run directory"]),
    "run-resume-missing": ("run --resume {d}/nope", ["nope", "not a tli run directory"]),
    "run-report-to-unknown": ("run --model {model} --report-to neptune --out {out}",
                              ["[train] report_to must be one of none, tensorboard, mlflow"]),
    "run-src-lang-empty": ("run --model {model} --src-lang ' ' --out {out}",
                           ["pairs.src_lang must be a language name"]),
    "run-resume-not-a-run": ("run --resume {d}/notrun", ["notrun", "not a tli run directory"]),
    "run-resume-with-options": ("run --resume {d}/notrun --set train.epochs=3",
                                ["--resume DIR continues the run with its saved config"]),
    # tli pairs check / split
    # round 2: checked before anything is written or deleted
    "run-set-empty-key": ("run --model {model} --set train.=1 --out {out}",
                          ["--set 'train.=1'", "expected section.key=value"]),
    "run-set-blamed-on-the-command-line": (
        "run --config {d}/ok.toml --model {model} --set train.nope=1 --out {out}",
        ["command line: [train] unknown key 'nope'"]),
    "run-select-on-typo": ("run --model {model} --set scan.select_on=contrl --out {out}",
                           ["[scan] select_on must be one of trained, control, got 'contrl'"]),
    "run-temperature-inf": ("run --model {model} --set train.temperature=inf --out {out}",
                            ["[train] temperature must be a finite number, got inf"]),
    "run-batch-size-huge": ("run --model {model} --set train.batch_size=1000000000 --out {out}",
                            ["[train] batch_size must be <= 65536"]),
    "run-seed-negative": ("run --model {model} --set evaluate.seed=-1 --out {out}",
                          ["[evaluate] seed must be an integer >= 0, got -1"]),
    "run-adapt-layers-outside": (
        "run --model {model} --pairs {d}/pairs.tsv --set train.adapt_layers='\"9\"' --out {out}",
        ["[train] adapt_layers: block 9 is outside 0..3"]),
    "run-adapt-layers-above-the-loss": (
        "run --model {model} --pairs {d}/pairs.tsv --set train.layer=2 "
        "--set train.adapt_layers='\"3\"' --out {out}",
        ["[train] adapt_layers: block 3 is at or above the deepest loss layer 2"]),
    "run-target-modules-unknown": (
        "run --model {model} --pairs {d}/pairs.tsv --set train.target_modules='[\"nope\"]' "
        "--out {out}", ["[train] target_modules nope: cannot add adapters"]),
    "run-no-negatives": ("run --model {model} --pairs {d}/same.tsv --out {out}",
                         ["same.tsv", "training has no negatives"]),
    "run-leakage": ("run --model {model} --pairs {d}/leaky.tsv --out {out}",
                    ["leaky.tsv", "1 control item(s) overlap the trained set",
                     "pairs.allow_overlap = true"]),
    "run-config-fifo": ("run --config {s}/fifo.toml --out {out}",
                        ["fifo.toml", "not a regular file"]),
    "run-pairs-fifo": ("run --model {model} --pairs {s}/fifo.tsv --out {out}",
                       ["fifo.tsv", "not a regular file"]),
    "run-resume-with-overwrite": ("run --resume {d}/notrun --overwrite",
                                  ["--resume continues a run and --overwrite replaces it"]),
    "run-rerun-changed-without-resume": ("run --model {model} --rerun-changed --out {out}",
                                         ["--rerun-changed goes with --resume DIR"]),
    "run-device-malformed": ("run --model {model} --set model.device=cuda:abc --out {out}",
                             ["[model] device must be cpu, cuda, cuda:N or auto, got 'cuda:abc'"]),
    "pairs-check-missing": ("pairs check {d}/nope.tsv", ["nope.tsv", "cannot read"]),
    "pairs-check-unreadable": ("pairs check {d}/dir.tsv", ["dir.tsv", "cannot read"]),
    "pairs-check-not-utf8": ("pairs check {d}/latin1.tsv", ["latin1.tsv", "line 2", "not UTF-8"]),
    "pairs-check-bad-json": ("pairs check {d}/bad.json", ["bad.json", "bad JSON at line 2"]),
    "pairs-check-bad-csv": ("pairs check {d}/bad.csv", ["bad.csv", "line 2", "bad CSV"]),
    "pairs-check-missing-field": ("pairs check {d}/nofield.json",
                                  ["nofield.json", 'missing field "english"']),
    "pairs-check-missing-column": ("pairs check {d}/nocolumn.tsv",
                                   ["nocolumn.tsv", 'missing column "english"']),
    "pairs-check-empty-list": ("pairs check {d}/empty.json", ["empty.json", "no pairs"]),
    "pairs-check-unknown-extension": ("pairs check {d}/afile",
                                      ["afile", "cannot tell the format"]),
    "pairs-check-unknown-format": ("pairs check {d}/pairs.tsv --format xml",
                                   ["--format", "invalid choice: 'xml'"]),
    "pairs-check-unknown-model": ("pairs check {d}/pairs.tsv --model no-such-model",
                                  ["'no-such-model'", "not an embedded name"]),
    "pairs-check-against-missing": ("pairs check {d}/pairs.tsv --against {d}/nope.tsv",
                                    ["nope.tsv", "cannot read"]),
    "pairs-check-fifo": ("pairs check {s}/fifo.tsv", ["fifo.tsv", "not a regular file"]),
    "pairs-check-dev-zero": ("pairs check --format tsv /dev/zero",
                             ["/dev/zero", "not a regular file"]),
    "pairs-check-too-large": ("pairs check {s}/huge.tsv", ["huge.tsv", "larger than 64 MiB"]),
    "pairs-check-duplicate-key-json": ("pairs check {d}/dup.json",
                                       ["dup.json", "record 1", 'field "english" appears twice']),
    "pairs-check-duplicate-key-jsonl": ("pairs check {d}/dup.jsonl",
                                        ["dup.jsonl", "line 2", 'field "swahili" appears twice']),
    "pairs-check-json-object": ("pairs check {d}/obj.json",
                                ["obj.json", "expected a JSON list of objects, found an object"]),
    "pairs-split-out-is-a-fifo": ("pairs split {d}/pairs.tsv --out {s}/fifo.tsv",
                                  ["fifo.tsv", "exists and is not a regular file"]),
    "pairs-split-seed-negative": ("pairs split {d}/pairs.tsv --seed -1 --out {out}.tsv",
                                  ["--seed must be an integer >= 0, got -1"]),
    "pairs-split-missing": ("pairs split {d}/nope.tsv --out {out}.tsv",
                            ["nope.tsv", "cannot read"]),
    "pairs-split-bad-json": ("pairs split {d}/bad.json --out {out}.tsv", ["bad.json", "bad JSON"]),
    "pairs-split-empty-list": ("pairs split {d}/empty.json --out {out}.tsv", ["no pairs"]),
    "pairs-split-one-pair": ("pairs split {d}/one.tsv --out {out}.tsv",
                             ["one.tsv", "1 pair(s) leave no control pair"]),
    "pairs-split-fraction": ("pairs split {d}/pairs.tsv --control-fraction 1.5 --out {out}.tsv",
                             ["--control-fraction", "must be in [0, 1)"]),
    "pairs-split-out-not-tsv": ("pairs split {d}/pairs.tsv --out {out}.json",
                                ["give a .tsv file name"]),
    "pairs-split-out-is-a-directory": ("pairs split {d}/pairs.tsv --out {d}/dir.tsv",
                                       ["dir.tsv", "cannot write"]),
    "pairs-split-out-under-a-file": ("pairs split {d}/pairs.tsv --out {d}/afile/x.tsv",
                                     ["afile/x.tsv", "cannot write"]),
    "pairs-check-muse-line": ("pairs check {d}/de-en.txt",
                              ["de-en.txt", "line 2", "expected 2 whitespace-separated fields"]),
    "pairs-convert-unknown-extension": ("pairs convert {d}/pairs.tsv {out}.dat",
                                        ["out.dat", "cannot tell the format"]),
    "pairs-convert-muse-line": ("pairs convert {d}/de-en.txt {out}.json",
                                ["de-en.txt", "line 2", "found 4"]),
    # tli embed
    "embed-no-words": ("embed --model {model} --out {out}", ["no strings to embed"]),
    "embed-file-missing": ("embed --model {model} --file {d}/nope.txt --out {out}",
                           ["nope.txt", "no such file"]),
    "embed-file-unreadable": ("embed --model {model} --file {d}/adir --out {out}",
                              ["adir", "cannot read"]),
    "embed-file-not-utf8": ("embed --model {model} --file {d}/latin1.tsv --out {out}",
                            ["latin1.tsv", "cannot read"]),
    "embed-file-empty": ("embed --model {model} --file {d}/empty.txt --out {out}",
                         ["no strings to embed"]),
    "embed-file-blank-line": ("embed --model {model} --file {d}/blank_line.txt --out {out}",
                              ["blank_line.txt", "line 2", "empty"]),
    "embed-unknown-model": ("embed --model no-such-model --out {out} maji",
                            ["'no-such-model'", "not an embedded name"]),
    "embed-unknown-pooling": ("embed --model {model} --pooling max --out {out} maji",
                              ["--pooling", "invalid choice: 'max'"]),
    "embed-unknown-dtype": ("embed --model {model} --dtype int8 --out {out} maji",
                            ["--dtype", "invalid choice: 'int8'"]),
    "embed-layer-out-of-range": ("embed --model {model} --layers 0,9 --out {out} maji",
                                 ["layer 9 is outside 0..4"]),
    "embed-layer-negative": ("embed --model {model} --layers -1 --out {out} maji",
                             ["layer -1 is outside 0..4"]),
    "embed-layer-not-a-number": ("embed --model {model} --layers two --out {out} maji",
                                 ["layer 'two'", "expected an index 0..4"]),
    "embed-layer-empty-range": ("embed --model {model} --layers 3-1 --out {out} maji",
                                ["layer range '3-1' is empty"]),
    "embed-batch-size": ("embed --model {model} --batch-size 0 --out {out} maji",
                         ["--batch-size must be >= 1, got 0"]),
    "embed-out-is-a-directory": ("embed --model {model} --out {d}/adir maji",
                                 ["adir", "is a directory"]),
    "embed-out-under-a-file": ("embed --model {model} --out {d}/afile/v.safetensors maji",
                               ["afile", "not a directory"]),
    "embed-out-is-a-fifo": ("embed --model {model} --out {s}/fifo.tsv maji",
                            ["fifo.tsv", "exists and is not a regular file"]),
    # tli scan
    "scan-pairs-missing": ("scan --model {model} --pairs {d}/nope.tsv --out {out}",
                           ["nope.tsv", "cannot read"]),
    "scan-pairs-unreadable": ("scan --model {model} --pairs {d}/dir.tsv --out {out}",
                              ["dir.tsv", "cannot read"]),
    "scan-pairs-bad-json": ("scan --model {model} --pairs {d}/bad.json --out {out}",
                            ["bad.json", "bad JSON"]),
    "scan-pairs-bad-csv": ("scan --model {model} --pairs {d}/bad.csv --out {out}",
                           ["bad.csv", "bad CSV"]),
    "scan-pairs-missing-field": ("scan --model {model} --pairs {d}/nofield.json --out {out}",
                                 ["nofield.json", 'missing field "english"']),
    "scan-pairs-empty-list": ("scan --model {model} --pairs {d}/empty.json --out {out}",
                              ["empty.json", "no pairs"]),
    "scan-pairs-one-pair": ("scan --model {model} --pairs {d}/one.tsv --out {out}",
                            ["one.tsv", "set 'trained' has 1 pair"]),
    "scan-control-missing": (
        "scan --model {model} --pairs {d}/pairs.tsv --control {d}/nope.tsv --out {out}",
        ["nope.tsv", "cannot read"]),
    "scan-unknown-model": ("scan --model no-such-model --pairs {d}/pairs.tsv --out {out}",
                           ["'no-such-model'", "not an embedded name"]),
    "scan-unknown-pooling": ("scan --model {model} --pairs {d}/pairs.tsv --pooling max --out {out}",
                             ["--pooling", "'max' is not one of"]),
    "scan-unknown-rule": ("scan --model {model} --pairs {d}/pairs.tsv --select-by loss --out {out}",
                          ["--select-by", "'loss' is not one of"]),
    "scan-batch-size": ("scan --model {model} --pairs {d}/pairs.tsv --batch-size 0 --out {out}",
                        ["batch_size must be an integer >= 1, got 0"]),
    "scan-level": ("scan --model {model} --pairs {d}/pairs.tsv --level 1.5 --out {out}",
                   ["level must be in (0, 1), got 1.5"]),
    "scan-out-is-a-file": ("scan --model {model} --pairs {d}/pairs.tsv --out {d}/afile",
                           ["afile", "exists and is not a directory"]),
    "scan-out-under-a-file": ("scan --model {model} --pairs {d}/pairs.tsv --out {d}/afile/s",
                              ["afile", "not a directory"]),
    # tli train
    "train-report-to-unknown": ("train --model {model} --pairs {d}/pairs.tsv --layer 2 "
                                "--report-to neptune --out {out}",
                                ["--report-to", "invalid choice: 'neptune'"]),
    "scan-select-on-typo": (
        "scan --model {model} --pairs {d}/pairs.tsv --select-on contrl --out {out}",
        ["--select-on", "'contrl' is not one of trained, control"]),
    "scan-existing-scan": ("scan --model {model} --pairs {d}/split.tsv --out {results}/scan",
                           ["scan", "already holds a scan (scan.json)", "--overwrite"]),
    "scan-leakage": ("scan --model {model} --pairs {d}/leaky.tsv --out {out}",
                     ["leaky.tsv", "overlap the trained set", "--allow-overlap"]),
    "scan-n-boot-huge": (
        "scan --model {model} --pairs {d}/pairs.tsv --n-boot 10000000 --out {out}",
        ["n_boot must be <= 1000000"]),
    "train-pairs-missing": ("train --model {model} --pairs {d}/nope.tsv --layer 2 --out {out}",
                            ["nope.tsv", "cannot read"]),
    "train-pairs-unreadable": ("train --model {model} --pairs {d}/dir.tsv --layer 2 --out {out}",
                               ["dir.tsv", "cannot read"]),
    "train-pairs-bad-json": ("train --model {model} --pairs {d}/bad.json --layer 2 --out {out}",
                             ["bad.json", "bad JSON"]),
    "train-pairs-bad-csv": ("train --model {model} --pairs {d}/bad.csv --layer 2 --out {out}",
                            ["bad.csv", "bad CSV"]),
    "train-pairs-missing-field": (
        "train --model {model} --pairs {d}/nofield.json --layer 2 --out {out}",
        ["nofield.json", 'missing field "english"']),
    "train-pairs-empty-list": ("train --model {model} --pairs {d}/empty.json --layer 2 --out {out}",
                               ["empty.json", "no pairs"]),
    "train-pairs-one-pair": ("train --model {model} --pairs {d}/one.tsv --layer 2 --out {out}",
                             ["training needs at least 2 pairs, got 1"]),
    "train-unknown-model": ("train --model no-such-model --layer 2 --out {out}",
                            ["'no-such-model'", "not an embedded name"]),
    "train-unknown-preset": ("train --model {model} --preset nope --layer 2 --out {out}",
                             ["unknown preset 'nope'"]),
    "train-unknown-pooling": ("train --model {model} --pooling max --layer 2 --out {out}",
                              ["pooling must be one of mean, mean_all, last, got 'max'"]),
    "train-unknown-loss": ("train --model {model} --loss nope --layer 2 --out {out}",
                           ["--loss", "'nope' is not one of"]),
    "train-layer-missing": ("train --model {model} --out {out}", ["--layer is required"]),
    "train-layer-out-of-range": ("train --model {model} --layer 9 --out {out}",
                                 ["layer must be in 1..4", "got 9"]),
    "train-layer-zero": ("train --model {model} --layer 0 --out {out}",
                         ["layer must be in 1..4", "got 0"]),
    "train-layer-negative": ("train --model {model} --layer -1 --out {out}",
                             ["layer must be >= 0, got -1"]),
    "train-layer-not-a-number": ("train --model {model} --layer two --out {out}",
                                 ["--layer", "'two' is not a valid int"]),
    "train-loss-layer-out-of-range": ("train --model {model} --layer 2 --loss-layers 9 --out {out}",
                                      ["loss_layers: layer 9 is outside 1..4"]),
    "train-batch-size": ("train --model {model} --layer 2 --batch-size 1 --out {out}",
                         ["batch_size must be >= 2", "got 1"]),
    "train-epochs": ("train --model {model} --layer 2 --epochs 0 --out {out}",
                     ["epochs must be >= 1, got 0"]),
    "train-lr-zero": ("train --model {model} --layer 2 --lr 0 --out {out}", ["lr must be > 0.0"]),
    "train-lr-too-large": ("train --model {model} --layer 2 --lr 5 --out {out}",
                           ["lr must be <= 1.0"]),
    "train-margin-negative": ("train --model {model} --layer 2 --margin -1 --out {out}",
                              ["margin must be >= 0.0"]),
    "train-margin-too-large": ("train --model {model} --layer 2 --margin 3 --out {out}",
                               ["margin must be <= 2.0"]),
    "train-lora-rank": ("train --model {model} --layer 2 --lora-r 0 --out {out}",
                        ["lora_r must be >= 1"]),
    "train-out-is-a-file": ("train --model {model} --layer 2 --pairs {d}/pairs.tsv --out {d}/afile",
                            ["afile", "exists and is not a directory"]),
    "train-out-under-a-file": (
        "train --model {model} --layer 2 --pairs {d}/pairs.tsv --out {d}/afile/t",
        ["afile/t", "not a directory"]),
    "train-resume-missing": ("train --resume {d}/nope", ["nope", "not a training directory"]),
    "train-resume-not-a-training-dir": ("train --resume {d}/adir",
                                        ["adir", "not a training directory"]),
    # tli evaluate
    "train-no-negatives": ("train --model {model} --layer 2 --pairs {d}/same.tsv --out {out}",
                           ["same.tsv", "training has no negatives"]),
    "train-leakage": ("train --model {model} --layer 2 --pairs {d}/leaky.tsv --out {out}",
                      ["leaky.tsv", "overlap the trained set", "--allow-overlap"]),
    "train-adapt-layers-outside": (
        "train --model {model} --layer 2 --adapt-layers 9 --out {out}",
        ["adapt_layers: block 9 is outside 0..3"]),
    "train-temperature-inf": ("train --model {model} --layer 2 --temperature inf --out {out}",
                              ["temperature must be a finite number, got inf"]),
    "train-batch-size-huge": ("train --model {model} --layer 2 --batch-size 1000000000 --out {out}",
                              ["batch_size must be <= 65536"]),
    "train-existing-run": ("train --model {model} --layer 2 --out {adapter}/..",
                           ["already holds a training run", "--resume"]),
    "train-pairs-fifo": ("train --model {model} --layer 2 --pairs {s}/fifo.tsv --out {out}",
                         ["fifo.tsv", "not a regular file"]),
    "evaluate-adapter-missing": ("evaluate --adapter {d}/nope --pairs {d}/split.tsv --out {out}",
                                 ["adapter", "nope", "no such directory"]),
    "evaluate-adapter-a-file": ("evaluate --adapter {d}/afile --pairs {d}/split.tsv --out {out}",
                                ["adapter", "afile", "is not a directory"]),
    "evaluate-adapter-empty-dir": ("evaluate --adapter {d}/adir --pairs {d}/split.tsv --out {out}",
                                   ["adir", "adapter_config.json is missing"]),
    "evaluate-adapter-corrupted": (
        "evaluate --adapter {corrupt} --pairs {d}/split.tsv --out {out}",
        ["adapter_model.safetensors is corrupted or unreadable"]),
    "evaluate-adapter-other-model": (
        "evaluate --adapter {adapter} --model {other} --pairs {d}/split.tsv --out {out}",
        ["was trained on model", "pass --model"]),
    "evaluate-unknown-model": (
        "evaluate --adapter {adapter} --model no-such-model --pairs {d}/split.tsv --out {out}",
        ["'no-such-model'", "not an embedded name"]),
    "evaluate-pairs-missing": ("evaluate --adapter {adapter} --pairs {d}/nope.tsv --out {out}",
                               ["nope.tsv", "cannot read"]),
    "evaluate-pairs-bad-json": ("evaluate --adapter {adapter} --pairs {d}/bad.json --out {out}",
                                ["bad.json", "bad JSON"]),
    "evaluate-pairs-bad-csv": ("evaluate --adapter {adapter} --pairs {d}/bad.csv --out {out}",
                               ["bad.csv", "bad CSV"]),
    "evaluate-pairs-missing-field": (
        "evaluate --adapter {adapter} --pairs {d}/nofield.json --out {out}",
        ["nofield.json", 'missing field "english"']),
    "evaluate-pairs-empty-list": ("evaluate --adapter {adapter} --pairs {d}/empty.json --out {out}",
                                  ["empty.json", "no pairs"]),
    "evaluate-pairs-one-pair": ("evaluate --adapter {adapter} --pairs {d}/one.tsv --out {out}",
                                ["one.tsv", "set 'trained' has 1 pair"]),
    "evaluate-unknown-pooling": (
        "evaluate --adapter {adapter} --pairs {d}/split.tsv --pooling max --out {out}",
        ["--pooling", "'max' is not one of"]),
    "evaluate-batch-size": (
        "evaluate --adapter {adapter} --pairs {d}/split.tsv --batch-size 0 --out {out}",
        ["batch_size must be an integer >= 1, got 0"]),
    "evaluate-level": ("evaluate --adapter {adapter} --pairs {d}/split.tsv --level 0 --out {out}",
                       ["level must be in (0, 1)"]),
    "evaluate-out-is-a-file": ("evaluate --adapter {adapter} --pairs {d}/split.tsv --out {d}/afile",
                               ["afile", "exists and is not a directory"]),
    "evaluate-out-under-a-file": (
        "evaluate --adapter {adapter} --pairs {d}/split.tsv --out {d}/afile/e",
        ["afile", "not a directory"]),
    # tli compare
    "compare-missing": ("compare {d}/nope --out {out}", ["nope", "no such directory"]),
    "compare-no-results": ("compare {d}/adir --out {out}",
                           ["adir", "neither a finished run", "nor a finished sweep cell"]),
    # tli plot
    "evaluate-existing-evaluation": (
        "evaluate --adapter {adapter} --pairs {d}/split.tsv --out {results}/eval",
        ["eval", "already holds an evaluation (evaluation.json)", "--overwrite"]),
    "evaluate-out-foreign-directory": (
        "evaluate --adapter {adapter} --pairs {d}/split.tsv --out {d}/notrun --overwrite",
        ["notrun", "holds no evaluation.json", "or to overwrite it"]),
    "evaluate-seed-negative": (
        "evaluate --adapter {adapter} --pairs {d}/split.tsv --seed -1 --out {out}",
        ["seed must be an integer >= 0, got -1"]),
    "evaluate-leakage": ("evaluate --adapter {adapter} --pairs {d}/leaky.tsv --out {out}",
                         ["leaky.tsv", "overlap the trained set", "--allow-overlap"]),
    "evaluate-adapter-renamed-tensors": (
        "evaluate --adapter {damaged}/renamed --pairs {d}/split.tsv --out {out}",
        ["renamed", "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight "
         "is missing", "loads completely or not at all"]),
    "evaluate-adapter-without-lora-b": (
        "evaluate --adapter {damaged}/no-lora-b --pairs {d}/split.tsv --out {out}",
        ["tensor base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight is missing"]),
    "evaluate-adapter-one-layer-missing": (
        "evaluate --adapter {damaged}/one-layer-missing --pairs {d}/split.tsv --out {out}",
        ["tensor base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight is missing"]),
    "evaluate-adapter-rank-mismatch": (
        "evaluate --adapter {damaged}/rank-mismatch --pairs {d}/split.tsv --out {out}",
        ["lora_A.weight has shape [16, 32], but its config and the model imply [8, 32]"]),
    "evaluate-adapter-bad-peft-type": (
        "evaluate --adapter {damaged}/bad-peft-type --pairs {d}/split.tsv --out {out}",
        ["adapter_config.json: peft_type 'NOPE' is not supported"]),
    # tli probe
    "evaluate-adapter-integer-weights": (
        "evaluate --adapter {damaged}/integer-weights --pairs {d}/split.tsv --out {out}",
        ["lora_A.weight holds int64 values; LoRA weights are floating point"]),
    "probe-out-holds-other-results": (
        "probe --adapter {adapter} --pairs {d}/split.tsv --out {results}/eval",
        ["eval", "holds no probe.json (it is not a probe)"]),
    "probe-adapter-one-layer-missing": (
        "probe --adapter {damaged}/one-layer-missing --pairs {d}/split.tsv --out {out}",
        ["layers.1.self_attn.q_proj.lora_A.weight is missing", "probed only in part"]),
    "probe-n-huge": ("probe --adapter {adapter} --pairs {d}/split.tsv --n 1000000 --out {out}",
                     ["n must be <= 65536"]),
    "plot-missing": ("plot {d}/nope", ["nope", "no such directory"]),
    "plot-a-file": ("plot {d}/afile", ["afile", "not a directory"]),
    "plot-no-results": ("plot {d}/adir", ["adir", "no results to plot"]),
}  # fmt: skip

#: The commands as docs/reliability.md names them, by the case ids' first word.
COMMANDS = ("run", "pairs", "embed", "scan", "train", "evaluate", "probe", "plot", "compare")


def _argv(template, **values):
    return [token.format(**values) for token in shlex.split(template)]


@pytest.mark.parametrize(("template", "needles"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_exit_2(
    run_cli, tmp_path, inputs, tiny_model_dir, other_model_dir, adapter, corrupt_adapter,
    special, damaged, results, template, needles,
):  # fmt: skip
    out = tmp_path / "out"
    argv = _argv(template, d=inputs, model=tiny_model_dir, other=other_model_dir, out=out,
                 adapter=adapter, corrupt=corrupt_adapter, s=special, damaged=damaged,
                 results=results)  # fmt: skip
    before = sorted(p.name for p in inputs.iterdir())
    code, _, err = run_cli(*argv)
    assert_user_error(code, err, *needles)
    assert not list(tmp_path.iterdir()), "bad input must leave nothing behind"
    assert sorted(p.name for p in inputs.iterdir()) == before


def test_every_command_has_bad_input_cases():
    from tli.cli import build_parser

    firsts = {case.split("-")[0] for case in BAD_INPUT}
    assert firsts == set(COMMANDS)
    assert {"pairs-check", "pairs-split"} <= {"-".join(c.split("-")[:2]) for c in BAD_INPUT}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(COMMANDS) <= set(sub.choices)


def test_one_pair_is_a_valid_pair_file(run_cli, inputs):
    code, out, _ = run_cli("pairs", "check", inputs / "one.tsv")
    assert code == 0 and "1" in out


def test_the_adapter_fixture_is_good(capsys, adapter, tiny_model_dir, inputs, tmp_path):
    """The evaluate cases fail for their stated reason, not because the adapter is bad."""
    from tli.adapters import read_adapter

    info = read_adapter(adapter)
    assert info.base_model == str(tiny_model_dir)


#: command -> argv template whose --out (or output) lies in the directory {locked}.
UNWRITABLE = {
    "run": "run --model {model} --pairs {d}/pairs.tsv --out {locked}",
    "pairs-split": "pairs split {d}/pairs.tsv --out {locked}/split.tsv",
    "embed": "embed --model {model} --out {locked}/v.safetensors maji",
    "scan": "scan --model {model} --pairs {d}/pairs.tsv --out {locked}",
    "train": "train --model {model} --pairs {d}/pairs.tsv --layer 2 --out {locked}",
    "evaluate": "evaluate --adapter {adapter} --pairs {d}/split.tsv --out {locked}",
    "plot": "plot {results}",
}


@pytest.mark.parametrize("template", UNWRITABLE.values(), ids=UNWRITABLE.keys())
def test_out_directory_not_writable(
    run_cli, monkeypatch, tmp_path, inputs, tiny_model_dir, adapter, results, template
):
    """A read-only output directory, simulated (tests may run as root, who may write anywhere)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    run_copy = tmp_path / "results"
    shutil.copytree(results, run_copy)
    if template.startswith("plot"):
        locked = run_copy / "figures"
        locked.mkdir()
    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def inside(path) -> bool:
        path = Path(path).absolute()
        return path == locked or locked in path.parents

    def access(path, mode, **kwargs):
        if inside(path) and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002
        if dir is not None and inside(dir):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    argv = _argv(template, d=inputs, model=tiny_model_dir, adapter=adapter, locked=locked,
                 results=run_copy)  # fmt: skip
    code, _, err = run_cli(*argv)
    assert_user_error(code, err, str(locked.name))
    assert re.search(r"not writable|Permission denied", err), err
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_really_read_only_directory(run_cli, tmp_path, inputs, tiny_model_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for template in (UNWRITABLE["run"], UNWRITABLE["embed"], UNWRITABLE["pairs-split"]):
            argv = _argv(template, d=inputs, model=tiny_model_dir, locked=locked)
            code, _, err = run_cli(*argv)
            assert_user_error(code, err, "locked")
    finally:
        locked.chmod(0o755)


# --- the real console: stderr at the file-descriptor level ----------------------------------

_MANY = r"""
import sys
from tli.cli import main
for argv in {cases!r}:
    print("<<<case", file=sys.stderr, flush=True)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    sys.stdout.flush()
    print(f">>>code {{code}}", file=sys.stderr, flush=True)
"""

#: Cases that load a tokenizer, a model config or a whole model before failing: transformers,
#: peft or tqdm must not add a line, a warning or a progress bar to the one error line.
REAL_STDERR = [
    "run-pairs-one-pair",
    "run-layer-out-of-range",
    "embed-layer-out-of-range",
    "scan-pairs-one-pair",
    "train-layer-out-of-range",
    "train-pairs-one-pair",
    "evaluate-adapter-corrupted",
    "evaluate-adapter-other-model",
    "pairs-check-bad-json",
    "plot-no-results",
    "run-target-modules-unknown",
    "run-no-negatives",
    "evaluate-adapter-one-layer-missing",
    "evaluate-adapter-rank-mismatch",
    "probe-adapter-one-layer-missing",
    "train-no-negatives",
]


def test_real_stderr_holds_only_the_error_line(
    tmp_path, inputs, tiny_model_dir, other_model_dir, adapter, corrupt_adapter, special,
    damaged, results,
):  # fmt: skip
    values = dict(d=inputs, model=tiny_model_dir, other=other_model_dir, adapter=adapter,
                  corrupt=corrupt_adapter, s=special, damaged=damaged, results=results)  # fmt: skip
    cases = [_argv(BAD_INPUT[c][0], out=tmp_path / f"out{i}", **values)
             for i, c in enumerate(REAL_STDERR)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _MANY.format(cases=cases)],
        capture_output=True, text=True, env=python_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    chunks = proc.stderr.split("<<<case\n")[1:]
    assert len(chunks) == len(REAL_STDERR), proc.stderr
    for name, chunk in zip(REAL_STDERR, chunks, strict=True):
        body, _, code = chunk.rpartition(">>>code ")
        assert_user_error(int(code), body, *BAD_INPUT[name][1])


# --- internal bugs ----------------------------------------------------------------------------


def test_an_internal_bug_propagates_from_main(monkeypatch, capsys, inputs):
    import tli.cli.pairs

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(tli.cli.pairs, "summarize", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["pairs", "check", str(inputs / "pairs.tsv")])
    assert "tli: error" not in capsys.readouterr().err


def test_an_internal_bug_exits_1_with_its_traceback(inputs):
    """The console script (``sys.exit(main())``) with a bug planted in a stage."""
    script = (
        "import sys, tli.pairs\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('an internal bug')\n"
        "tli.pairs.summarize = broken\n"
        "from tli.cli import main\n"
        "sys.argv = ['tli', 'pairs', 'check', sys.argv[1]]\n"
        "sys.exit(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(inputs / "pairs.tsv")],
        capture_output=True, text=True, env=python_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RuntimeError: an internal bug" in proc.stderr
    assert "tli: error" not in proc.stderr


def test_a_user_error_from_the_console_script_exits_2(inputs):
    proc = subprocess.run(
        [sys.executable, "-m", "tli", "pairs", "check", str(inputs / "bad.json")],
        capture_output=True, text=True, env=python_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tli: error: ")


def test_an_error_message_with_a_line_break_stays_one_line(run_cli, tmp_path):
    odd = tmp_path / "two\nlines.tsv"
    code, _, err = run_cli("pairs", "check", odd)
    assert_user_error(code, err, "two\\nlines.tsv")


# --- fuzzing ----------------------------------------------------------------------------------

class ModelLoaded(Exception):
    """Raised by the stubbed model loader: the arguments got past every check."""


#: The commands fuzzed, as argv prefixes.
FUZZED = {
    "run": ["run"],
    "pairs-check": ["pairs", "check"],
    "pairs-split": ["pairs", "split"],
    "embed": ["embed"],
    "scan": ["scan"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "plot": ["plot"],
}


@functools.lru_cache
def _options(prefix):
    from tli.cli import build_parser

    parser = build_parser()
    for name in prefix:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    found = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    return sorted(found - {"--help"}) or ["--help"]


FUZZ_WORDS = ["0", "1", "2", "-1", "9", "0.5", "1.5", "nan", "inf", "1e309", "final", "all",
              "0-2", "3-1", "mean", "mean_all", "last", "max", "paper", "none", "true",
              "gemma-3-270m", "no-such-model", "x.gguf", "train.epochs=0", "train.nope=1",
              "pooling=max", "preset=[1]", "train.layer=9", "scan.n_boot=3", ""]  # fmt: skip
FILES = ["pairs.tsv", "split.tsv", "one.tsv", "empty.json", "bad.json", "bad.csv",
         "nofield.json", "bad.toml", "unknown_key.toml", "wrong_type.toml", "dir.tsv", "afile",
         "adir", "words.txt", "latin1.tsv", "nope.tsv"]  # fmt: skip


@pytest.mark.parametrize("command", FUZZED.keys())
@settings(max_examples=max(FUZZ_EXAMPLES * 3 // 10, 1), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_fuzz_cli_arguments_give_exit_0_or_2_or_reach_the_model(
    command, data, monkeypatch, capsys, tmp_path, inputs, tiny_model_dir, adapter
):
    import tli.models

    def loaded(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(tli.models, "load_model", loaded)
    monkeypatch.setattr(tli.models, "gguf_to_cache", loaded)
    own = tmp_path / "inputs"  # a private copy: `pairs split --out` may overwrite a file
    if not own.exists():
        shutil.copytree(inputs, own)
        shutil.copytree(adapter, tmp_path / "adapter")
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    paths = [str(own / f) for f in FILES] + [str(tiny_model_dir), str(tmp_path / "adapter")]
    token = (
        st.sampled_from(_options(tuple(FUZZED[command]) or ["--verbose"]))
        | st.sampled_from(FUZZ_WORDS)
        | st.sampled_from(paths)
        | st.text(st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)),
                  max_size=10)
    )  # fmt: skip
    argv = [*FUZZED[command], *data.draw(st.lists(token, max_size=8), label="argv")]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except ModelLoaded:
        code = "model"
    _, err = capsys.readouterr()
    assert code in (0, 2, "model"), (argv, code)
    if code == 2:
        assert_user_error(code, err)


# --- the documentation ------------------------------------------------------------------------


def test_docs_reliability_md_is_current():
    """Every test docs/reliability.md names exists; every bad-input case is listed there."""
    from test_lock import WRITERS
    from test_pipeline import LATE_ERRORS
    from test_plots import DAMAGED_RESULTS, FIFO_RESULTS

    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    sources = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")}
    params = {
        "test_bad_input_is_one_line_exit_2": BAD_INPUT,
        "test_out_directory_not_writable": UNWRITABLE,
        "test_plot_of_damaged_results": DAMAGED_RESULTS,
        "test_fuzz_cli_arguments_give_exit_0_or_2_or_reach_the_model": FUZZED,
        "test_a_full_disk_during_a_command_is_one_line_exit_2": ("train", "run"),
        "test_every_command_that_writes_a_directory_holds_a_lock": WRITERS,
        "test_overwrite_with_an_error_found_late_keeps_the_complete_run": LATE_ERRORS,
        "test_plot_never_reads_a_fifo": FIFO_RESULTS,
    }
    reference = r"(?:tests/(test_\w+\.py)::)?(?<![/\w])(test_\w+)\b(?!\.py)(\[[^\]`]+\])?"
    named = re.findall(reference, doc)
    assert len(named) > 150
    for file, name, param in named:
        homes = [file] if file else list(sources)  # a bare name may live in any test file
        assert any(re.search(rf"^def {name}\(", sources[home], re.M) for home in homes), (
            f"{file}::{name} does not exist"
        )
        if param:
            assert param[1:-1] in params[name], f"{name}{param} is not a case"
    for case in BAD_INPUT:
        assert f"test_bad_input_is_one_line_exit_2[{case}]" in doc, f"{case} is not documented"
    for case in UNWRITABLE:
        assert f"test_out_directory_not_writable[{case}]" in doc, case
    for case in DAMAGED_RESULTS:
        assert f"test_plot_of_damaged_results[{case}]" in doc, case


def test_docs_config_md_is_current():
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == config_reference(), (
        "docs/config.md is stale: regenerate it with "
        "python -c 'from tli.cli.reference import config_reference; "
        "print(config_reference(), end=\"\")' "
        "> docs/config.md"
    )


# --- stdout and stderr: pipes, full disks, third-party notices ---------------------------------


def test_a_closed_pipe_on_stdout_ends_quietly(inputs):
    """`tli pairs check FILE | head -3` ended with a BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tli", "pairs", "check", str(inputs / "pairs.tsv")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=python_env(),
    )  # fmt: skip
    proc.stdout.close()  # the reader is gone before tli writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_a_full_stdout_is_one_line(inputs):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "tli", "pairs", "check", str(inputs / "pairs.tsv")],
            stdout=full, stderr=subprocess.PIPE, text=True, env=python_env(), timeout=120,
        )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "tli: error: stdout: cannot write: No space left on device\n"


#: Runs `tli ARGV` on a machine whose CPU reports AVX512-BF16: bitsandbytes then logs
#: "Failed to load CPU gemm_4bit_forward from kernels-community" on import (peft imports it).
AVX512_BF16 = r"""
import importlib.abc, importlib.util, sys

class Patch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        self.real, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.real.exec_module(module)

        class Lib:
            def __init__(self, lib):
                self._lib = lib

            def __getattr__(self, name):
                return getattr(self._lib, name)

            def has_avx512bf16_cpu(self):
                return True

        module.lib = Lib(module.lib)

sys.meta_path.insert(0, Patch())
from tli.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed")  # fmt: skip
def test_third_party_notices_become_tli_debug_lines(tmp_path, tiny_model_dir, inputs):
    """bitsandbytes' import notice reached stderr in every model-loading command; now every
    stderr line is tli's own, and the notice is a `tli: debug:` line under `tli -v`."""
    argv = ["train", "--model", str(tiny_model_dir), "--pairs", str(inputs / "pairs.tsv"),
            "--layer", "2", "--epochs", "1"]  # fmt: skip
    for verbose in ([], ["-v"]):
        proc = subprocess.run(
            [sys.executable, "-c", AVX512_BF16, *verbose, *argv, "--out",
             str(tmp_path / f"t{len(verbose)}")],
            capture_output=True, text=True, env=python_env(), timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        assert all(line.startswith("tli: ") for line in lines), proc.stderr
        notice = [line for line in lines if "gemm_4bit_forward" in line]
        if verbose:
            assert len(notice) == 1 and notice[0].startswith("tli: debug: bitsandbytes")
            assert "Failed to load CPU gemm_4bit_forward" in notice[0]
        else:
            assert notice == []
