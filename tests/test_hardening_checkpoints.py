"""Issue 12, section 3: reading checkpoints a hostile or unlucky user hands over.

Malformed slice tables, files that decode to more than they hold, FIFOs and devices, format
detection for every kind of path, and the nested containers ``paddle.save`` writes (with code
still refused).
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest

from dualsn import port

MA = getattr(np, "_core", None) or np.core
MA = MA.multiarray
UNPACK = "UnpackBigParamInfor@@"  # sic, Paddle's spelling


def write_pickle(path, obj, protocol=2) -> str:
    pathlib.Path(path).write_bytes(pickle.dumps(obj, protocol=protocol))
    return str(path)


def peak_bytes(fn) -> int:
    """The peak of Python-tracked allocations (numpy's array data included) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def refused(path) -> str:
    with pytest.raises(port.CheckpointError) as info:
        port.load_checkpoint(path)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Slice tables (paddle.save's record of arrays over 1 GiB split into 1-D slices)

A6 = np.arange(6, dtype=np.float32)


@pytest.mark.parametrize(
    "entries, table, message",
    [
        ({"w@@.0": A6}, {"w": {"OriginShape": (6,)}}, "'w': no 'slices' list"),
        ({"w@@.0": A6}, {"w": {"OriginShape": (6,), "slices": 5}}, "'w': 'slices' is not a list of names: 5"),
        ({"w@@.0": A6}, {"w": {"OriginShape": (6,), "slices": [0]}}, "'w': 'slices' is not a list of names: [0]"),
        ({"w@@.0": A6}, {"w": {"slices": ["w@@.0"]}}, "'w': no 'OriginShape'"),
        ({"w@@.0": A6}, {"w": {"OriginShape": (-6,), "slices": ["w@@.0"]}}, "'OriginShape' (-6,) is not a shape"),
        ({"w@@.0": A6}, {"w": {"OriginShape": "6", "slices": ["w@@.0"]}}, "'OriginShape' '6' is not a shape"),
        ({"w@@.0": A6}, {"w": {"OriginShape": (12,), "slices": ["w@@.0", "w@@.1"]}},
         "slice 'w@@.1' is not in the file"),
        ({"w@@.0": A6}, {"w": {"OriginShape": (12,), "slices": ["w@@.0", "w@@.0"]}},
         "slice 'w@@.0' is listed twice"),
        ({"w@@.0": A6, "v@@.0": A6}, {"w": {"OriginShape": (6,), "slices": ["w@@.0"]},
                                      "v": {"OriginShape": (6,), "slices": ["w@@.0"]}},
         "slice 'w@@.0' is listed twice"),
        ({"w@@.0": A6}, {"w": {"OriginShape": (7,), "slices": ["w@@.0"]}},
         "the slices hold 6 elements, 'OriginShape' (7,) needs 7"),
        ({"w@@.0": A6.reshape(2, 3)}, {"w": {"OriginShape": (6,), "slices": ["w@@.0"]}},
         "slice 'w@@.0' is not a 1-D array"),
        ({"w@@.0": A6, "w@@.1": A6.astype(np.float64)},
         {"w": {"OriginShape": (12,), "slices": ["w@@.0", "w@@.1"]}}, "slices of different dtypes"),
        ({"w@@.0": A6, "w": A6}, {"w": {"OriginShape": (6,), "slices": ["w@@.0"]}},
         "'w' is both an entry and a sliced array"),
        ({"w@@.0": A6}, ["w"], "is a list, not a table"),
        ({"w@@.0": A6}, {"w": ["w@@.0"]}, "'w': its entry is a list, not a table"),
    ],
    ids=["no-slices", "slices-int", "slice-name-int", "no-shape", "negative-shape", "shape-str",
         "out-of-range", "listed-twice", "used-by-two", "wrong-total", "not-1d", "mixed-dtypes",
         "collision", "table-list", "entry-list"],
)
def test_malformed_slice_tables_are_checkpoint_errors(tmp_path, entries, table, message):
    path = write_pickle(tmp_path / "s.pdparams", {**entries, UNPACK: table})
    text = refused(path)
    assert message in text, text
    assert "UnpackBigParamInfor@@" in text


def test_two_slice_names_for_one_array_are_refused(tmp_path):
    # The same array object under two slice names (the pickle memo): joining would copy it twice.
    shared = np.arange(4, dtype=np.float32)
    path = write_pickle(tmp_path / "s.pdparams", {
        "w@@.0": shared, "w@@.1": shared, UNPACK: {"w": {"OriginShape": (8,), "slices": ["w@@.0", "w@@.1"]}}})
    assert "slices 'w@@.0' and 'w@@.1' are the same data" in refused(path)


def test_every_slice_problem_is_listed_at_once(tmp_path):
    path = write_pickle(tmp_path / "s.pdparams", {"a@@.0": A6, UNPACK: {
        "a": {"OriginShape": (7,), "slices": ["a@@.0"]},
        "b": {"OriginShape": (6,), "slices": ["b@@.0"]},
    }})
    text = refused(path)
    assert "'a': the slices hold 6 elements" in text and "'b': slice 'b@@.0' is not in the file" in text


# ---------------------------------------------------------------------------------------------
# Bounded amplification: a file decodes to at most its size (+ port.SIZE_SLACK) of tensor data


class _Reduce:
    """Pickles as ``func(*args)`` (plus an optional BUILD state)."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def test_a_forged_shape_is_refused_before_allocating(tmp_path):
    # _reconstruct with a 400 MB shape and no data: numpy would allocate it uninitialized.
    forged = _Reduce(MA._reconstruct, (np.ndarray, (100_000_000,), np.dtype("f4")))
    path = write_pickle(tmp_path / "f.pdparams", {"w": forged})
    assert os.path.getsize(path) < 1000
    text = []
    peak = peak_bytes(lambda: text.append(refused(path)))
    assert "_reconstruct" in text[0] and "(100000000,)" in text[0]
    assert peak < 10 * 2**20


def test_a_stride_0_table_is_refused_before_allocating(tmp_path):
    # numpy.ndarray called directly: two 4 TiB stride-0 views of 4 bytes, joined by a slice table.
    huge = _Reduce(np.ndarray, ((2**40,), np.dtype("f4"), b"\0\0\0\0", 0, (0,)))
    path = write_pickle(tmp_path / "z.pdparams", {
        "w@@.0": huge, "w@@.1": huge, UNPACK: {"w": {"OriginShape": (2, 2**40), "slices": ["w@@.0", "w@@.1"]}}})
    text = []
    peak = peak_bytes(lambda: text.append(refused(path)))
    assert "numpy.ndarray" in text[0] and "called directly" in text[0]
    assert peak < 10 * 2**20


def test_reused_array_data_cannot_exceed_the_file_size(tmp_path):
    # One 1 MiB buffer, memoized by the pickler, feeds 64 arrays: a 1 MiB file that decodes to 64 MiB.
    raw = bytes(2**20)
    arrays = {f"w{i}": _Reduce(MA._reconstruct, (np.ndarray, (0,), b"b"), (1, (2**20,), np.dtype("u1"), False, raw))
              for i in range(64)}
    path = write_pickle(tmp_path / "r.pdparams", arrays, protocol=4)
    size = os.path.getsize(path)
    assert size < 2 * 2**20
    text = []
    peak = peak_bytes(lambda: text.append(refused(path)))
    assert f"more than the file's {size} bytes" in text[0]
    assert peak < 6 * size


def test_a_declared_length_beyond_the_file_is_refused(tmp_path):
    # BINBYTES8 declaring 400 MB in a file of a few bytes: pickle would allocate it first.
    path = tmp_path / "l.pdparams"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 400 * 2**20) + b"abc")
    text = []
    peak = peak_bytes(lambda: text.append(refused(path)))
    assert "declares 419430400 bytes" in text[0]
    assert peak < 10 * 2**20


def test_a_legitimate_file_fits_the_bound(tmp_path):
    # Every pickled array carries its bytes: a real state dict is within the bound at any protocol.
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal((64, 32)).astype(np.float32) for i in range(8)}
    for protocol in (2, 3, 4):
        path = write_pickle(tmp_path / f"ok{protocol}.pdparams", state, protocol=protocol)
        loaded = port.load_checkpoint(path)
        assert sorted(loaded) == sorted(state)
        for key in state:
            np.testing.assert_array_equal(loaded[key], state[key])


def test_object_arrays_are_refused_without_crashing(tmp_path):
    # numpy crashes (segfault) on an object array whose list is shorter than its shape: run it
    # in a child process so that the old behaviour fails this test instead of killing pytest.
    forged = _Reduce(MA._reconstruct, (np.ndarray, (0,), b"b"), (1, (10,), np.dtype("O"), False, [1]))
    path = write_pickle(tmp_path / "o.pdparams", {"w": forged})
    code = textwrap.dedent(f"""
        from dualsn import port
        try:
            port.load_checkpoint({path!r})
        except port.CheckpointError as e:
            print("refused:", e)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "object" in result.stdout


def test_only_the_latin1_codec_is_accepted(tmp_path):
    # Protocol 2 spells bytes as _codecs.encode(text, "latin1"); any other codec is refused.
    import _codecs

    path = write_pickle(tmp_path / "c.pdparams", {"w": _Reduce(_codecs.encode, (b"x" * 10, "zlib_codec"))})
    assert "_codecs.encode" in refused(path)


# ---------------------------------------------------------------------------------------------
# Only regular files


def _in_thread(fn, deadline=20.0):
    """Run ``fn`` in a thread; the exception it raised, or "blocked" after ``deadline``."""
    result = {}

    def target():
        try:
            fn()
            result["value"] = None
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            result["value"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(deadline)
    return "blocked" if thread.is_alive() else result["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("call", [port.load_checkpoint, port.detect_format], ids=["load", "detect"])
def test_a_fifo_is_refused_at_once(tmp_path, call):
    fifo = tmp_path / "ck.pdparams"
    os.mkfifo(fifo)
    outcome = _in_thread(lambda: call(fifo))
    if outcome == "blocked":  # release the reader so that the thread ends, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail(f"{call.__name__} blocked on a FIFO")
    assert isinstance(outcome, port.CheckpointError), outcome
    assert "not a regular file (a FIFO)" in str(outcome)


def test_a_directory_and_a_device_are_refused(tmp_path):
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(port.CheckpointError, match=r"not a regular file \(a directory\)"):
        port.load_checkpoint(tmp_path / "d.pt")
    if os.path.exists("/dev/zero"):
        outcome = _in_thread(lambda: port.load_checkpoint("/dev/zero"))
        assert isinstance(outcome, port.CheckpointError), outcome
        assert "not a regular file (a character device)" in str(outcome)
    with pytest.raises(FileNotFoundError):
        port.load_checkpoint(tmp_path / "missing.pdparams")


# ---------------------------------------------------------------------------------------------
# Format detection: by content, the same for every kind of path


def _outcome(fn, path):
    try:
        return "ok", fn(path)
    except port.CheckpointError as e:
        return "error", str(e).replace(os.fsdecode(path), "<path>")


@pytest.fixture
def checkpoint_files(tmp_path):
    torch = pytest.importorskip("torch")
    files = {}
    torch.save({"w": torch.arange(3.0)}, tmp_path / "zip.bin")
    torch.save({"w": torch.arange(3.0)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    write_pickle(tmp_path / "paddle.bin", {"w": np.arange(3, dtype=np.float32)})
    (tmp_path / "paddle.pt").write_bytes((tmp_path / "paddle.bin").read_bytes())
    (tmp_path / "zip.pdparams").write_bytes((tmp_path / "zip.bin").read_bytes())
    (tmp_path / "legacy.pdparams").write_bytes((tmp_path / "legacy.bin").read_bytes())
    (tmp_path / "text.pt").write_text("hello")
    for name in ("zip.bin", "legacy.bin", "paddle.bin", "paddle.pt", "zip.pdparams", "legacy.pdparams", "text.pt"):
        files[name] = tmp_path / name
    return files


def test_format_detection_is_the_same_for_str_bytes_and_pathlike(checkpoint_files):
    expected = {"zip.bin": "torch", "legacy.bin": "torch", "paddle.bin": "paddle"}
    for name, path in checkpoint_files.items():
        outcomes = [_outcome(port.detect_format, p) for p in (str(path), os.fsencode(path), path)]
        assert outcomes[0] == outcomes[1] == outcomes[2], (name, outcomes)
        if name in expected:
            assert outcomes[0] == ("ok", expected[name]), (name, outcomes)
        else:
            assert outcomes[0][0] == "error", (name, outcomes)
        loads = [_outcome(port.load_checkpoint, p) for p in (str(path), os.fsencode(path), path)]
        assert [kind for kind, _ in loads] == [outcomes[0][0]] * 3, (name, loads)
    messages = {name: _outcome(port.detect_format, path)[1] for name, path in checkpoint_files.items()}
    assert ("not a torch checkpoint: it is a pickle that is not torch's (a Paddle .pdparams file?)"
            in messages["paddle.pt"])
    assert "not a Paddle .pdparams checkpoint: it is a zip archive (a torch checkpoint?)" in messages["zip.pdparams"]
    assert "not a Paddle .pdparams checkpoint: it is a torch checkpoint (legacy format)" in messages["legacy.pdparams"]
    assert "not a torch checkpoint (neither a zip archive nor a pickle)" in messages["text.pt"]


def test_torch_files_are_read_by_content_whatever_their_name(checkpoint_files):
    torch = pytest.importorskip("torch")
    for name in ("zip.bin", "legacy.bin"):
        state = port.load_checkpoint(os.fsencode(checkpoint_files[name]))
        assert torch.equal(state["w"], torch.arange(3.0))


def test_a_zip_that_inflates_beyond_the_file_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (8 * 2**20))
    assert os.path.getsize(path) < 2**20
    assert "unpack to 8388608 bytes" in refused(path)


# ---------------------------------------------------------------------------------------------
# Nested containers: accepted as written; code still refused


def assert_same_tree(a, b, where="root"):
    if isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), where
        for key in b:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}.{i}")
    elif isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert type(a) is type(b) and a == b, where


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_nested_paddle_save_is_read_as_written(tmp_path, protocol):
    paddle = pytest.importorskip("paddle")
    paddle.seed(0)
    net_g, net_d = paddle.nn.Linear(3, 4), paddle.nn.Conv2D(2, 3, 3)
    checkpoint = {"netG": net_g.state_dict(), "netD": net_d.state_dict(), "epoch": 7,
                  "meta": {"lr": 0.5, "name": "run", "betas": [0.0, 0.9], "none": None}}
    path = str(tmp_path / f"trainer{protocol}.pdparams")
    paddle.save(checkpoint, path, protocol=protocol)
    loaded = port.load_checkpoint(path)
    assert_same_tree(loaded, paddle.load(path, return_numpy=True))  # what Paddle itself reads
    assert isinstance(loaded["netG"], collections.OrderedDict)
    np.testing.assert_array_equal(loaded["netG"]["weight"], net_g.weight.numpy())
    flat = port.flatten_state_dict(loaded)
    assert sorted(k for k in flat if k.startswith("net")) == [
        "netD.bias", "netD.weight", "netG.bias", "netG.weight"]
    assert flat["epoch"] == 7 and flat["meta.lr"] == 0.5


def test_nested_torch_checkpoint_is_read_as_written(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}, tmp_path / "c.pt")
    loaded = port.load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["state_dict"]["weight"], net.weight.detach())
    assert loaded["epoch"] == 2 and loaded["optimizer"]["param_groups"][0]["lr"] == 1e-3
    flat = port.flatten_state_dict(loaded)
    assert torch.equal(flat["optimizer.state.0.exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_nested_state_dict_ports_with_dotted_keys(tmp_path):
    torch = pytest.importorskip("torch")
    paddle = pytest.importorskip("paddle")
    paddle.seed(1)
    source = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 2))
    nested = {"0": source[0].state_dict(), "1": source[1].state_dict()}
    path = str(tmp_path / "n.pdparams")
    paddle.save(nested, path)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    port.load_state_dict(target, port.load_checkpoint(path), source="paddle")
    np.testing.assert_array_equal(target[1].weight.detach().numpy(), source[1].weight.numpy().T)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_code_in_a_nested_container_is_still_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "e.pdparams",
                        {"netG": {"weight": ("w", np.zeros(2, np.float32)), "x": [_Evil(marker)]}}, protocol)
    assert f"refused global {os.system.__module__}.system" in refused(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"w": _Reduce(eval, ("data", {"data": np.zeros(2)}))}, "refused global builtins.eval"),
        ({"w": _Reduce(tuple, (np.arange(1000),))}, "builtins.tuple only rebuilds Paddle's (name, array) pairs"),
        ({"w": _Reduce(collections.OrderedDict, ([("a", 1)],))}, "collections.OrderedDict with arguments"),
        ({"w": _Reduce(getattr, ("text", "upper"))}, "refused global builtins.getattr"),
    ],
    ids=["eval", "tuple-of-array", "ordereddict-args", "getattr"],
)
def test_globals_are_refused_outside_paddles_own_use(tmp_path, obj, message):
    path = write_pickle(tmp_path / "g.pdparams", obj)
    assert message in refused(path)


def test_legitimate_paddle_output_no_longer_reads_as_a_safety_rejection(tmp_path):
    paddle = pytest.importorskip("paddle")
    path = str(tmp_path / "t.pdparams")
    paddle.save({"model": paddle.nn.Linear(2, 2).state_dict(), "step": 1}, path)
    try:
        port.load_checkpoint(path)
    except port.CheckpointError as e:  # pragma: no cover - the failure this test looks for
        pytest.fail(f"refused: {e}")


def _deep_list_pickle(depth: int) -> bytes:
    # {"x": [[[...]]]} depth lists deep, written with opcodes (pickle.dumps would recurse).
    return (b"\x80\x02}X\x01\x00\x00\x00x" + b"]" * depth + b"a" * (depth - 1) + b"s.")


def test_cycles_and_deep_nesting_are_checkpoint_errors(tmp_path):
    loop: list = []
    loop.append(loop)
    path = write_pickle(tmp_path / "cycle.pdparams", {"x": loop})
    assert "contains itself" in refused(path)
    deep = tmp_path / "deep.pdparams"
    deep.write_bytes(_deep_list_pickle(100_000))
    assert f"nested more than {port.MAX_NESTING} levels deep" in refused(deep)


def test_shared_containers_are_kept_shared(tmp_path):
    common = {"lr": 0.1}
    path = write_pickle(tmp_path / "s.pdparams", {"args": common, "config": common, "w": np.ones(2, np.float32)})
    loaded = port.load_checkpoint(path)
    assert loaded["args"] is loaded["config"] and loaded["args"] == {"lr": 0.1}
    with pytest.raises(ValueError, match="reached twice"):
        port.flatten_state_dict(loaded)


def test_keys_must_be_strings_or_integers(tmp_path):
    path = write_pickle(tmp_path / "k.pdparams", {"w": {(1, 2): np.ones(2, np.float32)}})
    assert "key (1, 2) at 'w' is a tuple" in refused(path)
