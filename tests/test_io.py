"""Writing files (``tli.io``): atomic writes, leftovers of killed writers, disk errors."""

import json
import os

import pytest

from tli.errors import TLIError
from tli.io import is_leftover


def test_atomic_write_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    from tli.io import atomic_write_text

    target = tmp_path / "result.json"
    atomic_write_text(target, '{"old": true}\n')

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def dies(src, dst):
        raise Killed  # the process "dies" after writing the temporary, before the rename

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(Killed):
        atomic_write_text(target, '{"new": true}\n' * 1000)
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_leftovers_of_killed_writers_are_hidden_and_recognised():
    assert is_leftover(".evaluation.json.abc123.tmp")
    assert is_leftover(".final.tmp-k2j3")
    assert is_leftover(".final.old")
    assert is_leftover(".run.lock.123.tmp")
    for name in ("evaluation.json", "final", "run.lock", "report.tmp.html", ".hidden"):
        assert not is_leftover(name)


def test_disk_errors_while_writing_are_one_line(tmp_path, monkeypatch, capsys, inputs):
    from tli.io import atomic_write_text

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TLIError, match="x.txt: cannot write: No space left on device"):
        atomic_write_text(tmp_path / "x.txt", "data")
    assert list(tmp_path.iterdir()) == []


# --- a full disk: a real one where this machine allows mounting a small tmpfs -----------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KiB tmpfs (root may mount one on Linux); the test is skipped where it cannot."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _temporaries(root):
    return [p for p in root.rglob(".*") if is_leftover(p.name)]


def test_atomic_write_to_a_full_disk_is_one_line_without_a_temporary(tiny_disk):
    from tli.io import atomic_write_bytes

    atomic_write_bytes(tiny_disk / "keep.bin", b"old")
    with pytest.raises(TLIError, match=r"big.bin: cannot write: No space left on device"):
        atomic_write_bytes(tiny_disk / "big.bin", b"x" * 400_000)
    with pytest.raises(TLIError, match=r"keep.bin: cannot write: No space left on device"):
        atomic_write_bytes(tiny_disk / "keep.bin", b"y" * 400_000)
    assert (tiny_disk / "keep.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["keep.bin"]


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_full_disk_during_a_command_is_one_line_exit_2(
    run_cli, tiny_disk, tiny_model_dir, inputs, command
):
    """`tli train` and `tli run` into a disk that fills up part-way (a real tmpfs): one line,
    exit 2, the file named, no temporary left; filling it first makes the early writes fail."""
    from conftest import assert_user_error

    base = ["--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv"]
    if command == "train":
        argv = ["train", *base, "--layer", "2", "--epochs", "3", "--save-every", "1"]
    else:
        argv = ["run", *base, "--set", "train.epochs=3", "--set", "scan.n_boot=20",
                "--set", "evaluate.n_boot=20", "--set", "figures.tsne_pairs=8"]  # fmt: skip
    for i in range(2):  # the second attempt starts on an almost full disk
        code, _, err = run_cli(*argv, "--out", tiny_disk / f"out{i}")
        assert_user_error(code, err, "cannot write: No space left on device")
        assert str(tiny_disk) in err.splitlines()[-1]
        assert _temporaries(tiny_disk) == []


def test_a_full_disk_while_saving_an_adapter(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type: one line naming the adapter."""
    from safetensors import SafetensorError

    from tli.adapters import save_adapter

    class Model:
        def save_pretrained(self, path, **kwargs):
            (path / "adapter_model.safetensors").write_bytes(b"half")
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")  # fmt: skip

    with pytest.raises(TLIError, match=r"final: cannot write: No space left on device$"):
        save_adapter(Model(), tmp_path / "final", {})
    assert list(tmp_path.iterdir()) == []


# --- reading: only regular files, of a bounded size; JSON without repeated keys -------------


def test_only_regular_files_are_read(tmp_path):
    from tli.io import read_bytes, read_text

    os.mkfifo(tmp_path / "fifo")  # reading would block until a writer came
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "ok").write_bytes(b"ok")
    for path, needle in ((tmp_path / "fifo", "not a regular file"),
                         ("/dev/zero", "not a regular file"),  # would never end
                         (tmp_path, "Is a directory"),
                         (tmp_path / "nope", "no such file")):  # fmt: skip
        with pytest.raises(TLIError, match=needle):
            read_text(path)
    with pytest.raises(TLIError, match="larger than"):
        read_bytes(tmp_path / "big", limit=100)
    assert read_bytes(tmp_path / "ok", limit=2) == b"ok"


def test_read_json_refuses_a_repeated_key(tmp_path):
    from tli.io import read_json

    path = tmp_path / "a.json"
    path.write_text('{"r": 16, "r": 8}')
    with pytest.raises(TLIError, match=r"a.json: cannot read: duplicate key 'r'"):
        read_json(path)
    path.write_text('{"r": 16, "nested": {"x": 1}}')
    assert read_json(path) == {"r": 16, "nested": {"x": 1}}
