"""dualsn.port: state dicts, models and checkpoint files between PyTorch and Paddle.

The models are ported and then run side by side: every check compares the two frameworks'
numbers (outputs, parameters, u, v), or the port's result with the source tensor it came from.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")
paddle = pytest.importorskip("paddle")

import dualsn.paddle as dpaddle  # noqa: E402
import dualsn.torch as dtorch  # noqa: E402
from dualsn import port  # noqa: E402
from dualsn.examples import sngan  # noqa: E402
from _numeric import rel  # noqa: E402

F32_OUT = 1e-5  # a fresh port, float32: outputs agree to this relative difference
F32_TRAINED = 1e-4  # after 20 lockstep SGD steps


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: np.array(port._to_numpy(v)) for k, v in port._adapter(port.framework_of(model)).state(model).items()}


def run(model, *inputs, training=False):
    """Outputs of ``model`` on numpy inputs (no grad), as numpy."""
    if training:
        model.train()
    else:
        model.eval()
    if port.framework_of(model) == "torch":
        with torch.no_grad():
            return model(*[torch.from_numpy(x) for x in inputs]).numpy()
    with paddle.no_grad():
        return model(*[paddle.to_tensor(x) for x in inputs]).numpy()


FACTORIES = {
    ("torch", "D"): sngan.torch_discriminator,
    ("paddle", "D"): sngan.paddle_discriminator,
    ("torch", "G"): sngan.torch_generator,
    ("paddle", "G"): sngan.paddle_generator,
}


def inputs_for(which: str, seed: int = 0, batch: int = 8):
    return sngan.discriminator_inputs(batch, seed) if which == "D" else sngan.generator_inputs(batch, seed)


def warmed(framework: str, which: str, **kw):
    """A model whose u, v have moved past their initial draw (three training forwards)."""
    model = FACTORIES[(framework, which)](**kw)
    for seed in range(3):
        run(model, *inputs_for(which, seed), training=True)
    return model


def other(framework: str) -> str:
    return "paddle" if framework == "torch" else "torch"


def port_models(source_model, target):
    if port.framework_of(source_model) == "torch":
        return port.torch_to_paddle(source_model, target)
    return port.paddle_to_torch(source_model, target)


# ---------------------------------------------------------------------------------------------
# The SN-GAN pair


@pytest.mark.parametrize("which", ["D", "G"])
@pytest.mark.parametrize("start", ["torch", "paddle"])
def test_sngan_port_gives_the_same_model(start, which):
    source = warmed(start, which)
    target = FACTORIES[(other(start), which)]()
    report = port_models(source, target)

    # Every tensor carried over: u, v unchanged, only Linear weights transposed.
    s_state, t_state = numpy_state(source), numpy_state(target)
    for e in report.entries:
        if e.source_key is None:
            assert e.key.endswith("num_batches_tracked") and start == "paddle"
            continue
        expected = s_state[e.source_key].T if e.transposed else s_state[e.source_key]
        np.testing.assert_array_equal(t_state[e.key], expected)
        assert e.transposed == (e.key.startswith("linear.") and e.param == "weight" and e.sn == "original")
    assert sum(e.sn == "u" for e in report.entries) == (10 if which == "D" else 4)

    for training in (False, True):  # eval, then one more power iteration on both sides
        for seed in (10, 11):
            x = inputs_for(which, seed)
            assert rel(run(target, *x, training=training), run(source, *x, training=training)) < F32_OUT
    # The training forwards moved u, v identically.
    s_state, t_state = numpy_state(source), numpy_state(target)
    for e in report.entries:
        if e.sn in ("u", "v"):
            assert rel(t_state[e.key], s_state[e.source_key]) < F32_OUT


def _train_step_torch(D, G, opt_d, opt_g, real, y, fake, z, goal):
    real, y, fake, z, goal = map(torch.from_numpy, (real, y, fake, z, goal))
    sp = torch.nn.functional.softplus
    d_real, d_fake = D(real, y), D(fake, y)  # two forwards, one backward
    loss = sp(-d_real).mean() + sp(d_fake).mean()
    opt_d.zero_grad()
    loss.backward()
    opt_d.step()
    g = G(z)
    loss_g = ((g - goal) ** 2).mean()
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return [t.detach().numpy() for t in (d_real, d_fake, g)]


def _train_step_paddle(D, G, opt_d, opt_g, real, y, fake, z, goal):
    real, y, fake, z, goal = map(paddle.to_tensor, (real, y, fake, z, goal))
    sp = paddle.nn.functional.softplus
    d_real, d_fake = D(real, y), D(fake, y)
    loss = sp(-d_real).mean() + sp(d_fake).mean()
    opt_d.clear_grad()
    loss.backward()
    opt_d.step()
    g = G(z)
    loss_g = ((g - goal) ** 2).mean()
    opt_g.clear_grad()
    loss_g.backward()
    opt_g.step()
    return [t.numpy() for t in (d_real, d_fake, g)]


def training_data(step: int, batch: int):
    """Positive "real" images with labels, negative "fake" ones, latents and goal images."""
    x, y = sngan.discriminator_inputs(batch, seed=100 + step)
    (z,) = sngan.generator_inputs(batch, seed=200 + step)
    return np.abs(x), y, -np.abs(x[::-1]).copy(), z, np.tanh(2 * x).astype(np.float32)


@pytest.mark.parametrize("start", ["torch", "paddle"])
def test_sngan_trains_in_lockstep_after_porting(start):
    # Each SGD step trains D on real vs fake (two training forwards: u, v move twice) and G
    # towards fixed goal images (BatchNorm on batch statistics), in both frameworks.
    torch.manual_seed(0)
    paddle.seed(0)
    models = {start: (warmed(start, "D"), warmed(start, "G"))}
    models[other(start)] = (FACTORIES[(other(start), "D")](), FACTORIES[(other(start), "G")]())
    for s, t in zip(models[start], models[other(start)]):
        port_models(s, t)
    (tD, tG), (pD, pG) = models["torch"], models["paddle"]
    running_var0 = {k: v for k, v in numpy_state(tG).items() if k.endswith("running_var")}
    lr = 0.002
    t_opt = (torch.optim.SGD(tD.parameters(), lr=lr), torch.optim.SGD(tG.parameters(), lr=lr))
    p_opt = (paddle.optimizer.SGD(lr, parameters=pD.parameters()),
             paddle.optimizer.SGD(lr, parameters=pG.parameters()))
    for m in (tD, tG, pD, pG):
        m.train()

    steps, batch = 20, 8
    for step in range(steps):
        data = training_data(step, batch)
        t_out = _train_step_torch(tD, tG, *t_opt, *data)
        p_out = _train_step_paddle(pD, pG, *p_opt, *data)
        for a, b in zip(p_out, t_out):
            assert rel(a, b) < F32_TRAINED, step

    # Same parameters, u, v and running statistics on both sides (compared in torch's layout),
    # each tensor relative to the largest value in its layer: a BatchNorm bias that moved from
    # 0 to 1e-5 is compared at the scale of its weight (~1), not at its own.
    back = sngan.torch_discriminator(), sngan.torch_generator()
    port.paddle_to_torch(pD, back[0])
    port.paddle_to_torch(pG, back[1])
    for ported, trained in zip(back, (tD, tG)):
        a, b = numpy_state(ported), numpy_state(trained)
        scale = {}
        for key, value in b.items():
            prefix = port._split_key(key)[0]
            if value.dtype.kind == "f":
                scale[prefix] = max(scale.get(prefix, 0.0), float(np.max(np.abs(value))))
        for key in b:
            if key.endswith("num_batches_tracked"):
                continue
            if key.endswith("running_var"):
                # torch keeps the unbiased batch variance, Paddle the biased one: with n values
                # per channel, (torch - 0.9^k r0) = n / (n - 1) * (paddle - 0.9^k r0) after k
                # training forwards from the common r0.
                n = batch * {"bn0": 4 * 4, "bn1": 8 * 8, "bn2": 16 * 16}[key.split(".")[0]]
                decay = 0.9**steps * running_var0[key]
                assert rel(a[key] - decay, (b[key] - decay) * (n - 1) / n) < F32_TRAINED
                continue
            diff = np.max(np.abs(a[key].astype(np.float64) - b[key]))
            assert diff / scale[port._split_key(key)[0]] < F32_TRAINED, key
    x, y = sngan.discriminator_inputs(batch, seed=999)
    assert rel(run(pD, x, y), run(tD, x, y)) < F32_TRAINED
    (z,) = sngan.generator_inputs(batch, seed=999)
    assert rel(run(pG, z, training=True), run(tG, z, training=True)) < F32_TRAINED


# ---------------------------------------------------------------------------------------------
# Built-in flavours on the source side


@pytest.mark.parametrize(
    "source_fw, flavour, target_fw",
    [
        ("torch", "parametrizations", "paddle"),
        ("torch", "legacy", "paddle"),
        ("torch", "legacy", "torch"),  # the older torch hook's checkpoints into dualsn.torch
        ("paddle", "builtin", "torch"),
        ("paddle", "builtin", "paddle"),
    ],
)
def test_builtin_flavours_load_into_dualsn(source_fw, flavour, target_fw):
    source = warmed(source_fw, "D", sn=flavour)
    state = source.state_dict()
    target = FACTORIES[(target_fw, "D")]()
    # The built-in hooks run the legacy algorithm, the target dualsn's default "torch" preset:
    # loading across presets is allowed and warns (issue 13).
    expect = pytest.warns(port.PresetMismatchWarning) if flavour != "parametrizations" else contextlib.nullcontext()
    with expect:
        report = port.load_state_dict(target, state)  # source framework inferred from the tensors
    assert report.source == source_fw
    assert bool(report.preset_mismatches) == (flavour != "parametrizations")
    for e in report.entries:
        if e.sn in ("u", "v"):
            np.testing.assert_array_equal(numpy_state(target)[e.key], port._to_numpy(state[e.source_key]))
    for seed in (5, 6):
        x = inputs_for("D", seed)
        assert rel(run(target, *x), run(source, *x)) < F32_OUT


def test_legacy_checkpoint_loads_where_the_torch_parametrization_cannot():
    legacy = warmed("torch", "D", sn="legacy")
    state = legacy.state_dict()
    with pytest.raises(RuntimeError):
        sngan.torch_discriminator(sn="parametrizations").load_state_dict(state)
    model = sngan.torch_discriminator()
    with pytest.warns(port.PresetMismatchWarning, match="'torch_legacy'"):  # into the "torch" preset
        port.load_state_dict(model, state, source="torch")
    x = inputs_for("D", 7)
    np.testing.assert_array_equal(run(model, *x), run(legacy, *x))
    # ... and back: a dualsn model's state into the older hook.
    again = sngan.torch_discriminator(sn="legacy")
    with pytest.warns(port.PresetMismatchWarning):
        port.load_state_dict(again, model.state_dict())
    np.testing.assert_array_equal(run(again, *x), run(legacy, *x))


# ---------------------------------------------------------------------------------------------
# Every supported layer type


class TorchZoo(torch.nn.Module):
    def __init__(self, compat_linear: bool):
        super().__init__()
        nn = torch.nn
        sn = dtorch.spectral_norm
        self.linear = sn(nn.Linear(3, 5), seed=1)
        if compat_linear:
            self.clinear = sn(nn.Linear(3, 5), seed=2)
        self.conv1d = sn(nn.Conv1d(2, 4, 3), seed=3)
        self.conv3d = nn.Conv3d(2, 3, 2)
        self.convt1d = nn.ConvTranspose1d(2, 3, 3)
        self.convt3d = sn(nn.ConvTranspose3d(2, 3, 2), seed=4)
        self.bn1d = nn.BatchNorm1d(4)
        self.bn3d = nn.BatchNorm3d(2)
        self.ln = nn.LayerNorm([4, 3])
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.emb = sn(nn.Embedding(6, 3), seed=5)
        self.prelu = nn.PReLU(4)
        self.bilinear = nn.Bilinear(3, 2, 4)


class PaddleZoo(paddle.nn.Layer):
    def __init__(self, compat_linear: bool):
        super().__init__()
        nn = paddle.nn
        sn = dpaddle.spectral_norm
        self.linear = sn(nn.Linear(3, 5), seed=1)
        if compat_linear:
            self.clinear = sn(paddle.compat.nn.Linear(3, 5), seed=2)
        self.conv1d = sn(nn.Conv1D(2, 4, 3), seed=3)
        self.conv3d = nn.Conv3D(2, 3, 2)
        self.convt1d = nn.Conv1DTranspose(2, 3, 3)
        self.convt3d = sn(nn.Conv3DTranspose(2, 3, 2), seed=4)
        self.bn1d = nn.BatchNorm1D(4)
        self.bn3d = nn.BatchNorm3D(2)
        self.ln = nn.LayerNorm([4, 3])
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2D(4)
        self.emb = sn(nn.Embedding(6, 3), seed=5)
        self.prelu = nn.PReLU(4)
        self.bilinear = nn.Bilinear(3, 2, 4)


ZOO_INPUTS = {
    "linear": [(2, 3)], "clinear": [(2, 3)], "conv1d": [(2, 2, 5)], "conv3d": [(1, 2, 3, 3, 3)],
    "convt1d": [(2, 2, 4)], "convt3d": [(1, 2, 2, 2, 2)], "bn1d": [(3, 4)], "bn3d": [(2, 2, 2, 2, 2)],
    "ln": [(2, 4, 3)], "gn": [(2, 4, 3)], "inorm": [(2, 4, 3, 3)], "emb": [(4,)],
    "prelu": [(2, 4, 3)], "bilinear": [(2, 3), (2, 2)],
}


def zoo(framework: str, compat_linear: bool):
    return (TorchZoo if framework == "torch" else PaddleZoo)(compat_linear)


def randomize(model, seed: int = 0) -> None:
    """Random values in every float tensor (running variances positive), u and v included."""
    rng = np.random.default_rng(seed)
    adapter = port._adapter(port.framework_of(model))
    for key, tensor in adapter.state(model).items():
        if port._dtype_name(tensor) != "float32":
            continue
        value = rng.standard_normal(port._shape(tensor)).astype(np.float32)
        if key.endswith(("running_var", "_variance")):
            value = np.abs(value) + 0.5
        adapter.assign(tensor, value)


def zoo_outputs(model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    outs = {}
    for name, shapes in ZOO_INPUTS.items():
        layer = getattr(model, name, None)
        if layer is None:
            continue
        if name == "emb":
            xs = [rng.integers(0, 6, shapes[0]).astype(np.int64)]
        else:
            xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        outs[name] = run(layer, *xs)
    return outs


@pytest.mark.parametrize("start", ["torch", "paddle"])
@pytest.mark.parametrize("mode", ["models", "state_dict"])
def test_every_layer_type_ports(start, mode):
    compat_linear = mode == "models"  # a raw state dict cannot tell compat Linear apart
    source, target = zoo(start, compat_linear), zoo(other(start), compat_linear)
    randomize(source)
    if mode == "models":
        report = port_models(source, target)
    else:
        # numpy arrays with hook keys read as Paddle's preset; the zoo uses dualsn's "torch"
        report = port.load_state_dict(target, numpy_state(source), source=start, source_preset="torch")
    transposed = sorted(e.key for e in report.entries if e.transposed)
    assert transposed == [k for k in numpy_state(target) if k.startswith("linear.") and "weight" in k
                          and ("orig" in k or "original" in k)]
    renamed = {e.key: e.source_key for e in report.entries if e.source_key and e.key != e.source_key
               and e.sn == ""}
    expected = {"bn1d.running_mean": "bn1d._mean", "bn1d.running_var": "bn1d._variance",
                "inorm.weight": "inorm.scale", "prelu.weight": "prelu._weight",
                "bn3d.running_mean": "bn3d._mean", "bn3d.running_var": "bn3d._variance"}
    if start == "torch":
        expected = {v: k for k, v in expected.items()}
    assert renamed == expected
    a, b = zoo_outputs(target), zoo_outputs(source)
    assert a.keys() == b.keys()
    for name in a:
        assert rel(a[name], b[name]) < F32_OUT, name


def test_raw_paddle_compat_linear_is_caught_by_the_shape_check():
    # Without the source model, a Paddle Linear weight is taken to be [in, out]: a
    # paddle.compat.nn.Linear ([out, in]) then does not fit, and the error says so.
    source, target = zoo("paddle", True), zoo("torch", True)
    with pytest.raises(port.PortError, match=r"shape mismatch for 'clinear.parametrizations.weight.original'"):
        port.load_state_dict(target, source.state_dict())


class TorchScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5))

    def forward(self, x):
        return x * self.weight


class PaddleScale(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.weight = self.create_parameter([5])

    def forward(self, x):
        return x * self.weight


def test_exact_vector_norm_and_matrix_vector_norm_convert():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    # torch preset: a 1-D weight is normalized exactly and has no u, v ...
    exact = dtorch.spectral_norm(TorchScale(), compat="torch")
    matrix = dpaddle.spectral_norm(PaddleScale(), compat="paddle", seed=0)
    with pytest.warns(port.PresetMismatchWarning):  # across presets, on purpose
        report = port.torch_to_paddle(exact, matrix)
    w = exact.parametrizations.weight.original.detach().numpy()
    notes = {e.key: e.note for e in report.entries}
    assert notes["weight_u"].startswith("fixed point") and notes["weight_v"].startswith("fixed point")
    np.testing.assert_allclose(matrix.weight_u.numpy(), w / np.linalg.norm(w), rtol=1e-6)
    np.testing.assert_array_equal(matrix.weight_v.numpy(), [1.0])
    assert dpaddle.sigma(matrix) == pytest.approx(dtorch.sigma(exact), rel=1e-6)
    for training in (False, True):  # the fixed point stays put under the power iteration
        assert rel(run(matrix, x, training=training), run(exact, x, training=training)) < F32_OUT

    # ... and back: the matrix norm's u, v are dropped (one training forward converges them).
    source = dpaddle.spectral_norm(PaddleScale(), compat="paddle", seed=1)
    run(source, x, training=True)
    target = dtorch.spectral_norm(TorchScale(), compat="torch")
    with pytest.warns(port.PresetMismatchWarning):
        report = port.paddle_to_torch(source, target)
    assert [e.key for e in report.entries] == ["parametrizations.weight.original"]
    assert rel(run(target, x), run(source, x)) < F32_OUT


def test_spectral_norm_dims_that_do_not_correspond_are_refused():
    module = dtorch.spectral_norm(torch.nn.Linear(4, 4), seed=0)  # dim 0 of [out, in]
    layer = dpaddle.spectral_norm(paddle.nn.Linear(4, 4), dim=0, seed=0)  # dim 0 of [in, out]
    before = numpy_state(layer)
    with pytest.raises(port.PortError) as info:
        port.torch_to_paddle(module, layer)
    (problem,) = info.value.problems
    assert "the target takes it along dim 0 of its [in, out] weight (rows: input features)" in problem
    assert "the source along dim 0 of its [out, in] weight (rows: output features)" in problem
    assert "in the target but along dim 0 in the source" not in problem
    assert_same_state(numpy_state(layer), before)


# ---------------------------------------------------------------------------------------------
# Errors are collected, and nothing changes


def assert_same_state(after, before):
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.mark.parametrize("target_fw", ["torch", "paddle"])
def test_every_problem_is_reported_and_the_target_is_unchanged(target_fw):
    source = sngan.torch_discriminator() if target_fw == "paddle" else sngan.paddle_discriminator()
    state = numpy_state(source)
    fw = port.framework_of(source)
    bias = "linear.bias"
    conv = "blocks.0.conv1.bias"
    dropped = "embed.weight_u" if fw == "paddle" else "embed.parametrizations.weight.0._u"
    del state[dropped]
    state["blocks.9.extra"] = np.zeros(3, np.float32)
    state[bias] = np.zeros(2, np.float32)  # wrong shape
    state[conv] = state[conv].astype(np.float64)  # wrong dtype
    target = FACTORIES[(target_fw, "D")]()
    before = numpy_state(target)
    x = inputs_for("D", 3)
    out_before = run(target, *x)

    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, state, source=fw)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    assert "missing in the source" in text and "embed" in text
    assert "unexpected in the source: 'blocks.9.extra'" in text
    assert "shape mismatch for 'linear.bias'" in text
    assert "dtype mismatch for 'blocks.0.conv1.bias'" in text and "float64" in text
    assert_same_state(numpy_state(target), before)
    np.testing.assert_array_equal(run(target, *x), out_before)


def test_not_strict_tolerates_missing_and_unexpected_but_not_shapes():
    source, target = sngan.torch_discriminator(), sngan.paddle_discriminator()
    state = numpy_state(source)
    del state["linear.bias"]
    state["spare"] = np.ones(2, np.float32)
    kept = target.linear.bias.numpy().copy()
    report = port.load_state_dict(target, state, source="torch", strict=False)
    assert report.missing == ["linear.bias"] and report.unexpected == ["spare"]
    np.testing.assert_array_equal(target.linear.bias.numpy(), kept)
    np.testing.assert_array_equal(target.embed.weight_u.numpy(), state["embed.parametrizations.weight.0._u"])
    state["embed.parametrizations.weight.0._u"] = np.ones(3, np.float32)
    with pytest.raises(port.PortError, match="shape mismatch"):
        port.load_state_dict(target, state, source="torch", strict=False)


def test_batchnorm_step_counter():
    tG, pG = warmed("torch", "G"), sngan.paddle_generator()
    report = port.torch_to_paddle(tG, pG)  # num_batches_tracked: no Paddle counterpart, dropped
    assert not any("num_batches" in (e.source_key or "") for e in report.entries)
    fresh = sngan.torch_generator()
    report = port.paddle_to_torch(pG, fresh)  # kept as the target had it
    kept = [e for e in report.entries if e.key.endswith("num_batches_tracked")]
    assert len(kept) == 3 and all(e.source_key is None for e in kept)
    assert int(fresh.bn0.num_batches_tracked) == 0


def test_bad_arguments():
    model = sngan.torch_discriminator()
    with pytest.raises(ValueError, match="source"):
        port.load_state_dict(model, {"a": np.zeros(1)})  # numpy: the framework is unknown
    with pytest.raises(ValueError, match="source"):
        port.load_state_dict(model, {}, source="jax")
    with pytest.raises(TypeError, match="torch.nn.Module or a paddle.nn.Layer"):
        port.load_state_dict(object(), {}, source="torch")
    with pytest.raises(TypeError, match="paddle model"):
        port.torch_to_paddle(model, sngan.torch_discriminator())


# ---------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("start", ["torch", "paddle"])
def test_port_through_files(tmp_path, start):
    source = warmed(start, "D")
    native = tmp_path / ("d.pt" if start == "torch" else "d.pdparams")
    if start == "torch":
        torch.save(source.state_dict(), native)
    else:
        paddle.save(source.state_dict(), str(native))
    state = port.load_checkpoint(native)
    assert port.detect_format(native) == start
    target = FACTORIES[(other(start), "D")]()
    # paddle.save kept no preset: Paddle hook keys read as "paddle"; the model is dualsn's "torch"
    port.load_state_dict(target, state, source=start, source_preset="torch" if start == "paddle" else None)
    out = tmp_path / ("d.pdparams" if start == "torch" else "d.pt")
    port.save_checkpoint(target, out, other(start))  # the model: its presets are recorded
    # The written file is what the target framework's own loader reads.
    if start == "torch":
        reloaded = {k: v.numpy() for k, v in paddle.load(str(out)).items()}
    else:
        reloaded = {k: v.numpy() for k, v in torch.load(out, weights_only=True).items()}
    assert_same_state(reloaded, numpy_state(target))
    again = FACTORIES[(other(start), "D")]()
    port.load_state_dict(again, port.load_checkpoint(out), source=other(start))
    x = inputs_for("D", 4)
    assert rel(run(again, *x), run(source, *x)) < F32_OUT


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_pdparams_of_every_pickle_protocol(tmp_path, protocol):
    layer = sngan.paddle_generator()
    path = str(tmp_path / "g.pdparams")
    paddle.save(layer.state_dict(), path, protocol=protocol)
    state = port.load_checkpoint(path)
    assert_same_state(state, numpy_state(layer))


def test_big_pdparams_slices_are_joined(tmp_path):
    # paddle.save (protocol 2, 3) splits arrays over 1 GiB into slices; fake the layout small.
    whole = np.arange(12, dtype=np.float32).reshape(3, 4)
    saved = {"w@@.0": whole.ravel()[:5], "w@@.1": whole.ravel()[5:], "b": np.ones(2, np.float32),
             "UnpackBigParamInfor@@": {"w": {"OriginShape": (3, 4), "slices": ["w@@.0", "w@@.1"]}}}
    path = tmp_path / "big.pdparams"
    path.write_bytes(pickle.dumps(saved, protocol=2))
    assert_same_state(port.load_checkpoint(path), {"w": whole, "b": np.ones(2, np.float32)})


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pdparams_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"weight": _Evil(marker)}, protocol=2))
    with pytest.raises(port.CheckpointError) as info:
        port.load_checkpoint(path)
    assert f"refused global {os.system.__module__}.system" in str(info.value)
    assert not marker.exists()
    # paddle.load itself runs it: the file really is malicious.
    try:
        paddle.load(str(path))
    except Exception:
        pass
    assert marker.exists()


def test_a_malicious_pt_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": _Evil(marker)}, path)
    with pytest.raises(port.CheckpointError, match="weights_only"):
        port.load_checkpoint(path)
    assert not marker.exists()


def test_wrong_formats(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    (tmp_path / "b.pdparams").write_bytes((tmp_path / "a.pt").read_bytes())
    with pytest.raises(port.CheckpointError, match="zip archive"):
        port.load_checkpoint(tmp_path / "b.pdparams")
    (tmp_path / "c.pt").write_text("hello")
    with pytest.raises(port.CheckpointError, match="not a torch checkpoint"):
        port.load_checkpoint(tmp_path / "c.pt")
    (tmp_path / "d.ckpt").write_text("hello")
    with pytest.raises(port.CheckpointError, match="unknown checkpoint format"):
        port.load_checkpoint(tmp_path / "d.ckpt")
    (tmp_path / "e.pdparams").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(port.CheckpointError, match="not a state dict"):
        port.load_checkpoint(tmp_path / "e.pdparams")
    torch.save([torch.zeros(2)], tmp_path / "f.pt")
    with pytest.raises(port.CheckpointError, match="holds a list, not a state dict"):
        port.load_checkpoint(tmp_path / "f.pt")
    torch.save({"nested": {"w": torch.zeros(2)}}, tmp_path / "g.pt")  # nested: read as written
    assert torch.equal(port.load_checkpoint(tmp_path / "g.pt")["nested"]["w"], torch.zeros(2))
    with pytest.raises(FileNotFoundError):
        port.load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, framework, monkeypatch):
    path = tmp_path / ("x.pt" if framework == "torch" else "x.pdparams")
    first = {"w": np.ones((2, 3), np.float32)}
    port.save_checkpoint(first, path, framework)
    with pytest.raises(FileExistsError):
        port.save_checkpoint({"w": np.zeros((2, 3), np.float32)}, path, framework)
    assert_same_state(port.load_checkpoint(path), first)

    # A failure while writing leaves the old file whole and no temporary file behind.
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr(pickle, "dump", broken)
    with pytest.raises(OSError, match="disk full"):
        port.save_checkpoint({"w": np.zeros((2, 3), np.float32)}, path, framework, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert_same_state(port.load_checkpoint(path), first)

    second = {"w": np.full((2, 3), 2, np.float32), "b": np.arange(3, dtype=np.float64)}
    port.save_checkpoint(second, path, framework, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert_same_state(port.load_checkpoint(path), second)


def test_port_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import dualsn.port, dualsn.cli, dualsn.examples.sngan
        dualsn.cli.build_parser()
        print(",".join(m for m in ("torch", "paddle") if m in sys.modules) or "none")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "none"
