"""Model cards (``tli.card``): Hugging Face metadata and a body without placeholders."""

from __future__ import annotations

from huggingface_hub import ModelCard

from tli.card import CITATION, TAGS, card_text
from tli.models import model_origin


def _meta(**extra):
    meta = {
        "tli_version": "0.1.0",
        "model": "gemma-3-270m",
        "base_model": model_origin("gemma-3-270m"),
        "model_type": "gemma3_text",
        "num_layers": 18,
        "languages": ["Swahili", "English"],
        "data": {"source": "bundled lexicon", "sha256": {"tli/data/lexicon.tsv": "0f" * 32},
                 "trained": 863, "control": 95, "how": "the split column"},
        "command": "tli run --config runs/first/config.toml --out NEW_RUN_DIR",
        "train": {"loss": "info_nce", "lr": 2e-4, "epochs": 5, "lora_r": 16,
                  "target_modules": ["q_proj", "v_proj"], "loss_layers": ["final"]},
        "loss_layers": [18],
        "adapt_layers": None,
        "epoch": 5, "step": 540, "loss": 0.1234,
    }  # fmt: skip
    meta.update(extra)
    return meta


def test_the_embedded_model_card_names_its_hub_id_license_and_languages(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(card_text(_meta()))
    card = ModelCard.load(path)
    assert card.data.base_model == "google/gemma-3-270m" and card.data.license == "gemma"
    assert card.data.library_name == "peft" and card.data.language == ["sw", "en"]
    assert card.data.tags == list(TAGS)
    text = card.text
    assert "[More Information Needed]" not in path.read_text()
    assert "tli's embedded `gemma-3-270m`" in text and "Swahili → English" in text
    assert "| trained pairs | 863 |" in text and "0f0f0f" in text
    assert "| `target_modules` | q_proj, v_proj |" in text and "| adapted blocks | all |" in text
    assert "epoch 5 of 5, step 540, loss 0.1234" in text
    assert "tli run --config runs/first/config.toml" in text and CITATION in text
    assert "Not evaluated yet" in text
    assert 'AutoModelForCausalLM.from_pretrained("google/gemma-3-270m")' in text


def test_a_card_leaves_out_what_tli_does_not_know(tmp_path):
    meta = _meta(base_model={"base_model": "/models/mine", "local": True, "license": None},
                 languages=["source", "target"], command=None)  # fmt: skip
    path = tmp_path / "README.md"
    path.write_text(card_text(meta))
    card = ModelCard.load(path)
    assert card.data.base_model == "/models/mine" and card.data.license is None
    assert card.data.language is None  # "source" and "target" are no language codes
    assert "not a hub id" in card.text and "License: not known to tli" in card.text
    assert "through tli's Python API" in card.text
