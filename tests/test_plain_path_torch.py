"""dualsn.torch.plain_path: every spectral-norm forward by ordinary operations, autograd deriving
the whole gradient, held against the fast paths (the fused ``_DivideBySigma`` with its closed-form
gradient, sigma read off the last norm, in-place normalization, the eval cache, the kept sigma).

Each comparison trains two identically built and seeded modules side by side, one inside
``plain_path()`` and one outside, and compares outputs, u, v (and the extra pairs), sigma,
iteration counts and weight gradients after every step, as ||a - b|| / ||b||.
"""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import dualsn  # noqa: E402
import dualsn.torch as dsn  # noqa: E402
from dualsn import spec  # noqa: E402

PRESETS = tuple(spec.PRESETS)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.complex128: 1e-10}
STEPS = 5


@pytest.fixture(autouse=True)
def _clean_state():
    dualsn.manual_seed(None)
    yield
    dualsn.manual_seed(None)
    assert dsn._plain.ENABLED is False, "a test left plain_path switched on"


# ---------------------------------------------------------------------------------------------
# Helpers


class Vector(nn.Module):
    """A layer whose weight is 1-D (exactly normalized under "torch", a matrix otherwise)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.weight


def _randn(*shape):
    return lambda g, dtype: torch.randn(*shape, generator=g, dtype=dtype)


# kind -> (layer factory, input factory (generator, dtype) -> input)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), _randn(4, 6)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), _randn(2, 3, 6, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2), _randn(2, 4, 4, 4)),
    "embedding": (lambda: nn.Embedding(10, 6), lambda g, dtype: torch.randint(0, 10, (7,), generator=g)),
    "vector": (lambda: Vector(6), _randn(4, 6)),
}
CONV_INPUT = (3, 7, 7)  # spectral_norm_conv's one-sample input (stride 2: crop and output_padding)


def make(kind: str, dtype=torch.float64, **kwargs) -> nn.Module:
    """A fresh layer of ``kind`` with the same weights every time, spectral-normalized with a
    seeded draw of u, v (``kind == "sn_conv"``: :func:`dsn.spectral_norm_conv`)."""
    torch.manual_seed(0)
    if kind == "sn_conv":
        layer = nn.Conv2d(3, 4, 3, stride=2, padding=1).to(dtype)
        return dsn.spectral_norm_conv(layer, CONV_INPUT, seed=7, **kwargs)
    return dsn.spectral_norm(LAYERS[kind][0]().to(dtype), seed=7, **kwargs)


def inputs(kind: str, dtype, steps: int = STEPS):
    """The inputs of ``steps`` training steps (fixed by the step number)."""
    factory = _randn(2, *CONV_INPUT) if kind == "sn_conv" else LAYERS[kind][1]
    return [factory(torch.Generator().manual_seed(100 + i), dtype) for i in range(steps)]


def loss_of(out):
    out = out.abs() if out.is_complex() else out
    return (out.sin() ** 2).mean() + out.mean()


def snapshot(module, out):
    """What must agree between the two paths after a forward (and its backward)."""
    sn = dsn.get_spectral_norm(module)
    buffers = {k: t.detach().clone() for k, t in sn._buffers.items() if t is not None}
    original = module.parametrizations.weight.original
    return {
        "out": out.detach().clone(),
        "sigma": None if sn.last_sigma is None else sn.last_sigma.detach().clone(),
        "iterations": sn.last_iterations,
        "grad": None if original.grad is None else original.grad.clone(),
        **buffers,
    }


def train(module, xs, plain: bool, loss=None, lr=0.05):
    """SGD steps, one per input (``loss(out, x, module)``, default :func:`loss_of`), then an
    eval forward with grad and one without; the snapshots after each."""
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    records = []
    with dsn.plain_path() if plain else contextlib.nullcontext():
        for x in xs:
            opt.zero_grad()
            out = module(x)
            (loss_of(out) if loss is None else loss(out, x, module)).backward()
            records.append(snapshot(module, out))
            opt.step()
        module.eval()
        opt.zero_grad()
        out = module(xs[-1])
        loss_of(out).backward()
        records.append(snapshot(module, out))
        with torch.no_grad():
            records.append(snapshot(module, module(xs[0])))
    return records


def rel(a, b) -> float:
    """||a - b|| / ||b|| (||a|| when b is 0), in double precision."""
    wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    a, b = a.detach().to(wide), b.detach().to(wide)
    scale = torch.linalg.vector_norm(b)
    diff = torch.linalg.vector_norm(a - b)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_same_records(plain, fast, rtol):
    assert len(plain) == len(fast)
    for step, (p, f) in enumerate(zip(plain, fast)):
        assert p.keys() == f.keys(), step
        for key in f:
            a, b = p[key], f[key]
            if b is None or isinstance(b, int):
                assert a == b, f"step {step}, {key}: {a} != {b}"
                continue
            assert a.shape == b.shape, f"step {step}, {key}: shape {a.shape} != {b.shape}"
            r = rel(a, b)
            assert r <= rtol, f"step {step}, {key}: relative difference {r:.3e} > {rtol:.0e}"


def grad_fn_names(t) -> set[str]:
    """The class names of every node in ``t``'s autograd graph."""
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def uses_fused(t) -> bool:
    return any("DivideBySigma" in name for name in grad_fn_names(t))


def plain_now() -> bool:
    """Whether forwards take the plain path, judged by what a forward records."""
    probe = dsn.spectral_norm(nn.Linear(3, 2), seed=0)
    return not uses_fused(probe.weight)


# ---------------------------------------------------------------------------------------------
# API and the switch


def test_plain_path_is_public():
    assert "plain_path" in dsn.__all__
    assert callable(dsn.plain_path)


def test_nesting_restores_the_previous_state():
    assert not plain_now()
    with dsn.plain_path():
        assert plain_now()
        with dsn.plain_path(False):
            assert not plain_now()
            with dsn.plain_path(True):
                assert plain_now()
            assert not plain_now()
        assert plain_now()
        with dsn.plain_path():
            assert plain_now()
        assert plain_now()
    assert not plain_now()


def test_an_exception_restores_the_previous_state():
    with pytest.raises(RuntimeError, match="boom"):
        with dsn.plain_path():
            assert plain_now()
            raise RuntimeError("boom")
    assert not plain_now()
    with dsn.plain_path():
        with pytest.raises(ValueError, match="inner"):
            with dsn.plain_path(False):
                raise ValueError("inner")
        assert plain_now()
        # an error inside a forward itself
        layer = dsn.spectral_norm(nn.Linear(3, 2), seed=0)
        with pytest.raises(RuntimeError):
            layer(torch.randn(4, 5))
        assert plain_now()
    assert not plain_now()


# ---------------------------------------------------------------------------------------------
# No fast path is taken


# every layer under every preset, and spectral_norm_conv (which has one preset of its own)
KINDS_AND_PRESETS = [(kind, compat) for kind in LAYERS for compat in PRESETS] + [("sn_conv", None)]


def _preset(kind, compat):
    return {} if kind == "sn_conv" else {"compat": compat}


@pytest.mark.parametrize("kind, compat", KINDS_AND_PRESETS)
def test_no_fused_function_and_no_eval_cache(kind, compat):
    module = make(kind, **_preset(kind, compat))
    sn = dsn.get_spectral_norm(module)
    x = inputs(kind, torch.float64, 1)[0]
    with dsn.plain_path():
        for training in (True, False):
            module.train(training)
            names = grad_fn_names(module.weight)
            assert not any("DivideBySigma" in n for n in names), names
            assert not uses_fused(module(x))
            with torch.no_grad():
                module(x)
                module(x)
            assert sn._cache is None
    if sn._u is not None and kind != "sn_conv":
        # the walk does see the fused Function where it is used
        module.train()
        assert uses_fused(module.weight)


def test_plain_eval_neither_reads_nor_writes_the_cache_nor_the_kept_sigma():
    module = make("linear")
    sn = dsn.get_spectral_norm(module)
    x = torch.randn(3, 6, dtype=torch.float64)
    dsn.sigma(module)  # from now on fast forwards keep a sigma record
    module.eval()
    with torch.no_grad():
        fast = module(x)
    cache, record = sn._cache, sn._record
    assert cache is not None and cache.out is not None
    with dsn.plain_path(), torch.no_grad():
        weight = module.weight
        plain = module(x)
    assert weight is not cache.out
    assert sn._cache is cache and sn._record is record
    assert rel(plain, fast) <= 1e-12
    module.train()
    with dsn.plain_path():
        module(x)
    assert sn._record is record  # no record made: sigma() must compute it afresh
    u, v = sn._u, sn._v
    mat = module.parametrizations.weight.original.detach()
    assert abs(dsn.sigma(module) - float(torch.vdot(u, mat @ v))) <= 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv_transpose2d", "sn_conv"])
def test_buffers_keep_their_identity(kind):
    module = make(kind, num_svs=2)
    sn = dsn.get_spectral_norm(module)
    # the state buffers (the recovery vectors are constants, not in the state dict)
    state = {k: t for k, t in sn._buffers.items() if k not in sn._non_persistent_buffers_set}
    before = {k: (t, t.data_ptr(), t._version, t.clone()) for k, t in state.items()}
    with dsn.plain_path():
        module(inputs(kind, torch.float64, 1)[0])
    for k, (t, ptr, version, value) in before.items():
        assert sn._buffers[k] is t and t.data_ptr() == ptr
        assert t._version > version and not torch.equal(t, value), k  # updated in place


# ---------------------------------------------------------------------------------------------
# Plain equals fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_training_equals_fast_path(kind, compat, dtype):
    if kind == "conv_transpose2d":
        assert make(kind, dtype, compat=compat).parametrizations.weight[0].dim == 1
    xs = inputs(kind, dtype)
    plain = train(make(kind, dtype, compat=compat), xs, plain=True)
    fast = train(make(kind, dtype, compat=compat), xs, plain=False)
    assert_same_records(plain, fast, RTOL[dtype])


FEATURES = [
    {"coeff": 0.05},  # active: sigma > coeff (asserted below)
    {"coeff": 50.0},  # inactive
    {"num_svs": 2},
    {"atol": 1e-6},
    {"rtol": 1e-7, "n_power_iterations": 3, "max_iterations": 40},
    {"track_sigma": True},
    {"coeff": 0.05, "num_svs": 3, "rtol": 1e-6, "track_sigma": True},
]


def _check_coeff_side(records, coeff):
    for record in records:
        s = record["sigma"]
        if s is not None:
            assert (float(s.real) > coeff) == (coeff < 1), "the bound is on the side the test means"


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", ["linear", "conv_transpose2d", "vector"])
def test_features_equal_fast_path(kind, compat, features):
    if kind == "vector" and compat != "torch":
        # an n x 1 W-matrix has one singular value: num_svs > 1 is refused there
        features = {k: v for k, v in features.items() if k != "num_svs"}
    xs = inputs(kind, torch.float64)
    plain = train(make(kind, compat=compat, **features), xs, plain=True)
    fast = train(make(kind, compat=compat, **features), xs, plain=False)
    assert_same_records(plain, fast, RTOL[torch.float64])
    if "coeff" in features:
        _check_coeff_side(fast, features["coeff"])
    exact = fast[0]["sigma"] is None
    if "track_sigma" in features and not exact:
        for record in plain:
            assert rel(record["_sigma"], record["sigma"]) <= 1e-12
    if ("atol" in features or "rtol" in features) and not exact:
        counts = [r["iterations"] for r in plain[:STEPS]]
        assert all(c >= 2 for c in counts) and counts == [r["iterations"] for r in fast[:STEPS]]


def test_exact_vector_with_coeff_and_track_sigma():
    for coeff in (0.05, 50.0):
        xs = inputs("vector", torch.float64)
        kwargs = {"compat": "torch", "coeff": coeff, "track_sigma": True}
        plain = train(make("vector", **kwargs), xs, plain=True)
        fast = train(make("vector", **kwargs), xs, plain=False)
        assert_same_records(plain, fast, RTOL[torch.float64])
        assert all(r["sigma"] is None for r in plain)  # exact: last_sigma stays None
        norms = [float(r["_sigma"]) for r in plain]
        assert all((n > coeff) == (coeff < 1) for n in norms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "features", [{}, *FEATURES], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain"
)
def test_spectral_norm_conv_equals_fast_path(features, dtype):
    if dtype == torch.float32 and features.get("rtol", 1) < 1e-6:
        # After the conv warm-up sigma has settled to float32 rounding: a stop at rtol 1e-7 is
        # decided by rounding, and two correct paths may stop one iteration apart.
        features = {**features, "rtol": 1e-5}
    xs = inputs("sn_conv", dtype)
    plain = train(make("sn_conv", dtype, **features), xs, plain=True)
    fast = train(make("sn_conv", dtype, **features), xs, plain=False)
    assert_same_records(plain, fast, RTOL[dtype])
    if "coeff" in features:
        _check_coeff_side(fast, features["coeff"])


@pytest.mark.parametrize("compat", PRESETS)
def test_complex_weight_equals_fast_path(compat):
    def make_complex():
        torch.manual_seed(0)
        return dsn.spectral_norm(nn.Linear(6, 5, dtype=torch.complex128), compat=compat, seed=7, num_svs=2)

    xs = [torch.randn(4, 6, dtype=torch.complex128, generator=torch.Generator().manual_seed(i)) for i in range(STEPS)]
    plain = train(make_complex(), xs, plain=True)
    fast = train(make_complex(), xs, plain=False)
    assert_same_records(plain, fast, RTOL[torch.complex128])


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(compat, dtype):
    records = []
    for plain in (True, False):
        torch.manual_seed(0)
        module = dsn.spectral_norm(nn.Linear(16, 12).to(dtype), compat=compat, seed=7)
        sn = dsn.get_spectral_norm(module)
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
        with dsn.plain_path() if plain else contextlib.nullcontext():
            out = module(x)
            out.float().pow(2).sum().backward()
        assert out.dtype == dtype and sn._u.dtype == torch.float32 and sn.last_sigma.dtype == torch.float32
        records.append(snapshot(module, out))
    plain, fast = records
    for key in ("_u", "_v", "sigma"):
        assert rel(plain[key], fast[key]) <= 1e-5, key
    for key in ("out", "grad"):  # one rounding to half precision apart at most
        assert rel(plain[key], fast[key]) <= 1e-2, key


# ---------------------------------------------------------------------------------------------
# Second order: create_graph=True


def _penalty_loss(out, x, module):
    """A WGAN-GP style gradient penalty (the input's gradient, differentiated again) plus a
    penalty on the weight's own gradient (the fast path's differentiable closed form)."""
    original = module.parametrizations.weight.original
    score = (out.sin() ** 2).mean()
    (grad_x,) = torch.autograd.grad(score, x, create_graph=True)
    (grad_w,) = torch.autograd.grad(score, original, create_graph=True)
    return out.mean() + (grad_x.norm() - 0.1) ** 2 + grad_w.pow(2).sum()


@pytest.mark.parametrize("coeff", [None, 0.05, 50.0])
@pytest.mark.parametrize("kind, compat", [kc for kc in KINDS_AND_PRESETS if kc[0] != "embedding"])
def test_create_graph_equals_fast_path(kind, compat, coeff, monkeypatch):
    kwargs = {"coeff": coeff, **_preset(kind, compat)}
    xs = [x.requires_grad_() for x in inputs(kind, torch.float64, 3)]
    plain = train(make(kind, **kwargs), xs, plain=True, loss=_penalty_loss)
    calls = []
    closed_form = dsn._grad._weight_grad_differentiable
    monkeypatch.setattr(dsn._grad, "_weight_grad_differentiable", lambda *a, **k: calls.append(1) or closed_form(*a, **k))
    fast = train(make(kind, **kwargs), xs, plain=False, loss=_penalty_loss)
    assert_same_records(plain, fast, RTOL[torch.float64])
    fused = kind != "sn_conv" and fast[0]["sigma"] is not None
    assert bool(calls) == fused  # the fast run did take the differentiable closed form
    if coeff is not None:
        _check_coeff_side(fast, coeff)


# ---------------------------------------------------------------------------------------------
# The functional entry point


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("shape, dim", [((5, 4), 0), ((3, 4, 2, 2), 1), ((6,), 0)])
def test_spectral_norm_forward_equals_fast_path(compat, shape, dim):
    sp = spec.make_spec(compat, 2, coeff=0.3)
    w0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h, w = spec.matrix_shape(shape, dim)
    u0 = torch.nn.functional.normalize(torch.randn(h, dtype=torch.float64), dim=0)
    v0 = torch.nn.functional.normalize(torch.randn(w, dtype=torch.float64), dim=0)
    results = []
    for plain in (True, False):
        weight = w0.clone().requires_grad_()
        u, v = u0.clone(), v0.clone()
        with dsn.plain_path() if plain else contextlib.nullcontext():
            out = dsn.spectral_norm_forward(weight, u, v, dim, sp, training=True)
        assert uses_fused(out) == (not plain and not sp.is_exact_vector(len(shape)))
        out.sin().sum().backward()
        results.append((out.detach(), u, v, weight.grad))
    for a, b in zip(*results):
        assert rel(a, b) <= 1e-10
    if not sp.is_exact_vector(len(shape)):
        assert not torch.equal(results[0][1], u0)  # the iterations ran, in place
