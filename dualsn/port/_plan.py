"""Planning: decide, for every target tensor, where it comes from and how, convert every source
value it needs, and collect every problem, before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from dualsn.adapters import adapter as _adapter
from dualsn.adapters import framework_of
from dualsn.spec import DEFAULT_EPS, same_algorithm
from dualsn.keys import EXTRA_ROLES, PARAMETRIZED_PATTERN, STATE_ROLES, group_keys, join_key, sn_keys, sn_param_of
from dualsn.layout import NATIVE_LINEAR
from dualsn.port._keys import _RESHAPED, _inferred_preset, _rename
from dualsn.port._orientation import _dim_mismatch, _orientation_fits, _orientation_problem, _transposed_fits_better
from dualsn.port._tensors import _degenerate, _dtype_name, _is_tensor, _shape, _source_numpy, _Unloadable
from dualsn.port._types import Entry, PresetMismatch


@dataclass
class _Step:
    entry: Entry
    target: Any  # the live target tensor
    reshape: bool = False  # see _RESHAPED
    synth_from: str | None = None  # u, v (extra rows) of a matrix-mode 1-D norm, from an exact norm's W
    eps: float = DEFAULT_EPS
    sigma_of: tuple[Any, str] | None = None  # (layer, param): a _sigma computed after loading
    array: np.ndarray | None = None  # what the write phase copies into ``target``, prepared in the plan


DEGENERATE_HINT = (
    "refused (pass allow_degenerate=True, or --allow-degenerate on the command line, to load it anyway)"
)


class _Planner:
    """Decides, for every target tensor, which source tensor fills it and how, converts that
    source value to the array the write phase copies, and collects every problem on the way.
    Reads both sides; writes nothing."""

    def __init__(self, target, state_dict: Mapping[str, Any], source: str, source_layouts, source_dims,
                 allow_degenerate: bool = False, source_presets=None):
        self.target_fw = framework_of(target)
        self.adapter = _adapter(self.target_fw)
        self.target_state = self.adapter.state(target)
        self.layers = self.adapter.layers(target)
        self.state_dict = state_dict
        self.source = source
        self.source_layouts = source_layouts  # prefix -> Linear layout; None: native layouts
        self.source_dims = source_dims  # (prefix, param) -> spectral-norm dim; None: unknown
        self.allow_degenerate = allow_degenerate
        self.source_presets = {} if source_presets is None else source_presets  # "layer.param" -> (preset, basis)
        self.mismatches: list[PresetMismatch] = []
        self.steps: list[_Step] = []
        self.problems: list[str] = []
        self.missing: list[tuple[str, str]] = []  # (key, message)
        self.consumed: set[str] = set()

        source_groups = group_keys(state_dict)
        for prefix, t_locals in group_keys(self.target_state).items():
            self._layer(prefix, t_locals, source_groups.get(prefix, {}))
        self.unexpected = [(k, f"unexpected in the source: {k!r}") for k in state_dict if k not in self.consumed]

    def _layer(self, prefix: str, t_locals: dict[str, str], s_locals: dict[str, str]) -> None:
        layer = self.layers.get(prefix)
        kind, t_layout = self.adapter.layer_kind(layer) if layer is not None else ("other", None)
        if self.source_layouts is None:
            s_layout = NATIVE_LINEAR[self.source]
        else:  # a layer that is no Linear in the source model keeps the target's layout
            s_layout = self.source_layouts.get(prefix, t_layout)
        first = len(self.steps)
        for local, key in t_locals.items():
            self._tensor(prefix, layer, kind, (t_layout, s_layout), local, key, t_locals, s_locals)
        self._leftovers(kind, t_locals, s_locals)
        if self.source_dims is None and layer is not None:  # a raw state dict: dims unknown
            self._check_orientations(prefix, layer, kind, t_layout, self.steps[first:])

    def _tensor(self, prefix, layer, kind, layouts, local, key, t_locals, s_locals) -> None:
        t_layout, s_layout = layouts
        tensor = self.target_state[key]
        if not _is_tensor(tensor):  # e.g. a torch module's get_extra_state()
            self.problems.append(f"{key!r} in the target is a {type(tensor).__name__}, not a tensor")
            return
        shape = _shape(tensor)
        sn = sn_param_of(local, t_locals)
        info = self.adapter.sn_info(layer, sn[0]) if (sn and layer is not None) else None
        if sn is not None and info is None and not PARAMETRIZED_PATTERN.match(local):
            sn = None  # a buffer that merely ends in _u / _v / _orig
        param, role = sn if sn else (local, "")
        s_param = _rename(param, kind, self.source, self.target_fw)
        transposed = (kind == "linear" and param == "weight" and role in ("", "original")
                      and t_layout != s_layout and len(shape) == 2)

        s_sn = sn_keys(s_locals, s_param)
        source_key = _source_key(role, s_param, s_locals, s_sn)
        if source_key is None:
            self._no_source(prefix, kind, local, key, tensor, param, s_param, role, info, s_sn)
            return

        self.consumed.add(source_key)
        value = self.state_dict[source_key]
        if not _is_tensor(value):
            self.problems.append(f"{source_key!r} is a {type(value).__name__}, not a tensor")
            return
        if self.adapter.is_meta(tensor):
            self.problems.append(f"{key!r} in the target is a meta tensor, which has no storage to "
                                 "load into: materialize the model first, e.g. model.to_empty(device='cpu')")
            return
        problems_before = len(self.problems)
        s_shape = _shape(value)
        expected = tuple(reversed(s_shape)) if transposed and len(s_shape) == 2 else s_shape
        reshape = (param in _RESHAPED.get(kind, ()) and role in ("", "original")
                   and self.source != self.target_fw and s_shape != shape
                   and int(np.prod(s_shape)) == int(np.prod(shape)))
        if reshape:
            expected = shape
        if expected != shape:
            how = " after transposing" if transposed else ""
            self.problems.append(
                f"shape mismatch for {key!r}: the target has {list(shape)}, the source "
                f"{source_key!r} gives {list(expected)}{how}"
            )
        self._check_dtype(key, tensor, source_key, value)
        if role == "original" and info and "original" in s_sn:
            self._compare_presets(prefix, layer, param, s_param, s_sn)
        if role == "original" and info and self.source_dims and (prefix, s_param) in self.source_dims:
            self._check_dim(join_key(prefix, param), kind, layouts, info, self.source_dims[(prefix, s_param)],
                            transposed)
        note = f"reshaped {list(s_shape)} -> {list(shape)}" if reshape else ""
        entry = Entry(key, source_key, shape, transposed, role, param if role else "", note)
        step = _Step(entry, tensor, reshape=reshape)
        if len(self.problems) == problems_before:  # it fits: convert it now, before any write
            step.array = self._prepared(step, value)
        self.steps.append(step)

    def _check_dim(self, name, kind, layouts, info, s_dim, transposed) -> None:
        """A problem when the source's spectral norm took this weight along another axis than
        the target's does (the live path, where the source's dim is known)."""
        t_layout, s_layout = layouts
        fitting = (1 - s_dim) if (transposed and s_dim is not None) else s_dim
        if info[0] != fitting:
            self.problems.append(_dim_mismatch(name, kind, (t_layout, info[0]), (s_layout, s_dim), fitting))

    def _compare_presets(self, prefix, layer, param, s_param, s_sn) -> None:
        """Record a :class:`PresetMismatch` when the source's spectral norm on this weight ran
        another algorithm than the target's will."""
        target = self.adapter.sn_preset(layer, param)
        name = join_key(prefix, s_param)
        u = self.state_dict.get(s_sn["u"]) if "u" in s_sn else None
        u_shape = _shape(u) if _is_tensor(u) else None
        source, basis = self.source_presets.get(name) or _inferred_preset(s_sn["original"], self.source, u_shape)
        if target is not None and not same_algorithm(source, target):
            self.mismatches.append(PresetMismatch(join_key(prefix, param), source, target, basis))

    def _prepared(self, step: _Step, value) -> np.ndarray | None:
        """The array the write phase copies for ``step`` (in the target's layout), or None after
        recording why the source value cannot be loaded."""
        source_key = step.entry.source_key
        try:
            array = _source_numpy(value)
        except _Unloadable as e:
            self.problems.append(f"{source_key!r} {e}")
            return None
        except Exception as e:  # noqa: BLE001 - anything a framework raises while converting
            self.problems.append(f"{source_key!r} cannot be converted: {type(e).__name__}: {e}")
            return None
        why = None if self.allow_degenerate else _degenerate(array, step.entry.sn)
        if why is not None:
            self.problems.append(f"{source_key!r}: {why}; {DEGENERATE_HINT}")
            return None
        if step.entry.transposed:
            array = array.T
        if step.reshape:
            array = array.reshape(step.entry.shape)
        return array

    def _check_dtype(self, key, tensor, source_key, value) -> None:
        t_dtype, s_dtype = _dtype_name(tensor), _dtype_name(value)
        if "bfloat16" in (t_dtype, s_dtype):
            self.problems.append(f"{key!r}: bfloat16 is not supported (numpy has no bfloat16)")
        elif t_dtype != s_dtype:
            self.problems.append(
                f"dtype mismatch for {key!r}: the target has {t_dtype}, the source {source_key!r} "
                f"has {s_dtype}"
            )

    def _check_orientations(self, prefix, layer, kind, layout, steps: list[_Step]) -> None:
        """Refuse u, v that belong to the transposed W-matrix of a square weight: the source
        normalized it along its other axis, which no shape check can see. After a power
        iteration u = N(W v) (and v = N(W^H u)) hold for the matrix they were computed with."""
        loaded: dict[str, dict[str, np.ndarray]] = {}
        for step in steps:
            if step.entry.sn in ("original", "u", "v") and step.array is not None and step.synth_from is None:
                loaded.setdefault(step.entry.param, {})[step.entry.sn] = step.array
        for param, arrays in loaded.items():
            info = self.adapter.sn_info(layer, param)
            if len(arrays) < 3 or info is None or info[0] is None:
                continue
            fits = _orientation_fits(arrays["original"], info[0], arrays["u"], arrays["v"], info[1])
            if fits is not None and _transposed_fits_better(*fits):
                self.problems.append(_orientation_problem(join_key(prefix, param), kind, layout, info[0], fits))

    def _no_source(self, prefix, kind, local, key, tensor, param, s_param, role, info, s_sn) -> None:
        """A target tensor with no source tensor: kept, computed, or missing."""
        shape = _shape(tensor)
        if kind == "batchnorm" and local == "num_batches_tracked" and self.source == "paddle":
            self.steps.append(_Step(Entry(key, None, shape, note="kept: Paddle has no counterpart"), tensor))
            return
        if role in ("u", "v", *EXTRA_ROLES) and "original" in s_sn and "u" not in s_sn and info:
            # The source normalizes the 1-D weight exactly (no u, v); the target treats it as an
            # (n x 1) matrix: start it at that norm's fixed point u = W / ||W||, v = [1]. The
            # extra pairs' fixed point is zero: an (n x 1) matrix has no second singular value.
            w_key = s_sn["original"]
            w = self.state_dict[w_key]
            n = _shape(w)[0] if _is_tensor(w) and len(_shape(w)) == 1 else None
            k = shape[0] if role in EXTRA_ROLES else None  # extra rows: (k, n) and (k, 1)
            fits = {"u": (n,), "v": (1,), "u_extra": (k, n), "v_extra": (k, 1)}[role]
            if n is not None and shape == fits and _dtype_name(w) == _dtype_name(tensor):
                entry = Entry(key, None, shape, sn=role, param=param,
                              note=f"fixed point of the exact norm of {w_key}")
                step = _Step(entry, tensor, synth_from=w_key, eps=info[1])
                step.array = self._fixed_point(step, w)
                self.steps.append(step)
                return
        if role == "sigma" and "original" in s_sn and info:
            # The target tracks sigma and the source does not: sigma of the loaded state.
            entry = Entry(key, None, shape, sn=role, param=param, note="computed: sigma of the loaded state")
            self.steps.append(_Step(entry, tensor, sigma_of=(self.layers[prefix], param)))
            return
        hint = ""
        if role in STATE_ROLES:
            hint = f" (the source has no spectral-norm state on {join_key(prefix, s_param)!r})"
        elif role == "" and s_sn:
            hint = f" (the source has spectral norm on {join_key(prefix, s_param)!r}; the target has none)"
        self.missing.append((key, f"missing in the source: {key!r}{hint}"))

    def _fixed_point(self, step: _Step, w) -> np.ndarray | None:
        """u, v (extra rows) at the fixed point of the exact norm of the 1-D weight ``w``."""
        try:
            w = _source_numpy(w)
        except Exception as e:  # noqa: BLE001 - the weight's own step records the problem
            if not isinstance(e, _Unloadable):
                self.problems.append(f"{step.synth_from!r} cannot be converted: {type(e).__name__}: {e}")
            return None
        if step.entry.sn in EXTRA_ROLES:
            return np.zeros(step.entry.shape, dtype=w.dtype)
        if step.entry.sn == "v":
            return np.ones(1, dtype=w.dtype)
        return (w / np.maximum(np.linalg.norm(w), np.asarray(step.eps, dtype=w.real.dtype))).astype(w.dtype)

    def _leftovers(self, kind, t_locals, s_locals) -> None:
        """Source tensors of this layer that are rightly left out (the rest is unexpected)."""
        for local, s_key in s_locals.items():
            if s_key in self.consumed:
                continue
            s_sn = sn_param_of(local, s_locals)
            if kind == "batchnorm" and local == "num_batches_tracked" and self.target_fw == "paddle":
                self.consumed.add(s_key)  # Paddle's BatchNorm has no step counter
            elif s_sn and s_sn[1] in STATE_ROLES:
                t_sn = sn_keys(t_locals, _rename(s_sn[0], kind, self.target_fw, self.source))
                if not t_sn:
                    continue  # no spectral norm there in the target: unexpected
                if s_sn[1] == "sigma":
                    # a tracked sigma the target does not track: every forward recomputes it
                    self.consumed.add(s_key)
                elif "u" not in t_sn and _is_1d_state(s_sn[1], _shape(self.state_dict[s_key])):
                    # u, v (extra rows) of an (n x 1) matrix norm where the target normalizes
                    # the same 1-D weight exactly and keeps no u, v.
                    self.consumed.add(s_key)


def _source_key(role: str, s_param: str, s_locals: dict[str, str], s_sn: dict[str, str]) -> str | None:
    """The source key that fills a target tensor of ``role`` on ``s_param``, or None."""
    if role == "":
        return s_locals.get(s_param)
    if role == "original":  # from spectral-norm state, or from a plain weight
        return s_sn.get("original", s_locals.get(s_param))
    return s_sn.get(role)


def _is_1d_state(role: str, shape: tuple[int, ...]) -> bool:
    """Whether state of ``role`` and ``shape`` can belong to an (n x 1) matrix norm of a 1-D
    weight: u, v are vectors, the extra rows (k, n) and (k, 1) matrices."""
    return len(shape) == (2 if role in EXTRA_ROLES else 1)
