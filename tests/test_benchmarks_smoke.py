"""Smoke test of the benchmark harness (``python -m benchmarks``): a --quick run, in process.

No timing is asserted (the machine is shared and noisy); the tests check that one run
produces the markdown tables and the JSON with the expected rows and sane numbers (finite,
ordered quartiles, ratios that are what the samples say, memory that holds at least W and its
gradient), that page faults and peak memory are counted at all, and that the floor's operations
compute what they claim to (against numpy and dualsn.spec).
"""

from __future__ import annotations

import json
import math
import mmap
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("paddle")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not installed, it lives next to ``dualsn``
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.cases import CASES, FLOOR_PARTS, GROUPS, floor_part, select  # noqa: E402
from benchmarks.cli import main  # noqa: E402
from benchmarks.timing import Stats, Variant, measure, quartiles  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402

ROWS = {
    "torch": ["plain", "builtin", "dualsn"],
    "paddle": ["plain", "builtin", "dualsn", "dualsn[paddle]"],
}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_paired(value, iqr, num, den, scale=1.0):
    """``value`` [iqr] is the median [quartiles] of scale * num_i / den_i over rounds with den_i > 0."""
    vals = [scale * n / d for n, d in zip(num, den) if d > 0]
    if not vals:
        assert value is None and iqr is None
        return
    assert _finite(value) and len(iqr) == 2
    assert iqr[0] <= value <= iqr[1]
    assert value == pytest.approx(statistics.median(vals))
    assert iqr == pytest.approx(list(quartiles(vals)))


def test_quick_run_writes_tables_and_json(tmp_path, capsys):
    import torch

    threads_before = torch.get_num_threads()
    # In this process (the frameworks are imported already: fast); --device cpu: the same rows on
    # any machine. The default, one process per framework, is tested below.
    rc = main(["--quick", "--in-process", "--device", "cpu", "--case", "linear_256,register_linear_256",
               "--out", str(tmp_path)])
    assert rc == 0
    assert torch.get_num_threads() == threads_before  # the run leaves torch's setting alone
    stdout = capsys.readouterr().out
    md = (tmp_path / "latest.md").read_text()
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert md.strip() == stdout.strip()

    meta = doc["meta"]
    assert meta["threads"] == 1 and meta["quick"] is True and meta["memory"] is True
    assert meta["framework_info"]["torch"]["threads"] == 1
    assert set(meta["framework_info"]) == {"torch", "paddle"}
    assert meta["devices"] == ["cpu"] and meta["isolation"] == "one process, frameworks interleaved"
    assert all(_finite(x) for x in meta["loadavg"]["start"] + meta["loadavg"]["end"])

    keys = [(r["framework"], r["case"], r["mode"]) for r in doc["results"]]
    expected = {
        (fw, case, mode)
        for fw in ROWS
        for case, mode in [("linear_256", "train"), ("linear_256", "eval"), ("register_linear_256", "register")]
    }
    assert sorted(keys) == sorted(expected)

    for res in doc["results"]:
        fw, mode = res["framework"], res["mode"]
        assert res["label"] == fw and res["device"] == "cpu"
        rows = {row["variant"]: row for row in res["rows"]}
        names = [row["variant"] for row in res["rows"]]
        want = ROWS[fw] if mode != "register" else ROWS[fw][1:]  # registration has no plain row
        assert names == want
        for row in res["rows"]:
            assert _finite(row["median_ms"]) and row["median_ms"] > 0
            assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
            assert row["samples"] == meta["repeats"] == len(row["samples_ms"]) and row["inner"] >= 1
            assert _finite(row["faults_per_call"]) and row["faults_per_call"] >= 0
            if row["variant"] == "plain":
                continue
            assert _finite(row["overhead_ms"])
        if mode == "register":
            assert res["floor"] is None
            for row in res["rows"]:  # no plain row: the overhead is the time itself
                assert row["overhead_ms"] == row["median_ms"]
                assert row["pct_of_plain"] is None and "peak_bytes" not in row
                _check_paired(row["vs_builtin"], row["vs_builtin_iqr"], row["samples_ms"],
                              rows["builtin"]["samples_ms"])
            continue

        # The floor: every part, its fastest form, the total.
        floor = res["floor"]
        assert set(floor["ops"]) == set(FLOOR_PARTS[mode])
        for part, op in floor["ops"].items():
            assert _finite(op["median_ms"]) and op["median_ms"] > 0
            assert op["form"] in op["candidates"]
            assert op["median_ms"] == min(c["median_ms"] for c in op["candidates"].values())
            assert all(_finite(c["faults_per_call"]) for c in op["candidates"].values())
        assert floor["total_ms"] == pytest.approx(sum(op["median_ms"] for op in floor["ops"].values()))
        floor_rounds = [sum(vals) for vals in zip(*(op["samples_ms"] for op in floor["ops"].values()))]
        assert floor["rounds_ms"] == pytest.approx(floor_rounds)

        # Paired ratios and % recomputed from the raw samples.
        plain = rows["plain"]
        for row in res["rows"][1:]:
            assert row["overhead_ms"] == pytest.approx(row["median_ms"] - plain["median_ms"])
            over = [r - p for r, p in zip(row["samples_ms"], plain["samples_ms"])]
            b_over = [r - p for r, p in zip(rows["builtin"]["samples_ms"], plain["samples_ms"])]
            _check_paired(row["vs_builtin"], row["vs_builtin_iqr"], over, b_over)
            _check_paired(row["vs_floor"], row["vs_floor_iqr"], over, floor_rounds)
            _check_paired(row["pct_of_plain"], row["pct_of_plain_iqr"], over, plain["samples_ms"], 100.0)

        # Peak memory: train only, every row holds at least W and its gradient during a step.
        w_bytes = 4 * 256 * 256
        assert res["w_bytes"] == w_bytes
        for row in res["rows"]:
            if mode != "train":
                assert "peak_bytes" not in row
                continue
            assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] >= 2 * w_bytes
            assert 0 <= row["kept_bytes"] <= row["peak_bytes"]
            if row["variant"] != "plain":
                assert row["extra_peak_bytes"] == row["peak_bytes"] - plain["peak_bytes"]
                assert row["extra_peak_bytes"] >= 0  # no spectral norm needs less than the plain layer
        if fw == "paddle" and mode == "train":
            assert all(row["reserved_peak_bytes"] >= row["peak_bytes"] for row in res["rows"])

    for heading in (
        "## Summary: time",
        "## Summary: memory and page faults of a training step",
        "## torch",
        "## paddle",
        "## The floor",
        "## How these numbers are measured",
    ):
        assert heading in md
    for column in ("train: dualsn / built-in", "train: dualsn / floor", "eval % of plain: dualsn",
                   "dualsn peak above plain MiB", "dualsn faults/step"):
        assert column in md
    for fw in ROWS:
        assert f"| linear_256 | {fw} |" in md  # both frameworks in each summary
    assert "| linear_256 | train | plain |" in md
    assert "| register_linear_256 | register | builtin |" in md
    assert "| | | dualsn[paddle] |" in md
    assert "ru_minflt" in md and "torch.profiler" in md and "host_memory_stat" in md


def test_default_run_uses_one_process_per_framework(tmp_path, capsys):
    rc = main(["--quick", "--device", "cpu", "--case", "register_linear_256", "--out", str(tmp_path)])
    assert rc == 0
    md = capsys.readouterr().out
    doc = json.loads((tmp_path / "latest.json").read_text())
    meta = doc["meta"]
    assert meta["isolation"] == "one process per framework" and meta["frameworks"] == ["torch", "paddle"]
    assert set(meta["framework_info"]) == {"torch", "paddle"} and meta["devices"] == ["cpu"]
    assert sorted(r["label"] for r in doc["results"]) == ["paddle", "torch"]
    assert meta["command"].startswith("python -m benchmarks --quick --device cpu")
    assert "one process per framework" in md and "| register_linear_256 | register | dualsn[paddle] |" not in md
    assert "| | | dualsn[paddle] |" in md


def test_gpu_rows_skipped_without_cuda(tmp_path, capsys, monkeypatch):
    """--device auto (the default) without CUDA: CPU rows, and a note that says why no GPU rows."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["--quick", "--framework", "torch", "--case", "register_linear_256", "--out", str(tmp_path)])
    assert rc == 0
    md = capsys.readouterr().out
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["meta"]["devices"] == ["cpu"] and [r["label"] for r in doc["results"]] == ["torch"]
    assert doc["meta"]["isolation"] == "one process"
    assert "skipped: torch GPU rows: torch.cuda.is_available() is False" in md


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


def test_case_selection_and_the_issue_14_grid(capsys):
    convs_b64, unknown = select(["conv_*_b64"])
    assert unknown == [] and convs_b64 == [
        "conv_64x64x3x3_b64", "conv_128x128x3x3_b64", "conv_256x256x3x3_b64", "conv_512x512x3x3_b64"
    ]
    assert [CASES[n].w_shape for n in convs_b64] == [(64, 576), (128, 1152), (256, 2304), (512, 4608)]
    assert select(["linear_256", "linear_*", "nope"])[1] == ["nope"]
    assert select(["linear_256", "linear_256"])[0] == ["linear_256"]
    grid = set(GROUPS["grid"])
    for n in (256, 1024, 2048, 4096):
        assert {f"linear_{n}", f"linear_{n}_b64"} <= grid
    assert all(CASES[n].params["batch"] == (64 if n.endswith("_b64") else 1) for n in grid)
    assert main(["--list"]) == 0
    assert "conv_512x512x3x3_b64" in capsys.readouterr().out


def test_paired_ratios_from_known_samples():
    class _Case:
        name, description, w_shape = "c", "d", (2, 2)

    def st(samples):
        q1, q3 = quartiles(samples)
        return Stats(statistics.median(samples), q1, q3, len(samples), 1, samples, [0.0] * len(samples))

    stats = {
        "plain": st([1.0, 1.0, 1.0]),
        "builtin": st([3.0, 5.0, 1.0]),  # overheads 2, 4, 0 (the last round is left out)
        "dualsn": st([2.0, 2.0, 1.5]),  # overheads 1, 1, 0.5
        "floor:Wv@a": st([0.5, 0.5, 0.5]),
        "floor:Wv@b": st([0.25, 1.0, 0.25]),  # faster median: chosen
    }
    res = report.summarize("x", "x", "cpu", _Case, "eval", stats, tuple(k for k in stats if k.startswith("floor:")),
                           None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert res["floor"]["ops"]["floor:Wv"]["form"] == "b"
    assert rows["dualsn"]["vs_builtin"] == pytest.approx(statistics.median([0.5, 0.25]))
    assert rows["dualsn"]["vs_floor"] == pytest.approx(2.0)  # 1/0.25, 1/1, 0.5/0.25
    assert rows["dualsn"]["pct_of_plain"] == pytest.approx(100.0)
    assert rows["builtin"]["vs_builtin"] == 1.0


def test_page_faults_are_counted():
    size = 4 << 20  # 1024 pages of 4 KiB, touched fresh on every call

    def touch() -> None:
        with mmap.mmap(-1, size) as m:
            m[::4096] = b"x" * (size // 4096)

    stats = measure([Variant("touch", touch)], warmup=0, repeats=2, min_sample_s=0.0, max_inner=2)
    assert stats["touch"].faults_per_call >= 0.9 * size / mmap.PAGESIZE


def test_torch_cpu_peak_replays_the_allocator():
    import torch

    from benchmarks.torch_bench import _cpu_memory

    def build():
        kept = torch.ones(1 << 18)  # 1 MiB, kept across steps (like state a layer holds)

        def step():
            tmp = torch.empty(1 << 20)  # 4 MiB, freed within the step
            tmp.fill_(1.0)
            kept.add_(tmp[: kept.numel()])
            del tmp

        return step

    m = _cpu_memory(build)
    assert 5 << 20 <= m["peak_bytes"] < (5 << 20) + (64 << 10)
    assert (1 << 20) <= m["kept_bytes"] < (1 << 20) + (64 << 10)


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
    assert {floor_part(k) for k in floor.ops} == set(FLOOR_PARTS["train"])
    assert {floor_part(k) for k in floor.for_mode("eval")} == set(FLOOR_PARTS["eval"])
    for op in floor.ops.values():
        op()
    out = floor.outputs()
    assert set(out) == set(floor.ops)
    w64, u, v = w_mat.astype(np.float64), floor.u.astype(np.float64), floor.v.astype(np.float64)
    sigma = u @ w64 @ v
    assert sigma > 0
    expected = {
        "floor:Wv": w64 @ v,
        "floor:WHu": w64.T @ u,
        "floor:rescale": w64 / sigma,
        "floor:rank1_grad": numpy_ref.normalized_weight_grad(
            floor.grad.astype(np.float64), w64, u, v, 0, spec.PRESETS["torch"]
        ),
    }
    for name, got in out.items():
        np.testing.assert_allclose(got, expected[floor_part(name)], rtol=1e-5, atol=1e-5, err_msg=name)


def test_versus_imports_a_revision_beside_todays_package(tmp_path, capsys):
    """benchmarks.versus: the package at a git revision (here HEAD, today's committed code)
    imports under its own name, computes what today's does for the same seeded layer, and a
    short run prints the before / after lines."""
    import torch

    from benchmarks import versus

    try:
        old = versus.load_revision("HEAD", "torch", tmp_path)
        assert old.__name__ == "dualsn_HEAD.torch"
        assert Path(old.__file__).is_relative_to(tmp_path)
        import dualsn.torch as new

        outputs = []
        for package in (old, new):
            torch.manual_seed(0)
            layer = package.spectral_norm(torch.nn.Linear(6, 5), seed=3)
            outputs.append(layer(torch.ones(2, 6)).detach())
        assert torch.equal(outputs[0], outputs[1])
        assert versus.main(["HEAD", "--rounds", "2", "--calls", "2", "--warmup", "1", "--size", "16"]) == 0
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "dualsn_HEAD"]:
            del sys.modules[name]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("torch linear_16 train, 2 rounds of 2 calls: plain ")
    assert out[1].lstrip().startswith("before (HEAD): overhead ") and "/ built-in's" in out[1]
    assert out[2].lstrip().startswith("after  (working tree): overhead ")
