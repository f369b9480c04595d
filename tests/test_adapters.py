"""The backend adapters the tools use: one per framework, the same public names in both, found
through a registry (dualsn.adapters) that never imports a framework."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dualsn import adapters

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from dualsn.examples import sngan  # noqa: E402


def test_the_adapters_mirror_each_other():
    t, p = adapters.adapter("torch"), adapters.adapter("paddle")
    assert t.__all__ == p.__all__
    for name in t.__all__:
        assert hasattr(t, name) and hasattr(p, name), name
    assert (t.NAME, p.NAME) == ("torch", "paddle")


def test_the_registry_knows_the_frameworks_and_nothing_else():
    assert adapters.FRAMEWORKS == ("torch", "paddle")
    with pytest.raises(ValueError, match="Expected a framework"):
        adapters.adapter("jax")
    with pytest.raises(TypeError, match="Expected a torch.nn.Module or a paddle.nn.Layer, but got int"):
        adapters.framework_of(3)
    assert adapters.framework_of(torch.nn.Linear(2, 3)) == "torch"
    assert adapters.framework_of(paddle.nn.Linear(2, 3)) == "paddle"
    assert adapters.tensor_framework(torch.zeros(1)) == "torch"
    assert adapters.tensor_framework(paddle.zeros([1])) == "paddle"
    assert adapters.tensor_framework(np.zeros(1)) is None


def test_telling_a_framework_imports_none():
    code = textwrap.dedent(
        """
        import sys
        from dualsn import adapters
        try:
            adapters.framework_of(object())
        except TypeError:
            pass
        print(",".join(m for m in ("torch", "paddle") if m in sys.modules) or "none")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "none"


def test_both_adapters_see_the_same_spectral_norms():
    import dualsn

    dualsn.manual_seed(0)
    tm = sngan.torch_discriminator(compat="torch")
    pm = sngan.paddle_discriminator(compat="torch")
    t, p = adapters.adapter("torch"), adapters.adapter("paddle")
    names = t.sn_layer_names(tm)
    assert names and p.sn_layer_names(pm) == names
    assert len(t.sigmas(tm, names)) == len(p.sigmas(pm, names)) == len(names)
    found_t, found_p = t.spectral_norms(tm), p.spectral_norms(pm)
    assert [f.name for f in found_t] == [f.name for f in found_p]
    assert {f.kind for f in found_t} == {f.kind for f in found_p} == {"dualsn"}
