"""The run config: one section per stage, one pooling for all, presets and TOML.

A run config is TOML with the top-level keys ``preset`` and ``pooling`` and one table per stage
(:data:`SECTIONS`). :func:`resolve_config` layers the preset, the file and the command line into
a :class:`RunConfig`; :func:`to_toml` writes it back (a run directory's ``config.toml``), and
:func:`load_run_config` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tli.config import MAX_BATCH, build, check_range, check_seed, read_toml, to_dict
from tli.errors import TLIError
from tli.evaluate import EvalConfig
from tli.io import expand_user
from tli.models import ModelConfig
from tli.pairs import SRC_KEY, TGT_KEY
from tli.pipeline.presets import get_preset
from tli.probe import ProbeConfig
from tli.scan import ScanConfig
from tli.train import TrainConfig


@dataclass(frozen=True)
class PairsConfig:
    """Which word pairs, and how they are split into trained and control sets."""

    file: str | None = field(
        default=None,
        metadata={"help": "pair file (JSON, JSONL, CSV, TSV); none: the bundled lexicon"},
    )
    control: str | None = field(
        default=None, metadata={"help": "a separate control file (else the file's split column)"}
    )
    src_key: str = field(default=SRC_KEY, metadata={"help": "source field in JSON/CSV files"})
    tgt_key: str = field(default=TGT_KEY, metadata={"help": "target field in JSON/CSV files"})
    src_lang: str | None = field(
        default=None,
        metadata={
            "help": "name of the source language in every label, table, figure, probe prompt "
            "and the model card; none: the file's source field (swahili -> Swahili, de -> de), "
            "a MUSE file's name (de-en.txt -> de), or Swahili for the bundled lexicon"
        },
    )
    tgt_lang: str | None = field(
        default=None,
        metadata={"help": "name of the target language; none: as for src_lang (English)"},
    )
    resplit: bool = field(
        default=False,
        metadata={
            "help": "split anew even if the file has a split column (tli's leakage-free "
            "split; the paper: 623 trained / 63 control, sec. 3.3)"
        },
    )
    control_fraction: float = field(
        default=0.1, metadata={"help": "share of pairs held out as control (paper: 63/686)"}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the split"})
    allow_overlap: bool = field(
        default=False,
        metadata={
            "help": "accept control pairs that share a headword, root, stem or gloss with "
            "trained pairs (one warning instead of an error; tli's own split never has any)"
        },
    )

    def __post_init__(self) -> None:
        check_range("pairs.control_fraction", self.control_fraction, 0.0, 0.9, lo_open=True)
        check_seed("pairs.split_seed", self.split_seed)
        for name in ("file", "control"):
            value = getattr(self, name)
            if isinstance(value, str) and (not value.strip() or "\0" in value):
                raise TLIError(f"pairs.{name} must be a file path, got {value!r}")
        for name in ("src_lang", "tgt_lang"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or any(c in value for c in "\n\r\0")):
                raise TLIError(f"pairs.{name} must be a language name on one line, got {value!r}")


@dataclass(frozen=True)
class FigureConfig:
    """The figures of the report."""

    tsne_pairs: int = field(
        default=40,
        metadata={"help": "pairs in the t-SNE sample (paper: 'a representative subset')"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the t-SNE sample and fit"})

    def __post_init__(self) -> None:
        check_range("figures.tsne_pairs", self.tsne_pairs, 4, MAX_BATCH)
        check_seed("figures.seed", self.seed)


#: Sections of the run config: TOML table name -> config class.
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "pairs": PairsConfig,
    "scan": ScanConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "probe": ProbeConfig,
    "figures": FigureConfig,
}


#: Keys set once for the whole run rather than per stage.
GLOBAL_KEYS = ("pooling",)


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one pooling for every stage, and one section per stage."""

    preset: str = "paper"
    pooling: str = "mean_all"
    model: ModelConfig = field(default_factory=ModelConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    figures: FigureConfig = field(default_factory=FigureConfig)

    def to_toml_dict(self) -> dict[str, Any]:
        """The config as TOML tables (None values omitted: TOML has no null)."""
        out: dict[str, Any] = {"preset": self.preset, "pooling": self.pooling}
        for name in SECTIONS:
            values = to_dict(getattr(self, name))
            values.pop("pooling", None)
            out[name] = {k: v for k, v in values.items() if v is not None}
        return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key, {}), dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = dict(value) if isinstance(value, dict) else value
    return out


def resolve_config(*layers: dict[str, Any], where: str = "config") -> RunConfig:
    """Build a RunConfig from nested mappings (preset, file, command line), later ones winning.

    Unknown sections or keys, and per-stage ``pooling`` keys (pooling is set once for the
    whole run), are errors that name the key.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer)
    preset = merged.pop("preset", "paper")
    merged = _merge(_merge({}, get_preset(preset, where)), merged)
    pooling = merged.pop("pooling", "mean_all")
    kwargs: dict[str, Any] = {"preset": preset, "pooling": pooling}
    for key, value in merged.items():
        if key not in SECTIONS:
            raise TLIError(
                f"{where}: unknown key or section {key!r}; known: preset, pooling, "
                + ", ".join(SECTIONS)
            )
        if not isinstance(value, dict):
            raise TLIError(f"{where}: [{key}] must be a table of keys, got {value!r}")
        if "pooling" in value:
            raise TLIError(f"{where}: [{key}] pooling: set pooling once, at the top level")
        moved = [k for k in ("src_lang", "tgt_lang") if key == "probe" and k in value]
        if moved:
            raise TLIError(
                f"{where}: [probe] {moved[0]} moved to [pairs] {moved[0]}: the pair config names "
                "the languages of every stage"
            )
    for name, cls in SECTIONS.items():
        values = dict(merged.get(name, {}))
        names = {f.name for f in dataclasses.fields(cls)}
        if "pooling" in names:
            values["pooling"] = pooling
        for key in values:
            if key not in names:
                raise TLIError(
                    f"{where}: [{name}] unknown key {key!r}; known: {', '.join(sorted(names))}"
                )
        try:
            kwargs[name] = build(cls, values)
        except TLIError as err:
            raise TLIError(f"{where}: [{name}] {err}") from None
    return RunConfig(**kwargs)


def resolve_sources(*sources: tuple[str, dict[str, Any]]) -> RunConfig:
    """:func:`resolve_config` of ``(where, mapping)`` layers; an error names the layer at fault.

    The layer blamed is the first one that, with the layers before it, already gives the error:
    a bad ``--set`` is reported as ``command line``, a bad key in the file as the file.
    """
    layers = [layer for _, layer in sources]
    try:
        return resolve_config(*layers, where="")
    except TLIError as err:
        problem = str(err).removeprefix(": ")
    for k, (where, _) in enumerate(sources, start=1):
        try:
            resolve_config(*layers[:k], where="")
        except TLIError as err:
            if str(err).removeprefix(": ") == problem:
                raise TLIError(f"{where}: {problem}") from None
    raise TLIError(f"{sources[-1][0]}: {problem}")  # pragma: no cover (the full list fails)


def load_run_config(path: Path | str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of a TOML file (e.g. a run directory's ``config.toml``)."""
    return resolve_config(read_toml(path), overrides or {}, where=str(path))


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML text, with a header saying how to re-run it."""
    import tomli_w

    return "# tli run: resolved config; re-run with `tli run --config config.toml`\n" + (
        tomli_w.dumps(cfg.to_toml_dict())
    )


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Paths in the config resolved to absolute ones, so config.toml re-runs from anywhere."""
    pairs = cfg.pairs
    pairs = dataclasses.replace(
        pairs,
        file=str(expand_user(pairs.file).resolve()) if pairs.file else None,
        control=str(expand_user(pairs.control).resolve()) if pairs.control else None,
    )
    model = cfg.model
    local = expand_user(model.name)
    try:
        is_local = local.exists()
    except OSError:  # not a usable path (e.g. too long): models.resolve reports it
        is_local = False
    if is_local:
        model = dataclasses.replace(model, name=str(local.resolve()))
    texts = []
    for spec in cfg.evaluate.texts:  # NAME=PATH or PATH: keep the name, resolve the path
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = expand_user(spec.strip()).stem, spec
        texts.append(f"{name.strip()}={expand_user(path.strip()).resolve()}")
    evaluate = dataclasses.replace(cfg.evaluate, texts=tuple(texts))
    return dataclasses.replace(cfg, pairs=pairs, model=model, evaluate=evaluate)


def to_toml_fragment(values: dict[str, Any]) -> str:
    """A preset's values as TOML."""
    import tomli_w

    return tomli_w.dumps(values)
