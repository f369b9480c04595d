"""Issue 12, sections 5 and 6 on the command line: write errors exit with a documented code and
one clear line; the working directory cannot shadow installed packages; checkpoint keys are
echoed with their control characters escaped; hostile checkpoints exit 4, not with a traceback.
"""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

from dualsn import cli, port  # noqa: E402
from dualsn.examples import sngan  # noqa: E402

SNGAN = "dualsn.examples.sngan"
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def generator_pt(tmp_path) -> str:
    path = tmp_path / "src" / "g.pt"
    path.parent.mkdir()
    torch.save(sngan.torch_generator().state_dict(), path)
    return str(path)


def port_args(src, dst, *extra):
    return ["port", src, str(dst), "--model", f"{SNGAN}:paddle_generator", "--quiet", *extra]


def one_error_line(err: str, command: str = "port") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dualsn {command}: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Write errors: exit 9 and one line


def test_a_full_disk_exits_9_with_one_line(tmp_path, capsys, monkeypatch, generator_pt):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pickle, "dump", full)
    dst = tmp_path / "out" / "g.pdparams"
    dst.parent.mkdir()
    assert cli.main(port_args(generator_pt, dst)) == cli.EXIT_WRITE == 9
    line = one_error_line(capsys.readouterr().err)
    assert line == f"dualsn port: error: cannot write {dst}: No space left on device; nothing was written"
    assert os.listdir(dst.parent) == []


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS])
def test_an_unwritable_directory_exits_9(tmp_path, capsys, monkeypatch, generator_pt, error):
    # Tests may run as root, who can write anywhere: refuse the temporary file as the OS would.
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if os.fspath(path).endswith(port.TEMP_SUFFIX):
            raise OSError(error, os.strerror(error), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    dst = tmp_path / "g.pdparams"
    assert cli.main(port_args(generator_pt, dst)) == cli.EXIT_WRITE
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {dst}: {os.strerror(error)}" in line
    assert not dst.exists()


def test_a_destination_created_meanwhile_exits_7(tmp_path, capsys, monkeypatch, generator_pt):
    dst = tmp_path / "g.pdparams"
    real = pickle.dump

    def racing(*args, **kwargs):
        dst.write_bytes(b"theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(pickle, "dump", racing)
    assert cli.main(port_args(generator_pt, dst)) == cli.EXIT_EXISTS
    assert "was created while the checkpoint was being written" in one_error_line(capsys.readouterr().err)
    assert dst.read_bytes() == b"theirs"


def test_report_plot_write_error_exits_9(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from dualsn import report

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report.SNReport, "plot", full)
    png = tmp_path / "s.png"
    assert cli.main(["report", "--model", f"{SNGAN}:torch_generator", "--plot", str(png)]) == cli.EXIT_WRITE
    err = capsys.readouterr().err
    assert one_error_line(err, "report") == f"dualsn report: error: cannot write {png}: No space left on device"


def test_exit_code_9_is_documented():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^\| 9 \| .*cannot be written", readme, re.M)
    assert "9 DST (or the --plot file) cannot be written" in " ".join(cli.__doc__.split())
    assert "9 DST cannot be written" in " ".join((ROOT / "docs" / "porting.md").read_text().split())


# ---------------------------------------------------------------------------------------------
# Hostile checkpoints on the command line: exit 4 with one line


def test_a_malformed_slice_table_exits_4(tmp_path, capsys):
    bad = tmp_path / "s.pdparams"
    bad.write_bytes(pickle.dumps({"w@@.0": np.zeros(4, np.float32),
                                  "UnpackBigParamInfor@@": {"w": {"OriginShape": (4,)}}}, protocol=2))
    argv = ["port", str(bad), str(tmp_path / "x.pt"), "--model", f"{SNGAN}:torch_generator"]
    assert cli.main(argv) == cli.EXIT_BAD_FORMAT
    assert "'w': no 'slices' list" in one_error_line(capsys.readouterr().err)
    assert cli.main(["report", "--model", f"{SNGAN}:torch_generator", "--checkpoint", str(bad)]) == cli.EXIT_BAD_FORMAT
    assert "'w': no 'slices' list" in one_error_line(capsys.readouterr().err, "report")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("command", ["port", "report"])
def test_a_fifo_exits_4_at_once(tmp_path, capsys, command):
    fifo = tmp_path / "ck.pt"
    os.mkfifo(fifo)
    if command == "port":
        argv = ["port", str(fifo), str(tmp_path / "x.pdparams"), "--model", f"{SNGAN}:paddle_generator"]
    else:
        argv = ["report", "--model", f"{SNGAN}:torch_generator", "--checkpoint", str(fifo)]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", cli.main(argv)), daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("blocked on a FIFO")
    assert result["code"] == cli.EXIT_BAD_FORMAT
    assert "not a regular file (a FIFO)" in one_error_line(capsys.readouterr().err, command)


def test_a_trainer_checkpoint_is_not_called_unsafe(tmp_path, capsys):
    # A PaddleGAN-style nested file is read, and its generator entry is picked (issue 13).
    path = str(tmp_path / "trainer.pdparams")
    paddle.save({"netG": sngan.paddle_generator().state_dict(), "epoch": 3}, path)
    assert cli.main(["port", path, str(tmp_path / "g.pt"), "--model", f"{SNGAN}:torch_generator"]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert "refused global" not in err and f"using entry 'netG' of {path}" in out


# ---------------------------------------------------------------------------------------------
# Control characters in checkpoint keys


HOSTILE = "evil\x1b[31m\rkey\u202e"


def test_control_characters_in_keys_are_escaped(tmp_path, capsys):
    state = {k: np.array(port._to_numpy(v)) for k, v in sngan.torch_generator().state_dict().items()}
    state[HOSTILE] = np.zeros(2, np.float32)
    src = tmp_path / "h.pt"
    port.save_checkpoint(state, src, "torch")
    dst = tmp_path / "h.pdparams"
    assert cli.main(["port", str(src), str(dst), "--model", f"{SNGAN}:paddle_generator", "--no-strict"]) == 0
    out = capsys.readouterr().out
    assert "warning: evil\\x1b[31m\\rkey\\u202e in the source has no place in the target: skipped" in out
    argv = ["port", str(src), str(dst), "--model", f"{SNGAN}:paddle_generator", "--overwrite"]
    assert cli.main(argv) == cli.EXIT_MISMATCH
    captured = capsys.readouterr()
    for text in (out, captured.out, captured.err):
        assert not any(c in text for c in "\x1b\r\u202e"), repr(text)
    assert "evil\\x1b[31m\\rkey\\u202e" in captured.err


def test_terminal_text_escapes_only_what_it_must():
    assert cli.terminal_text("a.b [3, 4] <- x_y") == "a.b [3, 4] <- x_y"
    assert cli.terminal_text("a\tb\x00c\x7f\x9b") == "a\\tb\\x00c\\x7f\\x9b"
    assert cli.terminal_text("two\nlines") == "two\\nlines"
    assert cli.terminal_text("two\nlines", keep_newlines=True) == "two\nlines"
    assert cli.terminal_text("Größe σ") == "Größe σ"


# ---------------------------------------------------------------------------------------------
# The working directory cannot shadow installed packages


PLANTED = ("paddle", "torch", "numpy")
USER_MODULE = """
import paddle  # the installed one, not ./paddle.py
from dualsn.examples import sngan

def make():
    return sngan.paddle_generator()

def inputs():
    return sngan.generator_inputs(2, 0)
"""


def plant(directory: pathlib.Path, names=PLANTED) -> None:
    for name in names:
        marker = directory / f"IMPORTED_{name}"
        (directory / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def markers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.glob("IMPORTED_*"))


def run_dualsn(args, cwd, runner):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and p != str(cwd)))
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run([sys.executable, *runner, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_planted_modules_do_not_run_from_the_console_script(tmp_path, generator_pt):
    # The `dualsn` console script puts its own folder, not the working directory, on sys.path.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dualsn_script.py").write_text("import sys\nfrom dualsn.cli import main\nsys.exit(main())\n")
    work = tmp_path / "downloaded"
    work.mkdir()
    plant(work)
    (work / "mymodels.py").write_text(USER_MODULE)
    result = run_dualsn(
        ["port", generator_pt, "g.pdparams", "--model", "mymodels:make", "--source-model",
         f"{SNGAN}:torch_generator", "--check", "--input-fn", "mymodels:inputs", "--quiet"],
        work, [str(bin_dir / "dualsn_script.py")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check: max abs diff" in result.stdout and (work / "g.pdparams").exists()
    assert markers(work) == []


def test_planted_frameworks_do_not_run_under_python_dash_m(tmp_path, generator_pt):
    # `python -m` itself puts the working directory first and imports dualsn (and numpy) from
    # there before dualsn starts; the frameworks dualsn imports later come from site-packages.
    work = tmp_path / "downloaded"
    work.mkdir()
    plant(work, ("paddle", "torch"))
    result = run_dualsn(["port", generator_pt, "g.pdparams", "--model", f"{SNGAN}:paddle_generator", "--quiet"],
                        work, ["-m", "dualsn"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert markers(work) == []


def test_a_local_module_named_like_an_installed_one_is_not_imported(tmp_path, capsys, monkeypatch, generator_pt):
    work = tmp_path / "downloaded"
    work.mkdir()
    plant(work, ("torch",))
    with open(work / "torch.py", "a") as f:
        f.write("def make():\n    raise SystemExit('ran the planted factory')\n")
    monkeypatch.chdir(work)
    path_before = list(sys.path)
    assert cli.main(["port", generator_pt, "g.pdparams", "--model", "torch:make"]) == cli.EXIT_FACTORY
    line = one_error_line(capsys.readouterr().err)
    assert "'torch' has no attribute 'make'" in line
    assert "torch.py in the working directory was not imported: an installed module has that name" in line
    assert markers(work) == []
    assert sys.path == path_before


def test_a_local_module_is_imported_from_the_working_directory_only_when_named(tmp_path, capsys, monkeypatch,
                                                                             generator_pt):
    work = tmp_path / "project"
    work.mkdir()
    (work / "local_factories_12.py").write_text(USER_MODULE)
    monkeypatch.chdir(work)
    monkeypatch.delitem(sys.modules, "local_factories_12", raising=False)
    path_before = list(sys.path)
    assert cli.main(["port", generator_pt, "g.pdparams", "--model", "local_factories_12:make", "--quiet"]) == 0
    assert (work / "g.pdparams").exists()
    assert sys.modules["local_factories_12"].__file__ == str(work / "local_factories_12.py")
    assert sys.path == path_before  # nothing left behind in an embedding process
