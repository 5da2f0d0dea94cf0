"""Config dataclasses and their sources (``tli.config``, ``tli.pipeline.config``): every numeric
option finite and bounded, choices checked, errors blamed on the file or the command line."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from tli.config import parse_set, read_toml
from tli.errors import TLIError
from tli.pipeline.config import SECTIONS, resolve_sources
from tli.probe import ProbeConfig
from tli.sweep import SweepConfig

CONFIGS = [*SECTIONS.values(), ProbeConfig, SweepConfig]


def _numeric_fields():
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = set(typing.get_args(tp)) or {tp}
            if bool in args:
                continue
            if float in args:
                yield cls, f.name, float
            elif int in args:
                yield cls, f.name, int


NUMERIC = list(_numeric_fields())


@pytest.mark.parametrize(("cls", "name", "kind"), NUMERIC,
                         ids=[f"{c.__name__}.{n}" for c, n, _ in NUMERIC])  # fmt: skip
def test_every_numeric_option_is_finite_and_bounded(cls, name, kind):
    """`temperature = inf` and `batch_size = 10^9` were accepted; no numeric option takes an
    infinite, NaN or absurdly large value now."""
    bad = [10**12, -(10**12)] if kind is int else [math.inf, -math.inf, math.nan, 1e300, -1e300]
    for value in bad:
        with pytest.raises(TLIError, match=name):
            cls(**{name: value})


def test_the_numeric_fields_are_all_found():
    names = {f"{c.__name__}.{n}" for c, n, _ in NUMERIC}
    assert {"TrainConfig.temperature", "TrainConfig.batch_size", "ScanConfig.n_boot",
            "EvalConfig.seed", "PairsConfig.split_seed", "ProbeConfig.max_new_tokens",
            "SweepConfig.jobs", "FigureConfig.tsne_pairs"} <= names  # fmt: skip


def test_a_choice_with_a_typo_is_refused():
    from tli.scan import ScanConfig

    with pytest.raises(TLIError, match="select_on must be one of trained, control, got 'contrl'"):
        ScanConfig(select_on="contrl")


@pytest.mark.parametrize("item", ["train.=1", ".epochs=1", "train..epochs=1", " . =1", "=1"])
def test_set_with_an_empty_part_is_malformed(item):
    with pytest.raises(TLIError, match="expected section.key=value"):
        parse_set([item])


def test_errors_are_blamed_on_the_layer_that_holds_them(tmp_path):
    """`--set train.nope=1` with a good config file was reported as the file's error."""
    good = {"train": {"epochs": 2}}
    with pytest.raises(TLIError, match=r"^command line: \[train\] unknown key 'nope'"):
        resolve_sources(("c/tiny.toml", good), ("command line", {"train": {"nope": 1}}))
    with pytest.raises(TLIError, match=r"^c/tiny.toml: \[train\] unknown key 'nope'"):
        resolve_sources(("c/tiny.toml", {"train": {"nope": 1}}), ("command line", {}))
    with pytest.raises(TLIError, match=r"^command line: \[train\] epochs must be >= 1"):
        resolve_sources(("c/tiny.toml", good), ("command line", {"train": {"epochs": 0}}))
    # a bad value in the file that the command line replaces is no error at all
    fixed = resolve_sources(("f.toml", {"train": {"epochs": 0}}),
                            ("command line", {"train": {"epochs": 3}}))  # fmt: skip
    assert fixed.train.epochs == 3


def test_a_byte_order_mark_in_a_toml_file_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[train]\nepochs = 2\n".encode())
    assert read_toml(path) == {"train": {"epochs": 2}}


def test_list_valued_numbers_are_finite_too():
    from tli.train import TrainConfig

    for weights in ((math.inf,), (math.nan,), (1e300,), (-1.0,)):
        with pytest.raises(TLIError, match="loss_weights"):
            TrainConfig(layer=2, loss_layers=("target",), loss_weights=weights)
