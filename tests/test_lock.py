"""Directory locks (``tli.lock``): every command that writes a directory holds one; a second
process is refused in one line; stale locks are taken over; a directory a failed command
created is removed again. The lock's race tests with real processes are in test_pipeline.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tli.errors import TLIError
from tli.lock import LOCK, acquire_lock, locked_dir, release_lock

from conftest import assert_user_error


@pytest.fixture
def live_pid():
    """The pid of a live process that is not this one."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def _hold(directory, pid, command):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK).write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "command": command}))  # fmt: skip


#: command -> argv template whose output directory is {out}.
WRITERS = {
    "run": "run --model {model} --pairs {d}/pairs.tsv --out {out}",
    "scan": "scan --model {model} --pairs {d}/split.tsv --n-boot 20 --out {out}",
    "train": "train --model {model} --pairs {d}/pairs.tsv --layer 2 --epochs 1 --out {out}",
    "evaluate": "evaluate --adapter {adapter} --pairs {d}/split.tsv --n-boot 20 --out {out}",
    "probe": "probe --adapter {adapter} --pairs {d}/split.tsv --n 1 --out {out}",
    "sweep": "sweep --grid {grid} --out {out}",
    "plot": "plot {out}",
}


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir, inputs):
    path = tmp_path_factory.mktemp("grid") / "grid.toml"
    path.write_text(
        f'[sweep]\nmodel = "{tiny_model_dir}"\npairs = "{inputs / "split.tsv"}"\nn_boot = 20\n'
        '[train]\nlayer = 2\nepochs = 1\nbatch_size = 4\n[grid]\nseed = [0]\n'
    )
    return path


@pytest.mark.parametrize("command", WRITERS)
def test_every_command_that_writes_a_directory_holds_a_lock(
    run_cli, tmp_path, inputs, tiny_model_dir, adapter, grid, live_pid, command
):
    """A live process holds --out: the command refuses in one line and writes nothing."""
    import shlex

    out = tmp_path / "out"
    _hold(out, live_pid, "train")
    argv = [t.format(d=inputs, model=tiny_model_dir, adapter=adapter, grid=grid, out=out)
            for t in shlex.split(WRITERS[command])]  # fmt: skip
    code, _, err = run_cli(*argv)
    assert_user_error(code, err, f"{out}: another tli train (pid {live_pid}) is using this "
                                 "directory")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [LOCK]


def test_a_lock_above_or_just_below_refuses_too(tmp_path, live_pid):
    run = tmp_path / "run"
    _hold(run, live_pid, "run")
    (run / "train").mkdir()
    with pytest.raises(TLIError, match=f"{run}: another tli run \\(pid {live_pid}\\)"):
        acquire_lock(run / "train", "train")
    (run / LOCK).unlink()
    _hold(run / "train", live_pid, "train")
    with pytest.raises(TLIError, match="another tli train"):
        acquire_lock(run, "run")
    (run / "train" / LOCK).unlink()
    lock = acquire_lock(run, "run")
    inner = acquire_lock(run / "train", "train")  # this process's own lock above: allowed
    release_lock(inner)
    release_lock(lock)
    assert not lock.exists() and not inner.exists()


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    _hold(tmp_path, 2**22 + 3, "evaluate")  # above Linux's pid_max: no such process
    with caplog.at_level("WARNING", logger="tli"):
        lock = acquire_lock(tmp_path, "scan")
    assert "taking over a stale lock" in caplog.text
    assert json.loads(lock.read_text())["command"] == "scan"


def test_a_directory_the_command_created_is_removed_when_nothing_was_written(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(TLIError, match="boom"):
        with locked_dir(target, "evaluate"):
            assert (target / LOCK).is_file()
            (target / ".x.tmp").write_text("half")  # a temporary of a failed write
            raise TLIError("boom")
    assert list(tmp_path.iterdir()) == []  # out, b and a: all created by the command
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(TLIError):
        with locked_dir(existing, "evaluate"):
            raise TLIError("boom")
    assert existing.is_dir() and list(existing.iterdir()) == []
    with locked_dir(target, "evaluate"):
        (target / "result.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["result.json"]


def test_the_processes_of_one_distributed_launch_share_the_lock(tmp_path, monkeypatch):
    """accelerate launches one tli per process: rank 0 holds the lock for all of them."""
    with locked_dir(tmp_path / "out", "train"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with locked_dir(tmp_path / "out", "train"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(TLIError):  # another launch's rank 0
            with locked_dir(tmp_path / "out", "train"):
                pass
