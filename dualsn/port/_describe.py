"""Describing a checkpoint: flavour, presets, spectral norms, sigma (numpy only)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from dualsn.spec import DEFAULT_EPS
from dualsn.keys import flavour, group_keys, join_key, sn_keys, sn_param_of
from dualsn.port._keys import _inferred_preset
from dualsn.port._metadata import checkpoint_metadata
from dualsn.port._orientation import ORIENTATION_TOL, _orientation_fits
from dualsn.port._reader import detect_format, load_checkpoint
from dualsn.port._select import flatten_state_dict, select_state_dict
from dualsn.port._tensors import _is_tensor, _shape, _source_numpy


@dataclass(frozen=True)
class SNLayerDescription:
    """One spectral norm in a checkpoint. ``name``: the weight it normalizes
    (``"conv1.weight"``); ``flavour``: :data:`FLAVOURS`; ``preset`` and ``preset_basis``
    (``"recorded by dualsn 0.1.0"`` or ``"inferred from ... keys"``); ``shape`` of W;
    ``dim`` (None: a convolution operator norm, or no axis fits u and v) and ``dim_basis``;
    ``sigma``: u^H M v from the stored W, u, v (M the W-matrix along ``dim``; ``||W||`` for a
    1-D weight normalized exactly; a convolution norm's tracked sigma, else None); ``keys``:
    role -> key in the checkpoint."""

    name: str
    flavour: str
    preset: str
    preset_basis: str
    shape: tuple[int, ...]
    dim: int | None
    dim_basis: str
    sigma: float | None
    keys: dict = field(default_factory=dict, compare=False)


@dataclass
class CheckpointDescription:
    """What :func:`describe` found. ``framework``: ``"torch"`` or ``"paddle"``; ``flavour``:
    one of :data:`FLAVOURS`, ``"mixed"`` or ``"none"`` (no spectral norm); ``layers``: one
    :class:`SNLayerDescription` per spectral norm; ``metadata``: dualsn's record, if the file
    has one; ``key``: the entry described (``""``: the whole checkpoint); ``tensors``: how many
    tensors it holds."""

    path: str | None
    framework: str
    flavour: str
    layers: list[SNLayerDescription]
    metadata: dict | None = None
    key: str = ""
    tensors: int = 0

    @property
    def presets(self) -> dict[str, str]:
        return {layer.name: layer.preset for layer in self.layers}

    def summary(self) -> str:
        where = (self.path or "state dict") + (f" [{self.key}]" if self.key else "")
        flavour = "no spectral norm" if self.flavour == "none" else f"flavour {self.flavour}"
        presets = sorted(set(self.presets.values()))
        how = ("recorded by dualsn" if self.metadata and "presets" in self.metadata else "inferred from the keys")
        text = f"{where}: {self.framework} checkpoint, {self.tensors} tensors, {flavour}"
        if self.layers:
            text += f", {len(self.layers)} spectral norm(s), preset {'/'.join(presets)} ({how})"
        return text

    def __str__(self) -> str:
        lines = [self.summary()]
        if not self.layers:
            return lines[0]
        rows = [("layer", "flavour", "preset", "dim", "shape", "sigma")]
        for layer in self.layers:
            rows.append((
                layer.name, layer.flavour,
                layer.preset + (" (recorded)" if layer.preset_basis.startswith("recorded") else ""),
                "conv" if layer.dim is None and layer.dim_basis.startswith("convolution") else
                ("?" if layer.dim is None else str(layer.dim) + ("?" if "ambiguous" in layer.dim_basis else "")),
                "x".join(str(n) for n in layer.shape),
                "-" if layer.sigma is None else f"{layer.sigma:.6g}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if i and j >= 3 else c.ljust(w)
                                   for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if any("ambiguous" in layer.dim_basis for layer in self.layers):
            lines.append("?: a square W-matrix whose u and v fit both axes (not iterated yet?): dim assumed")
        return "\n".join(lines)


def _wide(array: np.ndarray) -> np.ndarray:
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)


def _w_matrix(w: np.ndarray, dim: int) -> np.ndarray:
    return np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1) if w.ndim > 1 else w.reshape(-1, 1)


def _infer_dim(w: np.ndarray, u, v) -> tuple[int | None, str]:
    """The axis the spectral norm takes W along, from the shapes of u, v; for a square
    W-matrix, the orientation they fit (after any power iteration u = N(M v), v = N(M^H u))."""
    if u is None:
        return 0, "1-D weight normalized exactly"
    if u.ndim != 1 or v is None or v.ndim != 1:
        return None, "convolution operator norm (u, v are activations)"
    axes = [d for d in range(max(w.ndim, 1)) if w.shape[d] == u.size and w.size // max(w.shape[d], 1) == v.size]
    if not axes:
        return None, f"unknown: u {list(u.shape)} and v {list(v.shape)} fit no axis of W {list(w.shape)}"
    if len(axes) == 1:
        return axes[0], "from the shapes of u and v"
    fits = {d: _orientation_fits(w, d, u, v, DEFAULT_EPS) for d in axes}
    residual = {d: min(f) if f else math.inf for d, f in fits.items()}
    best = min(axes, key=lambda d: residual[d])
    others = [residual[d] for d in axes if d != best]
    if residual[best] <= ORIENTATION_TOL and all(r > 100 * max(residual[best], DEFAULT_EPS) for r in others):
        return best, "from u and v (a square W-matrix: the orientation they fit)"
    return axes[0], f"ambiguous: u and v fit dims {axes} alike (a square W-matrix); {axes[0]} assumed"


def _sigma_of(w: np.ndarray, dim: int | None, u, v, tracked) -> float | None:
    if dim is None:  # a convolution operator norm: sigma needs the layer's geometry
        return None if tracked is None else float(np.real(np.asarray(tracked)).reshape(-1)[0])
    w = _wide(w)
    if u is None:
        return float(np.linalg.norm(w))
    m = _w_matrix(w, dim)
    return float(np.real(np.vdot(_wide(u), m @ _wide(v))))


def describe(checkpoint, *, key: str | None = None, strip_prefix: str | None = None,
             source: str | None = None) -> CheckpointDescription:
    """Describe the spectral norms in ``checkpoint``: a path (read with :func:`load_checkpoint`)
    or a mapping (a state dict, or what ``load_checkpoint`` returned).

    The framework is the file's format, or the tensors' type (numpy arrays: ``"paddle"``, as
    ``load_checkpoint`` reads ``.pdparams`` files; pass ``source`` to say otherwise). Each
    spectral norm's flavour is its key layout (:data:`FLAVOURS`); its preset is the one dualsn
    recorded in the file, else inferred: torch parametrization -> ``"torch"``, the older torch
    hook -> ``"torch_legacy"``, Paddle's hook -> ``"paddle"``. (The keys cannot tell a
    dualsn.torch model built with another ``compat`` from torch's built-in, nor a dualsn.paddle
    model from Paddle's: files dualsn wrote say so, others are inferred.) ``key`` and
    ``strip_prefix`` pick an entry as in :func:`select_state_dict`; without ``key`` every
    spectral norm in the checkpoint is described, named by its full dotted key. sigma is u^H M
    v of the stored state, computed in float64 with numpy.
    """
    path = None
    if not isinstance(checkpoint, Mapping):
        path = os.fsdecode(checkpoint)
        framework = detect_format(checkpoint)
        checkpoint = load_checkpoint(checkpoint)
    meta = checkpoint_metadata(checkpoint)
    if key is not None or strip_prefix:
        selection = select_state_dict(checkpoint, key=key, strip_prefix=strip_prefix)
        flat, chosen = selection.state, selection.key
        meta_layers = meta if (meta and not chosen and not selection.stripped) else None
    else:
        flat, chosen, meta_layers = flatten_state_dict(checkpoint), "", meta
    if path is None:
        kinds = {type(v).__module__.split(".")[0] for v in flat.values() if _is_tensor(v)}
        framework = source or ("torch" if kinds == {"torch"} else "paddle")
    recorded = _Recorded((meta_layers or {}).get("presets", {}), (meta_layers or {}).get("dims", {}),
                         (meta or {}).get("version", "?"))
    layers = []
    for prefix, locals_ in group_keys(flat).items():
        for local, full in locals_.items():
            sn = sn_param_of(local, locals_)
            if not sn or sn[1] != "original":
                continue
            keys = {"original": full, **{r: k for r, k in sn_keys(locals_, sn[0]).items() if r != "original"}}
            layer = _describe_layer(flat, join_key(prefix, sn[0]), keys, framework, recorded)
            if layer is not None:
                layers.append(layer)
    flavours = {layer.flavour for layer in layers}
    overall = flavours.pop() if len(flavours) == 1 else ("none" if not flavours else "mixed")
    tensors = sum(_is_tensor(v) for v in flat.values())
    return CheckpointDescription(path, framework, overall, layers, meta, chosen, tensors)


@dataclass(frozen=True)
class _Recorded:
    """What dualsn recorded in the file for the described entry: presets and dims by layer."""

    presets: dict
    dims: dict
    version: str


def _describe_layer(flat: dict, name: str, keys: dict[str, str], framework: str,
                    recorded: _Recorded) -> SNLayerDescription | None:
    """The description of the spectral norm on ``name`` whose state has ``keys`` (role ->
    key), or None when its W cannot be read."""
    full = keys["original"]
    u_value = flat.get(keys.get("u"))
    if name in recorded.presets:
        preset, basis = recorded.presets[name], f"recorded by dualsn {recorded.version}"
    else:
        preset, basis = _inferred_preset(full, framework, _shape(u_value) if _is_tensor(u_value) else None)
    arrays = {}
    for role, k in keys.items():
        value = flat[k]
        if _is_tensor(value):
            try:
                arrays[role] = _source_numpy(value)
            except Exception:  # noqa: BLE001 - a meta tensor, bfloat16: described without sigma
                pass
    w = arrays.get("original")
    if w is None:
        return None
    u, v = arrays.get("u"), arrays.get("v")
    if name in recorded.dims:
        dim = None if recorded.dims[name] == "conv" else int(recorded.dims[name])
        dim_basis = "convolution operator norm (recorded)" if dim is None else f"recorded by dualsn {recorded.version}"
    else:
        dim, dim_basis = _infer_dim(w, u, v)
    try:
        sigma = _sigma_of(w, dim, u, v, arrays.get("sigma"))
    except (ValueError, IndexError):
        sigma = None
    return SNLayerDescription(name, flavour(full, framework), preset, basis, tuple(w.shape), dim, dim_basis,
                              sigma, keys)
