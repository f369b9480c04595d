"""The names dualsn.torch gained so that its public API mirrors dualsn.paddle's:
``normalized_weight`` (the functional form, Paddle's signature) and ``invalidate_cache``,
held against the numpy reference in dualsn.spec."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import dualsn.torch as dt  # noqa: E402
from dualsn.torch import _cache  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402
from _numeric import random_array  # noqa: E402

SHAPES = [((5, 4), 0), ((3, 4, 2, 2), 1), ((4, 3, 2), 2), ((6,), 0)]


class Holder(nn.Module):
    """A module whose only parameter is ``weight``: lets a test pick any shape and dtype."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight).clone())


def np_(t):
    return t.detach().numpy().copy()


def test_mirrored_names_are_public():
    assert {"normalized_weight", "invalidate_cache", "report"} <= set(dt.__all__)
    assert "spectral_norm_forward" not in dt.__all__  # a compatibility alias only


# ---------------------------------------------------------------------------------------------
# normalized_weight


@pytest.mark.parametrize("compat", tuple(spec.PRESETS))
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim", SHAPES)
@pytest.mark.parametrize("do_power_iteration", [True, False])
@pytest.mark.parametrize("coeff", [None, 0.5])
def test_normalized_weight_equals_reference(compat, dtype, shape, dim, do_power_iteration, coeff):
    """Value, the in-place u, v and dL/dW equal the numpy reference's: the training
    iterations of dualsn.spec when ``do_power_iteration``, then W / divisor(u^H W v)."""
    sp = spec.make_spec(compat, 2, coeff=coeff)
    w_np, g_np = random_array(shape, dtype, seed=1), random_array(shape, dtype, seed=2)
    weight = torch.from_numpy(w_np).requires_grad_()
    if sp.is_exact_vector(len(shape)):
        u = v = None
        ref = numpy_ref.ReferenceSN(w_np, dim, sp)
        expected, u_ref, v_ref = ref.forward(w_np, do_power_iteration), None, None
    else:
        w_mat = spec.to_matrix(w_np, dim)
        u0, v0 = spec.init_uv(*w_mat.shape, 3, dtype, sp.eps)
        u, v = torch.from_numpy(u0.copy()), torch.from_numpy(v0.copy())
        us, vs = [u0], [v0]
        if do_power_iteration:
            us, vs, _ = numpy_ref.training_iterations(w_mat, us, vs, sp)
        u_ref, v_ref = us[0], vs[0]
        expected = w_np / sp.divisor(numpy_ref.sigma(w_mat, u_ref, v_ref))
    out = dt.normalized_weight(weight, u, v, dim, sp, do_power_iteration)
    np.testing.assert_allclose(np_(out), expected, rtol=1e-12, atol=1e-15)
    if u is not None:
        np.testing.assert_allclose(np_(u), u_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np_(v), v_ref, rtol=1e-12, atol=1e-14)
    (torch.from_numpy(g_np).conj() * out).real.sum().backward()
    expected_grad = numpy_ref.normalized_weight_grad(g_np, w_np, u_ref, v_ref, dim, sp)
    np.testing.assert_allclose(np_(weight.grad), expected_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("training", [True, False])
def test_spectral_norm_forward_is_normalized_weight(training):
    """The earlier name, with ``training`` for ``do_power_iteration``: the same bits."""
    sp = spec.make_spec("torch", 3)
    w = torch.from_numpy(random_array((6, 5), seed=4))
    u0, v0 = (torch.from_numpy(a) for a in spec.init_uv(6, 5, 5, np.float64))
    u1, v1, u2, v2 = u0.clone(), v0.clone(), u0.clone(), v0.clone()
    new = dt.normalized_weight(w, u1, v1, 0, sp, do_power_iteration=training)
    old = dt.spectral_norm_forward(w, u2, v2, 0, sp, training=training)
    assert torch.equal(new, old) and torch.equal(u1, u2) and torch.equal(v1, v2)
    assert torch.equal(u1, u0) != training  # iterated in place only when asked


# ---------------------------------------------------------------------------------------------
# invalidate_cache


def _write_one_unsampled_entry(original, u, v):
    # 1200 entries: the eval cache compares 256 of them; change one it does not compare,
    # through .data, which bypasses the version counter.
    sampled = set(_cache._sample_index(original).tolist())
    assert len(sampled) == 256 and {0, original.numel() - 1} <= sampled
    original.data.view(-1)[min(set(range(original.numel())) - sampled)] += 3.0


def _write_u(original, u, v):
    # u written through .data: neither its version counter nor W changes.
    u.data.copy_(torch.flip(u.data, (0,)))


@pytest.mark.parametrize("host_sample", [True, False], ids=["numpy view", "torch take"])
@pytest.mark.parametrize("write", [_write_one_unsampled_entry, _write_u])
def test_invalidate_cache_recomputes_after_an_unseen_write(write, host_sample, monkeypatch):
    """A write the eval cache cannot see leaves the cached output and the kept sigma stale;
    after invalidate_cache the next eval forward and sigma() are W / u^H W v and u^H W v of
    the state as it is now."""
    if not host_sample:
        monkeypatch.setattr(_cache, "_host_flat", lambda weight: None)
    m = dt.spectral_norm(Holder(random_array((40, 30), seed=6)), seed=7).eval()
    original, sn = m.parametrizations.weight.original, dt.get_spectral_norm(m)
    with torch.no_grad():
        cached = m.weight
        assert m.weight is cached  # eval, no graph: the cached output is returned
    sigma_before = dt.sigma(m)
    write(original, sn._u, sn._v)

    def current():
        s = numpy_ref.sigma(np_(original), np_(sn._u), np_(sn._v))
        return np_(original) / s, float(s)

    expected, expected_sigma = current()
    with torch.no_grad():
        assert m.weight is cached, "the premise: the cache does not see this write"
    assert dt.sigma(m) == sigma_before and abs(sigma_before - expected_sigma) > 1e-6
    dt.invalidate_cache(m)
    assert dt.sigma(m) == pytest.approx(expected_sigma, rel=1e-13)
    dt.invalidate_cache(m)  # also when the eval forward comes first
    with torch.no_grad():
        fresh = m.weight
    assert fresh is not cached
    np.testing.assert_allclose(np_(fresh), expected, rtol=1e-12, atol=1e-15)
    assert sn.last_sigma.item() == pytest.approx(expected_sigma, rel=1e-13)
    assert np.array_equal(expected, current()[0])  # nothing iterated: u, v are as they were


def test_invalidate_cache_errors():
    with pytest.raises(ValueError, match="Expected a dualsn spectral norm on name='weight', but Linear has none"):
        dt.invalidate_cache(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="name='bias'"):
        dt.invalidate_cache(dt.spectral_norm(nn.Linear(3, 2)), "bias")
    with pytest.raises(TypeError, match="Expected module to be a torch.nn.Module"):
        dt.invalidate_cache(object())
