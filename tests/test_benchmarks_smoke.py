"""Smoke test of the benchmark harness (``python -m benchmarks``): a --quick run, in process.

No timing is asserted (the machine is shared and noisy); the tests check that one run
produces the markdown tables and the JSON with the expected rows and finite numbers, and that
the floor's operations compute what they claim to (against numpy and dualsn.spec).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("paddle")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not installed, it lives next to ``dualsn``
    sys.path.insert(0, str(ROOT))

from benchmarks.cli import main  # noqa: E402
from dualsn import spec  # noqa: E402

ROWS = {
    "torch": ["plain", "builtin", "dualsn"],
    "paddle": ["plain", "builtin", "dualsn", "dualsn[paddle]"],
}
FLOOR = {
    "train": {"floor:Wv", "floor:WHu", "floor:rescale", "floor:rank1_grad"},
    "eval": {"floor:Wv", "floor:rescale"},
}


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_quick_run_writes_tables_and_json(tmp_path, capsys):
    import torch

    threads_before = torch.get_num_threads()
    rc = main(["--quick", "--case", "linear_256,register_linear_256", "--out", str(tmp_path)])
    assert rc == 0
    assert torch.get_num_threads() == threads_before  # the run leaves torch's setting alone
    stdout = capsys.readouterr().out
    md = (tmp_path / "latest.md").read_text()
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert md.strip() == stdout.strip()

    meta = doc["meta"]
    assert meta["threads"] == 1 and meta["quick"] is True
    assert meta["framework_info"]["torch"]["threads"] == 1
    assert set(meta["framework_info"]) == {"torch", "paddle"}

    keys = [(r["framework"], r["case"], r["mode"]) for r in doc["results"]]
    expected = {
        (fw, case, mode)
        for fw in ROWS
        for case, mode in [("linear_256", "train"), ("linear_256", "eval"), ("register_linear_256", "register")]
    }
    assert sorted(keys) == sorted(expected)

    for res in doc["results"]:
        fw, mode = res["framework"], res["mode"]
        names = [row["variant"] for row in res["rows"]]
        want = ROWS[fw] if mode != "register" else ROWS[fw][1:]  # registration has no plain row
        assert names == want
        for row in res["rows"]:
            assert _finite(row["median_ms"]) and row["median_ms"] > 0
            assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
            assert row["samples"] == meta["repeats"] and row["inner"] >= 1
            if row["variant"] == "plain":
                continue
            assert _finite(row["overhead_ms"])
            if row["vs_builtin"] is not None:
                assert _finite(row["vs_builtin"])
        if mode == "register":
            assert res["floor"] is None
            for row in res["rows"]:  # no plain row: the overhead is the time itself
                assert row["overhead_ms"] == row["median_ms"]
            continue
        plain = res["rows"][0]["median_ms"]
        for row in res["rows"][1:]:
            assert row["overhead_ms"] == pytest.approx(row["median_ms"] - plain)
        ops = res["floor"]["ops"]
        assert set(ops) == FLOOR[mode]
        assert all(_finite(op["median_ms"]) and op["median_ms"] > 0 for op in ops.values())
        assert res["floor"]["total_ms"] == pytest.approx(sum(op["median_ms"] for op in ops.values()))
        for row in res["rows"][1:]:
            if row["overhead_ms"] > 0:
                assert row["vs_floor"] == pytest.approx(row["overhead_ms"] / res["floor"]["total_ms"])

    for heading in ("## dualsn vs built-in, side by side", "## torch", "## paddle", "## The floor"):
        assert heading in md
    assert "| linear_256 | train | plain |" in md
    assert "| register_linear_256 | register | builtin |" in md
    assert "| | | dualsn[paddle] |" in md


def test_cuda_without_cuda_exits_with_a_message(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["--quick", "--device", "cuda", "--case", "linear_256", "--out", str(tmp_path)])
    assert rc == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    assert not (tmp_path / "latest.json").exists()


def test_unknown_case_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["--case", "no_such_case"])
    assert "no_such_case" in capsys.readouterr().err


@pytest.mark.parametrize(
    "framework, shape, transposed",
    [("torch", (6, 4), False), ("torch", (4, 2, 3), False), ("paddle", (6, 4), True), ("paddle", (4, 2, 3), False)],
)
def test_floor_ops_compute_the_floor(framework, shape, transposed):
    w = np.random.default_rng(3).standard_normal(shape).astype("float32")
    if framework == "torch":
        import torch

        from benchmarks.torch_bench import floor_ops

        floor = floor_ops(torch.from_numpy(w))
    else:
        import paddle

        from benchmarks.paddle_bench import floor_ops

        floor = floor_ops(paddle.to_tensor(w), transposed=transposed)
    w_mat = w.T if transposed else w.reshape(w.shape[0], -1)  # paddle Linear stores [in, out]
    np.testing.assert_array_equal(floor.w_mat, w_mat)
    for op in floor.ops.values():
        op()
    out = floor.outputs()
    w64, u, v = w_mat.astype(np.float64), floor.u.astype(np.float64), floor.v.astype(np.float64)
    sigma = u @ w64 @ v
    assert sigma > 0
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["floor:Wv"], w64 @ v, **tol)
    np.testing.assert_allclose(out["floor:WHu"], w64.T @ u, **tol)
    np.testing.assert_allclose(out["floor:rescale"], w64 / sigma, **tol)
    expected = spec.normalized_weight_grad(floor.grad.astype(np.float64), w64, u, v, 0, spec.PRESETS["torch"])
    np.testing.assert_allclose(out["floor:rank1_grad"], expected, **tol)
