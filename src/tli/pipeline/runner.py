"""The runner: every stage of the protocol into one run directory, resumable.

pairs -> scan -> layer choice -> train -> evaluate -> probe -> figures -> report. Inputs are
checked before anything is written (:func:`preflight`); each stage writes its results under the
run directory and its marker last, so ``tli run --resume DIR`` skips what finished. Each stage
also records in ``run.json`` the settings it ran with (:func:`stage_config`), so a resume can
tell when ``config.toml`` changed under a finished stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tli.config import to_dict
from tli.errors import TLIError
from tli.io import SetAside, atomic_write_json, atomic_write_text, ensure_dir, recover_aside
from tli.lock import LOCK, has_content, locked_dir
from tli.pairs import PairSets
from tli.pipeline.config import RunConfig, load_run_config, to_toml
from tli.pipeline.rundir import (
    MARKERS,
    STAGES,
    environment,
    prepare_run_dir,
    refuse_existing,
    remove_leftovers,
)

log = logging.getLogger("tli")


def load_sets(cfg: RunConfig) -> PairSets:
    """The trained and control sets of a run config (:func:`tli.pairs.load_sets`); no writing.

    A pair file without a split column is split by tli's leakage-free split
    (``pairs.control_fraction``, ``pairs.split_seed``); ``pairs.resplit`` splits anew a file that
    has one. A run needs at least 2 trained and 2 control pairs.
    """
    from tli.pairs import load_sets as load_pair_sets

    pc = cfg.pairs
    sets = load_pair_sets(
        Path(pc.file).resolve() if pc.file else None,
        Path(pc.control).resolve() if pc.control else None,
        src_key=pc.src_key,
        tgt_key=pc.tgt_key,
        split_unsplit=True,
        resplit=pc.resplit,
        control_fraction=pc.control_fraction,
        split_seed=pc.split_seed,
        src_lang=pc.src_lang,
        tgt_lang=pc.tgt_lang,
    )
    if len(sets.trained) < 2 or len(sets.control) < 2:
        where = pc.file or "the bundled lexicon"
        if pc.control:
            where = f"{where} and {pc.control}"
        raise TLIError(
            f"{where}: need at least 2 trained and 2 control pairs, got "
            f"{len(sets.trained)} and {len(sets.control)}"
        )
    sets.check_leakage(pc.allow_overlap, "pairs.allow_overlap = true")
    return sets


def stage_pairs(cfg: RunConfig, run_dir: Path) -> dict[str, list]:
    """Read, split and save the pairs; returns the sets."""
    from tli.pairs import write_pairs

    pc = cfg.pairs
    sets = load_sets(cfg)
    folder = ensure_dir(run_dir / "pairs")
    write_pairs(  # source/target columns: the languages may be any pair (read_pairs takes them)
        [dataclasses.replace(p, split="trained") for p in sets.trained]
        + [dataclasses.replace(p, split="control") for p in sets.control],
        folder / "pairs.tsv",
        src_key="source",
        tgt_key="target",
    )
    summary = {
        **sets.summary(),
        "source": str(Path(pc.file).resolve()) if pc.file else "bundled lexicon",
        "control_source": str(Path(pc.control).resolve()) if pc.control else None,
        "leakage": sets.leaks,
    }
    atomic_write_json(folder / "summary.json", summary)
    return sets.as_dict()


def saved_sets(run_dir: Path) -> dict[str, list]:
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


def stage_config(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The settings a stage's results depend on, besides the stages before it.

    Recorded in ``run.json`` (with their SHA-256) when the stage finishes; a resume compares
    them with ``config.toml`` (:meth:`Runner.changes`).
    """
    model = {"model": to_dict(cfg.model)}
    sections: dict[str, dict[str, Any]] = {
        "pairs": {"pairs": to_dict(cfg.pairs)},
        "scan": {**model, "scan": to_dict(cfg.scan)},
        "train": {**model, "train": to_dict(cfg.train)},
        "evaluate": {**model, "evaluate": to_dict(cfg.evaluate)},
        "probe": {**model, "probe": to_dict(cfg.probe)},
        "figures": {"figures": to_dict(cfg.figures)},
        "report": {},
    }
    return json.loads(json.dumps(sections[stage]))  # tuples as lists, as run.json holds them


def config_hash(values: dict[str, Any]) -> str:
    """SHA-256 of a stage's settings (canonical JSON)."""
    text = json.dumps(values, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``[section] key old -> new`` for every setting that differs."""
    out = []
    for section in sorted(old.keys() | new.keys()):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                out.append(f"[{section}] {key} {a.get(key)!r} -> {b.get(key)!r}")
    return out


class Runner:
    """Runs the stages of one run directory, loading each model at most once.

    Args:
        cfg: The run's config.
        run_dir: The run directory (its lock held).
        progress: Show progress bars (on a terminal).
        validated: Called once, as soon as every check the run can make has passed (before the
            training model is loaded); ``--overwrite`` deletes the previous run then.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True,
                 validated: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.validated = validated
        self._full: Any = None
        self._base_vectors: Any = None  # the scan's tli.embed.Embedding, for the evaluation
        self.record: dict[str, Any] = {"stages": {}}
        if (run_dir / "run.json").is_file():
            from tli.io import read_json

            self.record = read_json(run_dir / "run.json")
            if not isinstance(self.record.get("stages"), dict):
                raise TLIError(f"{run_dir / 'run.json'}: expected a \"stages\" table")

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished: its marker file exists and run.json records its time.

        A process killed between a stage's marker and its record in run.json re-runs the
        stage (each is idempotent), so run.json never lacks what later stages read from it.
        """
        recorded = "seconds" in self.record.get("stages", {}).get(stage, {})
        return recorded and (self.run_dir / MARKERS[stage]).is_file()

    def changes(self) -> list[tuple[str, list[str]]]:
        """Finished stages whose settings in ``config.toml`` differ from those they ran with.

        Returns:
            ``(stage, ["[section] key old -> new", ...])`` per changed stage, in order. A stage
            recorded before tli kept these records counts as unchanged.
        """
        found = []
        for stage in STAGES:
            rec = self.record.get("stages", {}).get(stage, {})
            if not self.done(stage) or "config_sha256" not in rec:
                continue
            now = stage_config(self.cfg, stage)
            if rec["config_sha256"] != config_hash(now):
                old = rec.get("config") if isinstance(rec.get("config"), dict) else {}
                found.append((stage, _changed_keys(old, now) or ["(settings differ)"]))
        return found

    def unfinished_training_changed(self) -> list[str]:
        """Settings that differ from an unfinished training's ``train_config.json`` ([] if none).

        A training killed part-way resumes from its checkpoint only with the settings it began
        with. The layer counts only when the config sets it (otherwise the scan chose it).
        """
        saved_path = self.run_dir / "train" / "train_config.json"
        if self.done("train") or not saved_path.is_file():
            return []
        from tli.io import read_json

        saved = read_json(saved_path)
        old = dict(saved.get("train") or {})
        now = json.loads(json.dumps(to_dict(self.cfg.train)))
        if self.cfg.train.layer is None:
            old.pop("layer", None)
            now.pop("layer", None)
        return _changed_keys({"train": old}, {"train": now})

    def rerun_from(self, stage: str) -> None:
        """Forget ``stage`` and every stage after it, so they run again; training starts over."""
        import shutil

        later = STAGES[STAGES.index(stage):]
        for name in later:
            self.record["stages"].pop(name, None)
            (self.run_dir / MARKERS[name]).unlink(missing_ok=True)
        atomic_write_json(self.run_dir / "run.json", self.record)
        if "train" in later and (self.run_dir / "train").exists():
            shutil.rmtree(self.run_dir / "train")
        log.warning("%s: re-running %s", self.run_dir, ", ".join(later))

    def full_model(self) -> Any:
        """The full-depth model, loaded on first use and then shared by scan and evaluate."""
        from tli.models import load_model

        if self._full is None:
            self._full = load_model(self.cfg.model)
        return self._full

    def data(self) -> dict[str, Any]:
        """What the pairs stage recorded: files, SHA-256, counts, languages (summary.json)."""
        return json.loads((self.run_dir / MARKERS["pairs"]).read_text(encoding="utf-8"))

    @property
    def languages(self) -> tuple[str, str]:
        """The run's source and target language names (from the pair config, via the pairs)."""
        data = self.data()
        return str(data.get("src_lang", "source")), str(data.get("tgt_lang", "target"))

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
            values = stage_config(self.cfg, stage)
            self.note(stage, seconds=round(time.perf_counter() - start, 2), config=values,
                      config_sha256=config_hash(values))  # fmt: skip
        self._validated()

    def _validated(self) -> None:
        if self.validated is not None:
            callback, self.validated = self.validated, None
            callback()

    def _pairs(self) -> None:
        sets = stage_pairs(self.cfg, self.run_dir)
        self.note("pairs", trained=len(sets["trained"]), control=len(sets["control"]))

    def _scan(self) -> None:
        from tli.scan import run_scan

        result = run_scan(
            self.full_model(), saved_sets(self.run_dir), self.cfg.scan, languages=self.languages
        )
        result.save(self.run_dir / "scan")
        self._base_vectors = result.embedding
        self.note("scan", chosen_layer=result.chosen_layer, warnings=result.warnings)

    def _train(self) -> None:
        from tli.models import load_model, meta_model
        from tli.scan import ScanResult
        from tli.train import check_trainable, load_depth, train

        scan = ScanResult.load(self.run_dir / "scan")
        layer, how = choose_layer(self.cfg, scan)
        tcfg = dataclasses.replace(self.cfg.train, layer=layer)
        depth = load_depth(tcfg, scan.num_layers)
        pairs = saved_sets(self.run_dir)["trained"]
        try:
            check_trainable(tcfg, meta_model(self.cfg.model, max_layer=depth), pairs,
                            str(self.run_dir / "pairs" / "pairs.tsv"))  # fmt: skip
        except TLIError as err:
            raise TLIError(f"[train] {err} (layer {layer}, {how})") from None
        self._validated()
        tokenizer = self._full.tokenizer if self._full is not None else None
        loaded = load_model(
            self.cfg.model,
            tokenizer=tokenizer,
            max_layer=depth,
            lm_head=False,  # training never uses it
        )
        resume = (self.run_dir / "train" / "checkpoints" / "latest").is_file()
        train(
            loaded,
            pairs,
            tcfg,
            self.run_dir / "train",
            resume=resume,
            model_config=to_dict(self.cfg.model),
            progress=self.progress,
            card={
                "languages": list(self.languages),
                "data": {k: v for k, v in self.data().items() if k != "leakage"},
                "command": f"tli run --config {self.run_dir / 'config.toml'} --out NEW_RUN_DIR",
            },
        )
        self.note("train", layer=layer, layer_source=how, resumed=resume)

    def _evaluate(self) -> None:
        from tli.adapters import write_card
        from tli.evaluate import evaluate

        final = self.run_dir / "train" / "final"
        result = evaluate(
            self.full_model(),
            final,
            saved_sets(self.run_dir),
            self.cfg.evaluate,
            self.run_dir / "eval",
            languages=self.languages,
            base_vectors=self._base_vectors,
        )
        self._base_vectors = None  # the base model is reused by the probe, not its vectors
        write_card(final, evaluation=result)  # the model card now shows Table 1 and verdicts
        self.note(
            "evaluate",
            verdicts=result.summary_lines(),
            base_vectors_reused=bool(result.timings.get("base_vectors_reused")),
        )

    def _probe(self) -> None:
        """Generated text, scored translation (``enabled``), and the LM ranking (``rank``).

        ``[probe] rank = true`` runs the LM-ranking yardstick with or without ``enabled``.
        """
        pc = self.cfg.probe
        if pc.enabled:
            from tli.probe import probe

            result = probe(self.full_model(), self.run_dir / "train" / "final",
                           saved_sets(self.run_dir), pc, self.run_dir / "probe",
                           score=True, rank=pc.rank, languages=self.languages)
            self.note("probe", summary=result.summary_line(), warnings=result.warnings)
        elif pc.rank:
            from tli.probe import lm_rank
            from tli.tables import rank_line

            ranking = lm_rank(self.full_model(), saved_sets(self.run_dir), pc,
                              self.run_dir / "probe", languages=self.languages)
            self.note("probe", rank=rank_line(ranking))
        atomic_write_json(
            self.run_dir / MARKERS["probe"], {"enabled": pc.enabled, "rank": pc.rank}
        )

    def _figures(self) -> None:
        from tli.plots import draw_run_figures

        files = draw_run_figures(
            self.run_dir, n_pairs=self.cfg.figures.tsne_pairs, seed=self.cfg.figures.seed
        )
        atomic_write_json(self.run_dir / MARKERS["figures"], {"files": [p.name for p in files]})

    def _report(self) -> None:
        from tli.report import write_report

        write_report(self.run_dir)


def preflight(cfg: RunConfig, saved: Path | None = None) -> None:
    """Check a run's inputs before anything is written: pairs, model, device, training settings.

    Reads and splits the pair files (the pairs stage does it again, cheaply, and the same way)
    and checks the one leakage rule; reads the perplexity check's text files; finds the model's
    config and tokenizer and builds the model on the meta device (no weights; an embedded or
    GGUF model is de-quantised into the cache once, as the scan would); checks the device and
    4-bit support, that the full model's weights fit in the free memory (:mod:`tli.memory`) and
    the tracker; and checks the training settings against the model: a set layer against its
    depth, loss layers, adapted blocks, target modules, and that the trained pairs give
    negatives. A layer left to the scan is checked as the deepest one here, and again, once
    chosen, before training starts.

    Args:
        cfg: The run config.
        saved: A resumed run's ``pairs/pairs.tsv``: its pairs stage is done, so the trained
            pairs come from there (the original pair file is no longer needed).
    """
    if cfg.evaluate.perplexity:
        from tli.perplexity import text_sets

        text_sets(cfg.evaluate.texts)  # a bad text file fails before the run directory exists
    from tli.train import check_tracker

    check_tracker(cfg.train.report_to)
    from tli import surgery
    from tli.models import check_loadable, load_config, load_tokenizer, meta_model
    from tli.train import check_pairs, check_trainable, load_depth

    if saved is not None:
        from tli.pairs import read_pairs, split_sets

        trained, where = split_sets(read_pairs(saved))["trained"], str(saved)
    else:
        trained, where = load_sets(cfg).trained, cfg.pairs.file or "the bundled lexicon"
    name = cfg.model.name
    check_loadable(cfg.model)
    _, config = load_config(name, trust_remote_code=cfg.model.trust_remote_code)
    n = surgery.num_layers(config)
    train = cfg.train
    needs_target = train.loss_layers is None or "target" in train.loss_layers
    from tli import memory

    # The scan's full model is the largest load of a run (training loads fewer blocks).
    full = memory.footprint(
        config, cfg.model.dtype, load_in_4bit=cfg.model.load_in_4bit,
        double_quant=cfg.model.double_quant, name=name,
    )  # fmt: skip
    memory.check_fits(full, cfg.model.device)
    load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code)
    if train.layer is None and needs_target:
        train = dataclasses.replace(train, layer=n)  # the scan chooses; any layer must fit
    check_pairs(trained, where)
    try:
        depth = load_depth(train, n)
    except TLIError as err:
        raise TLIError(f"[train] {err} (model {name!r} has {n} layers)") from None
    try:
        check_trainable(train, meta_model(cfg.model, max_layer=depth))
    except TLIError as err:
        raise TLIError(f"[train] {err}") from None


def run_pipeline(
    cfg: RunConfig | None,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    rerun_changed: bool = False,
    progress: bool = True,
) -> Path:
    """Run (or resume) the whole protocol into ``run_dir``; returns it.

    Order matters for safety:

    * a new run's inputs are all checked (:func:`preflight`) before anything is written;
    * the lock is taken before a directory is replaced (``overwrite``) or continued
      (``resume``); a resume reads ``config.toml`` under the lock, and refuses when it changed
      under a finished stage unless ``rerun_changed`` (that stage and the ones after re-run);
    * ``overwrite`` sets the previous run aside (a rename inside the directory) and deletes
      it only once the new run has passed every check (the training layer's included, after
      the scan); any failure before that puts it back;
    * ``config.toml`` marks a run directory; a stage counts as done only when its marker file
      exists *and* ``run.json`` records its time, so a kill between the two re-runs the
      (idempotent) stage.

    Args:
        cfg: The run config; None with ``resume`` (the saved one is used).
        run_dir: The run directory.
        resume: Continue the run in ``run_dir``.
        overwrite: Replace a run in ``run_dir``.
        rerun_changed: With ``resume``, re-run finished stages whose settings changed.
        progress: Show progress bars (on a terminal).
    """
    run_dir = Path(run_dir).resolve()
    if not resume:
        assert cfg is not None
        preflight(cfg)
    prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    with locked_dir(run_dir, "run"):
        if recover_aside(run_dir, keep=(LOCK,)):
            log.warning("%s: restored the run that an interrupted --overwrite had set aside",
                        run_dir)  # fmt: skip
        if resume:
            saved = load_run_config(run_dir / "config.toml")
            if cfg is not None and saved != cfg:
                raise TLIError(
                    f"{run_dir}: --resume continues the saved config.toml; "
                    "give no other config options"
                )
            cfg = saved
            remove_leftovers(run_dir)
            runner = Runner(cfg, run_dir, progress=progress)
            preflight(cfg, run_dir / "pairs" / "pairs.tsv" if runner.done("pairs") else None)
            _check_changes(runner, rerun_changed)
            if not (run_dir / "environment.json").is_file():
                atomic_write_json(run_dir / "environment.json", environment(cfg))
            runner.run()
            return run_dir
        assert cfg is not None
        aside = None
        if has_content(run_dir):
            if not overwrite:
                refuse_existing(run_dir)
            aside = SetAside(run_dir, keep=(LOCK,))
        checked = []

        def validated() -> None:
            checked.append(True)
            if aside is not None:
                aside.discard()
                log.info("%s: the previous run is replaced", run_dir)

        try:
            atomic_write_text(run_dir / "config.toml", to_toml(cfg))
            atomic_write_json(run_dir / "environment.json", environment(cfg))
            Runner(cfg, run_dir, progress=progress, validated=validated).run()
        except BaseException as err:
            if aside is not None and not aside.done:
                aside.restore()
                log.warning("%s: the previous run is back in place", run_dir)
            elif isinstance(err, TLIError) and not checked:
                _clear(run_dir)  # a new run that failed its checks leaves nothing behind
            raise
    return run_dir


def _clear(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but its lock."""
    import shutil

    for child in run_dir.iterdir():
        if child.name != LOCK:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _check_changes(runner: Runner, rerun_changed: bool) -> None:
    """Refuse a resume whose config.toml changed under a finished stage, or re-run from it."""
    changed = runner.changes()
    if not changed and runner.unfinished_training_changed():
        changed = [("train", runner.unfinished_training_changed())]
    if not changed:
        return
    stage, keys = changed[0]
    shown = "; ".join(keys[:4]) + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")
    if not rerun_changed:
        raise TLIError(
            f"{runner.run_dir}/config.toml changed since stage {stage!r} finished: {shown}; "
            f"use --rerun-changed to re-run {stage} and every stage after it, or restore "
            "the config"
        )
    log.warning("%s: config.toml changed since stage %r finished: %s", runner.run_dir, stage,
                shown)  # fmt: skip
    runner.rerun_from(stage)
