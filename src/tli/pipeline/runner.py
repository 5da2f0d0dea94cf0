"""The runner: every stage of the protocol into one run directory, resumable.

pairs -> scan -> layer choice -> train -> evaluate -> probe -> figures -> report. Inputs are
checked before anything is written (:func:`preflight`); each stage writes its results under the
run directory and its marker last, so ``tli run --resume DIR`` skips what finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from tli.config import to_dict
from tli.errors import TLIError
from tli.io import atomic_write_json, atomic_write_text, ensure_dir, expand_user
from tli.pairs import PairSets
from tli.pipeline.config import RunConfig, load_run_config, to_toml
from tli.pipeline.rundir import (
    MARKERS,
    STAGES,
    acquire_lock,
    empty_run_dir,
    environment,
    prepare_run_dir,
    release_lock,
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
    sets.warn_leakage()
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


class Runner:
    """Runs the stages of one run directory, loading each model at most once."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self._full: Any = None
        self._base_vectors: Any = None  # the scan's tli.embed.Embedding, for the evaluation
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
            self.note(stage, seconds=round(time.perf_counter() - start, 2))

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
        from tli.models import load_model
        from tli.scan import ScanResult
        from tli.train import load_depth, train

        scan = ScanResult.load(self.run_dir / "scan")
        layer, how = choose_layer(self.cfg, scan)
        tcfg = dataclasses.replace(self.cfg.train, layer=layer)
        tokenizer = self._full.tokenizer if self._full is not None else None
        loaded = load_model(
            self.cfg.model,
            tokenizer=tokenizer,
            max_layer=load_depth(tcfg, scan.num_layers),
            lm_head=False,  # training never uses it
        )
        resume = (self.run_dir / "train" / "checkpoints" / "latest").is_file()
        train(
            loaded,
            saved_sets(self.run_dir)["trained"],
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


def preflight(cfg: RunConfig) -> None:
    """Check a new run's inputs before its directory is created: pairs, model, layer.

    Reads and splits the pair files (the pairs stage does it again, cheaply, and the same
    way), reads the perplexity check's text files, finds the model's config (no weights),
    checks a set training layer against its depth and that the full model's weights fit in the
    free memory (:mod:`tli.memory`), so bad input fails in seconds with nothing written.
    """
    load_sets(cfg)
    if cfg.evaluate.perplexity:
        from tli.perplexity import text_sets

        text_sets(cfg.evaluate.texts)  # a bad text file fails before the run directory exists
    from tli.models import EMBEDDED, load_config
    from tli.train import check_tracker

    check_tracker(cfg.train.report_to)

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
    from tli import memory

    # The scan's full model is the largest load of a run (training loads fewer blocks).
    full = memory.footprint(
        config, cfg.model.dtype, load_in_4bit=cfg.model.load_in_4bit,
        double_quant=cfg.model.double_quant, name=name,
    )  # fmt: skip
    memory.check_fits(full, cfg.model.device)


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
