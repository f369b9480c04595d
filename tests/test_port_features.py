"""dualsn.port and dualsn's opt-in features: the ``num_svs`` extra pairs, the ``track_sigma``
buffer, ``coeff`` and ``spectral_norm_conv`` (activation-shaped u, v) cross between PyTorch
and Paddle.

Every check compares the two frameworks' numbers after a port: outputs, the copied state
(bit for bit), the backends' ``sigma`` / ``singular_values``, and then lockstep training.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import dualsn.paddle as dpaddle  # noqa: E402
import dualsn.torch as dtorch  # noqa: E402
from dualsn import port  # noqa: E402
from _numeric import rel  # noqa: E402

F32 = 1e-5  # float32: relative agreement of the two frameworks' numbers
INPUT = (2, 6, 6)  # one sample of the first convolution


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: np.array(port._to_numpy(v)) for k, v in port._adapter(port.framework_of(model)).state(model).items()}


# ---------------------------------------------------------------------------------------------
# One architecture in both frameworks: a convolution normalized by its operator norm (coeff,
# three singular values, tracked sigma), a strided one (two singular values), a Linear with
# coeff, three singular values and tracked sigma, and a plain spectral norm.


class TorchNet(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = dtorch.spectral_norm_conv(
            torch.nn.Conv2d(2, 3, 3, padding=1), INPUT, coeff=0.9, num_svs=3, track_sigma=True, seed=seed)
        self.conv2 = dtorch.spectral_norm_conv(
            torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 6, 6), num_svs=2, seed=seed + 1)
        self.fc = dtorch.spectral_norm(
            torch.nn.Linear(36, 5), coeff=0.5, num_svs=3, track_sigma=True, seed=seed + 2)
        self.out = dtorch.spectral_norm(torch.nn.Linear(5, 2), seed=seed + 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.out(torch.tanh(self.fc(x.flatten(1))))


class PaddleNet(paddle.nn.Layer):
    def __init__(self, seed: int):
        super().__init__()
        paddle.seed(seed)
        self.conv1 = dpaddle.spectral_norm_conv(
            paddle.nn.Conv2D(2, 3, 3, padding=1), INPUT, coeff=0.9, num_svs=3, track_sigma=True, seed=seed)
        self.conv2 = dpaddle.spectral_norm_conv(
            paddle.nn.Conv2D(3, 4, 3, stride=2, padding=1), (3, 6, 6), num_svs=2, seed=seed + 1)
        self.fc = dpaddle.spectral_norm(
            paddle.nn.Linear(36, 5), coeff=0.5, num_svs=3, track_sigma=True, seed=seed + 2)
        self.out = dpaddle.spectral_norm(paddle.nn.Linear(5, 2), seed=seed + 3)

    def forward(self, x):
        x = paddle.nn.functional.relu(self.conv1(x))
        x = paddle.nn.functional.relu(self.conv2(x))
        return self.out(paddle.tanh(self.fc(x.flatten(1))))


NETS = {"torch": TorchNet, "paddle": PaddleNet}
LAYERS = ("conv1", "conv2", "fc", "out")


def data(seed: int, batch: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *INPUT)).astype(np.float32)


def forward(model, x, training: bool):
    """Outputs on a numpy input, no grad, in the given mode (training runs the power iteration)."""
    model.train() if training else model.eval()
    if port.framework_of(model) == "torch":
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def warmed(framework: str, seed: int = 0):
    """A model whose u, v, extra pairs and tracked sigma have moved (five training forwards)."""
    model = NETS[framework](seed)
    for step in range(5):
        forward(model, data(step), training=True)
    return model


def port_models(source, target):
    if port.framework_of(source) == "torch":
        return port.torch_to_paddle(source, target)
    return port.paddle_to_torch(source, target)


def sn_module(framework: str):
    return dtorch if framework == "torch" else dpaddle


def state_of(model, layer: str) -> dict[str, np.ndarray]:
    """The spectral-norm state of ``model.<layer>`` by role, in numpy (torch's shapes = Paddle's)."""
    sub = getattr(model, layer)
    if port.framework_of(model) == "torch":
        sn = sub.parametrizations.weight[0]
        found = {r: getattr(sn, "_" + r, None) for r in port.STATE_ROLES}
        found = {r: t.detach().numpy() for r, t in found.items() if t is not None}
    else:
        found = {r: getattr(sub, "weight_" + r).numpy() for r in port.STATE_ROLES if hasattr(sub, "weight_" + r)}
    return found


def check_same(source, target):
    """The target holds the source's state (bit for bit) and computes the same numbers."""
    s_fw, t_fw = port.framework_of(source), port.framework_of(target)
    for layer in LAYERS:
        a, b = state_of(source, layer), state_of(target, layer)
        assert a.keys() == b.keys(), layer
        for role in a:
            np.testing.assert_array_equal(b[role], a[role], err_msg=f"{layer} {role}")
        values_s = sn_module(s_fw).singular_values(getattr(source, layer))
        values_t = sn_module(t_fw).singular_values(getattr(target, layer))
        assert len(values_s) == len(values_t) == {"conv1": 3, "conv2": 2, "fc": 3, "out": 1}[layer]
        assert rel(values_t, values_s) < F32, layer
        assert sn_module(t_fw).sigma(getattr(target, layer)) == pytest.approx(
            sn_module(s_fw).sigma(getattr(source, layer)), rel=F32)
    x = data(100)
    assert rel(forward(target, x, False), forward(source, x, False)) < F32
    # a training forward: the same power iteration from the same state, extras included
    assert rel(forward(target, x, True), forward(source, x, True)) < F32
    for layer in LAYERS:
        a, b = state_of(source, layer), state_of(target, layer)
        for role in a:
            assert rel(b[role], a[role]) < F32, (layer, role)


@pytest.mark.parametrize("start", ["torch", "paddle"])
def test_features_port_both_ways(start):
    end = "paddle" if start == "torch" else "torch"
    source, target = warmed(start), NETS[end](seed=7)  # another seed: the port must set everything
    report = port_models(source, target)
    roles = {e.key: e.sn for e in report.entries}
    assert sorted(set(roles.values()) - {""}) == ["original", "sigma", "u", "u_extra", "v", "v_extra"]
    conv_v = "conv1.weight_v" if end == "paddle" else "conv1.parametrizations.weight.0._v"
    assert [e.shape for e in report.entries if e.key == conv_v] == [INPUT]  # an activation shape
    assert not any(e.transposed for e in report.entries if e.sn not in ("", "original"))
    check_same(source, target)


@pytest.mark.parametrize("start", ["torch", "paddle"])
def test_features_train_in_lockstep_after_porting(start):
    models = {start: warmed(start)}
    models["paddle" if start == "torch" else "torch"] = NETS["paddle" if start == "torch" else "torch"](seed=7)
    port_models(models[start], models["paddle" if start == "torch" else "torch"])
    tm, pm = models["torch"], models["paddle"]
    lr = 0.05
    t_opt = torch.optim.SGD(tm.parameters(), lr=lr)
    p_opt = paddle.optimizer.SGD(lr, parameters=pm.parameters())
    tm.train()
    pm.train()
    goal = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    for step in range(4):
        x = data(200 + step)
        t_out = tm(torch.from_numpy(x))
        t_loss = ((t_out - torch.from_numpy(goal)) ** 2).mean()
        t_opt.zero_grad()
        t_loss.backward()
        t_opt.step()
        p_out = pm(paddle.to_tensor(x))
        p_loss = ((p_out - paddle.to_tensor(goal)) ** 2).mean()
        p_opt.clear_grad()
        p_loss.backward()
        p_opt.step()
        assert rel(p_out.detach().numpy(), t_out.detach().numpy()) < F32, step
        assert float(p_loss) == pytest.approx(float(t_loss), rel=F32)
    for layer in LAYERS:
        assert rel(dpaddle.singular_values(getattr(pm, layer)), dtorch.singular_values(getattr(tm, layer))) < F32
        t_state, p_state = state_of(tm, layer), state_of(pm, layer)
        for role in t_state:
            assert rel(p_state[role], t_state[role]) < F32, (layer, role)
    # the weights moved, identically (conv kernels share a layout; Paddle's Linear is [in, out])
    assert rel(pm.conv1.weight_orig.numpy(), tm.conv1.parametrizations.weight.original.detach().numpy()) < F32
    assert rel(pm.fc.weight_orig.numpy().T, tm.fc.parametrizations.weight.original.detach().numpy()) < F32


def test_features_port_through_checkpoint_files(tmp_path):
    # A raw state dict (no source model): the keys alone say where the new state goes.
    source = warmed("torch")
    port.save_checkpoint(source.state_dict(), tmp_path / "m.pt", "torch")
    target = PaddleNet(seed=7)
    port.load_state_dict(target, port.load_checkpoint(tmp_path / "m.pt"))
    port.save_checkpoint(target, tmp_path / "m.pdparams", "paddle")  # records the presets
    back = TorchNet(seed=9)
    port.load_state_dict(back, port.load_checkpoint(tmp_path / "m.pdparams"), source="paddle")
    check_same(source, target)
    check_same(warmed("torch"), back)  # check_same moved source: a twin (seeded) for the round trip


# ---------------------------------------------------------------------------------------------
# Features on one side only


def torch_linear(**kw):
    return dtorch.spectral_norm(torch.nn.Linear(6, 4), seed=0, **kw)


def paddle_linear(**kw):
    return dpaddle.spectral_norm(paddle.nn.Linear(6, 4), seed=1, **kw)


def test_a_tracked_sigma_the_source_lacks_is_computed():
    source = torch_linear()  # no _sigma
    forward(source, np.ones((1, 6), np.float32), training=True)
    target = paddle_linear(track_sigma=True)
    report = port.torch_to_paddle(source, target)
    (entry,) = [e for e in report.entries if e.sn == "sigma"]
    assert entry.key == "weight_sigma" and entry.source_key is None and entry.note.startswith("computed")
    w = source.parametrizations.weight.original.detach().double().numpy()
    u = source.parametrizations.weight[0]._u.double().numpy()
    v = source.parametrizations.weight[0]._v.double().numpy()
    assert float(target.weight_sigma) == pytest.approx(u @ w @ v, rel=F32)
    assert float(target.weight_sigma) == pytest.approx(dtorch.sigma(source), rel=F32)

    back, source = torch_linear(track_sigma=True), paddle_linear()
    port.paddle_to_torch(source, back)
    assert float(back.parametrizations.weight[0]._sigma) == pytest.approx(dtorch.sigma(back), rel=1e-12)
    assert float(back.parametrizations.weight[0]._sigma) == pytest.approx(dpaddle.sigma(source), rel=F32)


def test_a_tracked_sigma_the_target_does_not_track_is_dropped():
    source = paddle_linear(track_sigma=True)
    target = torch_linear()
    report = port.paddle_to_torch(source, target)  # strict: weight_sigma is not "unexpected"
    assert report.unexpected == [] and "weight_sigma" not in {e.source_key for e in report.entries}
    assert dtorch.sigma(target) == pytest.approx(dpaddle.sigma(source), rel=F32)


def test_extra_pairs_must_match():
    with pytest.raises(port.PortError, match="missing in the source.*weight_u_extra"):
        port.torch_to_paddle(torch_linear(), paddle_linear(num_svs=2))  # nothing to fill them from
    with pytest.raises(port.PortError, match="unexpected in the source.*_u_extra"):
        port.torch_to_paddle(torch_linear(num_svs=2), paddle_linear())
    with pytest.raises(port.PortError, match="shape mismatch for 'weight_u_extra'"):
        port.torch_to_paddle(torch_linear(num_svs=3), paddle_linear(num_svs=2))
    target = paddle_linear(num_svs=2)
    kept = target.weight_u_extra.numpy().copy()
    report = port.torch_to_paddle(torch_linear(), target, strict=False)
    assert report.missing == ["weight_u_extra", "weight_v_extra"]
    np.testing.assert_array_equal(target.weight_u_extra.numpy(), kept)


def test_a_convolution_norm_never_pairs_with_a_matrix_norm():
    conv = dtorch.spectral_norm_conv(torch.nn.Conv1d(2, 2, 1), (2, 1), seed=0)  # u (2, 1), v (2, 1)
    matrix = dpaddle.spectral_norm(paddle.nn.Conv1D(2, 2, 1), seed=0)  # u (2,), v (2,)
    before = numpy_state(matrix)
    with pytest.raises(port.PortError) as info:
        port.torch_to_paddle(conv, matrix)
    assert ("the target takes it along dim 0, the source as a convolution operator (spectral_norm_conv), "
            "so u and v would not fit") in str(info.value)
    for key, value in before.items():
        np.testing.assert_array_equal(numpy_state(matrix)[key], value)
    with pytest.raises(port.PortError, match=r"the target takes it as a convolution operator \(spectral_norm_conv\), "
                                             "the source along dim 0"):
        port.paddle_to_torch(matrix, conv)
    # a different input_shape: u, v do not fit
    other = dpaddle.spectral_norm_conv(paddle.nn.Conv1D(2, 2, 1), (2, 3), seed=0)
    with pytest.raises(port.PortError, match="shape mismatch for 'weight_v'"):
        port.torch_to_paddle(conv, other)


class TorchScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([3.0, -1.0, 2.0, 0.5]))


class PaddleScale(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.weight = self.create_parameter([4])


def test_exact_vector_norm_to_a_matrix_norm():
    # The exact 1-D norm keeps no u, v; an (n x 1) matrix norm starts at the fixed point
    # u = W / ||W||, v = [1]. (num_svs > 1 is refused on an n x 1 matrix: one singular value.)
    exact = dtorch.spectral_norm(TorchScale(), compat="torch", track_sigma=True)
    target = dpaddle.spectral_norm(PaddleScale(), compat="paddle", track_sigma=True, seed=0)
    with pytest.warns(port.PresetMismatchWarning):  # across presets, on purpose
        report = port.torch_to_paddle(exact, target)
    notes = {e.key: e.note for e in report.entries}
    assert all(notes[k].startswith("fixed point") for k in ("weight_u", "weight_v"))
    w = np.array([3.0, -1.0, 2.0, 0.5])
    assert dpaddle.singular_values(target) == pytest.approx([np.linalg.norm(w)], rel=F32)
    target.train()
    hook = dpaddle.get_spectral_norm(target)
    with paddle.no_grad():
        hook(target, ())  # a training forward's power iteration: the fixed point stays put
    assert dpaddle.singular_values(target) == pytest.approx([np.linalg.norm(w)], rel=F32)
    np.testing.assert_allclose(target.weight_u.numpy(), w / np.linalg.norm(w), rtol=F32)
    assert float(target.weight_sigma) == pytest.approx(np.linalg.norm(w), rel=F32)
    # and back: the matrix norm's u, v and extra rows are dropped, its sigma too
    with pytest.warns(port.PresetMismatchWarning):
        report = port.paddle_to_torch(target, dtorch.spectral_norm(TorchScale(), compat="torch"))
    assert [e.key for e in report.entries] == ["parametrizations.weight.original"]
