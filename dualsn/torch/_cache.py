"""What a spectral norm keeps between forwards: the eval-mode cache of the normalized weight
(:class:`_EvalCache`) and the sigma of the last forward (:class:`_SigmaRecord`), both checked
on every use against what they were computed from.

The functions below take the :class:`~dualsn.torch.SpectralNorm` itself (``sn``): they read its
plain attributes, its buffers and its ``_sigma_of`` / ``_divide_by``, and write its ``_cache``
and ``_record``.
"""

from __future__ import annotations

import torch

from dualsn import keys as _keys
from dualsn.torch import _dtypes
from dualsn.torch._grad import _divided

_U, _V = _keys.buffer_name("u"), _keys.buffer_name("v")  # the SN object's u, v buffers

_SAMPLE_RUNS, _RUN_LENGTH = 32, 8
"""Entries of W compared on every cache hit (see :class:`_Sample`): 32 runs of 8
consecutive ones, 256 in all."""


class _Sample:
    """Entries of W at the flat positions ``index``, kept to tell whether W changed where
    its version counter cannot see (writes through ``.data``).

    For a contiguous CPU W of a dtype numpy has, through a numpy view of W's memory (held:
    it cannot be reused), compared by bytes: one gather and one memcmp, against two tensor
    ops (``take``, ``equal``) at about 2 us each. Bytes, not values: an unchanged NaN then
    counts as unchanged, a 0.0 written over -0.0 as a change (a recompute). Elsewhere (GPU,
    bfloat16, a strided W) by value, with ``take`` and ``equal``."""

    __slots__ = ("index", "host", "host_index", "values")

    def __init__(self, weight: torch.Tensor, index: torch.Tensor) -> None:
        self.index = index
        self.host = _host_flat(weight)
        if self.host is not None:
            self.host_index = index.numpy()
            self.values = self.host[self.host_index].tobytes()
        else:
            self.host_index = None
            self.values = torch.take(weight, index)

    def unchanged(self, weight: torch.Tensor) -> bool:
        if self.host is not None:
            return self.host[self.host_index].tobytes() == self.values
        return torch.equal(torch.take(weight, self.index), self.values)


def _host_flat(weight: torch.Tensor):
    """A flat numpy view of a contiguous CPU ``weight``'s memory, or None (another device,
    strides, a dtype numpy lacks, compiling)."""
    if not weight.is_cpu or _dtypes._is_compiling() or not weight.is_contiguous():
        return None
    try:
        return weight.detach().numpy().reshape(-1)
    except (RuntimeError, TypeError):  # bfloat16; a conjugate or negative view
        return None


def _sample_index(weight: torch.Tensor) -> torch.Tensor:
    """Where :class:`_EvalCache` and :class:`_SigmaRecord` sample W: every entry of a small W,
    else 32 runs of 8 consecutive entries (flat order), evenly spread, the first and the last
    entry included (integer arithmetic: exact for any size). Runs, not 256 single entries:
    a hit then touches 32 cache lines and pages of W instead of 256 (measured in one
    process: a 1024 x 1024 eval forward's overhead 45 -> 28 % of the plain one)."""
    n = weight.numel()
    if n <= _SAMPLE_RUNS * _RUN_LENGTH:
        return torch.arange(n, device=weight.device)
    starts = torch.arange(_SAMPLE_RUNS, device=weight.device) * (n - _RUN_LENGTH) // (_SAMPLE_RUNS - 1)
    return (starts[:, None] + torch.arange(_RUN_LENGTH, device=weight.device)).reshape(-1)


class _SigmaRecord:
    """The sigma of the last forward, and what it was computed from: :func:`sigma` returns it
    while it is valid, by the checks of :class:`_EvalCache` (same W, u, v objects, W's
    storage, version counters, the 256 sampled entries of W). Once :func:`sigma` has been read, one
    is made on every training forward, so it holds no output and costs one small gather."""

    __slots__ = ("weight", "u", "v", "storage", "key", "sample", "sigma")

    def __init__(self, weight, u, v, sigma, index) -> None:
        self.weight, self.u, self.v, self.sigma = weight, u, v, sigma
        self.storage = weight.untyped_storage()  # held: its address cannot be reused
        self.sample = _Sample(weight, index)
        self.key = _state_key(weight, u, v)

    def valid(self, weight, u, v) -> bool:
        return (
            weight is self.weight
            and u is self.u
            and v is self.v
            and _state_key(weight, u, v) == self.key
            and self.sample.unchanged(weight)
        )


def _state_key(weight, u, v) -> tuple:
    """What the version counters and W's memory say of W, u, v."""
    return (weight._version, weight.data_ptr(), weight.shape, weight.stride(), u._version, v._version)


class _EvalCache(_SigmaRecord):
    """The normalized weight of the last eval forward, and what it was computed from.

    It is valid while W, u and v are unchanged, which :meth:`valid` checks on every use:

    * W, u, v are the same tensor objects, W with the same data pointer, shape and strides
      (W's storage is held here, so its address cannot be reused by another tensor);
    * their version counters did not move: every tracked in-place change bumps them
      (optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``);
    * 256 entries of W (:func:`_sample_index`) are unchanged by value: writes through
      ``.data`` bypass the version counter, and this catches whole-tensor ones such as an
      EMA of the weights written through ``.data`` (u and v written through ``.data`` while
      W is not changed are not seen: set ``cache_eval = False`` for such code, or call
      :func:`invalidate_cache`);
    * the returned tensor's own version counter did not move (the caller did not modify it).

    The check is kept to a few attribute reads and one comparison of the sample on purpose:
    an eval forward streams W through the CPU caches, so everything here runs cache-cold. On
    the CPU the sample is read through a numpy view of W's memory and compared by its bytes
    (:class:`_Sample`); elsewhere with two tensor ops.
    """

    __slots__ = ("out", "out_version")

    def __init__(self, weight, u, v, sigma) -> None:
        super().__init__(weight, u, v, sigma, _sample_index(weight))
        self.out = self.out_version = None

    @property
    def index(self) -> torch.Tensor:
        """The sampled flat positions of W."""
        return self.sample.index

    def valid(self, weight, u, v) -> bool:
        """Whether the cached sigma (and output, if any) still belong to ``weight``, u, v."""
        out = self.out
        return super().valid(weight, u, v) and (out is None or out._version == self.out_version)

    def set_output(self, out) -> None:
        self.out, self.out_version = out, out._version


def remember(sn, weight: torch.Tensor, sigma: torch.Tensor) -> None:
    """Keep ``sigma`` as ``sn``'s last sigma, with what it was computed from (a
    :class:`_SigmaRecord`). On every training forward: kept lean."""
    attrs = sn.__dict__  # plain attributes, written around nn.Module.__setattr__ (slow)
    u, v = sn._buffers[_U], sn._buffers[_V]
    if _dtypes._is_compiling() or weight.is_inference() or u.is_inference() or v.is_inference():
        attrs["_record"] = None  # no version counters to check it by
        return
    index = attrs.get("_sample_index")
    if index is None or index.device != weight.device or attrs["_sample_numel"] != weight.numel():
        index = attrs["_sample_index"] = _sample_index(weight)
        attrs["_sample_numel"] = weight.numel()
    attrs["_record"] = _SigmaRecord(weight, u, v, sigma, index)


def kept_sigma(sn, weight: torch.Tensor):
    """The sigma ``sn`` keeps for ``weight`` (its record's, or its eval cache's) while it is
    still valid, else None."""
    u, v = sn._u, sn._v
    for kept in (sn._record, sn._cache):
        if kept is not None and kept.valid(weight, u, v):
            return kept.sigma
    return None


def cached_output(sn, weight: torch.Tensor):
    """The eval cache's normalized weight when it may be returned as it is (eval, no graph to
    record, nothing changed), else None."""
    cache = sn._cache
    if (
        cache is not None
        and cache.out is not None
        and sn.cache_eval
        and not sn.training
        and not _dtypes._is_compiling()
        and not (torch.is_grad_enabled() and weight.requires_grad)
        and cache.valid(weight, sn._buffers[_U], sn._buffers[_V])
    ):
        return cache.out
    return None


def eval_forward(sn, weight: torch.Tensor):
    """(normalized weight, sigma) of an eval forward of ``sn``, through the eval cache when
    allowed."""
    u, v = sn._u, sn._v
    cacheable = (
        sn.cache_eval
        and not _dtypes._is_compiling()
        and not (weight.is_inference() or u.is_inference() or v.is_inference())
    )
    if not cacheable:
        sigma = sn._sigma_of(weight)
        return sn._divide_by(weight, sigma), sigma
    cache = sn._cache
    if cache is None or not cache.valid(weight, u, v):
        # Built as normal tensors even in inference mode: their version counters can be
        # read, and sigma and the result stay usable where autograd records later.
        with torch.inference_mode(False), torch.no_grad():
            cache = sn._cache = _EvalCache(weight, u, v, sn._sigma_of(weight))
    if torch.is_grad_enabled() and weight.requires_grad:
        # autograd needs a graph from W: reuse sigma only
        return sn._divide_by(weight, cache.sigma), cache.sigma
    with torch.inference_mode(False), torch.no_grad():
        out = _divided(weight, cache.sigma, sn.spec)
    cache.set_output(out)
    return out, cache.sigma
