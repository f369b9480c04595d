"""Move weights, and spectral-norm state, between PyTorch and PaddlePaddle models.

:func:`load_state_dict` is *target-driven*: it walks every parameter and buffer of the target
model (a ``torch.nn.Module`` or a ``paddle.nn.Layer``), finds the matching entry of the source
state dict, and converts it for the target layer's type:

* ``Linear`` weights are transposed between torch's ``[out, in]`` and ``paddle.nn.Linear``'s
  ``[in, out]`` (``paddle.compat.nn.Linear`` keeps torch's layout and is not transposed);
* BatchNorm ``running_mean`` / ``running_var`` <-> ``_mean`` / ``_variance`` (torch's
  ``num_batches_tracked`` has no Paddle counterpart: dropped going to Paddle, the target's own
  value kept coming from Paddle); InstanceNorm ``weight`` <-> ``scale``; PReLU ``weight`` <->
  ``_weight``; Bilinear bias ``[out]`` <-> ``[1, out]``; LayerNorm ``weight``/``bias`` of
  ``normalized_shape`` <-> flattened; Conv, ConvTranspose, GroupNorm and Embedding share their
  layouts;
* spectral-norm state in any flavour on either side - dualsn (any preset), the torch
  parametrization (``parametrizations.weight.original`` / ``.0._u`` / ``.0._v``), the older
  torch hook and the Paddle hook (``weight_orig`` / ``weight_u`` / ``weight_v``). u and v cross
  unchanged: dualsn's dim semantics make the W-matrix the same matrix in both frameworks (a
  ``paddle.nn.Linear`` is normalized along dim 1 of its ``[in, out]`` weight). A 1-D weight
  normalized exactly (no u, v; the torch preset) and one normalized as an (n x 1) matrix (the
  other presets) convert into each other: u, v are dropped, or set to their fixed point
  ``u = W / ||W||``, ``v = [1]``;
* the state of dualsn's opt-in features: the extra pairs of ``num_svs > 1`` (torch
  ``.0._u_extra`` / ``.0._v_extra`` <-> Paddle ``weight_u_extra`` / ``weight_v_extra``; rows
  of W-matrix-space vectors like u, v, so unchanged) and the ``track_sigma`` buffer (``.0._sigma``
  <-> ``weight_sigma``). A ``_sigma`` the target tracks and the source does not is computed
  from the loaded state (the backend's ``sigma``); one the target does not track is dropped
  (it is recomputed by every forward). ``spectral_norm_conv``'s u, v (and extra rows) have
  the activation shapes of one output / input sample, the same in both frameworks, and cross
  unchanged; a convolution norm never pairs with a matrix norm (the "dim" check refuses it).

Loading is transactional: every pair is checked first (missing, unexpected, shape, dtype, the
spectral norm's axis), every source value is converted to the array that will be copied (byte
order, strides, sparse layout) or refused (meta tensors, Python objects, and by default NaN/Inf
values and all-zero u, v), and one :class:`PortError` lists every problem; when it is raised
the target is unchanged. A nested checkpoint is narrowed to the state dict that fits the
target (:func:`select_state_dict`: ``key``, ``strip_prefix``, the ``module.``/``_orig_mod.``
prefixes), and nested state dicts are flattened with dotted keys (:func:`flatten_state_dict`).

Presets: each spectral norm's preset in the source (dualsn's record in the file, the live
source model, or the key layout: torch parametrization -> "torch", the older torch hook ->
"torch_legacy", Paddle's hook -> "paddle") is compared with the target's; a different
algorithm warns (:class:`PresetMismatchWarning`) or, with ``strict_presets``, is refused.
:func:`describe` reports the flavour, preset, dim and sigma of every spectral norm of a
checkpoint.

:func:`torch_to_paddle` and :func:`paddle_to_torch` port between two live models, where each
source Linear's layout (and each spectral norm's dim) is known exactly. For a raw state dict,
:func:`load_state_dict` assumes each framework's native Linear and lets the target's layer type
decide; shape checks catch a mismatch.

:func:`load_checkpoint` reads ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) and
``.pdparams`` files (a restricted unpickler: nothing from the file is executed) without running
code from them: regular files only, the format decided by the content, never more tensor data
than the file's size, nested containers returned as written. :func:`save_checkpoint` writes
atomically, never replaces a file created meanwhile unless told to, and honours the umask.

This package imports neither framework at import time. What it asks of a model or a tensor
goes through the framework's adapter (:mod:`dualsn.adapters`); the two file formats are its own
(``_torchfile`` imports torch to read or write a torch file; ``.pdparams`` files need no Paddle).

Layout: ``_types`` (records and errors), ``_keys`` (state-dict key names, flavours, presets,
Linear layouts), ``_tensors`` (tensor helpers, source conversion), ``_orientation`` (which
matrix a spectral norm takes), ``_select`` (nested checkpoints), ``_plan`` (the plan of a
load), ``_models`` (loading and porting), ``_limits``, ``_metadata`` (dualsn's record in a
file), ``_pdparams`` and ``_torchfile`` (the file formats), ``_reader`` and ``_writer``
(checkpoint files), ``_describe`` (describing a checkpoint).
"""

from __future__ import annotations

# Public names, the module-level constants of the former dualsn/port.py, and the private
# names the tests use (_adapter, _to_numpy, _shape, _dtype_name, _split_key, _temp_owner).
from dualsn.adapters import FRAMEWORKS, framework_of  # noqa: F401
from dualsn.adapters import adapter as _adapter  # noqa: F401
from dualsn.port._describe import CheckpointDescription, SNLayerDescription, describe
from dualsn.keys import FLAVOURS, STATE_ROLES, split_key as _split_key  # noqa: F401
from dualsn.layout import IN_OUT, OUT_IN  # noqa: F401
from dualsn.port._keys import PRESET_NAMES  # noqa: F401
from dualsn.port._limits import MAX_NESTING, SIZE_SLACK  # noqa: F401
from dualsn.port._metadata import METADATA_ATTRIBUTE, METADATA_FORMAT, checkpoint_metadata  # noqa: F401
from dualsn.port._models import load_state_dict, paddle_to_torch, port_model, presets_of, torch_to_paddle
from dualsn.port._orientation import ORIENTATION_TOL  # noqa: F401
from dualsn.port._plan import DEGENERATE_HINT  # noqa: F401
from dualsn.port._reader import PADDLE_SUFFIXES, TORCH_SUFFIXES, detect_format, load_checkpoint  # noqa: F401
from dualsn.port._select import WRAPPER_PREFIXES, Selection, flatten_state_dict, select_state_dict  # noqa: F401
from dualsn.port._tensors import _dtype_name, _shape, _to_numpy  # noqa: F401
from dualsn.port._types import CheckpointError, Entry, PortError, PortReport, PresetMismatch, PresetMismatchWarning
from dualsn.port._writer import STALE_TEMP_SECONDS, TEMP_SUFFIX, _temp_owner, save_checkpoint  # noqa: F401

__all__ = [
    "load_state_dict",
    "torch_to_paddle",
    "paddle_to_torch",
    "port_model",
    "load_checkpoint",
    "save_checkpoint",
    "detect_format",
    "flatten_state_dict",
    "framework_of",
    "select_state_dict",
    "describe",
    "presets_of",
    "checkpoint_metadata",
    "Entry",
    "PortReport",
    "Selection",
    "PresetMismatch",
    "CheckpointDescription",
    "SNLayerDescription",
    "PortError",
    "CheckpointError",
    "PresetMismatchWarning",
]
