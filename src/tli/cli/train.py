"""``tli train``: LoRA adapters with a contrastive loss at the target layer, depth-truncated."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from tli.cli.options import (
    add_model_arguments,
    add_pair_arguments,
    add_plan_argument,
    model_config,
    pair_sets,
)
from tli.config import add_dataclass_arguments, build, overrides_from_args, to_dict
from tli.errors import TLIError
from tli.pipeline.presets import PRESETS, train_values
from tli.train import TrainConfig

NAME = "train"
HELP = "train LoRA adapters with a contrastive loss at the target layer"
DESCRIPTION = (
    "TLI training (paper, sec. 3.4), depth-truncated: only blocks below the "
    "target layer are built and run. Writes peft adapters, logs and checkpoints. The "
    "trained set of --pairs is used (every pair of a file without a split column)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli train``."""
    add_pair_arguments(p, control=False)
    p.add_argument(
        "--preset",
        help=f"start from a named preset's training values and pooling: {', '.join(PRESETS)} "
        "(default: none, the defaults below)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="training directory")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    add_dataclass_arguments(p, TrainConfig)
    add_model_arguments(p)
    add_plan_argument(p)


def _saved(out_dir: Path) -> tuple[TrainConfig, dict, list]:
    """The training config, model settings and pairs that a training directory recorded."""
    from tli.io import read_json
    from tli.pairs import read_pairs

    saved_path = Path(out_dir) / "train_config.json"
    if not saved_path.is_file():
        raise TLIError(f"{out_dir}: not a training directory (no train_config.json)")
    saved = read_json(saved_path)
    if not isinstance(saved.get("train"), dict) or not isinstance(saved.get("model"), dict):
        raise TLIError(f'{saved_path}: expected "train" and "model" tables')
    pairs = Path(out_dir) / "pairs.tsv"
    if not pairs.is_file():
        raise TLIError(f"{out_dir}: the training pairs (pairs.tsv) are missing")
    try:
        cfg = build(TrainConfig, saved["train"])
    except TLIError as err:
        raise TLIError(f"{saved_path}: [train] {err}") from None
    return cfg, saved["model"], read_pairs(pairs)


def run(args: argparse.Namespace) -> int:
    """Run ``tli train``; returns the exit code.

    Everything is checked before the model is loaded and before anything is written: the
    settings, the pairs, the output directory, the device, and the settings against the
    model's structure (:func:`tli.train.check_trainable`, on the meta device).
    """
    from tli import surgery
    from tli.io import ensure_writable_dir
    from tli.lock import locked_dir
    from tli.models import ModelConfig, check_loadable, load_config, load_model, meta_model
    from tli.train import check_out_dir, check_tracker, check_trainable, load_depth, train

    out_dir = args.resume or args.out
    if args.resume is not None:
        cfg, model_values, pairs = _saved(args.resume)
        try:
            mcfg = build(ModelConfig, model_values)
        except TLIError as err:
            raise TLIError(f"{Path(args.resume) / 'train_config.json'}: [model] {err}") from None
        where = str(Path(args.resume) / "pairs.tsv")
    else:
        preset = train_values(args.preset, "--preset") if args.preset else {}
        cfg = build(TrainConfig, preset, overrides_from_args(TrainConfig, args))
        mcfg = model_config(args)
        pairs = None
    check_tracker(cfg.report_to)  # before any model is loaded
    needs_target = cfg.loss_layers is None or "target" in cfg.loss_layers
    if cfg.layer is None and needs_target:
        raise TLIError("--layer is required (run `tli scan` to choose one)")
    if args.plan:
        from tli.models import config_only
        from tli.plan import print_plan, train_stage

        config = config_only(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
        return print_plan([train_stage(mcfg, config, cfg)], mcfg.device)
    ensure_writable_dir(out_dir)
    check_out_dir(out_dir, resume=args.resume is not None)
    card = None  # a resume reuses the card facts train_config.json recorded
    if pairs is None:
        sets = pair_sets(args)
        pairs, where = sets.trained, sets.where
        card = {
            "languages": list(sets.languages),
            "data": sets.summary(),
            "command": "tli " + shlex.join(str(a) for a in args.argv),
        }
    check_loadable(mcfg)
    _, config = load_config(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
    depth = load_depth(cfg, surgery.num_layers(config))
    check_trainable(cfg, meta_model(mcfg, max_layer=depth), pairs, where)
    with locked_dir(out_dir, "train"):
        check_out_dir(out_dir, resume=args.resume is not None)  # again, with the lock held
        loaded = load_model(mcfg, max_layer=depth, lm_head=False)  # training never uses it
        result = train(
            loaded,
            pairs,
            cfg,
            out_dir,
            resume=args.resume is not None,
            model_config=to_dict(mcfg),
            card=card,
        )
    print(
        f"trained {result.steps} steps in {result.seconds:.1f} s "
        f"({result.steps / max(result.seconds, 1e-9):.2f} steps/s), final loss "
        f"{result.final_loss:.4f}; adapter -> {result.adapter_dir}"
    )
    return 0
