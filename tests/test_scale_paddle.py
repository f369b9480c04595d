"""dualsn.paddle where GAN training at scale takes it: paddle.DataParallel across processes,
paddle.jit.to_static and jit.save / jit.load, auto_cast and low-precision weights, deepcopy /
pickle / EMA copies of a model, and GPU devices. Every check compares against an independent
computation: a single-process run, dygraph, a float32 or numpy float64 run, or an exact SVD.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import _scale_common as common  # noqa: E402
import dualsn  # noqa: E402
import dualsn.paddle as dsn  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402

GPU = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
NO_GPU = "no CUDA device here (Paddle is a CPU build or sees no GPU)"
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not GPU, reason=NO_GPU))]
LOW_PRECISION = ("float16", "bfloat16")


@pytest.fixture(autouse=True)
def _cpu_and_clean_seed_stream():
    dualsn.manual_seed(None)
    paddle.set_device("cpu")
    yield
    paddle.set_device("cpu")
    dualsn.manual_seed(None)


# ---------------------------------------------------------------------------------------------
# Helpers


def np64(t) -> np.ndarray:
    return t.astype("float64").numpy() if "float64" not in str(t.dtype) else t.numpy().copy()


def assert_close(actual, expected, rtol) -> None:
    """max|actual - expected| <= rtol * max|expected| (a tolerance relative to the scale)."""
    a = actual if isinstance(actual, np.ndarray) else np64(actual)
    e = expected if isinstance(expected, np.ndarray) else np64(expected)
    assert a.shape == e.shape
    err, scale = np.abs(a - e).max(), np.abs(e).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:.1g} * scale {scale:.3g}"


def uv(model):
    """All u and v buffers of ``model``, in order."""
    return [b for name, b in model.named_buffers() if name.endswith(("weight_u", "weight_v"))]


def discriminator(dtype: str = "float32", seeds=(1, 2, 3)):
    """A toy SN discriminator with every W-matrix layout dualsn.paddle has: conv (dim 0),
    transposed conv (dim 1 of 4 axes, batched), Linear (dim 1, the last axis)."""
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        paddle.seed(0)
        layers = [
            dsn.spectral_norm(paddle.nn.Conv2D(2, 3, 3), seed=seeds[0]),
            paddle.nn.LeakyReLU(0.2),
            dsn.spectral_norm(paddle.nn.Conv2DTranspose(3, 2, 2), seed=seeds[1]),
            paddle.nn.Flatten(),
            dsn.spectral_norm(paddle.nn.Linear(2 * 5 * 5, 1), seed=seeds[2]),
        ]
    finally:
        paddle.set_default_dtype(old)
    return paddle.nn.Sequential(*layers)


def d_input(seed: int, dtype: str = "float32"):
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((3, 2, 6, 6)).astype(dtype))


# ---------------------------------------------------------------------------------------------
# 1. paddle.DataParallel across two processes


def test_data_parallel_matches_single_process(tmp_path):
    """Two CPU ranks (gloo collectives, Paddle's trainer environment variables on 127.0.0.1)
    train the SN discriminator with D(real) and D(fake) in two forwards per step. u and v
    are identical on both ranks after every step (DataParallel syncs buffers once, at
    construction; the power iteration depends only on W, which it keeps identical), and u,
    v and the final weights equal a single-process run on the global batch."""
    import _paddle_dp_worker as worker

    ports = common.free_ports(common.WORLD_SIZE)
    endpoints = ",".join(f"127.0.0.1:{p}" for p in ports)
    envs = [
        {
            "PADDLE_DISTRI_BACKEND": "gloo",
            "PADDLE_TRAINER_ID": str(rank),
            "PADDLE_TRAINERS_NUM": str(common.WORLD_SIZE),
            "PADDLE_TRAINER_ENDPOINTS": endpoints,
            "PADDLE_CURRENT_ENDPOINT": f"127.0.0.1:{port}",
            "CUDA_VISIBLE_DEVICES": "",
        }
        for rank, port in enumerate(ports)
    ]
    args = [[str(rank), str(tmp_path)] for rank in range(common.WORLD_SIZE)]
    try:
        common.run_workers("_paddle_dp_worker.py", envs, args, timeout=150)
    except RuntimeError as error:
        if worker.INIT_OK not in str(error):
            # No rank got through paddle.distributed.init_parallel_env: the collectives are
            # unavailable here (not a dualsn failure). The reason carries the exact error.
            pytest.skip(f"Paddle CPU collectives unavailable: {str(error)[-1500:]}")
        raise
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(common.WORLD_SIZE)]
    for key in ranks[0].files:
        assert all(np.array_equal(ranks[0][key], r[key]) for r in ranks[1:]), key

    model = worker.build_discriminator()
    optimizer = paddle.optimizer.SGD(learning_rate=common.LR, parameters=model.parameters())
    expected = {f"0/{k}": v for k, v in worker.sn_buffers(model).items()}
    for step, (real, fake) in enumerate(common.batches(), start=1):
        worker.train_step(model, optimizer, paddle.to_tensor(real), paddle.to_tensor(fake))
        expected.update({f"{step}/{k}": v for k, v in worker.sn_buffers(model).items()})
    expected.update({f"final/{k}": p.numpy() for k, p in model.named_parameters()})
    assert not np.allclose(expected[f"{common.STEPS}/0.weight_u"], expected["0/0.weight_u"])
    assert set(expected) == set(ranks[0].files)
    for key, value in expected.items():
        np.testing.assert_allclose(ranks[0][key], value, rtol=1e-10, atol=1e-12, err_msg=key)


# ---------------------------------------------------------------------------------------------
# 2. Static graphs: paddle.jit.to_static, jit.save / jit.load


def test_to_static_training_matches_dygraph():
    """A static-graph (``full_graph=True``) copy of the discriminator trains exactly like
    dygraph: the same outputs, u, v updates and gradients over steps of D(real) - D(fake)."""
    dygraph = discriminator()
    model = copy.deepcopy(dygraph)
    static = paddle.jit.to_static(model, full_graph=True)
    initial_u = uv(model)[0].numpy().copy()
    for step in range(2):
        outs = []
        for m in (dygraph, static):
            m.clear_gradients()
            out_real, out_fake = m(d_input(2 * step)), m(d_input(2 * step + 1))
            (out_real.mean() - out_fake.mean()).backward()
            outs.append((out_real, out_fake))
        for a, b in zip(*outs):
            assert_close(b, a, 1e-5)
        for a, b in zip(uv(dygraph), uv(model)):
            assert_close(b, a, 1e-6)
        for a, b in zip(dygraph.parameters(), model.parameters()):
            assert_close(b.grad, a.grad, 1e-5)
    assert not np.allclose(uv(model)[0].numpy(), initial_u)


def test_to_static_eval_and_jit_save_load_match_dygraph(tmp_path):
    """Eval mode: the static graph and the model saved by paddle.jit.save and loaded back
    by paddle.jit.load give dygraph's outputs, and do not move u, v."""
    dygraph = discriminator()
    dygraph(d_input(0))  # a training forward moves u, v
    dygraph.eval()
    model = copy.deepcopy(dygraph)
    static = paddle.jit.to_static(model, full_graph=True)
    before = [t.numpy().copy() for t in uv(model)]
    expected = dygraph(d_input(1))
    assert_close(static(d_input(1)), expected, 1e-6)
    path = str(tmp_path / "discriminator")
    paddle.jit.save(static, path, input_spec=[paddle.static.InputSpec([None, 2, 6, 6], "float32")])
    loaded = paddle.jit.load(path)
    assert_close(loaded(d_input(1)), expected, 1e-6)
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(uv(model), before))


# ---------------------------------------------------------------------------------------------
# 3. Mixed precision


def _auto_cast_casts(device: str, dtype: str) -> bool:
    """Whether paddle.amp.auto_cast really runs matmul in ``dtype`` on ``device``."""
    x = paddle.ones([2, 2])
    with paddle.amp.auto_cast(dtype=dtype):
        return paddle.matmul(x, x).dtype != paddle.float32


@pytest.mark.parametrize("device", DEVICES)
def test_auto_cast_keeps_float32_state(device):
    """Under paddle.amp.auto_cast u, v stay float32 and follow a float32 run exactly (the
    power iteration never runs in reduced precision), outputs match within that precision.

    Paddle 3.3.1 casts nothing on the CPU (auto_cast, and amp.decorate at level O2, only
    act on GPU/XPU places), so there this checks that the hooks work unchanged inside
    auto_cast; on a GPU it checks the float16 path."""
    paddle.set_device(device)
    dtype = "float16" if device == "gpu" else "bfloat16"
    model = discriminator()
    reference = copy.deepcopy(model)
    with paddle.amp.auto_cast(dtype=dtype, level="O1"):
        out = model(d_input(0))
    expected = reference(d_input(0))
    assert (out.dtype != paddle.float32) == _auto_cast_casts(device, dtype)
    for a, b in zip(uv(model), uv(reference)):
        assert a.dtype == paddle.float32
        assert_close(a, b, 1e-6)
    assert_close(out, expected, 3e-2)
    out.astype("float32").square().sum().backward()
    expected.square().sum().backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert a.grad.dtype == paddle.float32
        assert_close(a.grad, b.grad, 6e-2)


class Holder(paddle.nn.Layer):
    """y = x @ W^T for a weight of any dtype, the matmul in float32 (Paddle's CPU matmul has
    no float16/bfloat16 kernels): only the spectral norm sees the low-precision weight."""

    def __init__(self, weight: np.ndarray, dtype: str):
        super().__init__()
        self.weight = self.create_parameter(list(weight.shape), dtype="float32")
        self.weight.set_value(weight.astype("float32"))
        if dtype != "float32":
            self.to(dtype=dtype)

    def forward(self, x):
        return paddle.matmul(x, self.weight.astype("float32"), transpose_y=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_low_precision_weights_compute_in_float32(device, dtype):
    """float16 / bfloat16 weights: u, v are float32, the power iteration, sigma and the
    gradient are computed in float32, and the normalized weight is cast back to the
    weight's dtype. float64 weights keep float64 throughout. All checked against the numpy
    reference run in float64 on the same (rounded) weight."""
    paddle.set_device(device)
    rng = np.random.default_rng(3)
    layer = Holder(rng.standard_normal((10, 12)), dtype)
    assert str(layer.weight.dtype) == f"paddle.{dtype}"
    w_np = np64(layer.weight)  # the weight as stored, rounded to its dtype
    dsn.spectral_norm(layer, seed=9)
    state_dtype = "float32" if dtype in LOW_PRECISION else dtype
    assert str(layer.weight_u.dtype) == str(layer.weight_v.dtype) == f"paddle.{state_dtype}"
    u0, v0 = spec.init_uv(10, 12, 9, state_dtype)
    ref = numpy_ref.ReferenceSN(w_np, 0, spec.make_spec(), u0.astype(np.float64), v0.astype(np.float64))
    state_rtol = 1e-5 if dtype in LOW_PRECISION else 1e-12
    out_rtol = {"float16": 2e-3, "bfloat16": 1e-2, "float64": 1e-12}[dtype]
    x = paddle.to_tensor(rng.standard_normal((3, 12)).astype("float32"))
    for _ in range(2):
        layer(x)
        assert str(layer.weight.dtype) == f"paddle.{dtype}"
        assert_close(layer.weight, ref.forward(w_np, training=True), out_rtol)
        assert_close(layer.weight_u, ref.u, state_rtol)
        assert_close(layer.weight_v, ref.v, state_rtol)
        assert dsn.sigma(layer) == pytest.approx(float(ref.sigma(w_np)), rel=state_rtol)
    g_np = rng.standard_normal(w_np.shape)
    (layer.weight.astype("float64") * paddle.to_tensor(g_np)).sum().backward()
    grad = layer.weight_orig.grad
    assert str(grad.dtype) == f"paddle.{dtype}"
    assert_close(grad, ref.weight_grad(g_np, w_np), 2 * out_rtol)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_casting_the_layer_restores_float32_state(dtype):
    """``layer.to(dtype=...)`` after registration (what amp.decorate at level O2 does on a
    GPU) casts u, v with the layer; the next forward puts them back in float32 and the
    normalized weight, in the new dtype, still matches the float32 one."""
    layer = dsn.spectral_norm(Holder(np.random.default_rng(4).standard_normal((10, 12)), "float32"), seed=9)
    x = paddle.to_tensor(np.random.default_rng(5).standard_normal((3, 12)).astype("float32"))
    layer(x)
    layer.eval()
    expected = layer.weight.numpy().astype(np.float64)
    layer.to(dtype=dtype)
    layer(x)
    assert layer.weight_u.dtype == layer.weight_v.dtype == paddle.float32
    assert str(layer.weight.dtype) == f"paddle.{dtype}"
    assert_close(layer.weight, expected, 1e-2)
    assert dsn.sigma(layer) == pytest.approx(float(np.linalg.svd(np64(layer.weight_orig))[1][0]), rel=1e-2)


# ---------------------------------------------------------------------------------------------
# 4. Copies: deepcopy, pickle, EMA


@pytest.mark.parametrize("compat", list(spec.PRESETS))
def test_deepcopy_after_forward(compat):
    """An EMA generator starts as ``copy.deepcopy(G)`` of a model mid-training: the copy has
    its own u, v (equal values, separate storage) and computes the same outputs."""
    paddle.seed(0)
    g = dsn.spectral_norm(paddle.nn.Conv2D(2, 4, 3), compat=compat, seed=2)
    x = d_input(0)
    g(x).sum().backward()
    ema = copy.deepcopy(g)
    for a, b in zip(uv(g), uv(ema)):
        assert np.array_equal(a.numpy(), b.numpy()) and a.data_ptr() != b.data_ptr()
    g.eval(), ema.eval()
    assert np.array_equal(ema(x).numpy(), g(x).numpy())
    g.train()
    g(x)  # moves g's u, v only
    assert not np.array_equal(uv(g)[0].numpy(), uv(ema)[0].numpy())


def test_checkpoint_and_pickle_round_trips(tmp_path):
    """A checkpoint (``paddle.save(model.state_dict())``, loaded into a freshly built model
    whose spectral norms started elsewhere) resumes training exactly: same state, outputs,
    u, v updates and gradients. A pickled model (Paddle pickles any Layer's parameters as
    plain tensors, so it is for inference copies; ``paddle.save`` refuses Layer objects)
    computes the same outputs and the same u, v updates."""
    model = discriminator()
    model(d_input(0)).sum().backward()
    path = str(tmp_path / "d.pdparams")
    paddle.save(model.state_dict(), path)
    restored = discriminator(seeds=(4, 5, 6))  # a different start, which the checkpoint overwrites
    assert not np.array_equal(uv(restored)[0].numpy(), uv(model)[0].numpy())
    restored.set_state_dict(paddle.load(path))
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    assert all(np.array_equal(state[k].numpy(), restored_state[k].numpy()) for k in state)
    for m in (model, restored):
        m.clear_gradients()
        m(d_input(1)).square().sum().backward()
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(uv(model), uv(restored)))
    for a, b in zip(model.parameters(), restored.parameters()):
        assert np.array_equal(a.grad.numpy(), b.grad.numpy())

    pickled = pickle.loads(pickle.dumps(model))
    with paddle.no_grad():
        assert np.array_equal(pickled(d_input(2)).numpy(), model(d_input(2)).numpy())
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(uv(model), uv(pickled)))
    model.eval(), pickled.eval()
    assert np.array_equal(pickled(d_input(3)).numpy(), model(d_input(3)).numpy())


def ema_update(ema, model, decay: float, buffers: str = "copy") -> None:
    """The EMA recipe of docs/training.md: average the parameters, copy the buffers (u, v).
    ``buffers="average"`` averages the buffers too: the mistake the test demonstrates."""
    with paddle.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.set_value(decay * e + (1 - decay) * p)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.set_value(b if buffers == "copy" else decay * e + (1 - decay) * b)


def test_ema_of_parameters_keeps_sigma_consistent():
    """EMA of a generator: averaging the parameters and copying u, v gives a sigma within a
    percent of the EMA weight's exact largest singular value. Averaging the u, v buffers
    like parameters shrinks them below unit norm, so sigma is underestimated and the
    "normalized" weight has spectral norm > 1."""
    old = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        paddle.seed(0)
        g = dsn.spectral_norm(paddle.nn.Linear(12, 10), seed=3)
    finally:
        paddle.set_default_dtype(old)
    ema, ema_averaged_uv = copy.deepcopy(g), copy.deepcopy(g)
    optimizer = paddle.optimizer.SGD(learning_rate=0.5, parameters=g.parameters())
    rng = np.random.default_rng(0)
    for _ in range(30):
        x, target = (paddle.to_tensor(rng.standard_normal((8, n))) for n in (12, 10))
        optimizer.clear_grad()
        (g(x) - target).square().mean().backward()
        optimizer.step()
        ema_update(ema, g, decay=0.9)
        ema_update(ema_averaged_uv, g, decay=0.9, buffers="average")
    w_ema = ema.weight_orig.numpy()
    assert np.array_equal(w_ema, ema_averaged_uv.weight_orig.numpy())
    exact = np.linalg.svd(w_ema, compute_uv=False)[0]
    sigma_copied = dsn.sigma(ema)
    assert exact * (1 - 1e-2) < sigma_copied <= exact * (1 + 1e-12)

    u, v = uv(ema_averaged_uv)
    norms = float(np.linalg.norm(u.numpy()) * np.linalg.norm(v.numpy()))
    assert norms < 1 - 1e-3  # averaging unit vectors shrinks them
    sigma_averaged = dsn.sigma(ema_averaged_uv)
    assert sigma_averaged <= norms * exact * (1 + 1e-12) < sigma_copied
    ema_averaged_uv.eval()
    ema_averaged_uv(x)
    largest = np.linalg.svd(ema_averaged_uv.weight.numpy(), compute_uv=False)[0]
    assert largest > 1 + 1e-3  # the "normalized" weight is not 1-Lipschitz


# ---------------------------------------------------------------------------------------------
# 5. Devices


@pytest.mark.skipif(not GPU, reason=NO_GPU)
def test_gpu_matches_cpu():
    """Two training steps on the GPU and on the CPU from the same seeds: outputs, u, v and
    gradients agree within float32 tolerance."""
    cpu = discriminator()
    gpu = copy.deepcopy(cpu)
    gpu.to(device="gpu")
    for step in range(2):
        outs = []
        for m, device in ((cpu, "cpu"), (gpu, "gpu")):
            paddle.set_device(device)
            m.clear_gradients()
            out = m(d_input(2 * step)) - m(d_input(2 * step + 1))
            out.square().sum().backward()
            outs.append(out)
        assert_close(outs[1], outs[0], 1e-4)
        for a, b in zip(uv(cpu), uv(gpu)):
            assert_close(b, a, 1e-4)
        for a, b in zip(cpu.parameters(), gpu.parameters()):
            assert_close(b.grad, a.grad, 1e-4)
