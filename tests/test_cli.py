import importlib.util
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tli.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tli: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "tli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("embed", "pairs", "train"):
        assert command in out


def test_embed_writes_vectors(capsys, tiny_model_dir, tmp_path):
    out_file = tmp_path / "v.safetensors"
    code, out, _ = run(
        capsys,
        "embed",
        "--model",
        str(tiny_model_dir),
        "--layers",
        "0,2,final",
        "mtoto",
        "child",
        "--out",
        str(out_file),
    )
    assert code == 0
    assert "(L=3, B=2, D=32)" in out
    assert load_file(out_file)["vectors"].shape == (3, 2, 32)


def test_embed_reads_a_file(capsys, tiny_model_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("mtoto\nchild\nkitabu\n", encoding="utf-8")
    code, out, _ = run(
        capsys,
        "embed",
        "--model",
        str(tiny_model_dir),
        "--layers",
        "1",
        "--file",
        str(words),
        "--out",
        str(tmp_path / "v.safetensors"),
    )
    assert code == 0 and "(L=1, B=3, D=32)" in out


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--model", "no-such-model", "x"], ["no-such-model", "not an embedded name"]),
        (["--model", "./missing/dir", "x"], ["./missing/dir"]),
        (["--model", "{model}", "--layers", "9", "x"], ["layer 9 is outside 0..4"]),
        (["--model", "{model}", "x", "   "], ["empty or whitespace-only"]),
        (["--model", "{model}", "--device", "cuda", "x"], ["CUDA is not available"]),
        (["--model", "{model}", "--file", "/nonexistent/words.txt"], ["no such file"]),
        (["--model", "{model}", "--batch-size", "0", "x"], ["--batch-size"]),
    ],
)
def test_embed_bad_input(capsys, tiny_model_dir, tmp_path, argv, needles):
    import torch

    if torch.cuda.is_available() and any("CUDA" in n for n in needles):
        pytest.skip("this machine has CUDA")
    argv = [a.replace("{model}", str(tiny_model_dir)) for a in argv]
    code, _, err = run(capsys, "embed", *argv, "--out", str(tmp_path / "v.safetensors"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "v.safetensors").exists()


def test_gguf_without_gguf_package(capsys, tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    code, _, err = run(capsys, "embed", "--model", str(fake), "x")
    assert_one_line_error(code, err, "needs the package gguf")


def test_missing_gguf_file(capsys, tmp_path):
    code, _, err = run(capsys, "embed", "--model", str(tmp_path / "nope.gguf"), "x")
    assert_one_line_error(code, err, "no such .gguf file")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tli", "embed", "--model", "no-such-model", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
