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
