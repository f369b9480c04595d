"""Loading a state dict into a model, and porting between two live models."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping

from dualsn.adapters import FRAMEWORKS, framework_of
from dualsn.adapters import adapter as _adapter
from dualsn.keys import group_keys, join_key, sn_param_of
from dualsn.port._keys import _check_preset
from dualsn.port._metadata import checkpoint_metadata
from dualsn.port._plan import _Planner
from dualsn.port._select import Selection, flatten_state_dict, select_state_dict
from dualsn.port._types import CheckpointError, PortError, PortReport, PresetMismatch, PresetMismatchWarning


def _load(target, state_dict, source, strict, progress, allow_degenerate=False, source_layouts=None,
          source_dims=None, source_presets=None, strict_presets=False, stacklevel=4):
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be a mapping, but got {type(state_dict).__name__}")
    if source not in FRAMEWORKS:
        raise ValueError(f"Expected source to be one of {FRAMEWORKS}, but got source={source!r}")
    try:
        state_dict = flatten_state_dict(state_dict)
    except ValueError as e:
        raise PortError([str(e)]) from None
    plan = _Planner(target, state_dict, source, source_layouts, source_dims, allow_degenerate, source_presets)
    problems = plan.problems
    if strict:
        problems = [m for _, m in plan.missing] + [u for _, u in plan.unexpected] + problems
    if strict_presets:
        problems = problems + [
            f"{m}: refused (strict_presets); build the target's spectral norm with compat={m.source!r}, "
            "or port without strict_presets to load it anyway" for m in plan.mismatches]
    if problems:
        raise PortError(problems)
    if plan.mismatches:  # before any write: a warnings filter that raises leaves the target unchanged
        warnings.warn(PresetMismatchWarning(_mismatch_message(plan.mismatches), plan.mismatches),
                      stacklevel=stacklevel)

    # Every value is converted and fits: from here on nothing can fail short of running out of
    # memory.
    report = PortReport(source=source, target=plan.target_fw)
    report.missing = [k for k, _ in plan.missing]
    report.unexpected = [k for k, _ in plan.unexpected]
    report.preset_mismatches = list(plan.mismatches)
    for step in progress(plan.steps) if progress is not None else plan.steps:
        if step.array is not None:
            plan.adapter.assign(step.target, step.array)
        report.entries.append(step.entry)
    for layer in plan.layers.values():
        plan.adapter.refresh(layer)
    for step in plan.steps:  # after every other tensor: sigma of the loaded W, u, v
        if step.sigma_of is not None:
            plan.adapter.store_sigma(*step.sigma_of, step.target)
    return report


def _mismatch_message(mismatches: list[PresetMismatch]) -> str:
    first = mismatches[0]
    return (f"{len(mismatches)} spectral norm(s) loaded into a different preset than the source's, so "
            "training will not continue step for step (eval outputs agree): "
            + "; ".join(str(m) for m in mismatches)
            + f". Build the target with compat={first.source!r} to continue the source's algorithm, or "
            "pass strict_presets=True (--strict-presets) to refuse such a port")


def _infer_source(state_dict: Mapping) -> str:
    try:
        values = flatten_state_dict(state_dict).values()
    except ValueError:  # _load reports why it cannot be flattened
        values = state_dict.values()
    kinds = {type(v).__module__.split(".")[0] for v in values} & set(FRAMEWORKS)
    if len(kinds) == 1:
        return kinds.pop()
    raise ValueError(
        "Cannot tell which framework wrote this state dict (its values are not all torch or all "
        "paddle tensors): pass source='torch' or source='paddle'"
    )


def load_state_dict(
    target,
    state_dict: Mapping[str, Any],
    *,
    source: str | None = None,
    strict: bool = True,
    progress: Callable[[list], Iterable] | None = None,
    allow_degenerate: bool = False,
    key: str | None = None,
    strip_prefix: str | None = None,
    strict_presets: bool = False,
    source_preset: str | Mapping[str, str] | None = None,
) -> PortReport:
    """Load ``state_dict``, written by the framework ``source``, into ``target``.

    ``target`` is a ``torch.nn.Module`` or a ``paddle.nn.Layer``; ``state_dict`` maps names to
    torch tensors, paddle tensors or numpy arrays (e.g. from :func:`load_checkpoint`). A nested
    checkpoint (a trainer's ``{"state_dict": ..., "optimizer": ...}``, ``{"netG": ...,
    "netD": ...}``, ``ema``/``G_ema`` entries, prefixed keys) is narrowed to one state dict
    first, by :func:`select_state_dict` with ``key`` and ``strip_prefix``; an ambiguous choice
    raises :class:`CheckpointError` listing the candidates. ``source`` is ``"torch"`` or
    ``"paddle"`` (inferred from the tensors when omitted; required for numpy arrays). Every
    target tensor is filled in place, converted for the target layer's type (see the module
    docstring). A source Linear weight is taken to be in its framework's native layout (torch
    ``[out, in]``, ``paddle.nn.Linear`` ``[in, out]``).

    With ``strict`` (the default) a target tensor missing from the source, or a source tensor
    with no place in the target, is an error; without it they are left alone and listed in the
    report. A shape or dtype mismatch is always an error, and so is a source value that cannot
    be converted (a meta tensor, Python objects) or u, v that belong to the transposed W-matrix
    of a square weight. Source values with NaN or Inf, and an all-zero u or v, are errors
    unless ``allow_degenerate``. Errors are collected first, every source value is converted
    before the first write, and all problems are raised together as one :class:`PortError`;
    the target is then unchanged.

    Presets: each source spectral norm's preset is the one dualsn recorded in the checkpoint
    (:func:`save_checkpoint`), else ``source_preset`` (one name for all, or ``{"conv.weight":
    name}``) when given, else inferred from its keys (torch parametrization -> ``"torch"``,
    the older torch hook -> ``"torch_legacy"``, Paddle's hook -> ``"paddle"``). A target
    spectral norm that runs another algorithm gets a :class:`PresetMismatchWarning` naming the
    layer and both presets (``torch_legacy`` and ``paddle`` are one algorithm); with
    ``strict_presets`` it is a problem of the :class:`PortError` instead. ``strict`` does not
    cover presets: loading across presets is a legitimate migration.

    ``progress`` optionally wraps the list of copy steps (e.g. ``tqdm``). Returns a
    :class:`PortReport`.
    """
    if not isinstance(state_dict, Mapping):
        return _load(target, state_dict, source, strict, progress, allow_degenerate)  # says why not
    selection, source = _selection(target, state_dict, source, key, strip_prefix)
    presets = _source_presets(state_dict, selection, source_preset)
    report = _load(target, selection.state, source, strict, progress, allow_degenerate,
                   source_presets=presets, strict_presets=strict_presets)
    report.key, report.stripped_prefix = selection.key, selection.stripped
    return report


def _selection(target, checkpoint: Mapping, source, key, strip_prefix) -> tuple[Selection, str]:
    """The state dict of ``checkpoint`` to load into ``target``, and the framework that wrote
    it (``source``, else dualsn's record, else the tensors' type)."""
    try:
        selection = select_state_dict(checkpoint, key=key, strip_prefix=strip_prefix, target=target)
    except CheckpointError:
        raise
    except ValueError as e:  # flattening: shared or cyclic mappings, colliding keys
        raise PortError([str(e)]) from None
    if source is None:
        recorded = checkpoint_metadata(checkpoint)
        source = recorded["framework"] if recorded and recorded.get("framework") in FRAMEWORKS else \
            _infer_source(selection.state)
    return selection, source


class _EveryLayer(dict):
    """source_presets for ``source_preset="name"``: the same (preset, basis) for every layer."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def get(self, key, default=None):
        return self.value


def _source_presets(checkpoint, selection: "Selection", source_preset):
    """layer -> (preset, basis) the caller stated, or dualsn recorded, for the selected state."""
    if isinstance(source_preset, str):
        return _EveryLayer((_check_preset(source_preset, "source_preset"), "stated by source_preset"))
    if isinstance(source_preset, Mapping):
        return {k: (_check_preset(v, f"source_preset[{k!r}]"), "stated by source_preset")
                for k, v in source_preset.items()}
    if source_preset is not None:
        raise TypeError(f"Expected source_preset to be a str or a mapping, but got {type(source_preset).__name__}")
    meta = checkpoint_metadata(checkpoint)
    if meta is None or selection.key or selection.stripped:
        return None
    basis = f"recorded by dualsn {meta.get('version', '?')}"
    return {k: (v, basis) for k, v in meta.get("presets", {}).items()}


def _sn_params(model):
    """(adapter, layer, layer prefix, parameter name) of every spectral norm in ``model``."""
    adapter = _adapter(framework_of(model))
    layers = adapter.layers(model)
    for prefix, locals_ in group_keys(adapter.state(model)).items():
        layer = layers.get(prefix)
        for local in locals_:
            sn = sn_param_of(local, locals_)
            if sn and sn[1] == "original" and layer is not None:
                yield adapter, layer, prefix, sn[0]


def presets_of(model) -> dict[str, str]:
    """``{"conv1.weight": preset}`` for every spectral norm in ``model`` (any flavour): dualsn's
    by its algorithm (``"torch"``; the legacy order is ``"torch_legacy"`` in torch and
    ``"paddle"`` in Paddle, one algorithm), the torch parametrization ``"torch"``, the older
    torch hook ``"torch_legacy"``, Paddle's hook ``"paddle"``. :func:`save_checkpoint` records
    this in the file."""
    found = {}
    for adapter, layer, prefix, param in _sn_params(model):
        preset = adapter.sn_preset(layer, param)
        if preset is not None:
            found[join_key(prefix, param)] = preset
    return found


def _linear_layouts(model) -> dict[str, str]:
    fw = framework_of(model)
    adapter = _adapter(fw)
    layouts = {}
    for prefix, layer in adapter.layers(model).items():
        kind, layout = adapter.layer_kind(layer)
        if kind == "linear":
            layouts[prefix] = layout
    return layouts


def _sn_dims(model) -> dict[tuple[str, str], int]:
    """(layer prefix, param) -> dim of every spectral norm in ``model``."""
    dims = {}
    for adapter, layer, prefix, param in _sn_params(model):
        info = adapter.sn_info(layer, param)
        if info is not None:
            dims[(prefix, param)] = info[0]
    return dims


def _port(source_model, target, expect_source: str, expect_target: str, strict, progress, allow_degenerate,
          strict_presets=False):
    if framework_of(source_model) != expect_source:
        raise TypeError(f"Expected the source to be a {expect_source} model")
    if framework_of(target) != expect_target:
        raise TypeError(f"Expected the target to be a {expect_target} model")
    state = _adapter(expect_source).state(source_model)
    presets = {k: (v, "of the source model") for k, v in presets_of(source_model).items()}
    return _load(
        target, state, expect_source, strict, progress, allow_degenerate,
        source_layouts=_linear_layouts(source_model), source_dims=_sn_dims(source_model),
        source_presets=presets, strict_presets=strict_presets, stacklevel=5,
    )


def port_model(source_model, target, *, strict: bool = True, progress=None,
               allow_degenerate: bool = False, strict_presets: bool = False) -> PortReport:
    """Copy the state of ``source_model`` into ``target``, each a torch or a Paddle model of
    the same architecture (the frameworks may be the same: then only spectral-norm flavours
    are converted). See :func:`torch_to_paddle`."""
    source = framework_of(source_model)
    return _port(source_model, target, source, framework_of(target), strict, progress, allow_degenerate,
                 strict_presets)


def torch_to_paddle(module, layer, *, strict: bool = True, progress=None,
                    allow_degenerate: bool = False, strict_presets: bool = False) -> PortReport:
    """Copy the state of the torch ``module`` into the Paddle ``layer`` (same architecture).

    Like :func:`load_state_dict`, but each source Linear's layout, each spectral norm's dim
    and each spectral norm's preset are read from ``module``, so nothing is assumed. A target
    spectral norm with another preset warns (:class:`PresetMismatchWarning`), or with
    ``strict_presets`` is refused.
    """
    return _port(module, layer, "torch", "paddle", strict, progress, allow_degenerate, strict_presets)


def paddle_to_torch(layer, module, *, strict: bool = True, progress=None,
                    allow_degenerate: bool = False, strict_presets: bool = False) -> PortReport:
    """Copy the state of the Paddle ``layer`` into the torch ``module`` (same architecture).

    Like :func:`load_state_dict`, but each source Linear's layout (``paddle.nn.Linear`` or
    ``paddle.compat.nn.Linear``), each spectral norm's dim and its preset are read from
    ``layer``.
    """
    return _port(layer, module, "paddle", "torch", strict, progress, allow_degenerate, strict_presets)
