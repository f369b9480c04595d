"""``dualsn demo``, ``dualsn report`` (and :mod:`dualsn.report`), ``dualsn check``.

Report numbers are checked against W-matrices built here by hand (not with dualsn.spec) and
numpy's SVD, and against each backend's own ``sigma``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import dualsn.paddle  # noqa: E402
import dualsn.torch  # noqa: E402
from dualsn import cli, demo, diagnostics, port, report  # noqa: E402
from dualsn.examples import sngan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def top_sv(matrix: np.ndarray) -> float:
    return float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# dualsn.report


def torch_model():
    """dualsn spectral norm on four kinds of W-matrix, plus an exactly normalized 1-D bias."""
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.lin = dualsn.torch.spectral_norm(torch.nn.Linear(6, 5), seed=1)
    m.conv = dualsn.torch.spectral_norm(torch.nn.Conv2d(3, 4, 3), seed=2, n_power_iterations=2)
    m.tconv = dualsn.torch.spectral_norm(torch.nn.ConvTranspose2d(4, 3, 2), seed=3, compat="paddle")
    m.emb = dualsn.torch.spectral_norm(torch.nn.Embedding(7, 4), seed=4, compat="torch_legacy")
    m.vec = dualsn.torch.spectral_norm(torch.nn.Linear(3, 8), name="bias", seed=5)
    return m


def torch_matrices(m) -> dict[str, np.ndarray]:
    w = {k: getattr(m, k).parametrizations[p].original.detach().numpy().astype(np.float64)
         for k, p in [("lin", "weight"), ("conv", "weight"), ("tconv", "weight"), ("emb", "weight")]}
    return {
        "lin.weight": w["lin"],
        "conv.weight": w["conv"].reshape(4, -1),
        "tconv.weight": w["tconv"].transpose(1, 0, 2, 3).reshape(3, -1),  # default dim 1
        "emb.weight": w["emb"],
    }


def test_report_torch_rows_against_svd_and_backend_sigma():
    m = torch_model()
    r = report.report(m)
    rows = {row.name: row for row in r.rows}
    assert list(rows) == ["lin.weight", "conv.weight", "tconv.weight", "emb.weight", "vec.bias"]
    for name, mat in torch_matrices(m).items():
        row = rows[name]
        layer = getattr(m, name.split(".")[0])
        assert row.sigma_exact == pytest.approx(top_sv(mat), rel=1e-12)
        assert row.sigma == pytest.approx(dualsn.torch.sigma(layer), rel=1e-6)
        assert row.rel_error == pytest.approx((row.sigma - row.sigma_exact) / row.sigma_exact, rel=1e-12)
        assert row.normalized_norm == pytest.approx(row.sigma_exact / abs(row.sigma), rel=1e-12)
        assert row.shape == tuple(layer.parametrizations.weight.original.shape)
    bias = m.vec.parametrizations.bias.original.detach().numpy().astype(np.float64)
    assert rows["vec.bias"].sigma == pytest.approx(np.linalg.norm(bias), rel=1e-12)
    assert rows["vec.bias"].sigma_exact == pytest.approx(np.linalg.norm(bias), rel=1e-12)
    assert [rows[n].dim for n in rows] == [0, 0, 1, 0, 0]
    assert [rows[n].layer for n in rows] == ["Linear", "Conv2d", "ConvTranspose2d", "Embedding", "Linear"]
    assert rows["lin.weight"].preset == "torch"
    assert rows["conv.weight"].preset == "torch (n=2)"
    assert rows["tconv.weight"].preset == rows["emb.weight"].preset == "torch_legacy/paddle"
    # after registration (16 iterations) the torch preset's estimate is close, the others not
    assert abs(rows["lin.weight"].rel_error) < 1e-3
    assert abs(rows["tconv.weight"].rel_error) > 1e-3
    exact = [row.sigma_exact for row in r.rows]
    sig = [row.sigma for row in r.rows]
    assert r.exact_product == pytest.approx(np.prod(exact), rel=1e-12)
    assert r.sigma_product == pytest.approx(np.prod(sig), rel=1e-12)
    assert r.lipschitz_bound == pytest.approx(np.prod(np.divide(exact, np.abs(sig))), rel=1e-12)


def test_backend_report_wrappers():
    m = torch_model()
    assert [(r.name, r.sigma, r.sigma_exact) for r in dualsn.torch.report(m).rows] == [
        (r.name, r.sigma, r.sigma_exact) for r in report.report(m).rows
    ]
    layer = dualsn.paddle.spectral_norm(paddle.nn.Linear(4, 3), seed=0)
    (row,) = dualsn.paddle.report(layer).rows
    assert row.sigma == pytest.approx(dualsn.paddle.sigma(layer), rel=1e-6)


def test_report_changes_nothing():
    m = torch_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report.report(m)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_report_torch_builtins():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(5, 4)),
        torch.nn.utils.spectral_norm(torch.nn.Conv1d(2, 3, 3)),
    )
    rows = report.report(m).rows
    assert [r.name for r in rows] == ["0.weight", "1.weight"]
    assert rows[0].preset == "torch, built-in" and rows[1].preset == "torch_legacy, built-in"
    p = m[0].parametrizations.weight
    w0 = p.original.detach().double().numpy()
    u, v = p[0]._u.double().numpy(), p[0]._v.double().numpy()
    assert rows[0].sigma == pytest.approx(u @ w0 @ v, rel=1e-12)
    assert rows[0].sigma_exact == pytest.approx(top_sv(w0), rel=1e-12)
    w1 = m[1].weight_orig.detach().double().numpy().reshape(3, -1)
    u, v = m[1].weight_u.double().numpy(), m[1].weight_v.double().numpy()
    assert rows[1].sigma == pytest.approx(u @ w1 @ v, rel=1e-12)
    assert rows[1].sigma_exact == pytest.approx(top_sv(w1), rel=1e-12)


def test_report_paddle_against_svd_backend_sigma_and_torch():
    t = sngan.torch_discriminator(width=8)
    p = sngan.paddle_discriminator(width=8)
    port.torch_to_paddle(t, p)
    rt, rp = report.report(t), report.report(p)
    assert rp.framework == "paddle" and [r.name for r in rp.rows] == [r.name for r in rt.rows]
    layers = dict(p.named_sublayers())
    for a, b in zip(rt.rows, rp.rows):
        layer = layers[b.name.rsplit(".", 1)[0]]
        w = layer.weight_orig.numpy().astype(np.float64)
        mat = w.T if b.layer == "Linear" else w.reshape(w.shape[0], -1)  # paddle Linear: [in, out]
        assert b.sigma_exact == pytest.approx(top_sv(mat), rel=1e-12)
        assert b.sigma == pytest.approx(dualsn.paddle.sigma(layer), rel=1e-6)
        # the same W-matrix and u, v in both frameworks: the same numbers
        assert b.sigma == pytest.approx(a.sigma, rel=1e-6)
        assert b.sigma_exact == pytest.approx(a.sigma_exact, rel=1e-12)
    assert rp.rows[-2].dim == 1 and rt.rows[-2].dim == 0  # the Linear
    assert rp.lipschitz_bound == pytest.approx(rt.lipschitz_bound, rel=1e-5)


def test_report_paddle_builtin():
    paddle.seed(0)
    layer = paddle.nn.utils.spectral_norm(paddle.nn.Linear(5, 3))  # weight [5, 3], dim 1
    (row,) = report.report(layer).rows
    assert row.name == "weight" and row.preset == "paddle, built-in" and row.dim == 1
    w = layer.weight_orig.numpy().astype(np.float64)
    u, v = layer.weight_u.numpy().astype(np.float64), layer.weight_v.numpy().astype(np.float64)
    assert row.sigma == pytest.approx(u @ w.T @ v, rel=1e-12)
    assert row.sigma_exact == pytest.approx(top_sv(w), rel=1e-12)


def test_report_text_and_markdown():
    r = report.report(torch_model())
    text, md = str(r), r.to_markdown()
    for row in r.rows:
        assert row.name in text and f"`{row.name}`" in md
        assert f"{row.sigma_exact:.6g}" in text and f"{row.rel_error:+.2e}" in md
    assert f"{r.lipschitz_bound:.6g}" in text and f"{r.exact_product:.6g}" in md
    assert "not the operator norm" in text and "heuristic" in md
    assert md.splitlines()[0].startswith("| layer |")
    empty = report.report(torch.nn.Linear(2, 2))
    assert empty.rows == [] and "no spectral norm" in str(empty)


def markdown_table(md: str) -> list[list[str]]:
    """The cells of each row of the Markdown table at the start of ``md``, split as GFM does: on
    every ``|`` not escaped as ``\\|``; the escape is then undone."""
    rows = []
    for line in md.splitlines():
        if not line.startswith("|"):
            break
        assert line.endswith("|"), line
        cells = re.split(r"(?<!\\)\|", line[1:-1])
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def test_report_markdown_table_is_well_formed():
    r = report.report(torch_model())
    rows = markdown_table(r.to_markdown())
    header, delimiter, body = rows[0], rows[1], rows[2:]
    assert all(re.fullmatch(r":?-{3,}:?", c) for c in delimiter)
    assert len(delimiter) == 9
    assert [len(row) for row in rows] == [9] * (2 + len(r.rows))
    assert header == ["layer", "type", "shape", "dim", "preset", "sigma", "exact (SVD)", "rel. error", "||W_sn||"]
    assert len(body) == len(r.rows) == 5
    for row, cells in zip(r.rows, body):
        assert cells[0] == f"`{row.name}`"
        assert float(cells[5]) == pytest.approx(row.sigma, rel=1e-5)
        assert float(cells[8]) == pytest.approx(row.normalized_norm, abs=1e-6)


def test_convergence_reaches_the_exact_sigma():
    m = torch_model()
    for layer in report.collect(m)[:4]:
        curve = report.convergence(layer, 300)
        assert curve[0] == pytest.approx(layer.sigma(), rel=1e-12)
        assert curve[-1] == pytest.approx(layer.sigma_exact(), rel=1e-6)
        assert np.all(curve <= layer.sigma_exact() * (1 + 1e-12))  # u^H W v never exceeds sigma_max


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "conv.png"
    report.report(torch_model()).plot(path, iterations=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# dualsn.report with spectral_norm_conv (the convolution operator norm) and coeff


def torch_conv_matrix(weight: torch.Tensor, input_shape, **conv_args) -> np.ndarray:
    """The explicit matrix of one sample's convolution, by torch's own convolution of every
    unit input (float64): column j = conv(e_j)."""
    n = int(np.prod(input_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    conv = getattr(torch.nn.functional, f"conv{len(input_shape) - 1}d")
    return conv(basis, weight.detach().double(), **conv_args).reshape(n, -1).T.numpy()


def paddle_conv_matrix(weight, input_shape, **conv_args) -> np.ndarray:
    n = int(np.prod(input_shape))
    basis = paddle.eye(n, dtype="float64").reshape([n, *input_shape])
    conv = getattr(paddle.nn.functional, f"conv{len(input_shape) - 1}d")
    return conv(basis, weight.astype("float64"), **conv_args).reshape([n, -1]).numpy().T


def lipschitz_torch_model():
    """A strided convolution under spectral_norm_conv, a Linear whose coeff bound is active
    and one whose bound is not."""
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.conv = dualsn.torch.spectral_norm_conv(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7), seed=1)
    m.fc = dualsn.torch.spectral_norm(torch.nn.Linear(6, 5), coeff=0.5, seed=2)
    m.fc2 = dualsn.torch.spectral_norm(torch.nn.Linear(5, 4), coeff=10.0, seed=3, compat="paddle")
    for _ in range(3):  # training-mode reads run the power iteration: u, v move off their draw
        m.conv.weight
    return m


def lipschitz_paddle_model():
    m = paddle.nn.Layer()
    m.conv = dualsn.paddle.spectral_norm_conv(paddle.nn.Conv2D(2, 3, 3, stride=2, padding=1), (2, 7, 7), seed=5)
    m.fc = dualsn.paddle.spectral_norm(paddle.nn.Linear(6, 5), coeff=0.5, seed=6)
    m.fc2 = dualsn.paddle.spectral_norm(paddle.nn.Linear(5, 4), coeff=10.0, seed=7, compat="paddle")
    return m


def check_lipschitz_rows(r, conv_matrix, conv_u, conv_v, fc_matrix, fc2_matrix, sigma_of):
    rows = {row.name: row for row in r.rows}
    assert list(rows) == ["conv.weight", "fc.weight", "fc2.weight"]
    conv = rows["conv.weight"]
    assert conv.dim is None and conv.shape == (3, 2, 3, 3) and conv.exact_method == "svd"
    assert conv.sigma == pytest.approx(conv_u.ravel() @ conv_matrix @ conv_v.ravel(), rel=1e-12)
    assert conv.sigma == pytest.approx(sigma_of("conv"), rel=1e-6)
    assert conv.sigma_exact == pytest.approx(top_sv(conv_matrix), rel=1e-12)
    for name, mat, coeff in (("fc.weight", fc_matrix, 0.5), ("fc2.weight", fc2_matrix, 10.0)):
        row = rows[name]
        assert row.coeff == coeff and f"coeff={coeff}" in row.preset
        assert row.sigma == pytest.approx(sigma_of(name.split(".")[0]), rel=1e-6)
        assert row.sigma_exact == pytest.approx(top_sv(mat), rel=1e-12)
        # ||W_sn|| = sigma_exact / max(1, sigma / coeff)
        assert row.normalized_norm == pytest.approx(top_sv(mat) / max(1.0, row.sigma / coeff), rel=1e-12)
    assert rows["fc.weight"].sigma > 0.5 and rows["fc2.weight"].sigma < 10.0  # one bound active, one not
    assert rows["fc2.weight"].normalized_norm == pytest.approx(top_sv(fc2_matrix), rel=1e-12)
    assert conv.normalized_norm == pytest.approx(top_sv(conv_matrix) / abs(conv.sigma), rel=1e-12)
    assert r.lipschitz_bound == pytest.approx(np.prod([row.normalized_norm for row in r.rows]), rel=1e-12)
    assert r.exact_product == pytest.approx(
        top_sv(conv_matrix) * top_sv(fc_matrix) * top_sv(fc2_matrix), rel=1e-12)
    text = str(r)
    assert re.search(r"^conv\.weight\s+Conv2[dD]\s+3x2x3x3\s+conv\s", text, re.M)
    assert "coeff=0.5" in text and "W_sn = W / max(1, sigma / coeff)" in text and "~" not in text
    assert "| conv |" in r.to_markdown()


def test_report_conv_operator_norm_and_coeff_torch():
    m = lipschitz_torch_model()
    sn = m.conv.parametrizations.weight[0]
    conv_matrix = torch_conv_matrix(m.conv.parametrizations.weight.original, (2, 7, 7), stride=2, padding=1)
    assert conv_matrix.shape == (3 * 4 * 4, 2 * 7 * 7)
    check_lipschitz_rows(
        report.report(m), conv_matrix, sn._u.double().numpy(), sn._v.double().numpy(),
        m.fc.parametrizations.weight.original.detach().double().numpy(),
        m.fc2.parametrizations.weight.original.detach().double().numpy(),
        lambda name: dualsn.torch.sigma(getattr(m, name)),
    )
    # the operator norm, not the reshaped kernel's largest singular value
    kernel = m.conv.parametrizations.weight.original.detach().double().numpy().reshape(3, -1)
    assert report.report(m).rows[0].sigma_exact != pytest.approx(top_sv(kernel), rel=1e-3)
    assert dualsn.torch.report(m).rows == report.report(m).rows  # the backend's wrapper


def test_report_conv_operator_norm_and_coeff_paddle():
    m = lipschitz_paddle_model()
    conv_matrix = paddle_conv_matrix(m.conv.weight_orig, (2, 7, 7), stride=2, padding=1)
    check_lipschitz_rows(
        report.report(m), conv_matrix, m.conv.weight_u.numpy().astype(np.float64),
        m.conv.weight_v.numpy().astype(np.float64),
        m.fc.weight_orig.numpy().astype(np.float64).T,  # paddle Linear: [in, out]
        m.fc2.weight_orig.numpy().astype(np.float64).T,
        lambda name: dualsn.paddle.sigma(getattr(m, name)),
    )
    assert dualsn.paddle.report(m).rows == report.report(m).rows  # the backend's wrapper
    # ported from torch: the same rows
    t = lipschitz_torch_model()
    port.torch_to_paddle(t, m)
    rt, rp = report.report(t), report.report(m)
    for a, b in zip(rt.rows, rp.rows):
        assert (a.name, a.coeff) == (b.name, b.coeff)  # Paddle's Linear: [in, out], dim 1
        assert b.sigma == pytest.approx(a.sigma, rel=1e-6)
        assert b.sigma_exact == pytest.approx(a.sigma_exact, rel=1e-12)
    assert rp.lipschitz_bound == pytest.approx(rt.lipschitz_bound, rel=1e-5)


def test_report_large_convolution_uses_lanczos(monkeypatch):
    m = lipschitz_torch_model()
    exact = report.report(m).rows[0].sigma_exact
    monkeypatch.setattr(diagnostics, "CONV_SVD_LIMIT", 100)  # every convolution counts as large
    r = report.report(m)
    conv = r.rows[0]
    assert conv.exact_method == "lanczos" and [row.exact_method for row in r.rows[1:]] == ["svd", "svd"]
    assert conv.sigma_exact == pytest.approx(exact, rel=1e-9)
    assert conv.sigma_exact <= exact * (1 + 1e-12)  # a Ritz value never overshoots
    assert f"~{conv.sigma_exact:.6g}" in str(r) and report.LANCZOS_NOTE in str(r)


@pytest.mark.parametrize("case", ["conv1d", "conv2d_same", "conv3d"])
def test_conv_shape_is_the_frameworks_convolution(case):
    torch.manual_seed(0)
    layer, input_shape, args = {
        "conv1d": (torch.nn.Conv1d(4, 6, 3, stride=3, padding=2, dilation=2, groups=2), (4, 11),
                   dict(stride=3, padding=2, dilation=2, groups=2)),
        "conv2d_same": (torch.nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1)), (2, 5, 4),
                        dict(padding="same", dilation=(2, 1))),
        "conv3d": (torch.nn.Conv3d(1, 2, 2, stride=2, padding=1), (1, 3, 4, 3), dict(stride=2, padding=1)),
    }[case]
    dualsn.torch.spectral_norm_conv(layer, input_shape, seed=0)
    (sn,) = report.collect(layer)
    expected = torch_conv_matrix(layer.parametrizations.weight.original, input_shape, **args)
    np.testing.assert_allclose(sn.matrix, expected, rtol=0, atol=1e-12)
    y = np.random.default_rng(0).standard_normal((2, *sn.conv.output_shape))
    adjoint = sn.conv.mhv(sn.weight, y).reshape(2, -1)  # M^T y, matrix-free
    np.testing.assert_allclose(adjoint, y.reshape(2, -1) @ expected, rtol=0, atol=1e-12)
    assert report.report(layer).rows[0].sigma == pytest.approx(dualsn.torch.sigma(layer), rel=1e-6)


def test_conv_shape_of_paddle_same_padding():
    # Paddle's SAME padding with a stride pads (before, after) unevenly, as Paddle resolves it.
    paddle.seed(0)
    layer = dualsn.paddle.spectral_norm_conv(paddle.nn.Conv2D(2, 3, 4, stride=2, padding="SAME"), (2, 7, 6), seed=0)
    (sn,) = report.collect(layer)
    expected = paddle_conv_matrix(layer.weight_orig, (2, 7, 6), stride=2, padding="SAME")
    np.testing.assert_allclose(sn.matrix, expected, rtol=0, atol=1e-12)
    assert report.report(layer).rows[0].sigma == pytest.approx(dualsn.paddle.sigma(layer), rel=1e-6)


def test_plot_of_a_convolution_norm(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "lipschitz.png"
    report.report(lipschitz_torch_model()).plot(path, iterations=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convergence_of_a_convolution_reaches_its_operator_norm():
    m = lipschitz_torch_model()
    layer = report.collect(m)[0]
    curve = report.convergence(layer, 300)
    assert curve[0] == pytest.approx(layer.sigma(), rel=1e-12)
    assert curve[-1] == pytest.approx(layer.sigma_exact(), rel=1e-6)
    assert np.all(curve <= layer.sigma_exact() * (1 + 1e-12))


# ---------------------------------------------------------------------------------------------
# dualsn report (CLI)

USER_MODELS = """
import torch
import dualsn.torch

def chain():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        dualsn.torch.spectral_norm(torch.nn.Linear(6, 5)),
        torch.nn.ReLU(),
        dualsn.torch.spectral_norm(torch.nn.Linear(5, 2)),
    )

def plain():
    return torch.nn.Linear(3, 3)
"""


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "user_sn_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_sn_models", raising=False)
    return "user_sn_models"


def table(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines() if re.match(r"^\d+\.weight ", line)}


def test_cli_report_with_checkpoint(user_models, tmp_path, capsys):
    import user_sn_models

    model = user_sn_models.chain()
    with torch.no_grad():  # a state different from the factory's
        model[0].parametrizations.weight.original.mul_(3.0)
    torch.save(model.state_dict(), tmp_path / "ck.pt")

    assert cli.main(["report", "--model", f"{user_models}:chain", "--checkpoint", str(tmp_path / "ck.pt")]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    w0 = model[0].parametrizations.weight.original.detach().double().numpy()
    w2 = model[2].parametrizations.weight.original.detach().double().numpy()
    assert float(rows["0.weight"][6]) == pytest.approx(top_sv(w0), rel=1e-5)
    assert float(rows["2.weight"][6]) == pytest.approx(top_sv(w2), rel=1e-5)
    assert float(rows["0.weight"][5]) == pytest.approx(dualsn.torch.sigma(model[0]), rel=1e-5)
    bound = re.search(r"product of \|\|W_sn\|\|:\s+(\S+)", out).group(1)
    expected = top_sv(w0) / dualsn.torch.sigma(model[0]) * top_sv(w2) / dualsn.torch.sigma(model[2])
    assert float(bound) == pytest.approx(expected, rel=1e-5)

    assert cli.main(["report", "--model", f"{user_models}:chain", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| layer |")
    assert [len(row) for row in markdown_table(md)] == [9] * 4  # header, delimiter, 2 layers


def test_cli_report_paddle_model_from_torch_checkpoint(tmp_path, capsys):
    torch.manual_seed(3)
    t = sngan.torch_discriminator()
    torch.save(t.state_dict(), tmp_path / "d.pt")
    factory = "dualsn.examples.sngan:paddle_discriminator"
    assert cli.main(["report", "--model", factory, "--checkpoint", str(tmp_path / "d.pt")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("blocks.", "linear.", "embed."))}
    for name, module in t.named_modules():
        if dualsn.torch.is_spectral_norm(module):
            w = module.parametrizations.weight.original.detach().double().numpy()
            assert float(rows[name + ".weight"][6]) == pytest.approx(top_sv(w.reshape(w.shape[0], -1)), rel=1e-5)
            assert float(rows[name + ".weight"][5]) == pytest.approx(dualsn.torch.sigma(module), rel=1e-5)
    assert rows["linear.weight"][2] == f"{sngan.WIDTH}x1" and rows["linear.weight"][3] == "1"  # paddle.nn.Linear


def test_cli_report_plot(user_models, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sigma.png"
    assert cli.main(["report", "--model", f"{user_models}:chain", "--plot", str(png), "--iterations", "4"]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_report_errors(user_models, tmp_path, capsys):
    assert cli.main(["report", "--model", f"{user_models}:chain", "--checkpoint", str(tmp_path / "no.pt")]) == cli.EXIT_NO_FILE
    assert cli.main(["report", "--model", f"{user_models}:nothing"]) == cli.EXIT_FACTORY
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["report", "--model", f"{user_models}:chain", "--checkpoint", str(tmp_path / "junk.pt")]) == cli.EXIT_BAD_FORMAT
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    assert cli.main(["report", "--model", f"{user_models}:chain", "--checkpoint", str(tmp_path / "other.pt")]) == cli.EXIT_MISMATCH
    assert cli.main(["report", "--model", f"{user_models}:plain"]) == 0
    assert "no spectral norm found" in capsys.readouterr().out


def test_cli_report_plot_without_matplotlib():
    proc = run_python("""
        import sys
        sys.modules["matplotlib"] = None
        from dualsn.cli import main
        sys.exit(main(["report", "--model", "dualsn.examples.sngan:torch_discriminator", "--plot", "x.png"]))
    """)
    assert proc.returncode == cli.EXIT_MISSING, proc.stderr
    assert 'pip install "dualsn[plot]"' in proc.stderr


# ---------------------------------------------------------------------------------------------
# dualsn demo


def demo_steps(out: str):
    """(step, phase, out diff, sigma diff) of every step line."""
    found = []
    for line in out.splitlines():
        m = re.match(r"^\s*(\d+)\s+(torch|both)\s", line)
        if m:
            cells = line.split()
            diffs = (float(cells[-2]), float(cells[-1])) if m.group(2) == "both" else None
            found.append((int(m.group(1)), m.group(2), diffs))
    return found


def test_cli_demo(capsys):
    assert cli.main(["demo", "--steps", "3", "--torch-steps", "2", "--batch", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    steps = demo_steps(out)
    assert [(s, p) for s, p, _ in steps] == [(1, "torch"), (2, "torch"), (3, "both"), (4, "both"), (5, "both")]
    assert all(0 <= d <= demo.RTOL for _, _, diffs in steps[2:] for d in diffs)
    assert "ported to Paddle" in out and "10 spectral norms" in out
    assert re.search(r"result: .*tolerance 0\.0001\): OK", out)
    header = next(line for line in out.splitlines() if line.lstrip().startswith("step"))
    assert header.count("[") == 10  # one sigma column per spectrally normalized layer


def test_demo_sigmas_are_the_layers_and_progress_goes_to_stderr(capsys):
    result = demo.run(steps=1, torch_steps=1, batch=2, progress=True)
    captured = capsys.readouterr()
    assert "lockstep" in captured.err and "/2 [" in captured.err and "%|" not in captured.out
    assert len(result.sigmas) == 2 and len(result.sigmas[0]) == len(result.layers) == 10
    assert result.ok and len(result.out_diff) == len(result.sigma_diff) == 1


def test_cli_demo_detects_divergence(monkeypatch, capsys):
    real_port = port.torch_to_paddle

    def bad_port(module, layer, **kwargs):  # a port that gets one weight wrong by 1%
        out = real_port(module, layer, **kwargs)
        w = layer.linear.weight_orig
        w.set_value(w.numpy() * 1.01)
        return out

    monkeypatch.setattr(port, "torch_to_paddle", bad_port)
    assert cli.main(["demo", "--steps", "2", "--torch-steps", "1", "--batch", "4", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "DIVERGED" in out
    assert max(d for _, _, diffs in demo_steps(out)[1:] for d in diffs) > demo.RTOL


def test_cli_demo_bad_arguments(capsys):
    assert cli.main(["demo", "--steps", "0"]) == cli.EXIT_USAGE
    assert "--steps 0" in capsys.readouterr().err


@pytest.mark.parametrize("missing, extra", [("paddle", "paddle"), ("torch", "torch")])
def test_cli_demo_without_a_framework(missing, extra):
    proc = run_python(f"""
        import sys
        sys.modules[{missing!r}] = None  # import {missing} now raises ImportError
        from dualsn.cli import main
        sys.exit(main(["demo"]))
    """)
    assert proc.returncode == cli.EXIT_MISSING, proc.stderr
    assert f'pip install "dualsn[{extra}]"' in proc.stderr
    assert "step" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# dualsn check


def test_cli_check_quick(capsys):
    rc = cli.main(["check", "--quick"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    for case in cli.QUICK_CASES:
        assert any(line.startswith(case + " ") for line in lines)
    assert "dualsn_torch:torch" in out and "dualsn_paddle:paddle~golden" in out
    total, passed, failed, skipped = summary(out)
    assert total == passed + failed + skipped and total > 0
    assert rc == (0 if failed == 0 else 1)
    assert (" FAIL " in out) == (failed > 0)
    # the differential harness ran too: whole models, fast vs plain, torch vs Paddle
    m = re.search(r"(\d+) differential checks: (\d+) passed, (\d+) failed, (\d+) skipped", out)
    assert m and int(m.group(1)) == 24 and int(m.group(2)) + int(m.group(3)) == 24
    assert "sngan_discriminator/sgd" in out and "torch~paddle:torch:float32" in out


def test_cli_check_fails_when_the_differential_harness_fails(checkout, monkeypatch, capsys):
    import conformance
    from conformance import differential
    from conformance.runner import Result

    monkeypatch.setattr(conformance, "run", lambda drivers=None, cases=None, sequences=None, golden=True: [
        Result(cases[0], "registration", "reference", "torch", "golden", "pass")])
    bad = differential.DiffResult("resnet", "sgd", "torch", "float32", "paddle", differential.FAIL, "grad/conv1 off by 1e-2")
    monkeypatch.setattr(differential, "run", lambda quick=False, frameworks=None: [bad])
    assert cli.main(["check", "--quick"]) == 1
    assert "FAIL resnet/sgd/torch/float32/paddle: grad/conv1 off by 1e-2" in capsys.readouterr().out
    assert cli.main(["check", "--quick", "--no-differential"]) == 0


@pytest.fixture
def checkout(monkeypatch):
    """The repository root on sys.path, so that backends/ and conformance/ import."""
    monkeypatch.syspath_prepend(ROOT)


def summary(out: str) -> tuple[int, int, int, int]:
    m = re.search(r"(\d+) checks .*: (\d+) passed, (\d+) failed, (\d+) skipped", out)
    return tuple(map(int, m.groups()))


def test_cli_check_exit_code_follows_the_results(checkout, monkeypatch, capsys):
    import conformance
    from conformance.runner import Result

    def fake(status):
        return lambda drivers=None, cases=None, sequences=None, golden=True: [
            Result(cases[0], "registration", "reference", "torch", "golden", "pass"),
            Result(cases[0], "gradients", "reference", "torch", "golden", status, "weight grad off by 1e-3"),
        ]

    monkeypatch.setattr(conformance, "run", fake("pass"))
    assert cli.main(["check", "--case", "linear-f32", "--driver", "reference"]) == 0
    monkeypatch.setattr(conformance, "run", fake("FAIL"))
    assert cli.main(["check", "--case", "linear-f32", "--driver", "reference"]) == 1
    out = capsys.readouterr().out
    assert "FAIL linear-f32 / gradients / reference:torch~golden: weight grad off by 1e-3" in out


def test_cli_check_skips_drivers_of_missing_frameworks(checkout, monkeypatch, capsys):
    import backends.base

    monkeypatch.setattr(backends.base, "importable", lambda module: module != "paddle")
    rc = cli.main(["check", "--case", "linear-f32", "--driver", "reference", "--driver", "dualsn_paddle",
                   "--no-golden", "--driver", "dualsn_torch"])
    out = capsys.readouterr().out
    assert 'skipping driver dualsn_paddle: paddle is not installed (pip install "dualsn[paddle]")' in out
    assert "dualsn_paddle:" not in out.split("skipping", 1)[1].split("\n", 1)[1]
    assert "dualsn_torch:torch" in out and "dualsn_torch:paddle" in out
    import backends
    from conformance.sequences import SEQUENCES

    total, passed, failed, skipped = summary(out)
    # the reference is compared with golden traces only (off here): dualsn_torch's presets remain
    assert total == len(SEQUENCES) * len(backends.DRIVERS["dualsn_torch"].presets)
    assert rc == (0 if failed == 0 else 1)


def test_cli_check_needs_the_source_checkout(monkeypatch, capsys):
    assert cli.source_checkout() == ROOT
    monkeypatch.setattr(cli._check, "source_checkout", lambda: None)
    assert cli.main(["check", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_cli_check_unknown_case(capsys):
    assert cli.main(["check", "--case", "no-such-case"]) == 2
    assert "unknown case" in capsys.readouterr().err


def test_python_m_dualsn_check_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "dualsn", "check", "--case", "linear-f32", "--driver", "reference"],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert "linear-f32" in proc.stdout and "reference:torch~golden" in proc.stdout
    assert proc.returncode == (0 if summary(proc.stdout)[2] == 0 else 1)
