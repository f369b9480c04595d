"""Issue 13, problem 1: torch code converted by PaConvert trains like the torch original only
through dualsn's route.

PaConvert maps ``torch.nn.utils.parametrizations.spectral_norm`` to
``paddle.nn.utils.spectral_norm``, whose power iteration runs in the other order. The route:
convert the code with PaConvert, build the converted model under
``dualsn.paddle.patch(compat="torch")`` (no edit of the converted code), load the torch
checkpoint with ``dualsn.port``, train. Here a torch discriminator trains 3 steps and is saved,
then torch and the converted Paddle model train 20 SGD steps in lockstep on the same batches.

Fixtures (tests/fixtures/paconvert/): ``torch_model.py``, the torch source, and
``converted_model.py``, PaConvert 3.3.1's conversion of it. The workflow always runs on the
committed conversion; only the check that PaConvert still writes exactly that code needs
paconvert installed (``.ci/run`` installs it).
"""

import importlib.util
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch

import dualsn.paddle as dsn
from dualsn import port

FIXTURES = Path(__file__).parent / "fixtures" / "paconvert"
TORCH_SOURCE = FIXTURES / "torch_model.py"
CONVERTED = FIXTURES / "converted_model.py"

PRETRAIN_STEPS = 3
LOCKSTEP_STEPS = 20
LR = 0.05
TOLERANCE = 1e-4  # relative: float32 rounding of two correct implementations stays far below


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batches(count: int, seed: int):
    """(input, target) pairs as numpy arrays: the same batches go to both frameworks."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((4, 3, 8, 8)).astype(np.float32), rng.standard_normal((4, 1)).astype(np.float32))
        for _ in range(count)
    ]


def _torch_step(model, optimizer, x, y) -> np.ndarray:
    out = model(torch.from_numpy(x))
    loss = ((out - torch.from_numpy(y)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return out.detach().numpy()


def _paddle_step(model, optimizer, x, y) -> np.ndarray:
    out = model(paddle.to_tensor(x))
    loss = ((out - paddle.to_tensor(y)) ** 2).mean()
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    return out.numpy()


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.fixture(scope="module")
def torch_module():
    return _load_module(TORCH_SOURCE, "dualsn_fixture_torch_model")


@pytest.fixture(scope="module")
def converted_module():
    return _load_module(CONVERTED, "dualsn_fixture_converted_model")


@pytest.fixture(scope="module")
def checkpoint(torch_module, tmp_path_factory):
    """A torch checkpoint (parametrization keys) after a few training steps: u, v have moved."""
    torch.manual_seed(0)
    model = torch_module.Discriminator()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in _batches(PRETRAIN_STEPS, seed=1):
        _torch_step(model, optimizer, x, y)
    path = tmp_path_factory.mktemp("paconvert") / "discriminator.pt"
    port.save_checkpoint(model.state_dict(), path, "torch")
    return path


def _torch_from(torch_module, checkpoint):
    model = torch_module.Discriminator()
    model.load_state_dict(port.load_checkpoint(checkpoint))  # torch's own keys: loads as is
    return model


def _lockstep(torch_model, paddle_model) -> dict:
    """Eval outputs right after the port, then the train outputs of each lockstep step."""
    x_eval = _batches(1, seed=3)[0][0]
    torch_model.eval()
    paddle_model.eval()
    with torch.no_grad():
        eval_diff = _relative(torch_model(torch.from_numpy(x_eval)).numpy(), paddle_model(paddle.to_tensor(x_eval)).numpy())
    torch_model.train()
    paddle_model.train()
    t_opt = torch.optim.SGD(torch_model.parameters(), lr=LR)
    p_opt = paddle.optimizer.SGD(learning_rate=LR, parameters=paddle_model.parameters())
    steps = [
        _relative(_torch_step(torch_model, t_opt, x, y), _paddle_step(paddle_model, p_opt, x, y))
        for x, y in _batches(LOCKSTEP_STEPS, seed=2)
    ]
    return {"eval": eval_diff, "steps": steps}


def test_the_converted_code_calls_paddles_builtin():
    """The premise: PaConvert maps every torch spectral norm to Paddle's built-in."""
    code = CONVERTED.read_text()
    assert code.count("paddle.nn.utils.spectral_norm(") == 3
    assert "parametrizations" not in code.split('"""')[-1]  # only the docstring names torch's


def test_patched_route_trains_in_lockstep(torch_module, converted_module, checkpoint):
    with dsn.patch(compat="torch"):
        paddle_model = converted_module.Discriminator()  # the converted code, unedited
    for name in ("conv1", "conv2", "fc"):
        hook = dsn.get_spectral_norm(getattr(paddle_model, name))
        assert hook is not None and hook.spec.order == "uv", name
    assert dsn.get_spectral_norm(paddle_model.fc).spec.n_power_iterations == 2

    report = port.load_state_dict(paddle_model, port.load_checkpoint(checkpoint), source="torch")
    assert {e.sn for e in report.entries} == {"", "original", "u", "v"}

    result = _lockstep(_torch_from(torch_module, checkpoint), paddle_model)
    assert result["eval"] < 1e-5
    worst = max(result["steps"])
    assert worst < TOLERANCE, f"patched route: per-step relative differences {result['steps']}"


def test_plain_conversion_diverges(torch_module, converted_module, checkpoint):
    """The contrast: the same converted code and checkpoint on Paddle's built-in spectral norm
    match in eval mode but not in training."""
    paddle_model = converted_module.Discriminator()  # no patch: paddle.nn.utils.spectral_norm
    assert dsn.get_spectral_norm(paddle_model.conv1) is None
    assert "conv1.weight_u" in paddle_model.state_dict()  # the built-in's hook

    # strict=False with no missing or unexpected key: the same tensors load as on the patched
    # route; a preset-mismatch warning (the torch checkpoint into Paddle's algorithm) is what
    # this test demonstrates, so it is not an error here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = port.load_state_dict(paddle_model, port.load_checkpoint(checkpoint), source="torch", strict=False)
    assert report.missing == [] and report.unexpected == []

    result = _lockstep(_torch_from(torch_module, checkpoint), paddle_model)
    assert result["eval"] < 1e-5  # identical weights, u, v: eval agrees ...
    worst = max(result["steps"])
    assert worst > TOLERANCE, f"plain conversion: per-step relative differences {result['steps']}"
    assert result["steps"][0] > TOLERANCE  # ... training differs from the first step on


def _code_lines(text: str) -> list[str]:
    """The code of a file without comments, blank lines and trailing blanks (the committed
    fixture has a provenance header that PaConvert does not write)."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.skipif(importlib.util.find_spec("paconvert") is None, reason="paconvert is not installed")
def test_fixture_is_paconverts_output(tmp_path):
    source = tmp_path / "torch_model.py"
    shutil.copy(TORCH_SOURCE, source)
    out = tmp_path / "converted_model.py"
    # A subprocess, as a user runs the `paconvert` command: PaConvert keeps global state.
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from paconvert.main import main; sys.argv[0] = 'paconvert'; main()",
         "-i", str(source), "-o", str(out), "--log_dir", "disable"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert _code_lines(out.read_text()) == _code_lines(CONVERTED.read_text())
