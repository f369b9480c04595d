"""Issue 12, section 5: writing checkpoint files.

``save_checkpoint`` never replaces a file created while it was writing (unless told to), gives
new files the mode the umask allows and keeps an overwritten file's mode, and removes the
temporary file a killed writer left behind.
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from dualsn import port

STATE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


def _writer(framework):
    """The function save_checkpoint serializes with (to interrupt it in a test)."""
    if framework == "torch":
        torch = pytest.importorskip("torch")
        return torch, "save"
    return pickle, "dump"


def _suffix(framework):
    return ".pt" if framework == "torch" else ".pdparams"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """``umask(value)`` sets the process umask for one test; it is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("framework", ["paddle", "torch"])
def test_a_file_created_meanwhile_is_never_replaced(tmp_path, monkeypatch, framework):
    module, name = _writer(framework)
    path = tmp_path / ("x" + _suffix(framework))
    real = getattr(module, name)

    def racing(*args, **kwargs):
        path.write_bytes(b"someone else's checkpoint")  # appears while ours is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, racing)
    with pytest.raises(FileExistsError, match="was created while the checkpoint was being written"):
        port.save_checkpoint(STATE, path, framework)
    monkeypatch.undo()
    assert path.read_bytes() == b"someone else's checkpoint"
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left


def test_exclusive_create_without_hard_links(tmp_path, monkeypatch):
    # A file system without hard links: the name is claimed with O_EXCL instead.
    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "x.pdparams"
    port.save_checkpoint(STATE, path, "paddle")
    np.testing.assert_array_equal(port.load_checkpoint(path)["w"], STATE["w"])
    real = pickle.dump

    def racing(*args, **kwargs):
        (tmp_path / "y.pdparams").write_bytes(b"theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(pickle, "dump", racing)
    with pytest.raises(FileExistsError):
        port.save_checkpoint(STATE, tmp_path / "y.pdparams", "paddle")
    assert (tmp_path / "y.pdparams").read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["x.pdparams", "y.pdparams"]


@pytest.mark.parametrize("framework", ["paddle", "torch"])
def test_new_files_honour_the_umask(tmp_path, umask, framework):
    if framework == "torch":
        pytest.importorskip("torch")
    umask(0o022)
    port.save_checkpoint(STATE, tmp_path / ("a" + _suffix(framework)), framework)
    assert mode(tmp_path / ("a" + _suffix(framework))) == 0o644
    umask(0o077)
    port.save_checkpoint(STATE, tmp_path / ("b" + _suffix(framework)), framework)
    assert mode(tmp_path / ("b" + _suffix(framework))) == 0o600


def test_an_overwritten_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "a.pdparams"
    port.save_checkpoint(STATE, path, "paddle")
    for kept in (0o640, 0o600, 0o664):
        os.chmod(path, kept)
        port.save_checkpoint({"w": np.zeros(3, np.float32)}, path, "paddle", overwrite=True)
        assert mode(path) == kept
    np.testing.assert_array_equal(port.load_checkpoint(path)["w"], np.zeros(3, np.float32))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_temporary_file_has_a_recognizable_name(tmp_path, monkeypatch):
    seen = []
    real = pickle.dump

    def spying(*args, **kwargs):
        seen.extend(os.listdir(tmp_path))
        return real(*args, **kwargs)

    monkeypatch.setattr(pickle, "dump", spying)
    port.save_checkpoint(STATE, tmp_path / "m.pdparams", "paddle")
    (temp,) = seen
    assert port._temp_owner(temp) == ("m.pdparams", os.getpid())
    assert temp.startswith(".m.pdparams.") and temp.endswith(port.TEMP_SUFFIX)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    dead = _dead_pid()
    old = time.time() - 2 * port.STALE_TEMP_SECONDS
    left = tmp_path / f".m.pdparams.{dead}-0123abcd{port.TEMP_SUFFIX}"
    left.write_bytes(b"half a checkpoint")
    os.utime(left, (old, old))
    fresh = tmp_path / f".m.pdparams.{dead}-4567abcd{port.TEMP_SUFFIX}"  # dead, but written just now
    fresh.write_bytes(b"x")
    alive = tmp_path / f".m.pdparams.{os.getpid()}-89abcdef{port.TEMP_SUFFIX}"  # a live writer's
    alive.write_bytes(b"x")
    os.utime(alive, (old, old))
    other = tmp_path / f".n.pdparams.{dead}-0123abcd{port.TEMP_SUFFIX}"  # another file's
    other.write_bytes(b"x")
    os.utime(other, (old, old))
    unrelated = tmp_path / ".m.pdparams.notes"
    unrelated.write_bytes(b"x")
    os.utime(unrelated, (old, old))

    port.save_checkpoint(STATE, tmp_path / "m.pdparams", "paddle")
    assert not left.exists()
    assert fresh.exists() and alive.exists() and other.exists() and unrelated.exists()
    assert port._temp_owner(left.name) == ("m.pdparams", dead)
    assert port._temp_owner(unrelated.name) is None


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch, error):
    def failing(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError) as info:
        port.save_checkpoint(STATE, tmp_path / "f.pdparams", "paddle")
    assert info.value.errno == error
    assert os.listdir(tmp_path) == []
