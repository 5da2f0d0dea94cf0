"""Named presets: how ``tli run``, ``tli train`` and ``tli sweep`` name a protocol.

A preset is a partial run config: top-level keys (``pooling``) and one table per stage section
(``scan``, ``train``, ...). ``tli run --preset NAME`` layers the whole preset under the config
file and the command line; ``tli train --preset NAME`` takes its ``pooling`` and ``train``
values; a sweep grid's ``[sweep] preset = NAME`` takes the same as the base of every cell.
"""

from __future__ import annotations

from typing import Any

from tli.errors import TLIError

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


def get_preset(name: str, where: str = "preset") -> dict[str, Any]:
    """The values of preset ``name``; a TLIError naming the known presets otherwise."""
    if not isinstance(name, str) or name not in PRESETS:
        raise TLIError(f"{where}: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def train_values(name: str, where: str = "preset") -> dict[str, Any]:
    """The TrainConfig values of preset ``name``: its ``train`` table plus its ``pooling``."""
    values = get_preset(name, where)
    out = dict(values.get("train", {}))
    if "pooling" in values:
        out["pooling"] = values["pooling"]
    return out
