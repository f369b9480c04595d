""".pdparams files, read and written without Paddle (the format is pickle and numpy): a
restricted unpickler that admits only what ``paddle.save`` writes, so nothing from the file runs,
the join of the arrays it splits into slices, and what ``paddle.save`` writes for a state dict."""

from __future__ import annotations

import _compat_pickle
import collections
import math
import pickle
from typing import Any, Mapping

import numpy as np

from dualsn.port._limits import SIZE_SLACK, _brief
from dualsn.port._metadata import METADATA_ATTRIBUTE
from dualsn.port._tensors import _to_numpy
from dualsn.port._types import CheckpointError


_UNPACK = "UnpackBigParamInfor@@"  # sic, Paddle's spelling: arrays over 1 GiB split into slices
_PARAMETER_NAMES = "StructuredToParameterName@@"  # paddle.save's table of parameter names


def _multiarray():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 / numpy 1.x
    return core.multiarray


class _BoundedReader:
    """The file as the unpickler reads it: a length the pickle declares is checked against the
    bytes left in the file before anything is read (or allocated) for it."""

    def __init__(self, file, size: int):
        self._file, self._left = file, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        if n > self._left:
            raise pickle.UnpicklingError(
                f"the pickle declares {n} bytes where the file has {self._left} left (truncated or forged)")
        data = self._file.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("the file shrank while it was read")
        self._left -= n
        return data

    def readline(self) -> bytes:
        line = self._file.readline(self._left)
        self._left -= len(line)
        return line


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a .pdparams pickle, where numpy writes an array as
    ``_reconstruct(ndarray, (0,), b"b")`` followed by its data. Nothing else may use it."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(
            "refused numpy.ndarray called directly: a pickled array is rebuilt from its own bytes, "
            "never from a shape (or a buffer and strides) alone")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()


def _ordered_dict(*args, **kwargs):
    if args or kwargs:
        raise pickle.UnpicklingError(
            "refused collections.OrderedDict with arguments: a pickled OrderedDict is made empty, "
            "then filled")
    return collections.OrderedDict()


def _paddle_pair(pair):
    """``builtins.tuple`` as paddle.save uses it: a nested tensor is ``tuple((name, array))``."""
    if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], np.ndarray)):
        raise pickle.UnpicklingError(
            "refused builtins.tuple on something else: builtins.tuple only rebuilds Paddle's "
            "(name, array) pairs")
    return pair


def _is_shape(shape) -> bool:
    return isinstance(shape, (tuple, list)) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape)


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickles what ``paddle.save`` writes: containers, numpy arrays and scalars, and Paddle's
    (name, array) pairs for nested tensors. Every other global is refused, so no callable the
    file names is ever looked up, let alone run, and the allowed ones are wrappers that accept
    only numpy's and Paddle's own uses. Array data is counted as it is decoded: more than the
    file's size (+ SIZE_SLACK) is refused before it is allocated. The pure-Python unpickler
    reads each declared length through :class:`_BoundedReader` before allocating for it (the C
    one allocates first)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: _BoundedReader, size: int):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 str of numpy data
        self._size = size
        self._decoded = {"array": 0, "bytes": 0}
        self._ma = _multiarray()
        self._allowed = {
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._encode,
            ("collections", "OrderedDict"): _ordered_dict,
            ("builtins", "tuple"): _paddle_pair,
        }
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2
            self._allowed[(module, "_reconstruct")] = self._reconstruct
            self._allowed[(module, "scalar")] = self._scalar

    def find_class(self, module: str, name: str):
        if self.proto < 3:  # Python 2 names, as pickle's own find_class maps them
            module, name = _compat_pickle.NAME_MAPPING.get(
                (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {_brief(module)}.{_brief(name)}: a .pdparams file holds only "
                "containers, numpy arrays and scalars"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: not a Paddle state dict")

    def _charge(self, kind: str, nbytes: int) -> None:
        self._decoded[kind] += nbytes
        if self._decoded[kind] > self._size + SIZE_SLACK:
            raise pickle.UnpicklingError(
                f"its {kind} data decodes to more than the file's {self._size} bytes (+{SIZE_SLACK}): "
                "the file uses the same data again, which paddle.save never does; refused before "
                "allocating it")

    def _dtype(self, *args):
        dtype = np.dtype(*args)
        if dtype.hasobject:
            raise pickle.UnpicklingError(f"refused dtype {dtype}: Python objects are not tensor data")
        return dtype

    def _reconstruct(self, cls, shape, code):
        if cls is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
            raise pickle.UnpicklingError(
                f"refused _reconstruct{_brief(repr((cls, shape, code)))}: numpy pickles an array as "
                "_reconstruct(numpy.ndarray, (0,), b'b') followed by its data")
        return self._ma._reconstruct(np.ndarray, (0,), b"b")

    def _scalar(self, dtype, data=None):
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, str)) \
                or len(data) != dtype.itemsize:
            raise pickle.UnpicklingError(
                f"refused scalar({_brief(repr(dtype))}, ...): a numpy scalar is its dtype and "
                "exactly that many bytes")
        self._charge("array", dtype.itemsize)
        return self._ma.scalar(dtype, data)

    def _encode(self, text, encoding="utf-8", errors="strict"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise pickle.UnpicklingError(
                f"refused _codecs.encode(..., {_brief(repr(encoding))}): pickle protocol 2 spells "
                "bytes as _codecs.encode(text, 'latin1') only")
        self._charge("bytes", len(text))
        return text.encode("latin1")

    def _check_array_state(self, state) -> None:
        """numpy's array state (version, shape, dtype, fortran, data): data of exactly the
        size the shape needs, and no Python objects, checked before numpy allocates."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("refused an array state that is not numpy's")
        shape, dtype, _, data = state[-4:]
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError(
                f"refused an array of dtype {_brief(str(dtype))}: Python objects are not tensor data")
        if not (isinstance(shape, tuple) and _is_shape(shape)) or not isinstance(data, (bytes, str)):
            raise pickle.UnpicklingError("refused an array state that is not numpy's")
        nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
        if nbytes != len(data):
            raise pickle.UnpicklingError(
                f"refused an array of shape {_brief(str(shape))} and dtype {dtype} ({nbytes} bytes) "
                f"with {len(data)} bytes of data")
        self._charge("array", nbytes)

    def _load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.ndarray):
            self._check_array_state(state)
        elif type(inst) is collections.OrderedDict:
            if not (isinstance(state, dict) and set(state) == {METADATA_ATTRIBUTE}):
                raise pickle.UnpicklingError(
                    f"refused to set the state of an OrderedDict: only dualsn's {METADATA_ATTRIBUTE!r} "
                    "record may be set on one")
        elif not isinstance(inst, np.dtype):
            raise pickle.UnpicklingError(
                f"refused to set the state of a {type(inst).__name__}: in a .pdparams file only "
                "numpy arrays and dtypes have one")
        pickle._Unpickler.load_build(self)

    def _refuse_buffer(self):
        raise pickle.UnpicklingError("refused an out-of-band buffer (pickle protocol 5): paddle.save "
                                     "never writes one")

    dispatch[pickle.BUILD[0]] = _load_build
    for _opcode in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_opcode[0]] = _refuse_buffer
    del _opcode


def _slice_plan(top: dict, key, info, claimed: dict, arrays_seen: dict):
    """(slice names, arrays, shape) for one entry of a slice table, or its problems (list)."""
    if not isinstance(info, Mapping):
        return [f"{key!r}: its entry is a {type(info).__name__}, not a table"]
    names, shape = info.get("slices"), info.get("OriginShape")
    if names is None:
        return [f"{key!r}: no 'slices' list"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        return [f"{key!r}: 'slices' is not a list of names: {_brief(repr(names))}"]
    if shape is None:
        return [f"{key!r}: no 'OriginShape'"]
    if not _is_shape(shape):
        return [f"{key!r}: 'OriginShape' {_brief(repr(shape))} is not a shape"]
    if not isinstance(key, str) or key in top:
        return [f"{key!r} is both an entry and a sliced array" if isinstance(key, str)
                else f"{key!r}: the name of a sliced array must be a string"]
    problems, arrays = [], []
    for name in names:
        if name in claimed:
            problems.append(f"{key!r}: slice {name!r} is listed twice")
            continue
        claimed[name] = key
        value = top.get(name)
        if name not in top:
            problems.append(f"{key!r}: slice {name!r} is not in the file")
        elif not isinstance(value, np.ndarray) or value.ndim != 1:
            problems.append(f"{key!r}: slice {name!r} is not a 1-D array")
        elif arrays_seen.setdefault(id(value), name) != name:
            problems.append(f"{key!r}: slices {arrays_seen[id(value)]!r} and {name!r} are the same data")
        else:
            arrays.append(value)
    if problems:
        return problems
    if len({a.dtype for a in arrays}) > 1:
        return [f"{key!r}: slices of different dtypes ({', '.join(sorted({str(a.dtype) for a in arrays}))})"]
    total, need = sum(a.size for a in arrays), math.prod(int(n) for n in shape)
    if total != need:
        return [f"{key!r}: the slices hold {total} elements, 'OriginShape' {tuple(shape)} needs {need}"]
    return list(names), arrays, tuple(int(n) for n in shape)


def _join_slices(top: dict, shown: str) -> None:
    """Join the arrays paddle.save (protocols 2, 3) split into 1-D slices, after checking the
    whole table: every slice present, used once, and exactly as large as the shape needs."""
    table = top.pop(_UNPACK, None)
    if table is None:
        return
    what = f"{shown}: malformed {_UNPACK!r} table (paddle.save's record of arrays split into slices)"
    if not isinstance(table, Mapping):
        raise CheckpointError(f"{what}: it is a {type(table).__name__}, not a table")
    plans, problems, claimed, arrays_seen = {}, [], {}, {}
    for key, info in table.items():
        plan = _slice_plan(top, key, info, claimed, arrays_seen)
        if isinstance(plan, list):
            problems += plan
        else:
            plans[key] = plan
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    for key, (names, arrays, shape) in plans.items():
        for name in names:
            del top[name]
        top[key] = np.concatenate(arrays).reshape(shape)


def _load_pdparams(file, size: int, shown: str) -> dict:
    try:
        obj = _RestrictedUnpickler(_BoundedReader(file, size), size).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{shown}: {e}") from None
    except Exception as e:  # truncated or garbled files  # noqa: BLE001
        raise CheckpointError(
            f"{shown}: not a readable .pdparams pickle ({type(e).__name__}: {_brief(str(e))})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{shown}: holds a {type(obj).__name__}, not a state dict")
    top = collections.OrderedDict(obj) if isinstance(obj, collections.OrderedDict) else dict(obj)
    if METADATA_ATTRIBUTE in getattr(obj, "__dict__", {}):
        setattr(top, METADATA_ATTRIBUTE, obj.__dict__[METADATA_ATTRIBUTE])
    top.pop(_PARAMETER_NAMES, None)
    _join_slices(top, shown)
    return top


def _pdparams_data(state_dict: Mapping[str, Any]) -> collections.OrderedDict:
    """What ``paddle.save`` writes for ``state_dict``: numpy arrays, plus its parameter-name table."""
    data = collections.OrderedDict((k, np.array(_to_numpy(v))) for k, v in state_dict.items())
    data[_PARAMETER_NAMES] = {k: k for k in state_dict}
    return data


def _save_pdparams(data, file) -> None:
    pickle.dump(data, file, protocol=4)
