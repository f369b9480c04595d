"""The ``dualsn`` command line: ``dualsn port`` end to end, its output and its exit codes."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

from dualsn import cli, port  # noqa: E402
from dualsn.examples import sngan  # noqa: E402
from _numeric import rel  # noqa: E402

SNGAN = "dualsn.examples.sngan"
USER_MODELS = """
from dualsn.examples import sngan

def narrow_paddle_discriminator():
    return sngan.paddle_discriminator(width=16)

def scaled_paddle_discriminator():
    # Same weights, different function: what --check must catch.
    layer = sngan.paddle_discriminator()
    inner = layer.forward
    layer.forward = lambda x, y: inner(x, y) * 1.01
    return layer

def broken():
    raise RuntimeError("no GPU here")
"""


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A user's own module of factories, importable as ``user_models``."""
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_models", raising=False)
    return "user_models"


def eval_out(model, *inputs):
    model.eval()
    if port.framework_of(model) == "torch":
        with torch.no_grad():
            return model(*[torch.from_numpy(x) for x in inputs]).numpy()
    with paddle.no_grad():
        return model(*[paddle.to_tensor(x) for x in inputs]).numpy()


def train_forward(model, *inputs):
    model.train()
    if port.framework_of(model) == "torch":
        with torch.no_grad():
            model(*[torch.from_numpy(x) for x in inputs])
    else:
        with paddle.no_grad():
            model(*[paddle.to_tensor(x) for x in inputs])
    model.eval()


def warmed(model, which="D"):
    for seed in range(3):
        inputs = sngan.discriminator_inputs(4, seed) if which == "D" else sngan.generator_inputs(4, seed)
        train_forward(model, *inputs)
    return model


def save_native(model, path):
    if port.framework_of(model) == "torch":
        torch.save(model.state_dict(), path)
    else:
        paddle.save(model.state_dict(), str(path))
    return str(path)


def table_rows(text: str) -> dict[str, str]:
    """The per-tensor lines, by tensor name."""
    rows = {}
    for line in text.splitlines():
        if line.startswith(("check:", "wrote", "warning:")) or not line.strip():
            continue
        rows[line.split()[0]] = line
    return rows


# ---------------------------------------------------------------------------------------------
# Successful ports


def test_port_torch_to_paddle_with_check(tmp_path, capsys):
    source = warmed(sngan.torch_discriminator())
    src = save_native(source, tmp_path / "d.pt")
    dst = tmp_path / "d.pdparams"
    code = cli.main([
        "port", src, str(dst), "--model", f"{SNGAN}:paddle_discriminator",
        "--source-model", f"{SNGAN}:torch_discriminator", "--check",
        "--input-fn", f"{SNGAN}:discriminator_inputs",
    ])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out

    target = sngan.paddle_discriminator()
    rows = table_rows(out)
    assert sorted(rows) == sorted(target.state_dict())  # one line per tensor
    assert re.fullmatch(
        r"linear\.weight_orig +\[32, 1\] +transposed +sn original +<- linear\.parametrizations\.weight\.original",
        rows["linear.weight_orig"],
    )
    assert re.fullmatch(
        r"embed\.weight_u +\[10\] +as-is +sn u +<- embed\.parametrizations\.weight\.0\._u", rows["embed.weight_u"]
    )
    assert re.fullmatch(r"linear\.bias +\[1\] +as-is +- +<- linear\.bias", rows["linear.bias"])
    check = re.search(r"check: max abs diff (\S+), max rel diff (\S+) \(rtol 0.0001\): OK", out)
    assert check and float(check.group(2)) < 1e-5
    assert "wrote" in out and "39 tensors, 1 transposed, 30 spectral-norm tensors" in out

    # DST is a Paddle checkpoint that gives the torch model's outputs.
    target.set_state_dict(paddle.load(str(dst)))
    x = sngan.discriminator_inputs(4, seed=9)
    assert rel(eval_out(target, *x), eval_out(source, *x)) < 1e-5


def test_port_generator_with_input_shape(tmp_path, capsys):
    source = warmed(sngan.paddle_generator(), "G")
    src = save_native(source, tmp_path / "g.pdparams")
    dst = tmp_path / "g.pt"
    code = cli.main([
        "port", src, str(dst), "--model", f"{SNGAN}:torch_generator",
        "--source-model", f"{SNGAN}:paddle_generator", "--check", "--input-shape", "4,32", "--seed", "3",
    ])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    rows = table_rows(out)
    assert "transposed" in rows["linear.parametrizations.weight.original"]
    assert "<- bn0._mean" in rows["bn0.running_mean"]
    assert "(kept: Paddle has no counterpart)" in rows["bn0.num_batches_tracked"]
    assert "as-is" in rows["up1.parametrizations.weight.original"]  # ConvTranspose: same layout
    check = re.search(r"max rel diff (\S+)", out)
    assert float(check.group(1)) < 1e-5
    target = sngan.torch_generator()
    target.load_state_dict(torch.load(dst, weights_only=True))  # torch's own loader reads it
    z = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)
    assert rel(eval_out(target, z), eval_out(source, z)) < 1e-5


@pytest.mark.parametrize(
    "make_source, suffix, factory",
    [
        (lambda: sngan.paddle_discriminator(sn="builtin"), ".pdparams", "torch_discriminator"),
        (lambda: sngan.torch_discriminator(sn="parametrizations"), ".pt", "paddle_discriminator"),
        (lambda: sngan.torch_discriminator(sn="legacy"), ".pth", "paddle_discriminator"),
        (lambda: sngan.torch_discriminator(sn="legacy"), ".pt", "torch_discriminator"),
    ],
    ids=["paddle-builtin", "torch-parametrizations", "torch-legacy", "torch-legacy-to-dualsn-torch"],
)
def test_port_from_builtin_checkpoints(tmp_path, capsys, make_source, suffix, factory):
    source = warmed(make_source())
    src = save_native(source, tmp_path / f"src{suffix}")
    target = getattr(sngan, factory)()
    dst = tmp_path / ("dst.pt" if port.framework_of(target) == "torch" else "dst.pdparams")
    assert cli.main(["port", src, str(dst), "--model", f"{SNGAN}:{factory}", "--quiet"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert not table_rows(out) and "wrote" in out  # --quiet: only the summary
    port.load_state_dict(target, port.load_checkpoint(dst), source=port.detect_format(dst))
    x = sngan.discriminator_inputs(4, seed=8)
    assert rel(eval_out(target, *x), eval_out(source, *x)) < 1e-5


def test_python_dash_m_with_a_factory_in_the_working_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text("from dualsn.examples.sngan import paddle_generator as make\n")
    src = save_native(warmed(sngan.torch_generator(), "G"), tmp_path / "g.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run(
        [sys.executable, "-m", "dualsn", "port", src, "g.pdparams", "--model", "mymodels:make"],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote g.pdparams (paddle) from" in result.stdout
    assert (tmp_path / "g.pdparams").exists()


# ---------------------------------------------------------------------------------------------
# Failures: exit codes and messages


def test_check_failure_exits_1_and_writes_nothing(tmp_path, capsys, user_models):
    src = save_native(warmed(sngan.torch_discriminator()), tmp_path / "d.pt")
    dst = tmp_path / "d.pdparams"
    code = cli.main([
        "port", src, str(dst), "--model", f"{user_models}:scaled_paddle_discriminator",
        "--source-model", f"{SNGAN}:torch_discriminator", "--check",
        "--input-fn", f"{SNGAN}:discriminator_inputs",
    ])
    out = capsys.readouterr().out
    assert code == cli.EXIT_CHECK_FAILED
    diff = re.search(r"max rel diff (\S+) \(rtol 0.0001\): FAILED", out)
    assert diff and float(diff.group(1)) == pytest.approx(0.01, rel=1e-3)  # relative to the source
    assert "not written" in out and not dst.exists()


def test_checkpoint_that_does_not_fit_exits_6(tmp_path, capsys, user_models):
    src = save_native(sngan.torch_discriminator(), tmp_path / "d.pt")
    code = cli.main(["port", src, str(tmp_path / "d.pdparams"), "--model",
                     f"{user_models}:narrow_paddle_discriminator"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_MISMATCH
    assert "does not fit --model" in err and "the target was not changed" in err
    assert "shape mismatch for 'linear.weight_orig': the target has [16, 1]" in err
    assert not (tmp_path / "d.pdparams").exists()


def test_file_errors(tmp_path, capsys):
    model = f"{SNGAN}:paddle_discriminator"
    assert cli.main(["port", str(tmp_path / "nope.pt"), str(tmp_path / "x.pdparams"), "--model", model]) == cli.EXIT_NO_FILE
    assert "nope.pt: no such file" in capsys.readouterr().err

    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    (tmp_path / "a.pdparams").write_bytes((tmp_path / "a.pt").read_bytes())
    assert cli.main(["port", str(tmp_path / "a.pdparams"), str(tmp_path / "x.pt"), "--model",
                     f"{SNGAN}:torch_discriminator"]) == cli.EXIT_BAD_FORMAT
    assert "not a Paddle .pdparams checkpoint: it is a zip archive" in capsys.readouterr().err

    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert cli.main(["port", str(tmp_path / "junk.pt"), str(tmp_path / "x.pdparams"), "--model", model]) == cli.EXIT_BAD_FORMAT
    assert "not a torch checkpoint" in capsys.readouterr().err

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(  # a hand-written pickle that calls os.system
        b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode() + b"\x85R."
    )
    assert cli.main(["port", str(evil), str(tmp_path / "x.pt"), "--model",
                     f"{SNGAN}:torch_discriminator"]) == cli.EXIT_BAD_FORMAT
    assert "refused global os.system" in capsys.readouterr().err
    assert not marker.exists()


def test_destination_exists(tmp_path, capsys):
    src = save_native(sngan.torch_generator(), tmp_path / "g.pt")
    dst = tmp_path / "g.pdparams"
    dst.write_bytes(b"old")
    args = ["port", src, str(dst), "--model", f"{SNGAN}:paddle_generator"]
    assert cli.main(args) == cli.EXIT_EXISTS
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert dst.read_bytes() == b"old"
    assert cli.main(args + ["--overwrite"]) == cli.EXIT_OK
    assert sorted(port.load_checkpoint(dst)) == sorted(sngan.paddle_generator().state_dict())


@pytest.mark.parametrize(
    "factory, message",
    [
        ("no_such_package.models:make", "cannot import 'no_such_package.models': ModuleNotFoundError"),
        (f"{SNGAN}:no_such_factory", "has no attribute 'no_such_factory'"),
        (f"{SNGAN}:IMAGE_SIZE", "'IMAGE_SIZE' is not callable"),
        (f"{SNGAN}:discriminator_inputs", "returned a tuple, not a torch.nn.Module or a paddle.nn.Layer"),
        ("user_models:broken", "calling it failed: RuntimeError: no GPU here"),
    ],
)
def test_factory_errors_exit_5(tmp_path, capsys, user_models, factory, message):
    src = save_native(sngan.torch_generator(), tmp_path / "g.pt")
    assert cli.main(["port", src, str(tmp_path / "g.pdparams"), "--model", factory]) == cli.EXIT_FACTORY
    err = capsys.readouterr().err
    assert err.startswith("dualsn port: error: --model") and message in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "no_colon"], "expected the form pkg.module:factory"),
        (["--model", f"{SNGAN}:paddle_generator", "--check"], "--check needs --source-model"),
        (["--model", f"{SNGAN}:paddle_generator", "--check", "--source-model", f"{SNGAN}:torch_generator"],
         "--check needs --input, --input-shape or --input-fn"),
        (["--model", f"{SNGAN}:torch_generator"], "the target is a torch model: name DST .pt or .pth"),
        (["--model", f"{SNGAN}:paddle_generator", "--source-model", f"{SNGAN}:paddle_generator"],
         "is a torch checkpoint but --source-model builds a paddle model"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, extra, message):
    src = save_native(sngan.torch_generator(), tmp_path / "g.pt")
    assert cli.main(["port", src, str(tmp_path / "g.pdparams")] + extra) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_argparse_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["port", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--source-model" in help_text and "--check" in help_text


def test_progress_bar_on_a_large_checkpoint_on_a_terminal(tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    src = save_native(sngan.torch_generator(), tmp_path / "g.pt")
    terminal = Terminal()
    monkeypatch.setattr(cli._port, "PROGRESS_MIN_ELEMENTS", 1000)  # the generator has ~70k elements
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["port", src, str(tmp_path / "g.pdparams"), "--model", f"{SNGAN}:paddle_generator"]) == 0
    assert re.search(r"porting: 100%.*\b28/28\b", terminal.getvalue())
    monkeypatch.setattr(cli._port, "PROGRESS_MIN_ELEMENTS", 10**9)  # small checkpoints: no bar
    terminal.seek(0)
    terminal.truncate()
    assert cli.main(["port", src, str(tmp_path / "g.pdparams"), "--model", f"{SNGAN}:paddle_generator",
                     "--overwrite"]) == 0
    assert terminal.getvalue() == ""


def test_cli_module_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        from dualsn import cli
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
        print(",".join(m for m in ("torch", "paddle") if m in sys.modules) or "none")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("none")
