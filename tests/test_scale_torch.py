"""dualsn.torch where GAN training at scale takes it: DistributedDataParallel across
processes, torch.compile, autocast and low-precision weights, deepcopy / pickle / EMA copies
of a model, and CUDA devices. Every check compares against an independent computation: a
single-process run, eager mode, a float32 or numpy float64 run, or an exact SVD.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import _scale_common as common  # noqa: E402
import dualsn.torch as dt  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason=NO_CUDA))]
AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}
LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Helpers


def np64(t) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def assert_close(actual, expected, rtol) -> None:
    """max|actual - expected| <= rtol * max|expected| (a tolerance relative to the scale)."""
    a, e = np64(actual) if torch.is_tensor(actual) else actual, np64(expected) if torch.is_tensor(expected) else expected
    assert a.shape == e.shape
    err, scale = np.abs(a - e).max(), np.abs(e).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:.1g} * scale {scale:.3g}"


def sn_layers(model):
    """(module, SpectralNorm) for every dualsn spectral norm in ``model``."""
    return [(m, dt.get_spectral_norm(m)) for m in model.modules() if dt.is_spectral_norm(m)]


def uv(model):
    """All u and v buffers of ``model``, in order."""
    return [t for _, sn in sn_layers(model) for t in (sn._u, sn._v)]


def make_layer(kind: str, dtype=torch.float32):
    """A small layer of the kind whose W-matrix path dualsn.torch takes: dim first (linear,
    conv2d), dim in the middle (convT2d, batched products), dim last (linear with dim=1)."""
    torch.manual_seed(0)
    layer = {
        "linear": lambda: nn.Linear(12, 10),
        "linear_dim1": lambda: nn.Linear(12, 10),
        "conv2d": lambda: nn.Conv2d(3, 5, 3),
        "convT2d": lambda: nn.ConvTranspose2d(5, 4, 3),
    }[kind]().to(dtype)
    return dt.spectral_norm(layer, dim=1 if kind == "linear_dim1" else None, seed=7)


def layer_input(kind: str, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (4, 12), "linear_dim1": (4, 12), "conv2d": (2, 3, 6, 6), "convT2d": (2, 5, 4, 4)}[kind]
    return torch.randn(shape, generator=g).to(dtype)


def discriminator():
    """A toy SN discriminator with all three W-matrix layouts (conv, transposed conv, linear)."""
    torch.manual_seed(0)
    return nn.Sequential(
        dt.spectral_norm(nn.Conv2d(2, 3, 3), seed=1),
        nn.LeakyReLU(0.2),
        dt.spectral_norm(nn.ConvTranspose2d(3, 2, 2), seed=2),
        nn.Flatten(),
        dt.spectral_norm(nn.Linear(2 * 5 * 5, 1), seed=3),
    )


def d_input(seed: int):
    return torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# 1. DistributedDataParallel across two processes


def test_distributed_data_parallel_matches_single_process(tmp_path):
    """Two CPU ranks (gloo on 127.0.0.1) train the SN discriminator with D(real) and D(fake)
    in two forwards per step. u and v are identical on both ranks after every step, and u, v
    and the final weights equal a single-process run on the global batch.

    The worker also tries DDP's buffer settings: with ``broadcast_buffers=False`` nothing
    syncs u, v (not even at construction), so ranks agree only when u, v start equal
    (``seed=``): unseeded ranks keep different u, v; ``forward_sync_buffers=False`` (torch
    2.13+) still syncs them once at construction, after which they stay identical because
    the power iteration depends only on W, which DDP keeps identical.
    """
    import _ddp_worker as worker

    port = common.free_ports(1)[0]
    args = [[str(r), str(common.WORLD_SIZE), str(port), str(tmp_path)] for r in range(common.WORLD_SIZE)]
    common.run_workers("_ddp_worker.py", [{}] * common.WORLD_SIZE, args, timeout=150)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(common.WORLD_SIZE)]
    keys = ranks[0].files
    scenarios = {k.split("/")[0] for k in keys}
    steps = [str(s) for s in range(common.STEPS + 1)]

    def same_on_all_ranks(scenario, step):
        names = [k for k in keys if k.startswith(f"{scenario}/{step}/")]
        assert names
        return all(np.array_equal(ranks[0][k], r[k]) for r in ranks[1:] for k in names)

    for scenario in ("default", "no_broadcast_seeded", "no_forward_sync_unseeded"):
        if scenario in scenarios:
            for step in steps + ["final"]:
                assert same_on_all_ranks(scenario, step), (scenario, step)
    # unseeded u, v that nothing syncs stay rank-local
    conv_u = "no_broadcast_unseeded/{}/0.parametrizations.weight.0._u"
    for step in ("0", steps[-1]):
        assert not np.array_equal(ranks[0][conv_u.format(step)], ranks[1][conv_u.format(step)])

    # The single-process reference on the global batch.
    torch.set_num_threads(1)
    model = worker.build_discriminator(seeded=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=common.LR)
    expected = {f"0/{k}": v for k, v in worker.sn_buffers(model).items()}
    for step, (real, fake) in enumerate(common.batches(), start=1):
        worker.train_step(model, optimizer, torch.from_numpy(real), torch.from_numpy(fake))
        expected.update({f"{step}/{k}": v for k, v in worker.sn_buffers(model).items()})
    expected.update({f"final/{k}": p.detach().numpy() for k, p in model.named_parameters()})
    initial_u = expected["0/0.parametrizations.weight.0._u"]
    assert not np.allclose(expected[f"{steps[-1]}/0.parametrizations.weight.0._u"], initial_u)
    for scenario in ("default", "no_broadcast_seeded"):
        for key, value in expected.items():
            np.testing.assert_allclose(ranks[0][f"{scenario}/{key}"], value, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. torch.compile


def test_compile_has_no_graph_break():
    """Dynamo captures a training-mode and an eval-mode forward of a model with every
    W-matrix layout as one graph each."""
    torch._dynamo.reset()
    model = discriminator()
    for training in (True, False):
        model.train(training)
        explanation = torch._dynamo.explain(model)(d_input(0))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_compile_eval_matches_eager():
    """Eval mode, compiled (aot_eager: the same graph as inductor gets, without the C++
    compile time), equals eager: no power iteration, sigma from the stored u, v."""
    torch._dynamo.reset()
    model = discriminator()
    model(d_input(0))  # one training step moves u, v
    model.eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    before = [t.clone() for t in uv(model)]
    with torch.no_grad():
        eager = model(d_input(1))
        out = compiled(d_input(1))
    assert_close(out, eager, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(uv(model), before))


def test_inductor_training_matches_eager():
    """torch.compile (inductor) of two training steps with D(real) - D(fake): the same
    outputs, u, v updates and gradients as eager, and no graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = dt.spectral_norm(nn.Linear(6, 3), seed=5)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="inductor")
    initial = [t.clone() for t in uv(model)]
    for step in range(2):
        real, fake = torch.randn(4, 6), torch.randn(4, 6) - 1
        outs = []
        for m in (eager, compiled):
            m.zero_grad()
            out_real, out_fake = m(real), m(fake)
            (out_real.mean() - out_fake.mean()).backward()
            outs.append((out_real, out_fake))
        for a, b in zip(outs[0], outs[1]):
            assert_close(b, a, 1e-5)
        for a, b in zip(uv(eager), uv(model)):
            assert_close(b, a, 1e-6)
        for a, b in zip(eager.parameters(), model.parameters()):
            assert_close(b.grad, a.grad, 1e-5)
    assert not any(torch.equal(a, b) for a, b in zip(uv(model), initial))  # u, v did move
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


# ---------------------------------------------------------------------------------------------
# 3. Mixed precision


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "linear_dim1", "conv2d", "convT2d"])
def test_autocast_power_iteration_stays_float32(device, kind):
    """Under autocast the power iteration and sigma run in float32 (u, v as in a float32
    run) while the layer's own op runs in reduced precision; outputs and gradients match the
    float32 run within that precision."""
    model = make_layer(kind).to(device)
    reference = copy.deepcopy(model)
    x = layer_input(kind).to(device)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE[device]):
        out = model(x)
    assert out.dtype == AUTOCAST_DTYPE[device]
    out_ref = reference(x)
    for a, b in zip(uv(model), uv(reference)):
        assert a.dtype == torch.float32
        assert_close(a, b, 1e-6)
    assert dt.sigma(model) == pytest.approx(dt.sigma(reference), rel=1e-6)
    assert_close(out, out_ref, 3e-2)
    out.float().square().sum().backward()
    out_ref.square().sum().backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert a.grad.dtype == torch.float32
        assert_close(a.grad, b.grad, 6e-2)


class Holder(nn.Module):
    """y = x @ W^T for a weight of any dtype: the matmul runs in float32 so that only the
    spectral norm sees the low-precision weight."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x @ self.weight.float().t()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_weights_compute_in_float32(device, dtype):
    """float16 / bfloat16 weights: u, v are float32, the power iteration, sigma and the
    gradient are computed in float32, and the normalized weight is cast back to the
    weight's dtype. float64 weights keep float64 throughout. All checked against the numpy
    reference run in float64 on the same (rounded) weight."""
    rng = np.random.default_rng(3)
    w_np = rng.standard_normal((10, 12))
    weight = torch.from_numpy(w_np).to(dtype)
    w_np = np64(weight)  # the weight as stored, rounded to its dtype
    model = dt.spectral_norm(Holder(weight.clone()).to(device), seed=9)
    state_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    sn = dt.get_spectral_norm(model)
    assert sn._u.dtype == sn._v.dtype == state_dtype
    u0, v0 = spec.init_uv(10, 12, 9, "float32" if dtype in LOW_PRECISION else "float64")
    ref = numpy_ref.ReferenceSN(w_np, 0, spec.make_spec(), u0.astype(np.float64), v0.astype(np.float64))
    state_rtol = 1e-5 if dtype in LOW_PRECISION else 1e-12
    out_rtol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    x = torch.from_numpy(rng.standard_normal((3, 12))).float().to(device)
    for _ in range(2):
        w_sn = model.weight
        assert w_sn.dtype == dtype
        expected = ref.forward(w_np, training=True)
        assert_close(w_sn, expected, out_rtol)
        assert_close(sn._u, ref.u, state_rtol)
        assert_close(sn._v, ref.v, state_rtol)
        assert dt.sigma(model) == pytest.approx(float(ref.sigma(w_np)), rel=state_rtol)
    g_np = rng.standard_normal(w_np.shape)
    original = model.parametrizations.weight.original
    model.weight.mul(torch.from_numpy(g_np).to(device=device, dtype=dtype)).float().sum().backward()
    assert original.grad.dtype == dtype
    ref.iterate(w_np, 1)
    assert_close(original.grad, ref.weight_grad(g_np, w_np), 2 * out_rtol)
    model(x).sum().backward()  # a forward of the whole layer works too


def test_casting_the_module_keeps_float32_state():
    """``module.half()`` / ``.to(torch.bfloat16)`` after registration keep u, v in float32
    (without rounding them through the low precision); ``.double()`` makes them float64."""
    model = make_layer("conv2d")
    model(layer_input("conv2d"))
    model.eval()  # reading model.weight below must not iterate
    u, v = (t.clone() for t in uv(model))
    expected = np64(model.weight)
    for dtype in LOW_PRECISION:
        model.to(dtype)
        assert all(t.dtype == torch.float32 for t in uv(model))
        assert torch.equal(uv(model)[0], u) and torch.equal(uv(model)[1], v)
        assert model.weight.dtype == dtype
        assert_close(model.weight, expected, 1e-2)
    model.double()
    assert all(t.dtype == torch.float64 for t in uv(model))


# ---------------------------------------------------------------------------------------------
# 4. Copies: deepcopy, pickle / torch.save, EMA


@pytest.mark.parametrize("compat", list(spec.PRESETS))
def test_deepcopy_after_forward(compat):
    """An EMA generator starts as ``copy.deepcopy(G)`` of a model mid-training: the copy has
    its own u, v (equal values, separate storage) and computes the same outputs."""
    torch.manual_seed(0)
    g = dt.spectral_norm(nn.Conv2d(3, 4, 3), compat=compat, seed=2)
    x = layer_input("conv2d")
    g(x).sum().backward()  # after a forward and a backward, as in training
    ema = copy.deepcopy(g)
    for a, b in zip(uv(g), uv(ema)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    g.eval(), ema.eval()
    assert torch.equal(ema(x), g(x))
    g.train()
    g(x)  # moves g's u, v only
    assert not torch.equal(uv(g)[0], uv(ema)[0])


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole module is not "weights only"


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_whole_model_pickles(how):
    """``torch.save(model)`` and pickle of a whole model with dualsn spectral norms (the
    torch built-in parametrization refuses both): the loaded model has the same state,
    computes the same outputs and trains on exactly like the original."""
    model = discriminator()
    model(d_input(0)).sum().backward()
    loaded = _torch_save_load(model) if how == "torch.save" else pickle.loads(pickle.dumps(model))
    assert type(loaded[0]).__name__ == type(model[0]).__name__ == "ParametrizedConv2d"
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    for m in (model, loaded):
        m.zero_grad()
        m(d_input(1)).square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(uv(model), uv(loaded)))
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a.grad, b.grad)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(d_input(2)), model(d_input(2)))
    dt.remove_spectral_norm(loaded[0])  # the loaded model is a normal dualsn model
    assert torch.equal(loaded[0].weight, model[0].weight)
    pickle.loads(pickle.dumps(loaded))  # and pickles again


def ema_update(ema: nn.Module, model: nn.Module, decay: float, buffers: str = "copy") -> None:
    """The EMA recipe of docs/training.md: average the parameters, copy the buffers (u, v).
    ``buffers="average"`` averages the buffers too: the mistake the test demonstrates."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            if buffers == "copy":
                e.copy_(b)
            else:
                e.lerp_(b, 1 - decay)


def test_ema_of_parameters_keeps_sigma_consistent():
    """EMA of a generator: averaging the parameters and copying u, v gives a sigma within a
    fraction of a percent of the EMA weight's exact largest singular value (and exact after a
    few power iterations). Averaging the u, v buffers like parameters shrinks them below unit
    norm, so sigma is underestimated and the "normalized" weight has spectral norm > 1."""
    torch.manual_seed(0)
    g = dt.spectral_norm(nn.Linear(12, 10).double(), seed=3)
    ema = copy.deepcopy(g)
    ema_averaged_uv = copy.deepcopy(g)
    optimizer = torch.optim.SGD(g.parameters(), lr=0.5)
    for _ in range(30):
        x, target = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
        optimizer.zero_grad()
        (g(x) - target).square().mean().backward()
        optimizer.step()
        ema_update(ema, g, decay=0.9)
        ema_update(ema_averaged_uv, g, decay=0.9, buffers="average")
    w_ema = np64(ema.parametrizations.weight.original)
    assert np.array_equal(w_ema, np64(ema_averaged_uv.parametrizations.weight.original))
    exact = np.linalg.svd(w_ema, compute_uv=False)[0]

    sigma_copied = dt.sigma(ema)
    assert exact * (1 - 1e-2) < sigma_copied <= exact * (1 + 1e-12)
    sn = dt.get_spectral_norm(ema)
    sn.iterate(ema.parametrizations.weight.original, 20)  # optional refresh on the EMA weight
    assert dt.sigma(ema) == pytest.approx(exact, rel=1e-9)

    u, v = uv(ema_averaged_uv)
    norms = float(u.norm()) * float(v.norm())
    assert norms < 1 - 1e-3  # averaging unit vectors shrinks them
    sigma_averaged = dt.sigma(ema_averaged_uv)
    assert sigma_averaged <= norms * exact * (1 + 1e-12) < sigma_copied
    with torch.no_grad():
        ema_averaged_uv.eval()
        largest = np.linalg.svd(np64(ema_averaged_uv.weight), compute_uv=False)[0]
    assert largest > 1 + 1e-3  # the "normalized" weight is not 1-Lipschitz


# ---------------------------------------------------------------------------------------------
# 5. Devices


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_matches_cpu():
    """Two training steps on CUDA and on the CPU from the same seeds: outputs, u, v and
    gradients agree within float32 tolerance."""
    cpu = discriminator()
    gpu = copy.deepcopy(cpu).cuda()
    for step in range(2):
        outs = []
        for m, device in ((cpu, "cpu"), (gpu, "cuda")):
            m.zero_grad()
            out = m(d_input(2 * step).to(device)) - m(d_input(2 * step + 1).to(device))
            out.square().sum().backward()
            outs.append(out)
        assert_close(outs[1], outs[0], 1e-4)
        for a, b in zip(uv(cpu), uv(gpu)):
            assert_close(b, a, 1e-4)
        for a, b in zip(cpu.parameters(), gpu.parameters()):
            assert_close(b.grad, a.grad, 1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nn.DataParallel needs 2 CUDA devices")
def test_data_parallel_keeps_u_updates():
    """nn.DataParallel replicas update u, v in place in the storage they share with the
    original module, so the updates survive (the built-in legacy SN once lost them)."""
    single = discriminator().cuda()
    model = copy.deepcopy(single)
    parallel = nn.DataParallel(model, device_ids=[0, 1])
    x = torch.cat([d_input(0), d_input(1)]).cuda()
    before = [t.clone() for t in uv(model)]
    parallel(x).sum().backward()
    single(x).sum().backward()
    for a, b, c in zip(uv(model), uv(single), before):
        assert not torch.equal(a, c)
        assert_close(a, b, 1e-5)
