"""Adapters: the peft LoRA directories tli writes, reads, checks and applies.

One module for everything about an adapter directory, so that every command (train, evaluate,
probe, sweep) writes and checks adapters the same way:

* :func:`save_adapter` writes peft's files plus ``tli_adapter.json`` (:data:`ADAPTER_META`),
  replacing the directory atomically;
* :func:`read_adapter` reads and checks a directory without a model (files, JSON, weights);
* :func:`check_adapter` checks it against a loaded model (name, architecture, depth, shapes);
* :class:`Merged` merges it into the model in place and can put the base weights back (never
  into quantized weights: merging would re-quantize them); :func:`attached` attaches it
  unmerged for a block and removes it after.

A missing or broken adapter is always an error, never a silent evaluation of the base model
(the paper's evaluation script did that when the adapter path was wrong).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tli import surgery
from tli.errors import TLIError, first_line
from tli.io import atomic_write_json, current_umask, ensure_dir, read_json

log = logging.getLogger("tli")

#: peft's files in an adapter directory, and tli's own record beside them.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "tli_adapter.json"
#: The model card in an adapter directory (the file the Hub shows).
CARD = "README.md"


@contextmanager
def quiet_peft(record: bool = False) -> Iterator[list[warnings.WarningMessage]]:
    """Silence peft's call of a deprecated transformers property for the block.

    peft 0.21 reads ``is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning on every adapter load; it says nothing about the adapter. With ``record``,
    every other warning is collected into the yielded list (e.g. peft's "missing adapter keys")
    instead of being shown.
    """
    with warnings.catch_warnings(record=record) as caught:
        if record:
            warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield caught if caught is not None else []


def write_card(adapter_dir: Path, evaluation: Any = None, meta: dict | None = None) -> Path:
    """(Re)write the model card ``README.md`` of an adapter directory atomically; return it.

    Args:
        adapter_dir: The adapter directory.
        evaluation: A :class:`tli.evaluate.EvalResult` of this adapter, whose verdicts and
            Table 1 the card then shows.
        meta: The adapter's metadata (default: its ``tli_adapter.json``).

    Raises:
        TLIError: ``meta`` is not given and the directory has no ``tli_adapter.json``.
    """
    from tli.card import card_text
    from tli.io import atomic_write_text

    adapter_dir = Path(adapter_dir)
    if meta is None:
        if not (adapter_dir / ADAPTER_META).is_file():
            raise TLIError(f"adapter {adapter_dir}: no {ADAPTER_META} to write a model card from")
        meta = read_json(adapter_dir / ADAPTER_META)
    path = adapter_dir / CARD
    atomic_write_text(path, card_text(meta, evaluation))
    return path


def save_adapter(model: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write the adapter in peft's format, tli's metadata and the model card (:mod:`tli.card`).

    ``path`` is replaced atomically: the files go to a temporary sibling that is renamed into
    place, so a reader sees the old adapter or the new one, never a mixture.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the adapter is an ordinary folder
    try:
        # save_embedding_layers=False: the adapter never touches embeddings, and peft would
        # otherwise look the base model up on the hub to decide.
        model.save_pretrained(tmp, save_embedding_layers=False)
        atomic_write_json(tmp / ADAPTER_META, meta)
        write_card(tmp, meta=meta)  # replaces peft's template
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



@dataclass
class AdapterInfo:
    """A peft LoRA adapter directory, read and checked (see :func:`read_adapter`).

    Attributes:
        dir: The directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        config: The parsed ``adapter_config.json``.
        meta: The parsed ``tli_adapter.json`` ({} for an adapter not trained by tli).
        shapes: Weight name (prefix ``base_model.model.`` removed) -> shape.
    """

    dir: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]

    @property
    def base_model(self) -> str | None:
        """The model the adapter was trained on: tli's record, else peft's."""
        return self.meta.get("model") or self.config.get("base_model_name_or_path") or None

    @property
    def layer(self) -> int | None:
        """The layer the adapter was trained at (tli adapters), else None."""
        layer = self.meta.get("layer")
        return int(layer) if isinstance(layer, int) else None

    @property
    def modules(self) -> list[str]:
        """Names (in the base model) of the modules the weights adapt."""
        names = {name.rsplit(".lora_", 1)[0] for name in self.shapes if ".lora_" in name}
        return sorted(names)

    def summary(self) -> dict[str, Any]:
        """What ``evaluation.json`` records about the adapter."""
        keys = ("base_model_name_or_path", "peft_type", "r", "lora_alpha", "target_modules")
        keys += ("layers_to_transform", "use_dora", "modules_to_save")
        peft = {k: self.config.get(k) for k in keys if k in self.config}
        # peft keeps target_modules as a set and writes it in hash order, which differs from
        # process to process; sorted, the same adapter gives the same evaluation.json.
        if isinstance(peft.get("target_modules"), list):
            peft["target_modules"] = sorted(peft["target_modules"], key=str)
        return {
            "dir": str(self.dir),
            "tli": dict(self.meta),
            "peft": peft,
            "modules": len(self.modules),
        }


_PEFT_PREFIX = "base_model.model."


def read_adapter(path: str | os.PathLike[str]) -> AdapterInfo:
    """Read and check an adapter directory, without a model: files, JSON, weights.

    ``path`` may be the adapter directory itself or a training directory, whose ``final/``
    adapter is then used.

    Raises:
        TLIError: The directory is missing, lacks ``adapter_config.json`` or
            ``adapter_model.safetensors``, either is unreadable or corrupted, the weights
            are empty or hold NaN or infinity.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "no such directory"
        raise TLIError(f"adapter {path}: {what} (a missing adapter is never evaluated as the base)")
    if not (path / ADAPTER_CONFIG).is_file() and (path / "final" / ADAPTER_CONFIG).is_file():
        log.info("adapter %s is a training directory: using its final/ adapter", path)
        path = path / "final"
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise TLIError(
                f"adapter {path}: {name} is missing (not a peft adapter directory; a missing "
                "adapter is never evaluated as the base model)"
            )
    config = read_json(path / ADAPTER_CONFIG)
    meta = read_json(path / ADAPTER_META) if (path / ADAPTER_META).is_file() else {}
    try:
        weights = load_file(path / ADAPTER_WEIGHTS)
    except Exception as err:  # safetensors raises its own error types for every corruption
        raise TLIError(
            f"adapter {path}: {ADAPTER_WEIGHTS} is corrupted or unreadable "
            f"({type(err).__name__}: {first_line(err)})"
        ) from None
    if not weights:
        raise TLIError(f"adapter {path}: {ADAPTER_WEIGHTS} holds no weights")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TLIError(f"adapter {path}: weight {name} holds NaN or infinity")
    shapes = {name.removeprefix(_PEFT_PREFIX): tuple(t.shape) for name, t in weights.items()}
    return AdapterInfo(path, config, meta, shapes)


def same_model(recorded: str, loaded: Any) -> bool:
    """Whether a recorded model name denotes the loaded model (same name or same directory)."""
    if recorded in (loaded.name, loaded.path):
        return True
    from tli.io import expand_user

    mine = [expand_user(p) for p in (loaded.name, loaded.path)]
    theirs = expand_user(recorded)
    if not theirs.exists():
        return False
    return any(p.exists() and p.resolve() == theirs.resolve() for p in mine)


def model_facts(loaded: Any) -> dict[str, Any]:
    """What results record about a base model: name, path, model_type, num_layers, hidden size."""
    return {
        "name": loaded.name,
        "path": str(loaded.path),
        "model_type": loaded.model.config.model_type,
        "num_layers": loaded.num_layers,
        "hidden_size": surgery.hidden_size(loaded.model),
        "quantization": getattr(loaded, "quantization", None),
    }


def is_quantized(model: Any) -> bool:
    """Whether the model's weights are quantized (bitsandbytes 4-bit or 8-bit)."""
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    return any(getattr(model, f"is_loaded_in_{bits}bit", False) for bits in (4, 8))


def _weights_in_words(quantization: dict[str, Any] | None) -> str:
    if not quantization:
        return "unquantized"
    return f"{quantization.get('bits', 4)}-bit {quantization.get('quant_type', 'nf4').upper()}"


def quantization_note(info: AdapterInfo, loaded: Any) -> str | None:
    """A warning when the adapter was trained on a base quantized differently from ``loaded``.

    Allowed (LoRA weights do not depend on the base's storage), but the figures then measure
    the adapter on a base it was not trained on. None when they agree or the adapter does not
    record its base's quantization (adapters from before tli recorded it).
    """
    if "quantization" not in info.meta:
        return None
    trained = info.meta.get("quantization") or None
    here = getattr(loaded, "quantization", None)
    if bool(trained) == bool(here):
        return None
    return (
        f"adapter {info.dir} was trained on {_weights_in_words(trained)} weights but is applied "
        f"to {_weights_in_words(here)} weights of {loaded.name!r}: allowed, but the figures "
        "measure it on a base it was not trained on"
    )


def check_adapter(info: AdapterInfo, loaded: Any) -> None:
    """Check that an adapter belongs to the loaded model: name, architecture, depth, shapes.

    Raises:
        TLIError: Naming both sides, when the adapter's ``base_model_name_or_path`` or its
            ``tli_adapter.json`` (model, model_type, num_layers, hidden_size) disagree with
            the loaded model, when a weight adapts a module the model lacks, or when a LoRA
            matrix does not fit its module.
    """
    facts = model_facts(loaded)
    where = f"adapter {info.dir}"
    for source, recorded in (
        ("base_model_name_or_path", info.config.get("base_model_name_or_path")),
        ("tli_adapter.json model", info.meta.get("model")),
    ):
        if recorded and not same_model(str(recorded), loaded):
            raise TLIError(
                f"{where} was trained on model {recorded!r} ({source}), but the loaded model is "
                f"{loaded.name!r}; pass --model {recorded} or the matching adapter"
            )
    for key in ("model_type", "num_layers", "hidden_size"):
        recorded = info.meta.get(key)
        if recorded is not None and recorded != facts[key]:
            raise TLIError(
                f"{where} was trained on a model with {key} {recorded!r} (tli_adapter.json), but "
                f"the loaded model {loaded.name!r} has {key} {facts[key]!r}"
            )
    model = loaded.model
    for name, shape in info.shapes.items():
        if ".lora_" not in name:
            continue
        module_name, _, kind = name.partition(".lora_")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise TLIError(
                f"{where}: weight {name} adapts module {module_name!r}, which the loaded model "
                f"{loaded.name!r} does not have"
            ) from None
        dims = surgery.linear_dims(module)
        if dims is None or len(shape) != 2:
            continue
        fan_in, fan_out = dims
        if kind.startswith("A.") and shape[1] != fan_in:
            raise TLIError(
                f"{where}: {name} has shape {list(shape)}, but {module_name} of the loaded model "
                f"{loaded.name!r} takes {fan_in} inputs"
            )
        if kind.startswith("B.") and shape[0] != fan_out:
            raise TLIError(
                f"{where}: {name} has shape {list(shape)}, but {module_name} of the loaded model "
                f"{loaded.name!r} gives {fan_out} outputs"
            )


def _load_onto(loaded: Any, info: AdapterInfo, use: str) -> Any:
    """``PeftModel.from_pretrained`` onto ``loaded.model`` in place, fully or not at all.

    Raises:
        TLIError: peft cannot load the adapter, or it holds weights for modules its own config
            does not inject (it would be ``use``d only in part).
    """
    from peft import PeftModel

    with quiet_peft(record=True) as caught:
        try:
            peft_model = PeftModel.from_pretrained(loaded.model, str(info.dir), is_trainable=False)
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as err:
            raise TLIError(
                f"adapter {info.dir}: cannot be loaded onto {loaded.name!r}: {first_line(err)}"
            ) from None
    for w in caught:
        if "adapter" in str(w.message).lower() or "key" in str(w.message).lower():
            log.warning("peft: %s", first_line(str(w.message)))
    injected = {
        name
        for name, module in peft_model.get_base_model().named_modules()
        if "default" in getattr(module, "lora_A", {})
    }
    unused = sorted(set(info.modules) - injected)
    if unused:
        peft_model.unload()
        raise TLIError(
            f"adapter {info.dir}: weights for {len(unused)} module(s) (e.g. {unused[0]}) are not "
            f"used by its {ADAPTER_CONFIG}; the adapter would be {use} only in part"
        )
    return peft_model


class Merged:
    """The adapter merged into the model in place; :meth:`restore` puts the base weights back."""

    def __init__(self, loaded: Any, info: AdapterInfo, use: str = "evaluated") -> None:
        model = loaded.model
        if is_quantized(model):  # merging re-quantizes: every figure would carry rounding error
            raise TLIError(
                f"the adapter cannot be merged into the quantized weights of {loaded.name!r}; "
                "apply it unmerged (tli.adapters.attached)"
            )
        self.saved: dict[str, dict[str, torch.Tensor]] | None = {}
        for name in info.modules:
            params = dict(model.get_submodule(name).named_parameters(recurse=False))
            if not all(p.is_floating_point() for p in params.values()):
                self.saved = None  # e.g. 4-bit weights: merging re-quantises, no exact copy
                break
            self.saved[name] = {k: p.detach().clone() for k, p in params.items()}
        if info.config.get("modules_to_save"):
            self.saved = None
        self.model = _load_onto(loaded, info, use).merge_and_unload()  # same object as before

    def restore(self) -> bool:
        """Put the base weights back (exactly); False when they could not be kept."""
        if self.saved is None:
            return False
        with torch.no_grad():
            for name, params in self.saved.items():
                module = self.model.get_submodule(name)
                for key, value in params.items():
                    getattr(module, key).data.copy_(value)
        return True


@contextmanager
def attached(loaded: Any, info: AdapterInfo, use: str = "probed") -> Iterator[Any]:
    """The loaded model with the adapter attached (not merged) for the block; removed after.

    peft injects the LoRA layers into ``loaded.model`` in place; on exit ``unload()`` puts the
    original layers back, so ``loaded.model`` is exactly the base model again.

    Raises:
        TLIError: peft cannot load the adapter, or the adapter holds weights for modules its
            own config does not inject (it would be applied only in part).
    """
    peft_model = _load_onto(loaded, info, use)
    try:
        peft_model.eval()
        yield peft_model
    finally:
        peft_model.unload()


def is_identity(info: AdapterInfo) -> bool:
    """Whether every LoRA B matrix of the adapter is zero (the adapter changes nothing)."""
    from safetensors import safe_open

    with safe_open(str(info.dir / ADAPTER_WEIGHTS), "pt") as f:
        keys = [k for k in f.keys() if ".lora_B" in k]
        return bool(keys) and all(not bool(f.get_tensor(k).any()) for k in keys)


def check_base(base: Any, use: str) -> None:
    """Refuse a truncated model or one that already carries adapters as the base for ``use``."""
    if base.truncated:
        raise TLIError(
            f"{use} needs the full model; {base.name!r} was built with "
            f"{base.depth} of {base.num_layers} blocks (max_layer)"
        )
    if hasattr(base.model, "peft_config") or hasattr(base.model, "get_base_model"):
        raise TLIError(f"model {base.name!r} already carries adapters; load a fresh base model")
