"""`tli run`: the whole protocol in one run directory.

pairs -> scan -> layer choice -> train -> evaluate -> figures -> report. Each stage writes its
results under the run directory and finishes by writing one file last (its *marker*), so
``tli run --resume DIR`` knows which stages are complete and skips them. Every file is written
atomically, and a lock file keeps a second run out of a directory that a live run holds.

Run directory::

    config.toml        the resolved config (re-run with: tli run --config DIR/config.toml)
    environment.json   versions, git commit, seed, device, time
    run.json           what each stage did, the chosen layer, timings
    pairs/             pairs.tsv (trained + control, with the split) and summary.json
    scan/ train/ eval/ figures/
    report.md  report.html
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tli.config import build, check_range, to_dict
from tli.errors import TLIError
from tli.evaluate import EvalConfig
from tli.io import (
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    expand_user,
    is_leftover,
)
from tli.models import ModelConfig
from tli.probe import ProbeConfig
from tli.scan import ScanConfig
from tli.train import TrainConfig

log = logging.getLogger("tli")

STAGES = ("pairs", "scan", "train", "evaluate", "probe", "figures", "report")
#: The file each stage writes last; its presence means the stage finished.
MARKERS = {
    "pairs": "pairs/summary.json",
    "scan": "scan/scan.json",
    "train": "train/train.json",
    "evaluate": "eval/evaluation.json",
    "probe": "probe/done.json",
    "figures": "figures/figures.json",
    "report": "report.html",
}
LOCK = "run.lock"


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
    src_key: str = field(default="swahili", metadata={"help": "source field in JSON/CSV files"})
    tgt_key: str = field(default="english", metadata={"help": "target field in JSON/CSV files"})
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

    def __post_init__(self) -> None:
        check_range("pairs.control_fraction", self.control_fraction, 0.0, 0.9, lo_open=True)
        for name in ("file", "control"):
            value = getattr(self, name)
            if isinstance(value, str) and (not value.strip() or "\0" in value):
                raise TLIError(f"pairs.{name} must be a file path, got {value!r}")


@dataclass(frozen=True)
class FigureConfig:
    """The figures of the report."""

    tsne_pairs: int = field(
        default=40,
        metadata={"help": "pairs in the t-SNE sample (paper: 'a representative subset')"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the t-SNE sample and fit"})

    def __post_init__(self) -> None:
        check_range("figures.tsne_pairs", self.tsne_pairs, 4)


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

#: Named presets: section -> partial values (plus top-level keys).
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's protocol exactly: mean over all attention-masked tokens (BOS included) in the
    # scan, the training and the evaluation (sec. 3.2, 3.4, 3.5); the layer of highest mean
    # cosine; every hyper-parameter of sec. 3.4 (the section defaults).
    "paper": {"pooling": "mean_all", "scan": {"select_by": "cosine"}},
    # Chosen by `tli sweep` on the bundled lexicon's own split, 3 seeds (docs/findings.md,
    # examples/sweep-*.toml): symmetric InfoNCE (temperature 0.05) on final-layer vectors of
    # the word's own tokens, adapters on every block, the paper's lr 2e-4 and 5 epochs.
    "aligned": {
        "pooling": "mean",
        "scan": {"select_by": "cosine"},
        "train": {
            "loss": "info_nce",
            "temperature": 0.05,
            "loss_layers": ["final"],
            "adapt_layers": "all",
            "lr": 2e-4,
            "epochs": 5,
            "warmup_steps": 10,
        },
    },
}


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
    if not isinstance(preset, str) or preset not in PRESETS:
        raise TLIError(f"{where}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    merged = _merge(_merge({}, PRESETS[preset]), merged)
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


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads(text)


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; a TLIError naming the file (and line) when it is bad."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TLIError(f"{path}: no such file") from None
    except OSError as err:
        raise TLIError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise TLIError(f"{path}: cannot read: not UTF-8 (at byte offset {err.start})") from None
    try:
        return _toml_loads(text)
    except Exception as err:  # tomllib.TOMLDecodeError
        raise TLIError(f"{path}: bad TOML: {err}") from None


def load_run_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of a TOML file (e.g. a run directory's ``config.toml``)."""
    return resolve_config(read_toml(path), overrides or {}, where=str(path))


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set section.key=value`` overrides as a nested dict (values parsed as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TLIError(f"--set {item!r}: expected section.key=value")
        try:
            value = _toml_loads(f"v = {raw}")["v"]
        except Exception:
            value = raw  # a bare string
        parts = key.split(".")
        if len(parts) > 2:
            raise TLIError(f"--set {item!r}: expected section.key=value")
        if len(parts) == 1:
            out[parts[0]] = value
        elif not isinstance(out.setdefault(parts[0], {}), dict):
            raise TLIError(f"--set {item!r}: {parts[0]} was set to a value, not a table, before")
        else:
            out[parts[0]][parts[1]] = value
    return out


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML text, with a header saying how to re-run it."""
    import tomli_w

    return "# tli run: resolved config; re-run with `tli run --config config.toml`\n" + (
        tomli_w.dumps(cfg.to_toml_dict())
    )


# --- run directory ----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _lock_mutex(run_dir: Path) -> Iterator[None]:
    """Serialise lock checks between tli processes on this host (flock on the directory).

    Without it two processes could both find the same stale lock and both take it over.
    Where ``fcntl`` is missing (Windows) the check runs unserialised.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire_lock(run_dir: Path) -> Path:
    """Take ``run.lock``; refuse if a live process holds it; take over a stale one.

    The lock file is created whole (written to a temporary name, then hard-linked into place,
    which fails if the lock exists), so a reader never sees an empty lock.
    """
    lock = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    with _lock_mutex(run_dir):
        for _ in range(2):
            tmp = run_dir / f".{LOCK}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, lock)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as handle:
                        json.dump(me, handle)
                    return lock
            else:
                return lock
            finally:
                tmp.unlink(missing_ok=True)
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError, RecursionError):
                holder = {}
            pid = holder.get("pid") if isinstance(holder, dict) else None
            pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else 0
            same_host = isinstance(holder, dict) and holder.get("host") == socket.gethostname()
            if pid and same_host and _pid_alive(pid):
                raise TLIError(
                    f"{run_dir}: another tli run (pid {pid}) is using this directory; "
                    f"wait for it or choose another --out"
                ) from None
            log.warning("%s: taking over a stale lock (pid %s is gone)", run_dir, pid or "?")
            lock.unlink(missing_ok=True)
    raise TLIError(f"{run_dir}: cannot take the lock {lock}")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process still holds it."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError, RecursionError):
        return
    if isinstance(holder, dict) and holder.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def environment(cfg: RunConfig) -> dict[str, Any]:
    """Versions, git commit, seeds, device and time, for environment.json."""
    import importlib.metadata as md
    import subprocess

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            name: version(name)
            for name in (
                "tli",
                "torch",
                "transformers",
                "peft",
                "accelerate",
                "safetensors",
                "scipy",
                "scikit-learn",
                "matplotlib",
            )
        },
        "git_commit": commit,
        "seeds": {
            "train": cfg.train.seed,
            "scan": cfg.scan.seed,
            "evaluate": cfg.evaluate.seed,
            "split": cfg.pairs.split_seed,
            "figures": cfg.figures.seed,
        },
        "device": cfg.model.device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Check that ``run_dir`` can hold this run; create it. Nothing is removed here.

    Emptying a directory for ``--overwrite`` happens in :func:`empty_run_dir`, only once the
    lock is held, so a second run never deletes the files of a live one.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TLIError(f"{run_dir}: exists and is not a directory")
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise TLIError(f"{run_dir}: not a tli run directory (no config.toml) to resume")
        return
    if _has_content(run_dir) and not (run_dir / "config.toml").is_file():
        raise TLIError(
            f"{run_dir}: exists, is not empty and is not a tli run directory; "
            "refusing to write into it" + ("" if not overwrite else " or to overwrite it")
        )
    ensure_dir(run_dir)


def _has_content(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything but a lock and tli's own leftovers."""
    if not run_dir.is_dir():
        return False
    return any(c.name != LOCK and not is_leftover(c.name) for c in run_dir.iterdir())


def empty_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """With the lock held: refuse a finished or started run, or (``overwrite``) empty it."""
    if not _has_content(run_dir):
        return
    if not overwrite:
        raise TLIError(
            f"{run_dir}: exists and is not empty; use --resume to continue it, --overwrite "
            "to replace it, or another --out"
        )
    import shutil

    # config.toml goes last: a kill part-way leaves a directory --overwrite still accepts.
    children = sorted(run_dir.iterdir(), key=lambda c: c.name == "config.toml")
    for child in children:
        if child.name != LOCK:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporaries that killed writers left in ``run_dir`` (lock held); return them."""
    import shutil

    found = [p for p in run_dir.rglob(".*") if is_leftover(p.name)]
    for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.debug("removed %s, left behind by an interrupted run", path)
    return found


# --- stages -------------------------------------------------------------------------------------


def load_sets(cfg: RunConfig) -> tuple[dict[str, list], list[str]]:
    """The trained and control sets of a run config, and their leakage; nothing is written."""
    from tli.pairs import check_leakage, load_lexicon, read_pairs, split_pairs, split_sets

    pc = cfg.pairs
    keys = {"src_key": pc.src_key, "tgt_key": pc.tgt_key}
    pairs = read_pairs(Path(pc.file).resolve(), **keys) if pc.file else load_lexicon()
    if pc.control:
        control = read_pairs(Path(pc.control).resolve(), **keys)
        sets = {"trained": split_sets(pairs)["trained"], "control": split_sets(control)["trained"]}
    else:
        has_split = any(p.split for p in pairs)
        if pc.resplit or not has_split:
            pairs = split_pairs(pairs, control_fraction=pc.control_fraction, seed=pc.split_seed)
        sets = split_sets(pairs)
    if len(sets["trained"]) < 2 or len(sets["control"]) < 2:
        where = pc.file or "the bundled lexicon"
        if pc.control:
            where = f"{where} and {pc.control}"
        raise TLIError(
            f"{where}: need at least 2 trained and 2 control pairs, got "
            f"{len(sets['trained'])} and {len(sets['control'])}"
        )
    return sets, check_leakage(sets["trained"], sets["control"])


def stage_pairs(cfg: RunConfig, run_dir: Path) -> dict[str, list]:
    """Read, split and save the pairs; returns the sets."""
    from tli.pairs import write_pairs

    pc = cfg.pairs
    sets, leaks = load_sets(cfg)
    folder = ensure_dir(run_dir / "pairs")
    write_pairs(
        [dataclasses.replace(p, split="trained") for p in sets["trained"]]
        + [dataclasses.replace(p, split="control") for p in sets["control"]],
        folder / "pairs.tsv",
    )
    summary = {
        "source": str(Path(pc.file).resolve()) if pc.file else "bundled lexicon",
        "control_source": str(Path(pc.control).resolve()) if pc.control else None,
        "trained": len(sets["trained"]),
        "control": len(sets["control"]),
        "leakage": leaks,
    }
    for leak in leaks:
        log.warning("pairs: %s", leak)
    atomic_write_json(folder / "summary.json", summary)
    return sets


def read_sets(run_dir: Path) -> dict[str, list]:
    """The sets saved by the pairs stage."""
    from tli.pairs import read_pairs, split_sets

    return split_sets(read_pairs(run_dir / "pairs" / "pairs.tsv"))


def choose_layer(cfg: RunConfig, scan: Any) -> tuple[int, str]:
    """The training layer: the config's, or the scan's choice (never 0: no block below it)."""
    if cfg.train.layer is not None:
        return cfg.train.layer, "set in the config"
    layer, how = scan.chosen_layer, f"chosen by the scan ({cfg.scan.select_by})"
    if layer == 0:
        alt = scan.next_best_layer if scan.next_best_layer else 1
        log.warning(
            "the scan chose layer 0 (the embeddings), which has no block below it to "
            "train; using the next best, layer %d",
            alt,
        )
        layer, how = alt, f"next best of the scan ({cfg.scan.select_by}); layer 0 cannot be trained"
    return layer, how


class Runner:
    """Runs the stages of one run directory, loading each model at most once."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self._full: Any = None
        self.record: dict[str, Any] = {"stages": {}}
        if (run_dir / "run.json").is_file():
            self.record = json.loads((run_dir / "run.json").read_text())

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished: its marker file exists and run.json records its time.

        A process killed between a stage's marker and its record in run.json re-runs the
        stage (each is idempotent), so run.json never lacks what later stages read from it.
        """
        recorded = "seconds" in self.record.get("stages", {}).get(stage, {})
        return recorded and (self.run_dir / MARKERS[stage]).is_file()

    def full_model(self) -> Any:
        """The full-depth model, loaded on first use and then shared by scan and evaluate."""
        from tli.models import load_model

        if self._full is None:
            self._full = load_model(self.cfg.model)
        return self._full

    def note(self, stage: str, **facts: Any) -> None:
        """Record facts about a stage in ``run.json``."""
        self.record["stages"].setdefault(stage, {}).update(facts)
        atomic_write_json(self.run_dir / "run.json", self.record)

    def run(self) -> None:
        """Run every stage that has not finished yet."""
        for stage in STAGES:
            if self.done(stage):
                log.info("%s: already done, skipped", stage)
                continue
            log.info("%s ...", stage)
            start = time.perf_counter()
            getattr(self, f"_{stage}")()
            self.note(stage, seconds=round(time.perf_counter() - start, 2))

    def _pairs(self) -> None:
        sets = stage_pairs(self.cfg, self.run_dir)
        self.note("pairs", trained=len(sets["trained"]), control=len(sets["control"]))

    def _scan(self) -> None:
        from tli.scan import run_scan

        result = run_scan(self.full_model(), read_sets(self.run_dir), self.cfg.scan)
        result.save(self.run_dir / "scan")
        self.note("scan", chosen_layer=result.chosen_layer, warnings=result.warnings)

    def _train(self) -> None:
        from tli.models import load_model
        from tli.scan import ScanResult
        from tli.train import load_depth, train

        scan = ScanResult.load(self.run_dir / "scan")
        layer, how = choose_layer(self.cfg, scan)
        tcfg = dataclasses.replace(self.cfg.train, layer=layer)
        tokenizer = self._full.tokenizer if self._full is not None else None
        loaded = load_model(
            self.cfg.model, tokenizer=tokenizer, max_layer=load_depth(tcfg, scan.num_layers)
        )
        resume = (self.run_dir / "train" / "checkpoints" / "latest").is_file()
        train(
            loaded,
            read_sets(self.run_dir)["trained"],
            tcfg,
            self.run_dir / "train",
            resume=resume,
            model_config=to_dict(self.cfg.model),
            progress=self.progress,
        )
        self.note("train", layer=layer, layer_source=how, resumed=resume)

    def _evaluate(self) -> None:
        from tli.evaluate import evaluate

        result = evaluate(
            self.full_model(),
            self.run_dir / "train" / "final",
            read_sets(self.run_dir),
            self.cfg.evaluate,
            self.run_dir / "eval",
        )
        self.note("evaluate", verdicts=result.verdict_lines())

    def _probe(self) -> None:
        """Generated text and scored word translation, when ``[probe] enabled = true``."""
        if self.cfg.probe.enabled:
            from tli.probe import probe

            result = probe(self.full_model(), self.run_dir / "train" / "final",
                           read_sets(self.run_dir), self.cfg.probe, self.run_dir / "probe",
                           score=True)
            self.note("probe", summary=result.summary_line(), warnings=result.warnings)
        atomic_write_json(self.run_dir / MARKERS["probe"], {"enabled": self.cfg.probe.enabled})

    def _figures(self) -> None:
        from tli.plots import draw_run_figures

        files = draw_run_figures(
            self.run_dir, n_pairs=self.cfg.figures.tsne_pairs, seed=self.cfg.figures.seed
        )
        atomic_write_json(self.run_dir / MARKERS["figures"], {"files": [p.name for p in files]})

    def _report(self) -> None:
        from tli.report import write_report

        write_report(self.run_dir)


def preflight(cfg: RunConfig) -> None:
    """Check a new run's inputs before its directory is created: pairs, model, layer.

    Reads and splits the pair files (the pairs stage does it again, cheaply, and the same
    way), finds the model's config (no weights) and checks a set training layer against its
    depth, so bad input fails in seconds with nothing written.
    """
    load_sets(cfg)
    from tli.models import EMBEDDED, load_config

    name = cfg.model.name
    if name in EMBEDDED or name.lower().endswith(".gguf"):
        if name not in EMBEDDED and not expand_user(name).is_file():
            raise TLIError(f"{name}: no such .gguf file")
        return  # the embedded/GGUF paths de-quantise on first use; the scan does that
    from tli import surgery

    _, config = load_config(name, trust_remote_code=cfg.model.trust_remote_code)
    n = surgery.num_layers(config)
    train = cfg.train
    needs_target = train.loss_layers is None or "target" in train.loss_layers
    if train.layer is not None or not needs_target:
        from tli.train import plan

        try:
            plan(train, n)
        except TLIError as err:
            raise TLIError(f"[train] {err} (model {name!r} has {n} layers)") from None


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run (or resume) the whole protocol into ``run_dir``; returns it.

    Order matters for safety: inputs are checked before anything is written; the lock is
    taken before a directory is emptied (``overwrite``) or continued (``resume``);
    ``config.toml`` marks a run directory (written first, removed last), and a resume writes
    a missing ``environment.json``; a stage counts as done only when its marker file exists
    *and* ``run.json`` records its time, so a kill between the two re-runs the (idempotent)
    stage.
    """
    run_dir = Path(run_dir).resolve()
    if not resume:
        preflight(cfg)
    prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    lock = acquire_lock(run_dir)
    try:
        if resume:
            saved = load_run_config(run_dir / "config.toml")
            if saved != cfg:
                raise TLIError(
                    f"{run_dir}: --resume continues the saved config.toml; "
                    "give no other config options"
                )
            remove_leftovers(run_dir)
            if not (run_dir / "environment.json").is_file():
                atomic_write_json(run_dir / "environment.json", environment(cfg))
        else:
            empty_run_dir(run_dir, overwrite=overwrite)
            atomic_write_text(run_dir / "config.toml", to_toml(cfg))
            atomic_write_json(run_dir / "environment.json", environment(cfg))
        Runner(cfg, run_dir, progress=progress).run()
    finally:
        release_lock(lock)
    return run_dir


# --- command line -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tli run``."""
    p = sub.add_parser(
        "run",
        help="the whole protocol: pairs, scan, layer choice, train, evaluate, figures, report",
        description="Run the TLI protocol end to end into a run directory. Defaults: the "
        "embedded gemma-3-270m, the bundled lexicon and its split, the paper's settings.",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="a TOML file (sections: model, pairs, scan, "
        "train, evaluate, figures; see docs/config.md)",
    )
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: paper)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/tli)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", type=Path, metavar="DIR", help="finish the run in DIR")
    p.add_argument("--model", help="shortcut for --set model.name=...")
    p.add_argument("--pairs", help="shortcut for --set pairs.file=...")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key, e.g. --set train.epochs=3 (repeatable)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.resume is not None and (
        args.config or args.preset or args.set or args.model or args.pairs or args.out
    ):
        raise TLIError(
            "--resume DIR continues the run with its saved config; give no other config options"
        )
    if args.resume is not None:
        run_dir = args.resume
        prepare_run_dir(Path(run_dir), overwrite=False, resume=True)
        cfg = load_run_config(Path(run_dir) / "config.toml")
    else:
        layers: list[dict[str, Any]] = []
        if args.config is not None:
            layers.append(read_toml(args.config))
        cli: dict[str, Any] = parse_set(args.set)
        if args.preset:
            cli["preset"] = args.preset
        if args.model:
            cli.setdefault("model", {})["name"] = args.model
        if args.pairs:
            cli.setdefault("pairs", {})["file"] = args.pairs
        cfg = resolve_config(*layers, cli, where=str(args.config or "command line"))
        cfg = _absolute_paths(cfg)
        run_dir = args.out or Path("runs/tli")
    start = time.perf_counter()
    out = run_pipeline(cfg, Path(run_dir), resume=args.resume is not None, overwrite=args.overwrite)
    record = json.loads((out / "run.json").read_text())
    for line in record["stages"].get("evaluate", {}).get("verdicts", []):
        print(line)
    print(f"run finished in {time.perf_counter() - start:.0f} s: {out / 'report.html'}")
    return 0


def _absolute_paths(cfg: RunConfig) -> RunConfig:
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
    return dataclasses.replace(cfg, pairs=pairs, model=model)


# --- documentation ----------------------------------------------------------------------------


def config_reference() -> str:
    """``docs/config.md``: every key of a run config, its default and its source.

    Generated from the config dataclasses (their ``help`` metadata), so the documentation and
    the code cannot drift apart; ``tests/test_run.py`` checks the file is current.
    """
    import typing

    def shown(value: Any) -> str:
        if value is None:
            return "(none)"
        if isinstance(value, tuple):
            return ", ".join(map(str, value))
        return str(value).replace("\n", "\\n").replace("|", "\\|")

    lines = [
        "# `tli run` configuration",
        "",
        "<!-- generated by tli.run.config_reference(); do not edit by hand -->",
        "",
        "A run config is TOML with two top-level keys and one table per stage. Every key is "
        "optional; a key you leave out takes the value of the preset (`--preset`, default "
        "`paper`), else the default below. Any key can be set on the command line with "
        "`--set section.key=value` (e.g. `--set train.epochs=3`); the resolved config is "
        "saved as `config.toml` in the run directory and re-runs with "
        "`tli run --config DIR/config.toml`. Paths are resolved to absolute ones.",
        "",
        "## Top level",
        "",
        "| key | default | meaning and source |",
        "| --- | --- | --- |",
        "| `preset` | `paper` | named set of values: " + ", ".join(f"`{p}`" for p in PRESETS)
        + " (below) |",
        "| `pooling` | `mean_all` | how a word's token states become one vector, for the scan, "
        "training and evaluation alike (DESIGN.md, fact 3): `mean_all` (all attention-masked "
        "tokens, BOS included: the paper, sec. 3.2-3.5), `mean` (the word's own tokens) or "
        "`last` |",
        "",
    ]
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"## `[{name}]`", "", doc, "", "| key | default | meaning and source |",
                  "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            if f.name == "pooling":
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = _type_name(hints[f.name])
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{shown(default)}` | {help_text} ({kind}) |")
        lines.append("")
    lines += ["## Presets", ""]
    for preset, values in PRESETS.items():
        lines += [f"### `{preset}`", "", "```toml", to_toml_fragment(values).rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _type_name(tp: Any) -> str:
    import typing

    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return _type_name(rest[0]) + " or none" if len(rest) == 1 else str(tp)
    if typing.get_origin(tp) is tuple:
        return "list of " + _type_name(args[0])
    return getattr(tp, "__name__", str(tp))


def to_toml_fragment(values: dict[str, Any]) -> str:
    """A preset's values as TOML."""
    import tomli_w

    return tomli_w.dumps(values)
