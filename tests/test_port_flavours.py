"""Issue 13, problems 2 and 3: the right preset by default, and nested checkpoints.

* ``port.describe`` tells the flavour of each spectral norm from the key layout (torch
  parametrization, the older torch hook, Paddle's hook), its preset (recorded by dualsn when it
  wrote the file, else inferred), its dim, and sigma = u^H M v, checked against numpy and the
  live model.
* Porting into a model whose spectral norm runs another algorithm than the source's warns
  (``PresetMismatchWarning``, naming the layer and both presets) or, with
  ``strict_presets=True``, refuses with the target unchanged.
* Nested checkpoints (StudioGAN, Lightning, ``G_ema``, PaddleGAN trainer files, ``module.`` and
  ``_orig_mod.`` prefixes) load tensor for tensor; an ambiguous choice lists the candidates.
"""

from __future__ import annotations

import collections
import os
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

import dualsn.paddle as dpaddle  # noqa: E402
import dualsn.torch as dtorch  # noqa: E402
from dualsn import port  # noqa: E402
from dualsn.examples import sngan  # noqa: E402
from _numeric import rel  # noqa: E402
from _native import save_native  # noqa: E402

F32 = 1e-5

FACTORIES = {"torch": sngan.torch_discriminator, "paddle": sngan.paddle_discriminator}
GENERATORS = {"torch": sngan.torch_generator, "paddle": sngan.paddle_generator}


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: np.array(port._to_numpy(v)) for k, v in port._adapter(port.framework_of(model)).state(model).items()}


def forward(model, *inputs, training=False):
    model.train() if training else model.eval()
    if port.framework_of(model) == "torch":
        with torch.no_grad():
            return model(*[torch.from_numpy(x) for x in inputs]).numpy()
    with paddle.no_grad():
        return model(*[paddle.to_tensor(x) for x in inputs]).numpy()


def warmed(model, which="D"):
    """Three training forwards: u, v move away from their draw (and fit their W-matrix)."""
    for seed in range(3):
        inputs = sngan.discriminator_inputs(4, seed) if which == "D" else sngan.generator_inputs(4, seed)
        forward(model, *inputs, training=True)
    return model


def live_sn(model) -> dict[str, tuple[np.ndarray, int, np.ndarray, np.ndarray]]:
    """layer.param -> (W, dim, u, v) read from the live model's own spectral-norm objects."""
    found = {}
    if port.framework_of(model) == "torch":
        for prefix, module in model.named_modules():
            plists = getattr(module, "parametrizations", {})
            for pname in plists:
                p = plists[pname][0]
                if hasattr(p, "_u") and p._u is not None:
                    found[f"{prefix}.{pname}"] = (plists[pname].original.detach().numpy(), int(p.dim),
                                                  p._u.detach().numpy(), p._v.detach().numpy())
            for hook in module._forward_pre_hooks.values():
                if type(hook).__name__ == "SpectralNorm":
                    n = hook.name
                    found[f"{prefix}.{n}"] = (getattr(module, n + "_orig").detach().numpy(), int(hook.dim),
                                              getattr(module, n + "_u").detach().numpy(),
                                              getattr(module, n + "_v").detach().numpy())
    else:
        for prefix, layer in model.named_sublayers():
            for hook in layer._forward_pre_hooks.values():
                if hasattr(hook, "dim") and isinstance(getattr(hook, "name", None), str):
                    n = hook.name
                    found[f"{prefix}.{n}"] = (getattr(layer, n + "_orig").numpy(), int(hook.dim),
                                              getattr(layer, n + "_u").numpy(), getattr(layer, n + "_v").numpy())
    return found


def numpy_sigma(w, dim, u, v) -> float:
    m = np.moveaxis(w.astype(np.float64), dim, 0).reshape(w.shape[dim], -1)
    return float(u.astype(np.float64) @ m @ v.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# Problem 2a: flavour, preset, dims and sigma of a checkpoint


@pytest.mark.parametrize(
    "framework, sn, flavour, preset",
    [
        ("torch", "parametrizations", "torch_parametrization", "torch"),
        ("torch", "legacy", "torch_legacy", "torch_legacy"),
        ("paddle", "builtin", "paddle", "paddle"),
    ],
)
def test_describe_a_builtin_checkpoint(tmp_path, framework, sn, flavour, preset):
    model = warmed(FACTORIES[framework](sn=sn))
    path = save_native(model, tmp_path / ("d.pt" if framework == "torch" else "d.pdparams"))
    d = port.describe(path)
    assert (d.framework, d.flavour, d.metadata) == (framework, flavour, None)  # a file dualsn did not write
    live = live_sn(model)
    assert sorted(layer.name for layer in d.layers) == sorted(live)
    for layer in d.layers:
        w, dim, u, v = live[layer.name]
        assert (layer.flavour, layer.preset) == (flavour, preset)
        assert layer.preset_basis.startswith("inferred")
        assert layer.shape == w.shape and layer.dim == dim, layer.name
        assert layer.sigma == pytest.approx(numpy_sigma(w, dim, u, v), rel=1e-9, abs=1e-12)
    text = str(d)
    assert f"flavour {flavour}" in text and "inferred from the keys" in text
    assert all(layer.name in text for layer in d.layers)


@pytest.mark.parametrize("framework", ["torch", "paddle"])
@pytest.mark.parametrize("compat", ["torch", "paddle"])
def test_dualsn_records_its_presets(tmp_path, framework, compat):
    model = warmed(FACTORIES[framework](compat=compat))
    recorded = tmp_path / ("r.pt" if framework == "torch" else "r.pdparams")
    port.save_checkpoint(model, recorded, framework)
    expected = "torch" if compat == "torch" else ("torch_legacy" if framework == "torch" else "paddle")
    assert set(port.presets_of(model).values()) == {expected}

    d = port.describe(recorded)
    assert d.metadata["presets"] == port.presets_of(model) and d.metadata["version"]
    assert {layer.preset for layer in d.layers} == {expected}
    assert all(layer.preset_basis.startswith("recorded by dualsn") for layer in d.layers)
    for layer in d.layers:
        if framework == "torch" and compat == "torch":  # dualsn.torch's sigma: u^H M v of its state
            module = dict(model.named_modules())[layer.name.rpartition(".")[0]]
            assert layer.sigma == pytest.approx(dtorch.sigma(module), rel=1e-6)
        elif framework == "paddle":
            sublayer = dict(model.named_sublayers())[layer.name.rpartition(".")[0]]
            assert layer.sigma == pytest.approx(dpaddle.sigma(sublayer), rel=1e-6)

    # The same model saved by the framework itself: the keys alone say "torch" for any
    # dualsn.torch model and "paddle" for any dualsn.paddle one (the documented ambiguity).
    native = save_native(model, tmp_path / ("n.pt" if framework == "torch" else "n.pdparams"))
    inferred = {layer.preset for layer in port.describe(native).layers}
    assert inferred == {"torch" if framework == "torch" else "paddle"}


def test_files_with_the_record_still_load_everywhere(tmp_path):
    t_model, p_model = warmed(sngan.torch_discriminator()), warmed(sngan.paddle_discriminator())
    port.save_checkpoint(t_model, tmp_path / "t.pt", "torch")
    port.save_checkpoint(p_model, tmp_path / "p.pdparams", "paddle")
    # torch's own loader, also with weights_only, and a strict load_state_dict
    again = sngan.torch_discriminator()
    again.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    for key, value in numpy_state(again).items():
        np.testing.assert_array_equal(value, numpy_state(t_model)[key])
    # Paddle's own loader: nothing unexpected
    other = sngan.paddle_discriminator()
    missing, unexpected = other.set_state_dict(paddle.load(str(tmp_path / "p.pdparams")))
    assert (list(missing), list(unexpected)) == ([], [])
    for key, value in numpy_state(other).items():
        np.testing.assert_array_equal(value, numpy_state(p_model)[key])
    # dualsn's reader: the record is no key, and it survives a round trip
    loaded = port.load_checkpoint(tmp_path / "p.pdparams")
    assert sorted(loaded) == sorted(p_model.state_dict())
    assert port.checkpoint_metadata(loaded)["presets"] == port.presets_of(p_model)
    port.save_checkpoint(loaded, tmp_path / "copy.pdparams", "paddle")
    assert port.describe(tmp_path / "copy.pdparams").metadata["presets"] == port.presets_of(p_model)


def test_a_malformed_record_is_ignored_and_other_state_refused(tmp_path):
    def write(attrs, name):
        data = collections.OrderedDict(w=np.ones(2, np.float32))
        data.__dict__.update(attrs)
        path = tmp_path / name
        path.write_bytes(pickle.dumps(data, protocol=4))
        return path

    bogus = write({"_dualsn": {"presets": {"w": "tensorflow"}}}, "bogus.pdparams")
    loaded = port.load_checkpoint(bogus)
    assert port.checkpoint_metadata(loaded) is None and list(loaded) == ["w"]
    with pytest.raises(port.CheckpointError, match="only dualsn's '_dualsn' record"):
        port.load_checkpoint(write({"evil": 1}, "evil.pdparams"))


# ---------------------------------------------------------------------------------------------
# Problem 2b: a preset mismatch warns, or is refused with strict_presets


def assert_loaded(target, source_state: dict[str, np.ndarray], report) -> None:
    """Every target tensor equals the source tensor it came from (transposed where said)."""
    state = numpy_state(target)
    for e in report.entries:
        if e.source_key is not None:
            expected = source_state[e.source_key]
            np.testing.assert_array_equal(state[e.key], expected.T if e.transposed else expected, err_msg=e.key)


def test_torch_parametrization_into_a_paddle_preset_model_warns(tmp_path):
    source = warmed(sngan.torch_discriminator(sn="parametrizations"))
    path = save_native(source, tmp_path / "d.pt")
    target = sngan.paddle_discriminator(compat="paddle")
    with pytest.warns(port.PresetMismatchWarning) as caught:
        report = port.load_state_dict(target, port.load_checkpoint(path))
    warning = caught[0].message
    assert "'blocks.0.conv1.weight'" in str(warning) and "'torch'" in str(warning) and "'paddle'" in str(warning)
    assert len(warning.mismatches) == 10 == len(report.preset_mismatches)
    first = report.preset_mismatches[0]
    assert (first.source, first.target) == ("torch", "paddle")
    assert first.basis == "inferred from torch parametrization keys"
    assert_loaded(target, numpy_state(source), report)  # loaded all the same: eval agrees
    x = sngan.discriminator_inputs(4, 9)
    assert rel(forward(target, *x), forward(source, *x)) < F32

    refused = sngan.paddle_discriminator(compat="paddle")
    before = numpy_state(refused)
    with pytest.raises(port.PortError, match=r"'blocks.0.conv1.weight'.*'torch'.*'paddle'.*strict_presets"):
        port.load_state_dict(refused, port.load_checkpoint(path), strict_presets=True)
    for key, value in numpy_state(refused).items():
        np.testing.assert_array_equal(value, before[key])  # unchanged


def test_paddle_builtin_into_a_torch_preset_model_warns(tmp_path):
    source = warmed(sngan.paddle_discriminator(sn="builtin"))
    path = save_native(source, tmp_path / "d.pdparams")
    target = sngan.torch_discriminator()  # dualsn, compat="torch"
    with pytest.warns(port.PresetMismatchWarning, match=r"'linear.weight': the source's preset is 'paddle' "
                      r"\(inferred from Paddle hook keys\), the target's 'torch'"):
        report = port.load_state_dict(target, port.load_checkpoint(path), source="paddle")  # numpy arrays
    assert_loaded(target, numpy_state(source), report)
    with pytest.raises(port.PortError, match="strict_presets"):
        port.load_state_dict(sngan.torch_discriminator(), port.load_checkpoint(path), source="paddle",
                             strict_presets=True)
    # Into the matching algorithm: no warning (torch_legacy and paddle are one algorithm).
    with warnings.catch_warnings():
        warnings.simplefilter("error", port.PresetMismatchWarning)
        assert port.load_state_dict(sngan.torch_discriminator(compat="torch_legacy"),
                                    port.load_checkpoint(path), source="paddle").preset_mismatches == []
        assert port.load_state_dict(sngan.torch_discriminator(sn="legacy"),
                                    port.load_checkpoint(path), source="paddle").preset_mismatches == []


@pytest.mark.parametrize("direction", ["torch_to_paddle", "paddle_to_torch"])
def test_live_ports_know_the_source_presets(direction):
    if direction == "torch_to_paddle":
        source, make_target = warmed(sngan.torch_discriminator()), lambda: sngan.paddle_discriminator(compat="paddle")
        match = r"the source's preset is 'torch' \(of the source model\), the target's 'paddle'"
        call = port.torch_to_paddle
    else:
        source, make_target = warmed(sngan.paddle_discriminator(compat="paddle")), sngan.torch_discriminator
        match = r"the source's preset is 'paddle' \(of the source model\), the target's 'torch'"
        call = port.paddle_to_torch
    target = make_target()
    with pytest.warns(port.PresetMismatchWarning, match=match):
        report = call(source, target)
    assert_loaded(target, numpy_state(source), report)
    with pytest.raises(port.PortError, match="strict_presets"):
        call(source, make_target(), strict_presets=True)


def test_no_warning_when_the_presets_agree(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", port.PresetMismatchWarning)
        # a dualsn.paddle model with compat="torch", written by dualsn: the record says "torch"
        source = warmed(sngan.paddle_discriminator(compat="torch"))
        port.save_checkpoint(source, tmp_path / "d.pdparams", "paddle")
        target = sngan.torch_discriminator()
        report = port.load_state_dict(target, port.load_checkpoint(tmp_path / "d.pdparams"))  # source recorded
        assert report.preset_mismatches == []
        assert_loaded(target, numpy_state(source), report)
        # live models: each side's own preset
        port.paddle_to_torch(source, sngan.torch_discriminator())
        port.torch_to_paddle(warmed(sngan.torch_discriminator(compat="torch_legacy")),
                             sngan.paddle_discriminator(compat="paddle"))
    # The same model written by paddle.save: its keys read as Paddle's preset; source_preset says better.
    native = save_native(source, tmp_path / "n.pdparams")
    with pytest.warns(port.PresetMismatchWarning):
        port.load_state_dict(sngan.torch_discriminator(), port.load_checkpoint(native), source="paddle")
    with warnings.catch_warnings():
        warnings.simplefilter("error", port.PresetMismatchWarning)
        port.load_state_dict(sngan.torch_discriminator(), port.load_checkpoint(native), source="paddle",
                             source_preset="torch")
    with pytest.raises(ValueError, match="source_preset"):
        port.load_state_dict(sngan.torch_discriminator(), port.load_checkpoint(native), source="paddle",
                             source_preset="tf")


def test_a_warning_turned_error_leaves_the_target_unchanged(tmp_path):
    path = save_native(warmed(sngan.torch_discriminator()), tmp_path / "d.pt")
    target = sngan.paddle_discriminator(compat="paddle")
    before = numpy_state(target)
    with warnings.catch_warnings():
        warnings.simplefilter("error", port.PresetMismatchWarning)
        with pytest.raises(port.PresetMismatchWarning):
            port.load_state_dict(target, port.load_checkpoint(path))
    for key, value in numpy_state(target).items():
        np.testing.assert_array_equal(value, before[key])


# ---------------------------------------------------------------------------------------------
# Problem 3: nested checkpoints


def test_studiogan_style_file(tmp_path):
    model = warmed(sngan.torch_discriminator())
    opt = torch.optim.Adam(model.parameters())
    x, y = sngan.discriminator_inputs(4, 0)
    model(torch.from_numpy(x), torch.from_numpy(y)).sum().backward()
    opt.step()
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "seed": 0, "step": 100,
                "best_fid": 12.5}, tmp_path / "model=D-best.pth")
    checkpoint = port.load_checkpoint(tmp_path / "model=D-best.pth")
    target = sngan.paddle_discriminator()
    report = port.load_state_dict(target, checkpoint)
    assert report.key == "state_dict" and report.stripped_prefix == ""
    assert_loaded(target, numpy_state(model), report)  # source keys: those of the chosen entry
    # The same with key=: and describe of the chosen entry
    assert port.load_state_dict(sngan.paddle_discriminator(), checkpoint, key="state_dict").key == "state_dict"
    assert len(port.describe(tmp_path / "model=D-best.pth", key="state_dict").layers) == 10


def test_lightning_file_strips_model_prefix(tmp_path):
    model = warmed(sngan.torch_generator(), "G")
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.2.0", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": []}, tmp_path / "last.ckpt")
    target = sngan.paddle_generator()
    report = port.load_state_dict(target, port.load_checkpoint(tmp_path / "last.ckpt"))
    assert (report.key, report.stripped_prefix) == ("state_dict", "model.")
    assert_loaded(target, numpy_state(model), report)  # source keys: stripped ones
    z = sngan.generator_inputs(4, 5)
    assert rel(forward(target, *z), forward(model, *z)) < F32


def test_g_ema_is_a_choice_the_user_makes(tmp_path):
    g, g_ema, d = warmed(sngan.torch_generator(), "G"), warmed(sngan.torch_generator(), "G"), sngan.torch_discriminator()
    with torch.no_grad():
        for p in g_ema.parameters():
            p.mul_(0.5)
    torch.save({"G": g.state_dict(), "G_ema": g_ema.state_dict(), "D": d.state_dict()}, tmp_path / "biggan.pth")
    checkpoint = port.load_checkpoint(tmp_path / "biggan.pth")
    with pytest.raises(port.CheckpointError, match=r"2 state dicts that fit the model: 'G' .*'G_ema' .*key="):
        port.load_state_dict(sngan.paddle_generator(), checkpoint)
    target = sngan.paddle_generator()
    report = port.load_state_dict(target, checkpoint, key="G_ema")
    assert report.key == "G_ema"
    assert_loaded(target, numpy_state(g_ema), report)
    # the discriminator is the only entry that fits a discriminator
    assert port.load_state_dict(sngan.paddle_discriminator(), checkpoint).key == "D"


def test_paddlegan_trainer_file(tmp_path):
    net_g, net_d = warmed(sngan.paddle_generator(), "G"), warmed(sngan.paddle_discriminator())
    opt = paddle.optimizer.Adam(parameters=net_g.parameters())
    path = str(tmp_path / "epoch_3_checkpoint.pdparams")
    paddle.save({"netG": net_g.state_dict(), "netD": net_d.state_dict(), "optimG": opt.state_dict(), "epoch": 3},
                path)
    checkpoint = port.load_checkpoint(path)
    for source, target, entry in ((net_g, sngan.torch_generator(), "netG"),
                                  (net_d, sngan.torch_discriminator(), "netD")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", port.PresetMismatchWarning)  # paddle.save kept no preset
            report = port.load_state_dict(target, checkpoint, source="paddle")
        assert report.key == entry
        assert_loaded(target, numpy_state(source), report)
    # Without a model the choice is ambiguous: every candidate is listed.
    with pytest.raises(port.CheckpointError, match=r"2 state dicts: 'netG' \(\d+ tensors\), 'netD' \(\d+ tensors\)"):
        port.select_state_dict(checkpoint)
    assert port.select_state_dict(checkpoint, key="netD").state.keys() == net_d.state_dict().keys()


@pytest.mark.parametrize("wrap", ["module", "_orig_mod", "both"])
def test_wrapper_prefixes_are_stripped_when_every_key_has_them(wrap):
    model = warmed(sngan.torch_discriminator())
    if wrap == "module":
        state, prefix = torch.nn.DataParallel(model).state_dict(), "module."
    elif wrap == "_orig_mod":
        state, prefix = torch.compile(model).state_dict(), "_orig_mod."
    else:
        state, prefix = torch.nn.DataParallel(torch.compile(model)).state_dict(), "module._orig_mod."
    assert all(k.startswith(prefix) for k in state)
    target = sngan.paddle_discriminator()
    report = port.load_state_dict(target, state)
    assert report.stripped_prefix == prefix
    assert_loaded(target, numpy_state(model), report)


def test_prefixes_stay_where_the_target_has_them_or_not_every_key_has_them():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(3, 2)

    source = Wrapper()
    target = Wrapper()
    report = port.load_state_dict(target, source.state_dict())
    assert report.stripped_prefix == "" and {e.source_key for e in report.entries} == {"module.weight", "module.bias"}
    np.testing.assert_array_equal(target.module.weight.detach().numpy(), source.module.weight.detach().numpy())
    # not every key has the prefix: nothing is stripped, and the leftovers are reported
    partial = {"module.weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    with pytest.raises(port.PortError, match="unexpected in the source: 'module.weight'"):
        port.load_state_dict(torch.nn.Linear(3, 2), partial)


def test_strip_prefix_and_dotted_keys():
    source = torch.nn.Linear(3, 2)
    flat = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    target = torch.nn.Linear(3, 2)
    report = port.load_state_dict(target, flat, strip_prefix="backbone")
    assert report.stripped_prefix == "backbone."
    np.testing.assert_array_equal(target.weight.detach().numpy(), source.weight.detach().numpy())
    with pytest.raises(port.CheckpointError, match=r"strip_prefix 'head\.': no key of the checkpoint starts with it"):
        port.load_state_dict(torch.nn.Linear(3, 2), flat, strip_prefix="head.")
    # a Lightning GAN: generator. and discriminator. keys in one flat state_dict
    gan = {"state_dict": {**{f"generator.{k}": v for k, v in source.state_dict().items()},
                          "discriminator.weight": torch.zeros(1, 2)}}
    other = torch.nn.Linear(3, 2)
    port.load_state_dict(other, gan, key="state_dict.generator")
    np.testing.assert_array_equal(other.bias.detach().numpy(), source.bias.detach().numpy())
    with pytest.raises(port.CheckpointError, match=r"key 'state_dict.critic': no such entry"):
        port.load_state_dict(other, gan, key="state_dict.critic")


def test_a_nested_file_still_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "e.pdparams"
    path.write_bytes(pickle.dumps({"netG": {"weight": np.zeros(2, np.float32)}, "hook": {"x": Evil()}}, protocol=4))
    with pytest.raises(port.CheckpointError, match="refused global"):
        port.load_checkpoint(path)
    assert not marker.exists()
