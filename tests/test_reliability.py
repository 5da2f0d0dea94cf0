"""Reliability: every command under bad input, interruption, concurrency and repetition.

``docs/reliability.md`` lists each failure mode with the test here that shows it. A user error
is one ``tli: error:`` line naming the file or option, exit code 2, no traceback; an internal
bug keeps its traceback and exits 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tli.cli import main
from tli.errors import TLIError
from tli.io import is_leftover
from tli.pairs import load_lexicon, read_pairs, split_pairs, write_pairs

from conftest import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


# --- helpers --------------------------------------------------------------------------------


def cli(capsys, *argv):
    """Run ``tli`` in-process; return (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse-level errors exit from the parser
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    """Exit 2; stderr holds exactly one ``tli: error:`` line, last, naming ``needles``.

    Other stderr lines may only be tli's own log lines (``tli: info:``/``tli: warning:``):
    no traceback, no progress bar, no stray warning.
    """
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("tli: error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    assert all(line.startswith("tli: ") for line in lines), err
    for needle in needles:
        assert needle in errors[0], errors[0]


def python_env() -> dict[str, str]:
    """The environment of a ``tli`` subprocess: this checkout's sources first."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


# --- inputs -------------------------------------------------------------------------------

BAD_TOML = "[train\nepochs = 3\n"
UNKNOWN_KEY_TOML = "[train]\nnope = 1\n"
UNKNOWN_SECTION_TOML = "[extra]\nx = 1\n"
WRONG_TYPE_TOML = '[train]\nepochs = "three"\n'


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One folder of good and bad input files, shared by the error tests."""
    d = tmp_path_factory.mktemp("inputs")
    lexicon = [dataclasses.replace(p, split=None) for p in load_lexicon()[:60]]
    write_pairs(lexicon, d / "pairs.tsv")
    write_pairs(split_pairs(lexicon, control_fraction=0.2, seed=0), d / "split.tsv")
    write_pairs(lexicon[:1], d / "one.tsv")
    files = {
        "empty.json": "[]",
        "bad.json": '[{"swahili": "maji", "english": "water"},\n',
        "bad.csv": 'swahili,english\n"maji,water\n',
        "nofield.json": '[{"swahili": "maji"}]',
        "nocolumn.tsv": "swahili\tpos\nmaji\tnoun\n",
        "afile": "x\n",
        "words.txt": "maji\nmoto\n",
        "blank_line.txt": "maji\n\nmoto\n",
        "empty.txt": "",
        "bad.toml": BAD_TOML,
        "unknown_key.toml": UNKNOWN_KEY_TOML,
        "unknown_section.toml": UNKNOWN_SECTION_TOML,
        "wrong_type.toml": WRONG_TYPE_TOML,
        "unknown_preset.toml": 'preset = "nope"\n',
        "bad_pooling.toml": 'pooling = "max"\n',
    }
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "latin1.tsv").write_bytes("swahili\tenglish\nmaji\tw\xe4ter\n".encode("latin-1"))
    (d / "latin1.toml").write_bytes("[train]\n# \xe4\n".encode("latin-1"))
    (d / "dir.tsv").mkdir()  # a directory where a file is expected: unreadable
    (d / "dir.toml").mkdir()
    (d / "adir").mkdir()
    (d / "notrun").mkdir()
    (d / "notrun" / "notes.txt").write_text("someone's files\n")
    (d / "notrun.tsv").write_text("x")
    return d


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A different tiny Llama (2 blocks, other seed): not the base of `adapter`."""
    path = tmp_path_factory.mktemp("other-llama")
    tiny_model("llama", layers=2, seed=1).save_pretrained(path)
    tiny_tokenizer("left").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, inputs, tmp_path_factory):
    """A real adapter of the tiny model, from `tli train` (one epoch, a few steps)."""
    out = tmp_path_factory.mktemp("train") / "t"
    argv = ["train", "--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv", "--layer", "2",
            "--epochs", "1", "--batch-size", "8", "--warmup-steps", "0", "--out", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return out / "final"


@pytest.fixture(scope="module")
def corrupt_adapter(adapter, tmp_path_factory):
    """The adapter with its weights file cut short."""
    path = tmp_path_factory.mktemp("corrupt") / "final"
    shutil.copytree(adapter, path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return path


@pytest.fixture(scope="module")
def results(tiny_model_dir, inputs, adapter, tmp_path_factory):
    """A run-like results folder (config.toml, scan/, eval/) for `tli plot`, without figures."""
    from tli.pipeline.config import resolve_config, to_toml

    root = tmp_path_factory.mktemp("results") / "run"
    root.mkdir()
    (root / "config.toml").write_text(to_toml(resolve_config({"figures": {"tsne_pairs": 4}})))
    split = inputs / "split.tsv"
    common = ["--model", tiny_model_dir, "--pairs", split, "--n-boot", "20"]
    assert main([str(a) for a in ["scan", *common, "--out", root / "scan"]]) == 0
    argv = ["evaluate", "--adapter", adapter, *common, "--out", root / "eval"]
    assert main([str(a) for a in argv]) == 0
    return root


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
                             ["afile/run", "Not a directory"]),
    "run-out-foreign-directory": ("run --model {model} --pairs {d}/pairs.tsv --out {d}/notrun",
                                  ["notrun", "not a tli run directory"]),
    "run-resume-missing": ("run --resume {d}/nope", ["nope", "not a tli run directory"]),
    "run-resume-not-a-run": ("run --resume {d}/notrun", ["notrun", "not a tli run directory"]),
    "run-resume-with-options": ("run --resume {d}/notrun --set train.epochs=3",
                                ["--resume DIR continues the run with its saved config"]),
    # tli pairs check / split
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
    # tli plot
    "plot-missing": ("plot {d}/nope", ["nope", "no such directory"]),
    "plot-a-file": ("plot {d}/afile", ["afile", "not a directory"]),
    "plot-no-results": ("plot {d}/adir", ["adir", "no results to plot"]),
}  # fmt: skip

#: The commands as docs/reliability.md names them, by the case ids' first word.
COMMANDS = ("run", "pairs", "embed", "scan", "train", "evaluate", "plot")


def _argv(template, **values):
    return [token.format(**values) for token in shlex.split(template)]


@pytest.mark.parametrize(("template", "needles"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_exit_2(
    capsys, tmp_path, inputs, tiny_model_dir, other_model_dir, adapter, corrupt_adapter,
    template, needles,
):  # fmt: skip
    out = tmp_path / "out"
    argv = _argv(template, d=inputs, model=tiny_model_dir, other=other_model_dir, out=out,
                 adapter=adapter, corrupt=corrupt_adapter)  # fmt: skip
    before = sorted(p.name for p in inputs.iterdir())
    code, _, err = cli(capsys, *argv)
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


def test_one_pair_is_a_valid_pair_file(capsys, inputs):
    code, out, _ = cli(capsys, "pairs", "check", inputs / "one.tsv")
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
    capsys, monkeypatch, tmp_path, inputs, tiny_model_dir, adapter, results, template
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
    code, _, err = cli(capsys, *argv)
    assert_user_error(code, err, str(locked.name))
    assert re.search(r"not writable|Permission denied", err), err
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_really_read_only_directory(capsys, tmp_path, inputs, tiny_model_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for template in (UNWRITABLE["run"], UNWRITABLE["embed"], UNWRITABLE["pairs-split"]):
            argv = _argv(template, d=inputs, model=tiny_model_dir, locked=locked)
            code, _, err = cli(capsys, *argv)
            assert_user_error(code, err, "locked")
    finally:
        locked.chmod(0o755)


#: A results file damaged in place -> words of the error of `tli plot`.
DAMAGED_RESULTS = {
    "config.toml": ["config.toml", "bad TOML"],
    "scan/scan.json": ["scan.json", "cannot read"],
    "eval/evaluation.json": ["evaluation.json", "cannot read"],
    "eval/pairs.csv": ["pairs.csv", "not a tli evaluation table"],
    "eval/vectors.safetensors": ["vectors.safetensors", "corrupted or unreadable"],
}


@pytest.mark.parametrize(("name", "needles"), DAMAGED_RESULTS.items(), ids=DAMAGED_RESULTS.keys())
def test_plot_of_damaged_results(capsys, tmp_path, results, name, needles):
    run = tmp_path / "run"
    shutil.copytree(results, run)
    (run / name).write_bytes(b"{garbage")
    code, _, err = cli(capsys, "plot", run)
    assert_user_error(code, err, *needles)
    assert not (run / "figures").exists()  # every input is read before anything is drawn


def test_plot_when_figures_is_a_file(capsys, tmp_path, results):
    run = tmp_path / "run"
    shutil.copytree(results, run)
    (run / "figures").write_text("x")
    code, _, err = cli(capsys, "plot", run)
    assert_user_error(code, err, "figures", "exists and is not a directory")


def test_train_resume_with_a_damaged_config(capsys, tmp_path):
    (tmp_path / "train_config.json").write_text("{garbage")
    code, _, err = cli(capsys, "train", "--resume", tmp_path)
    assert_user_error(code, err, "train_config.json")


def test_train_unknown_target_module(capsys, tmp_path, tiny_model_dir, inputs):
    code, _, err = cli(capsys, "train", "--model", tiny_model_dir, "--pairs",
                       inputs / "pairs.tsv", "--layer", "2", "--target-modules", "nope",
                       "--out", tmp_path / "t")  # fmt: skip
    assert_user_error(code, err, "target_modules", "nope")


def test_train_checks_its_out_directory_before_loading_the_model(
    capsys, monkeypatch, tiny_model_dir, inputs
):
    import tli.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(tli.models, "load_model", never)
    code, _, err = cli(capsys, "train", "--model", tiny_model_dir, "--pairs",
                       inputs / "pairs.tsv", "--layer", "2", "--out", inputs / "afile")  # fmt: skip
    assert_user_error(code, err, "afile")


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
]


def test_real_stderr_holds_only_the_error_line(
    tmp_path, inputs, tiny_model_dir, other_model_dir, adapter, corrupt_adapter
):
    values = dict(d=inputs, model=tiny_model_dir, other=other_model_dir, adapter=adapter,
                  corrupt=corrupt_adapter)  # fmt: skip
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


def test_an_error_message_with_a_line_break_stays_one_line(capsys, tmp_path):
    odd = tmp_path / "two\nlines.tsv"
    code, _, err = cli(capsys, "pairs", "check", odd)
    assert_user_error(code, err, "two\\nlines.tsv")


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    from tli.io import atomic_write_text

    target = tmp_path / "result.json"
    atomic_write_text(target, '{"old": true}\n')

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def dies(src, dst):
        raise Killed  # the process "dies" after writing the temporary, before the rename

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(Killed):
        atomic_write_text(target, '{"new": true}\n' * 1000)
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_leftovers_of_killed_writers_are_hidden_and_recognised():
    assert is_leftover(".evaluation.json.abc123.tmp")
    assert is_leftover(".final.tmp-k2j3")
    assert is_leftover(".final.old")
    assert is_leftover(".run.lock.123.tmp")
    for name in ("evaluation.json", "final", "run.lock", "report.tmp.html", ".hidden"):
        assert not is_leftover(name)


def test_disk_errors_while_writing_are_one_line(tmp_path, monkeypatch, capsys, inputs):
    from tli.io import atomic_write_text

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TLIError, match="x.txt: cannot write: No space left on device"):
        atomic_write_text(tmp_path / "x.txt", "data")
    assert list(tmp_path.iterdir()) == []


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
    from tli.pipeline.rundir import acquire_lock, empty_run_dir, prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": "elsewhere"}))
    (run / ".config.toml.a1.tmp").write_text("half")
    prepare_run_dir(run, overwrite=False, resume=False)
    acquire_lock(run)
    empty_run_dir(run, overwrite=False)  # nothing to refuse


def test_overwrite_removes_config_toml_last(tmp_path, monkeypatch):
    """A kill part-way through --overwrite leaves a folder that --overwrite still accepts."""
    import shutil as shutil_module

    from tli.pipeline.rundir import empty_run_dir, prepare_run_dir

    run = tmp_path / "run"
    (run / "scan").mkdir(parents=True)
    for name in ("config.toml", "run.json", "scan/scan.json", "report.html"):
        (run / name).write_text("x")
    removed = []
    real_unlink, real_rmtree = Path.unlink, shutil_module.rmtree
    monkeypatch.setattr(Path, "unlink", lambda self, **k: (removed.append(self.name),
                                                            real_unlink(self, **k)))  # fmt: skip
    monkeypatch.setattr(shutil_module, "rmtree", lambda path, *a, **k: (
        removed.append(Path(path).name), real_rmtree(path, *a, **k)))  # fmt: skip
    with pytest.raises(TLIError, match="--overwrite"):
        empty_run_dir(run, overwrite=False)
    empty_run_dir(run, overwrite=True)
    assert removed[-1] == "config.toml" and sorted(removed) == sorted(
        ["config.toml", "run.json", "scan", "report.html"]
    )
    prepare_run_dir(run, overwrite=False, resume=False)


def test_evaluation_json_does_not_depend_on_hash_order(adapter):
    """peft writes target_modules (a set) in hash order, which changes from process to process."""
    from tli.adapters import read_adapter

    info = read_adapter(adapter)
    for order in (["q_proj", "v_proj"], ["v_proj", "q_proj"]):
        info.config["target_modules"] = order
        assert info.summary()["peft"]["target_modules"] == ["q_proj", "v_proj"]


# --- safety -----------------------------------------------------------------------------------

SOURCES = sorted((SRC / "tli").rglob("*.py"))


def _code_lines():
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield f"{path.relative_to(ROOT)}:{number}", code


def test_weights_are_read_only_through_safetensors_or_weights_only():
    for where, code in _code_lines():
        if "torch.load(" in code:
            assert "weights_only=True" in code, where
        assert not re.search(r"\bpickle\b|\bdill\b|\bjoblib\b|allow_pickle\s*=\s*True", code), where
        assert not re.search(r"weights_only\s*=\s*False", code), where


def test_no_user_string_reaches_a_shell():
    for where, code in _code_lines():
        assert "shell=True" not in code, where
        assert not re.search(r"\bos\.(system|popen|exec\w*|spawn\w*)\(", code), where
        assert not re.search(r"(?<![.\w])(eval|exec)\(", code), where
        if re.search(r"subprocess\.(run|Popen|call|check_output|check_call)\(", code):
            assert re.search(r"\(\s*\[|\(\s*$|\(cmd|\(argv|\(command", code), where


def test_trust_remote_code_is_off_unless_a_flag_says_so(monkeypatch, tiny_model_dir):
    import transformers

    from tli.cli import build_parser
    from tli.models import ModelConfig, load_model

    assert ModelConfig().trust_remote_code is False
    for where, code in _code_lines():
        assert "trust_remote_code=True" not in code, where
    seen = []
    for cls_name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls_name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for flag in (False, True):
        seen.clear()
        load_model(ModelConfig(name=str(tiny_model_dir), trust_remote_code=flag))
        assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
        assert all(value is flag for _, value in seen), seen
    parser = build_parser()
    for argv in (["embed", "x"], ["scan"], ["train"], ["evaluate", "--adapter", "a"]):
        args = parser.parse_args(argv)
        assert getattr(args, "trust_remote_code", False) is False, argv
        with_flag = parser.parse_args([*argv, "--trust-remote-code"])
        assert with_flag.trust_remote_code is True, argv


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
    with pytest.raises(Stop):
        main(["run", "--model", "model", "--pairs", "pairs.tsv", "--set",
              'pairs.control="control.tsv"', "--out", "rel"])  # fmt: skip
    cfg = load_run_config(tmp_path / "rel" / "config.toml")
    assert cfg.pairs.file == str(tmp_path / "pairs.tsv")
    assert cfg.pairs.control == str(tmp_path / "control.tsv")
    assert cfg.model.name == str(Path(tiny_model_dir).resolve())
    for value in (cfg.pairs.file, cfg.pairs.control, cfg.model.name):
        assert Path(value).is_absolute()


# --- concurrency ------------------------------------------------------------------------------
# tests/test_run.py::test_a_live_lock_refuses_and_a_stale_lock_is_taken_over checks the lock
# against a live and a dead process id; the tests below use real tli processes.


def _grab_lock(run_dir, barrier, results):
    from tli.errors import TLIError
    from tli.pipeline.rundir import acquire_lock

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
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), rel
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
            for stage in ignore:
                for record in (x, y):
                    record["stages"].get("train", {}).pop(stage, None)
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
    assert_same_results(results_of(reference_run), results_of(run), ignore=("resumed",))


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
    assert_same_results(before, results_of(run), ignore=("resumed",))


@pytest.mark.slow
def test_a_second_run_into_a_live_run_directory_refuses(capsys, tiny_model_dir, inputs, tmp_path):
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
            code, _, err = cli(capsys, *other)
            assert_user_error(code, err, needle)
        # --overwrite deleted nothing of the live run:
        assert (run / "config.toml").is_file() and (run / "pairs" / "pairs.tsv").is_file()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


# --- the documentation ------------------------------------------------------------------------


def test_docs_reliability_md_is_current():
    """Every test docs/reliability.md names exists; every bad-input case is listed there."""
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    sources = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")}
    params = {
        "test_bad_input_is_one_line_exit_2": BAD_INPUT,
        "test_out_directory_not_writable": UNWRITABLE,
        "test_plot_of_damaged_results": DAMAGED_RESULTS,
        "test_fuzz_cli_arguments_give_exit_0_or_2_or_reach_the_model": FUZZED,
    }
    reference = r"(?:tests/(test_\w+\.py)::)?(?<![/\w])(test_\w+)\b(?!\.py)(\[[^\]`]+\])?"
    named = re.findall(reference, doc)
    assert len(named) > 150
    for file, name, param in named:
        source = sources[file or "test_reliability.py"]
        assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
        if param:
            assert param[1:-1] in params[name], f"{name}{param} is not a case"
    for case in BAD_INPUT:
        assert f"test_bad_input_is_one_line_exit_2[{case}]" in doc, f"{case} is not documented"
    for case in UNWRITABLE:
        assert f"test_out_directory_not_writable[{case}]" in doc, case
    for case in DAMAGED_RESULTS:
        assert f"test_plot_of_damaged_results[{case}]" in doc, case


# --- fuzzing ----------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tli.config import parse_set, read_toml  # noqa: E402
from tli.config import toml_loads as _toml_loads  # noqa: E402
from tli.pipeline.config import SECTIONS, resolve_config, to_toml  # noqa: E402

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
#: Examples per fuzz test; raise it to search longer: TLI_FUZZ_EXAMPLES=5000 pytest -k fuzz
EXAMPLES = int(os.environ.get("TLI_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None)


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


WORDS = ["0", "1", "2", "-1", "9", "0.5", "1.5", "nan", "inf", "1e309", "final", "all", "0-2",
         "3-1", "mean", "mean_all", "last", "max", "paper", "none", "true", "gemma-3-270m",
         "no-such-model", "x.gguf", "train.epochs=0", "train.nope=1", "pooling=max", "preset=[1]",
         "train.layer=9", "scan.n_boot=3", ""]  # fmt: skip
FILES = ["pairs.tsv", "split.tsv", "one.tsv", "empty.json", "bad.json", "bad.csv",
         "nofield.json", "bad.toml", "unknown_key.toml", "wrong_type.toml", "dir.tsv", "afile",
         "adir", "words.txt", "latin1.tsv", "nope.tsv"]  # fmt: skip


@pytest.mark.parametrize("command", FUZZED.keys())
@settings(max_examples=max(EXAMPLES * 3 // 10, 1), deadline=None, database=None,
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
        | st.sampled_from(WORDS)
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
