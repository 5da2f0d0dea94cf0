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
from dataclasses import dataclass, field
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
    from safetensors import SafetensorError

    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    except OSError as err:
        raise TLIError(f"{path}: cannot write: {err.strerror or err}") from None
    try:
        # save_embedding_layers=False: the adapter never touches embeddings, and peft would
        # otherwise look the base model up on the hub to decide.
        try:
            model.save_pretrained(tmp, save_embedding_layers=False)
            atomic_write_json(tmp / ADAPTER_META, meta)
            write_card(tmp, meta=meta)  # replaces peft's template
        except (OSError, SafetensorError, TLIError) as err:  # e.g. no space left on the device
            raise TLIError(f"{path}: cannot write: {_write_problem(err)}") from None
        # mkdtemp makes 0700 and safetensors writes 0600; the adapter is an ordinary folder
        # with ordinary files, like everything else tli writes.
        mask = current_umask()
        tmp.chmod(0o777 & ~mask)
        for child in tmp.rglob("*"):
            child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TLIError(f"{path}: cannot write: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_problem(err: BaseException) -> str:
    """The OS's words for a failed write (safetensors wraps them as ``(os error N)``)."""
    import re

    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = first_line(err)
    found = re.search(r"os error (\d+)", text)
    if found:
        return os.strerror(int(found.group(1)))
    return text.rpartition("cannot write: ")[2]


@dataclass
class AdapterInfo:
    """A peft LoRA adapter directory, read and checked (see :func:`read_adapter`).

    Attributes:
        dir: The directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        config: The parsed ``adapter_config.json``.
        meta: The parsed ``tli_adapter.json`` ({} for an adapter not trained by tli).
        shapes: Weight name (prefix ``base_model.model.`` removed) -> shape.
        raw_shapes: Weight name as saved -> shape.
    """

    dir: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    raw_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

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
    _check_lora_config(config, path / ADAPTER_CONFIG)
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
        if not tensor.is_floating_point():
            raise TLIError(
                f"adapter {path}: weight {name} holds {str(tensor.dtype).removeprefix('torch.')} "
                "values; LoRA weights are floating point"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise TLIError(f"adapter {path}: weight {name} holds NaN or infinity")
    raw = {name: tuple(t.shape) for name, t in weights.items()}
    shapes = {name.removeprefix(_PEFT_PREFIX): shape for name, shape in raw.items()}
    return AdapterInfo(path, config, meta, shapes, raw)


def _check_lora_config(config: dict[str, Any], where: Path) -> None:
    """The fields of ``adapter_config.json`` that tli relies on, checked with a clear message."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise TLIError(
            f"{where}: peft_type {kind!r} is not supported; tli reads LoRA adapters "
            '(peft_type "LORA")'
        )
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise TLIError(f"{where}: r must be a positive integer (the LoRA rank), got {r!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha == alpha:
        raise TLIError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise TLIError(
            f"{where}: target_modules must be a module name or a list of them, got {targets!r}"
        )


def missing_or_misshapen(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]
) -> str | None:
    """The first tensor an adapter's config implies that ``found`` lacks or holds misshapen.

    Args:
        expected: What peft's ``get_peft_model_state_dict`` gives for the injected adapter
            (names as saved, shapes as the config and the model imply).
        found: The tensors of the adapter's weights file.

    Returns:
        A description of the first problem (in the model's order), or None.
    """
    for name, tensor in expected.items():
        if name not in found:
            return f"tensor {name} is missing"
        if tuple(found[name].shape) != tuple(tensor.shape):
            return (
                f"tensor {name} has shape {list(found[name].shape)}, but its config and the "
                f"model imply {list(tensor.shape)}"
            )
    extra = [name for name in found if name not in expected]
    if extra:
        return f"{len(extra)} tensor(s) (e.g. {extra[0]}) are not used by its {ADAPTER_CONFIG}"
    return None


def check_tensors(info: AdapterInfo, structure: Any, use: str = "evaluated") -> None:
    """Check, before any weight is loaded, that every tensor the adapter's config implies is there.

    peft injects the adapter's config into ``structure`` (a throwaway
    :func:`tli.models.meta_model`: it is modified) and lists the tensors that config implies;
    the weights file must hold exactly those, with those shapes.

    Raises:
        TLIError: Naming the first missing or misshapen tensor, or one the config does not use.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    where = f"adapter {info.dir}"
    with quiet_peft():
        try:
            config = LoraConfig.from_pretrained(str(info.dir))
            injected = get_peft_model(structure.model, config)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise TLIError(
                f"{where}: cannot be applied to {structure.name!r}: {first_line(err)}"
            ) from None
    expected = get_peft_model_state_dict(injected)
    found = {name: torch.empty(shape, device="meta") for name, shape in info.raw_shapes.items()}
    problem = missing_or_misshapen(expected, found)
    if problem:
        raise TLIError(
            f"{where}: {problem}; the adapter would be {use} only in part (it loads completely "
            "or not at all)"
        )


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
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    with quiet_peft(record=True) as caught:
        try:
            # Mismatched shapes are left unloaded (not an exception) and reported below,
            # naming the tensor, with every other missing tensor.
            peft_model = PeftModel.from_pretrained(
                loaded.model, str(info.dir), is_trainable=False, ignore_mismatched_sizes=True
            )
        except (RuntimeError, ValueError, KeyError, TypeError, OSError, AttributeError) as err:
            _remove_adapters(loaded.model)
            raise TLIError(
                f"adapter {info.dir}: cannot be loaded onto {loaded.name!r}: {first_line(err)}"
            ) from None
    for w in caught:  # what peft found is checked below, completely; the rest is noise
        log.debug("peft: %s", first_line(str(w.message)))
    injected = {
        name
        for name, module in peft_model.get_base_model().named_modules()
        if "default" in getattr(module, "lora_A", {})
    }
    unused = sorted(set(info.modules) - injected)
    problem = None
    if unused:
        problem = (
            f"weights for {len(unused)} module(s) (e.g. {unused[0]}) are not used by its "
            f"{ADAPTER_CONFIG}"
        )
    else:
        expected = get_peft_model_state_dict(peft_model)
        problem = missing_or_misshapen(expected, load_file(info.dir / ADAPTER_WEIGHTS))
    if problem:
        peft_model.unload()
        raise TLIError(
            f"adapter {info.dir}: {problem}; the adapter would be {use} only in part (it loads "
            "completely or not at all)"
        )
    return peft_model


def _remove_adapters(model: Any) -> None:
    """Undo a half-finished injection: put every LoRA layer's base layer back in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


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
