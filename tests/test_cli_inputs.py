"""Issue 13 on the command line: inputs for ``port --check`` (problem 4), nested checkpoints
(--key, --strip-prefix, exit 4 listing the candidates), preset mismatches (warning lines,
--strict-presets), ``report --checkpoint`` describing a file, and exit 8 for a ``--model``
factory that needs a missing framework (problem 5)."""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

from dualsn import cli, port  # noqa: E402
from dualsn.examples import sngan  # noqa: E402
from _native import save_native  # noqa: E402

SNGAN = "dualsn.examples.sngan"


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: np.array(port._to_numpy(v)) for k, v in port._adapter(port.framework_of(model)).state(model).items()}


def warmed(model):
    model.train()
    with torch.no_grad():
        for seed in range(3):
            x, y = sngan.discriminator_inputs(4, seed)
            model(torch.from_numpy(x), torch.from_numpy(y))
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Problem 4: input specs


def test_input_specs_parse():
    spec = cli.parse_input_spec("x:float32[4,3,32,32]")
    assert (spec.name, spec.dtype, spec.shape, spec.low, spec.high) == ("x", "float32", (4, 3, 32, 32), None, None)
    spec = cli.parse_input_spec("y:int64[4]<10")
    assert (spec.name, spec.dtype, spec.shape, spec.low, spec.high) == ("y", "int64", (4,), 0, 10)
    spec = cli.parse_input_spec("float16[2, 5][-1,1)")
    assert (spec.name, spec.dtype, spec.shape, spec.low, spec.high) == ("", "float16", (2, 5), -1.0, 1.0)
    assert cli.parse_input_spec("t:int32[3][5,9)").low == 5
    assert cli.parse_input_spec("m:bool[2,2]").dtype == "bool"
    assert cli.parse_input_spec("s:float64[]").shape == ()


def draw(*argv, seed=0):
    args = argparse.Namespace(input=[a for a in argv if ":" in a or "[" in a], input_shape=[a for a in argv if "[" not in a],
                              input_fn=None, seed=seed)
    return cli._inputs(args)


def test_inputs_have_their_dtype_range_and_seed():
    x, y, b = draw("x:float32[4,3,32,32]", "y:int64[1000]<10", "b:bool[50]")
    assert x.dtype == np.float32 and x.shape == (4, 3, 32, 32)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # standard normal
    assert y.dtype == np.int64 and y.min() == 0 and y.max() == 9 and len(np.unique(y)) == 10  # [0, 10)
    assert b.dtype == np.bool_ and 0 < b.sum() < 50
    u, = draw("u:float64[10000][-2,3)")
    assert u.dtype == np.float64 and -2 <= u.min() and u.max() < 3 and abs(float(u.mean()) - 0.5) < 0.05
    np.testing.assert_array_equal(draw("x:float32[4,3]", "y:int64[4]<10")[1], draw("x:float32[4,3]", "y:int64[4]<10")[1])
    assert not np.array_equal(draw("y:int64[64]<10", seed=1)[0], draw("y:int64[64]<10", seed=2)[0])
    # --input-shape is the float32 standard-normal spec, value for value
    np.testing.assert_array_equal(draw("2,3")[0], draw("float32[2,3]")[0])


@pytest.mark.parametrize(
    "spec, why",
    [
        ("x:float32[4,3", "not an input spec"),
        ("x:float33[4]", "unknown dtype 'float33'"),
        ("y:int64[4]", "an integer input needs a range, e.g. y:int64[4]<10"),
        ("x:float32[0,3]", "the shape [0,3] must be positive integers"),
        ("x:float32[4,a]", "the shape [4,a] must be positive integers"),
        ("y:int64[4]<0", "the range [0, 0) is empty"),
        ("y:int64[4]<2.5", "the range must be integers for int64"),
        ("y:uint8[4]<300", "the range [0, 300) does not fit uint8"),
        ("y:int64[4][5,2)", "the range [5, 2) is empty"),
        ("b:bool[4]<2", "a bool input takes no range"),
        ("4,3,16,16", "not an input spec"),
    ],
)
def test_malformed_specs_exit_2_naming_the_spec_and_the_form(tmp_path, capsys, spec, why):
    src = save_native(sngan.torch_discriminator(), tmp_path / "d.pt")
    code = cli.main(["port", src, str(tmp_path / "d.pdparams"), "--model", f"{SNGAN}:paddle_discriminator",
                     "--source-model", f"{SNGAN}:torch_discriminator", "--check", "--input", spec])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert f"--input {spec!r}: {why}" in err
    assert "expected [NAME:]DTYPE[D1,D2,...] with an optional range <N (meaning [0, N)) or [A,B)" in err
    assert not (tmp_path / "d.pdparams").exists()


def test_input_does_not_mix_with_the_other_input_options(tmp_path, capsys):
    src = save_native(sngan.torch_discriminator(), tmp_path / "d.pt")
    code = cli.main(["port", src, str(tmp_path / "d.pdparams"), "--model", f"{SNGAN}:paddle_discriminator",
                     "--source-model", f"{SNGAN}:torch_discriminator", "--check", "--input", "x:float32[4,3,16,16]",
                     "--input-shape", "4"])
    assert code == cli.EXIT_USAGE
    assert "--input cannot be combined with --input-shape or --input-fn" in capsys.readouterr().err


def test_check_feeds_class_labels_to_a_projection_discriminator(tmp_path, capsys):
    src = save_native(warmed(sngan.torch_discriminator()), tmp_path / "d.pt")
    base = ["port", src, str(tmp_path / "d.pdparams"), "--model", f"{SNGAN}:paddle_discriminator",
            "--source-model", f"{SNGAN}:torch_discriminator", "--check"]
    # Before: --input-shape gives float32 only, and the class embedding cannot take it.
    assert cli.main(base + ["--input-shape", "4,3,16,16", "--input-shape", "4"]) == cli.EXIT_USAGE
    assert "running the models failed" in capsys.readouterr().err
    # Now: integer labels in [0, 10).
    code = cli.main(base + ["--input", "x:float32[4,3,16,16]", "--input", f"y:int64[4]<{sngan.NUM_CLASSES}"])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    diff = re.search(r"check: max abs diff (\S+), max rel diff (\S+) \(rtol 0.0001\): OK", out)
    assert diff and float(diff.group(2)) < 1e-5
    assert (tmp_path / "d.pdparams").exists()


# ---------------------------------------------------------------------------------------------
# Problem 3 on the command line: nested checkpoints


def test_a_paddlegan_trainer_file_ports_and_ambiguity_exits_4(tmp_path, capsys):
    net_g, net_d = sngan.paddle_generator(), sngan.paddle_discriminator()
    path = str(tmp_path / "trainer.pdparams")
    paddle.save({"netG": net_g.state_dict(), "netD": net_d.state_dict(), "epoch": 3}, path)

    dst = tmp_path / "g.pt"
    assert cli.main(["port", path, str(dst), "--model", f"{SNGAN}:torch_generator", "--quiet"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"using entry 'netG' of {path}" in out
    # DST holds netG, tensor for tensor: back in Paddle every tensor equals the trainer file's
    back = sngan.paddle_generator()
    port.load_state_dict(back, port.load_checkpoint(dst))
    expected = numpy_state(net_g)
    for key, value in numpy_state(back).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)

    # --key picks; a model that fits neither entry, or a --key that does not exist, exits 4 with the list
    assert cli.main(["port", path, str(tmp_path / "d.pt"), "--model", f"{SNGAN}:torch_discriminator",
                     "--key", "netD", "--quiet"]) == cli.EXIT_OK
    capsys.readouterr()
    assert cli.main(["port", path, str(tmp_path / "x.pt"), "--model", f"{SNGAN}:torch_discriminator",
                     "--key", "netE"]) == cli.EXIT_BAD_FORMAT
    err = capsys.readouterr().err
    assert "key 'netE': no such entry" in err and "'netG' (" in err and "'netD' (" in err


def test_g_and_g_ema_exit_4_listing_both(tmp_path, capsys):
    g = sngan.torch_generator()
    torch.save({"G": g.state_dict(), "G_ema": g.state_dict(), "D": sngan.torch_discriminator().state_dict()},
               tmp_path / "biggan.pth")
    args = ["port", str(tmp_path / "biggan.pth"), str(tmp_path / "g.pdparams"), "--model", f"{SNGAN}:paddle_generator"]
    assert cli.main(args) == cli.EXIT_BAD_FORMAT
    err = capsys.readouterr().err
    assert "2 state dicts that fit the model: 'G' (" in err and "'G_ema' (" in err and "--key" in err
    assert not (tmp_path / "g.pdparams").exists()
    assert cli.main(args + ["--key", "G_ema", "--quiet"]) == cli.EXIT_OK


def test_strip_prefix_on_the_command_line(tmp_path, capsys):
    g = sngan.torch_generator()
    torch.save({f"net.{k}": v for k, v in g.state_dict().items()}, tmp_path / "g.pt")
    args = ["port", str(tmp_path / "g.pt"), str(tmp_path / "g.pdparams"), "--model", f"{SNGAN}:paddle_generator",
            "--quiet"]
    assert cli.main(args) == cli.EXIT_MISMATCH  # "net." is no wrapper prefix: not stripped by itself
    capsys.readouterr()
    assert cli.main(args + ["--strip-prefix", "net."]) == cli.EXIT_OK
    assert "stripped the key prefix 'net.'" in capsys.readouterr().out
    assert cli.main(args + ["--strip-prefix", "head.", "--overwrite"]) == cli.EXIT_BAD_FORMAT
    assert "no key of the checkpoint starts with it" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Problem 2 on the command line: presets


def test_a_preset_mismatch_is_a_warning_line_or_exit_6(tmp_path, capsys, monkeypatch):
    src = save_native(warmed(sngan.torch_discriminator()), tmp_path / "d.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "paddle_preset_models.py").write_text(
        "from dualsn.examples import sngan\n"
        "def discriminator():\n    return sngan.paddle_discriminator(compat='paddle')\n")
    args = ["port", src, str(tmp_path / "d.pdparams"), "--model", "paddle_preset_models:discriminator", "--quiet"]
    assert cli.main(args + ["--strict-presets"]) == cli.EXIT_MISMATCH
    err = capsys.readouterr().err
    assert "spectral norm of 'blocks.0.conv1.weight': the source's preset is 'torch'" in err
    assert "refused (strict_presets)" in err and not (tmp_path / "d.pdparams").exists()

    assert cli.main(args) == cli.EXIT_OK
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: preset mismatch")]
    assert len(lines) == 10
    assert lines[0] == ("warning: preset mismatch: spectral norm of 'blocks.0.conv1.weight': the source's preset "
                        "is 'torch' (inferred from torch parametrization keys), the target's 'paddle'")
    # DST records the target's presets: describing it says so
    d = port.describe(tmp_path / "d.pdparams")
    assert {layer.preset for layer in d.layers} == {"paddle"} and d.metadata["presets"]


def test_report_describes_a_checkpoint(tmp_path, capsys):
    model = warmed(sngan.torch_discriminator(sn="legacy"))
    path = save_native(model, tmp_path / "legacy.pt")
    assert cli.main(["report", "--checkpoint", path]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: torch checkpoint, ") and "flavour torch_legacy, 10 spectral norm(s)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("blocks.", "linear.", "embed."))}
    module = model.blocks[0].conv1
    w, u, v = (t.detach().double().numpy() for t in (module.weight_orig, module.weight_u, module.weight_v))
    assert rows["blocks.0.conv1.weight"][1:3] == ["torch_legacy", "torch_legacy"]
    assert float(rows["blocks.0.conv1.weight"][-1]) == pytest.approx(float(u @ w.reshape(w.shape[0], -1) @ v), rel=1e-5)

    # with --model: one summary line, the mismatch warnings, then the model's report
    assert cli.main(["report", "--model", f"{SNGAN}:torch_discriminator", "--checkpoint", path]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{path}: torch checkpoint")
    assert "warning: preset mismatch: spectral norm of 'blocks.0.conv1.weight': the source's preset is " \
           "'torch_legacy'" in out
    assert cli.main(["report"]) == cli.EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# Problem 5: a factory that needs a missing framework exits 8 with the extra's name


FACTORIES = """
import {framework}

def make():
    return None
"""

LAZY = """
def make():
    import {framework}.nn
    return {framework}.nn
"""


@pytest.mark.parametrize("framework", ["paddle", "torch"])
@pytest.mark.parametrize("when", ["import", "call"])
def test_a_missing_framework_exits_8(tmp_path, capsys, monkeypatch, framework, when):
    src = save_native(sngan.torch_generator() if framework == "paddle" else sngan.paddle_generator(),
                      tmp_path / ("g.pt" if framework == "paddle" else "g.pdparams"))
    module = f"needs_{framework}_{when}"
    (tmp_path / f"{module}.py").write_text((FACTORIES if when == "import" else LAZY).format(framework=framework))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    dst = tmp_path / ("g.pdparams" if framework == "paddle" else "g.pt")
    # Loaded already in this process; None in sys.modules makes `import` fail as if it were absent.
    for name in [m for m in sys.modules if m == framework or m.startswith(framework + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    code = cli.main(["port", src, str(dst), "--model", f"{module}:make"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_MISSING, err
    assert f"--model '{module}:make' needs {framework}, which is not installed: " \
           f'pip install "dualsn[{framework}]"' in err
    assert "ModuleNotFoundError" in err and not dst.exists()


def test_other_missing_modules_still_exit_5(tmp_path, capsys, monkeypatch):
    (tmp_path / "needs_other.py").write_text("import no_such_dependency_xyz\n\ndef make():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = save_native(sngan.torch_generator(), tmp_path / "g.pt")
    assert cli.main(["port", src, str(tmp_path / "g.pdparams"), "--model", "needs_other:make"]) == cli.EXIT_FACTORY
    assert "ModuleNotFoundError: No module named 'no_such_dependency_xyz'" in capsys.readouterr().err
