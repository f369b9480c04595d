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
from dualsn import cli, demo, port, report  # noqa: E402
from dualsn.examples import sngan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    bound = re.search(r"product of \|\|W/sigma\|\|:\s+(\S+)", out).group(1)
    expected = top_sv(w0) / dualsn.torch.sigma(model[0]) * top_sv(w2) / dualsn.torch.sigma(model[2])
    assert float(bound) == pytest.approx(expected, rel=1e-5)

    assert cli.main(["report", "--model", f"{user_models}:chain", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| layer |")


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
    monkeypatch.setattr(cli, "source_checkout", lambda: None)
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
